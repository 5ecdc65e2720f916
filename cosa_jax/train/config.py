"""Training config: every key with its default, and validation with errors that name the key.

Config files in ``configs/`` start from ``default_config()`` and override what they need;
``python -m launch.train --config configs/X.py --config.train.lr=1e-6`` overrides from the
command line (ml_collections rejects unknown keys and wrong types there).
"""

from __future__ import annotations

import ml_collections

from cosa_jax.models.config import REMAT_POLICIES
from cosa_jax.train.data import truncation_error
# The losses (paper's, from other papers, ours): docs/objectives.md
from cosa_jax.train.losses import label_smoothing_error, loss_type_error

MODES = ("sft", "dpo")
GRAD_DTYPES = ("float32", "bfloat16")


class TrainConfigError(ValueError):
    """A training config value that cannot work; the message names the key."""


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.output_dir = "runs/default"

    c.model = ml_collections.ConfigDict()
    c.model.path = "embedded:smollm2-135m-instruct"   # HF dir, hub id, or embedded:NAME
    c.model.param_dtype = "float32"                    # master weights (+ optimiser state)
    c.model.compute_dtype = "bfloat16"
    c.model.attention_impl = "xla"                     # xla | cudnn | reference
    c.model.remat = "none"                             # none | full | dots | dots_with_no_batch_dims
                                                       # (what the backward recomputes; saves
                                                       # activations, see the memory plan)
    c.model.scan_layers = True                         # False: unrolled layer loop, longer compile

    c.data = ml_collections.ConfigDict()
    c.data.train = ""                                  # jsonl / parquet / save_to_disk dir / hub id
    c.data.train_split = "train"
    c.data.eval = ""                                   # optional dev pairs
    c.data.eval_split = "train"
    c.data.eval_pairs = 256
    c.data.truncation = "reference"                    # reference | none | error
    c.data.max_length = 640
    c.data.max_prompt_length = 512
    c.data.max_target_length = 128
    c.data.fixed_length = True                         # pad every batch to max_length (one row
                                                       # length; response windows: a few shapes)
    c.data.pad_multiple = 64                           # bucket size when fixed_length is False

    c.train = ml_collections.ConfigDict()
    c.train.mode = "dpo"                               # sft | dpo
    c.train.epochs = 3
    c.train.max_steps = -1                             # > 0 overrides epochs
    c.train.batch_size = 32                            # global, in pairs (dpo) or examples (sft)
    c.train.grad_accum = 4
    c.train.lr = 5e-7
    c.train.warmup_steps = 150
    c.train.schedule = "constant"                      # constant | cosine
    c.train.clip_norm = 10.0
    c.train.rmsprop_decay = 0.99
    c.train.rmsprop_eps = 1e-8
    c.train.weight_decay = 0.0
    c.train.logps_chunk = 128
    c.train.save_logits = False                        # keep the window logits for the backward:
                                                       # one vocab matmul less, fp32 logits of the
                                                       # whole window held (no logps_chunk then)
    c.train.grad_dtype = "float32"                     # float32 | bfloat16: gradient accumulator
                                                       # and averaged gradients (8B: 32 -> 16 GB)
    c.train.device_memory_gb = 0.0                     # per device; 0 = ask the device
                                                       # (memory_stats), none on CPU = no check
    c.train.memory_headroom = 0.95                     # fraction of it the step may plan to use
    c.train.log_every = 1
    c.train.eval_every = 0                             # optimiser steps; 0 = only at the end
    c.train.shuffle = True

    c.dpo = ml_collections.ConfigDict()
    c.dpo.beta = 0.1
    c.dpo.label_smoothing = 0.0
    c.dpo.loss_type = "sigmoid"                        # sigmoid | ipo | hinge | score_margin
                                                       # | simpo | orpo (docs/objectives.md)
    c.dpo.margin_scale = 0.5                           # score_margin: offset per unit of
                                                       # rejected - chosen category-error score
    c.dpo.simpo_beta = 2.0                             # simpo (SimPO's beta, not dpo.beta)
    c.dpo.simpo_gamma = 1.0                            # simpo target margin (gamma/beta = 0.5)
    c.dpo.orpo_lambda = 0.1                            # orpo weight of the odds-ratio term
    c.dpo.precompute_ref = False                       # reference log-probs once, cached on
                                                       # disk: no reference weights resident
    c.dpo.share_prompt = False                         # one row per pair: the prompt runs once

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (1, -1, 1)                          # (data, fsdp, tensor); -1 = the rest

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.dir = ""                              # default: <output_dir>/checkpoints
    c.checkpoint.every = 100
    c.checkpoint.keep = 2
    c.checkpoint.async_save = True

    c.export = ml_collections.ConfigDict()
    c.export.hf_dir = ""                               # default: <output_dir>/hf
    c.export.dtype = ""                                # default: the parameter dtype

    c.distributed = ml_collections.ConfigDict()
    c.distributed.initialize = "auto"                  # auto | yes | no (cosa_jax.distributed)
    c.distributed.coordinator_address = ""             # host:port; else JAX_COORDINATOR_ADDRESS,
                                                       # else JAX's Slurm / TPU detection
    c.distributed.num_processes = 0                    # 0: JAX_NUM_PROCESSES or detected
    c.distributed.process_id = -1                      # -1: JAX_PROCESS_ID or detected
    c.distributed.timeout_s = 300                      # waiting for the other processes
    return c


def validate(c: ml_collections.ConfigDict) -> None:
    """Raise TrainConfigError naming the first bad key."""
    def bad(key, why):
        raise TrainConfigError(f"config key {key}: {why}")

    if c.train.mode not in MODES:
        bad("train.mode", f"{c.train.mode!r} is not one of {MODES}")
    if not c.data.train:
        bad("data.train", "no training data given (a jsonl/parquet file, a dataset dir or hub id)")
    if not c.model.path:
        bad("model.path", "no model given")
    if why := truncation_error(c.data.truncation):
        bad("data.truncation", why)
    for key in ("train.batch_size", "train.grad_accum", "data.max_length", "data.max_prompt_length",
                "train.logps_chunk", "checkpoint.keep", "train.log_every"):
        section, name = key.split(".")
        if int(c[section][name]) <= 0:
            bad(key, f"must be positive, got {c[section][name]}")
    if c.train.batch_size % c.train.grad_accum:
        bad("train.batch_size", f"{c.train.batch_size} is not divisible by train.grad_accum="
                                f"{c.train.grad_accum}")
    if c.train.lr <= 0:
        bad("train.lr", f"must be > 0, got {c.train.lr}")
    if c.train.warmup_steps < 0:
        bad("train.warmup_steps", "must be >= 0")
    if c.train.max_steps <= 0 and c.train.epochs <= 0:
        bad("train.epochs", "set train.epochs > 0 or train.max_steps > 0")
    if c.data.max_prompt_length > c.data.max_length:
        bad("data.max_prompt_length", "is larger than data.max_length")
    if c.dpo.beta <= 0:
        bad("dpo.beta", f"must be > 0, got {c.dpo.beta}")
    if why := loss_type_error(c.dpo.loss_type):
        bad("dpo.loss_type", why)
    if c.dpo.simpo_beta <= 0:
        bad("dpo.simpo_beta", f"must be > 0, got {c.dpo.simpo_beta}")
    for key in ("dpo.simpo_gamma", "dpo.orpo_lambda", "dpo.margin_scale"):
        section, name = key.split(".")
        if c[section][name] < 0:
            bad(key, f"must be >= 0, got {c[section][name]}")
    if c.dpo.label_smoothing and c.dpo.loss_type != "sigmoid":
        bad("dpo.label_smoothing", f"applies to dpo.loss_type='sigmoid' only, not "
                                   f"{c.dpo.loss_type!r}")
    if c.train.grad_dtype not in GRAD_DTYPES:
        bad("train.grad_dtype", f"{c.train.grad_dtype!r} is not one of {GRAD_DTYPES}")
    if c.model.remat not in REMAT_POLICIES:
        bad("model.remat", f"{c.model.remat!r} is not one of {REMAT_POLICIES}")
    if c.train.device_memory_gb < 0:
        bad("train.device_memory_gb", "must be >= 0 (0 = ask the device)")
    if not 0 < c.train.memory_headroom <= 1:
        bad("train.memory_headroom", f"must be in (0, 1], got {c.train.memory_headroom}")
    if why := label_smoothing_error(c.dpo.label_smoothing):
        bad("dpo.label_smoothing", why)
    if len(tuple(c.mesh.shape)) != 3:
        bad("mesh.shape", f"must be (data, fsdp, tensor), got {tuple(c.mesh.shape)}")
    if list(c.mesh.shape).count(-1) > 1:
        bad("mesh.shape", "at most one axis may be -1")
    if c.checkpoint.every < 0:
        bad("checkpoint.every", "must be >= 0 (0 = only at the end)")
    if c.distributed.initialize not in ("auto", "yes", "no"):
        bad("distributed.initialize", "must be auto, yes or no")
    if c.distributed.num_processes < 0:
        bad("distributed.num_processes", "must be >= 0 (0 = from the environment)")
    if c.distributed.num_processes and not -1 <= c.distributed.process_id < c.distributed.num_processes:
        bad("distributed.process_id", f"{c.distributed.process_id} is not in "
                                      f"[0, distributed.num_processes={c.distributed.num_processes})")


def resolve_mesh_shape(shape, n_devices: int) -> tuple[int, int, int]:
    """Replace a -1 in (data, fsdp, tensor) by whatever uses up the devices."""
    shape = [int(s) for s in shape]
    if -1 in shape:
        known = 1
        for s in shape:
            if s != -1:
                known *= s
        if n_devices % known:
            raise TrainConfigError(f"config key mesh.shape: {tuple(shape)} does not divide "
                                   f"{n_devices} devices")
        shape[shape.index(-1)] = n_devices // known
    return tuple(shape)


# One-line docs for `--help` of the keys whose line in default_config() carries no comment.
KEY_DOCS = {
    "seed": "seeds the data order (and anything else random)",
    "output_dir": "checkpoints, metrics, curves and the HF export go here",
    "model.compute_dtype": "activation / matmul dtype",
    "data.train_split": "split of a dataset dir or hub id to train on",
    "data.eval_split": "split of data.eval",
    "data.eval_pairs": "dev pairs scored at each eval (first N)",
    "data.max_length": "longest prompt + response, in tokens",
    "data.max_prompt_length": "longest prompt kept (truncation per data.truncation)",
    "data.max_target_length": "longest response kept when the prompt is truncated",
    "train.epochs": "passes over the training data (unless train.max_steps > 0)",
    "train.grad_accum": "micro-batches per optimiser step (divides batch_size)",
    "train.lr": "peak learning rate (RMSprop, as the paper)",
    "train.warmup_steps": "linear warm-up steps",
    "train.clip_norm": "global gradient-norm clip",
    "train.rmsprop_decay": "RMSprop second-moment decay",
    "train.rmsprop_eps": "RMSprop epsilon",
    "train.weight_decay": "decoupled weight decay",
    "train.logps_chunk": "tokens per chunk of the vocab projection when summing log-probs",
    "train.log_every": "optimiser steps between metrics lines",
    "train.shuffle": "shuffle the pairs each epoch (seeded)",
    "dpo.beta": "DPO temperature beta",
    "dpo.label_smoothing": "conservative-DPO label smoothing, in [0, 0.5)",
    "dpo.precompute_ref": "score the reference model once before training",
    "checkpoint.every": "optimiser steps between checkpoints (0 = only at the end)",
    "checkpoint.keep": "checkpoints kept",
    "checkpoint.async_save": "write checkpoints in the background",
}
