"""The train step: one ``jax.jit`` boundary with explicit shardings and a donated state.

State is a plain dict pytree ``{"step", "params", "opt_state", "rng"}`` so that Orbax saves and
restores it onto any mesh. Batches are the typed containers of ``cosa_jax.train.batches``
(``SftBatch``, ``TwoRowBatch``: rows = 2 x pairs, chosen rows first, then rejected;
``SharedPromptBatch``: one row per pair), each field ``[grad_accum, rows, ...]``, sharded on
the rows axis over (data, fsdp) (``batch_shardings``); the step scans over the micro-batches,
sums fp32 gradients, averages them and applies one optimiser update. A non-finite loss or
gradient leaves the state untouched and is reported in the metrics, so the host can stop with
the last good state.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from cosa_jax import sharding as shd
from cosa_jax.models.config import LlamaConfig
from cosa_jax.models.llama import Params
from cosa_jax.train import logprobs, losses
from cosa_jax.train.batches import PAIR_KEYS, ROW_KEYS, Batch, TwoRowBatch

State = dict


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """What the step optimises; static under jit."""
    mode: str = "dpo"                 # "dpo" | "sft"
    beta: float = 0.1
    label_smoothing: float = 0.0
    loss_type: str = "sigmoid"
    precomputed_ref: bool = False     # batch carries ref_chosen_logps / ref_rejected_logps
    logps_chunk: int = 128
    save_logits: bool = False         # logprobs.chunked_target_logps: no logits recompute
    simpo_beta: float = 2.0
    simpo_gamma: float = 1.0
    orpo_lambda: float = 0.1
    margin_scale: float = 0.5         # score_margin: batch carries pair_score_gap
    grad_dtype: str = "float32"       # gradient accumulator and averaged gradients

    def __post_init__(self):
        if self.mode not in ("dpo", "sft"):
            raise ValueError(f"train.mode must be 'dpo' or 'sft', got {self.mode!r}")
        if why := losses.loss_type_error(self.loss_type):
            raise ValueError(f"dpo.loss_type: {why}")
        if self.grad_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"train.grad_dtype must be float32 or bfloat16, got {self.grad_dtype!r}")

    @property
    def needs_reference(self) -> bool:
        """DPO-family losses compare against a reference; SimPO and ORPO do not."""
        return self.mode == "dpo" and self.loss_type not in losses.REFERENCE_FREE

    @property
    def needs_score_gap(self) -> bool:
        return self.mode == "dpo" and self.loss_type == "score_margin"


def loss_and_metrics(params: Params, ref_params: Params | None, micro: Batch,
                     cfg: LlamaConfig, loss_cfg: LossConfig):
    """Scalar loss of one micro-batch and its metrics (batch means, TRL names)."""
    if loss_cfg.mode == "sft":
        logps = logprobs.row_logps(params, cfg, micro, loss_cfg.logps_chunk, loss_cfg.save_logits)
        loss, n_tokens = losses.sft_loss(logps, micro.labels)
        return loss, {"loss": loss, "logps/chosen": jnp.mean(jax.lax.stop_gradient(logps)),
                      "tokens/target": n_tokens.astype(jnp.float32)}
    pol_c, pol_r = logprobs.pair_logps(params, cfg, micro, loss_cfg.logps_chunk, loss_cfg.save_logits)
    lt, extra = loss_cfg.loss_type, {}
    if lt in losses.REFERENCE_FREE:
        len_c, len_r = logprobs.pair_lengths(micro)
        if lt == "simpo":
            per_pair, rew_c, rew_r = losses.simpo_loss(pol_c, pol_r, len_c, len_r,
                                                       beta=loss_cfg.simpo_beta,
                                                       gamma=loss_cfg.simpo_gamma)
        else:
            per_pair, rew_c, rew_r, nll = losses.orpo_loss(pol_c, pol_r, len_c, len_r,
                                                           lam=loss_cfg.orpo_lambda)
            extra["nll"] = jnp.mean(nll)
    else:
        if loss_cfg.precomputed_ref:
            ref_c, ref_r = micro.ref_chosen_logps, micro.ref_rejected_logps
        else:
            ref_c, ref_r = jax.lax.stop_gradient(
                logprobs.pair_logps(ref_params, cfg, micro, loss_cfg.logps_chunk))
        if lt == "score_margin":
            per_pair, rew_c, rew_r = losses.score_margin_dpo_loss(
                pol_c, pol_r, ref_c, ref_r, micro.pair_score_gap, beta=loss_cfg.beta,
                margin_scale=loss_cfg.margin_scale)
        else:
            per_pair, rew_c, rew_r = losses.dpo_loss(pol_c, pol_r, ref_c, ref_r, beta=loss_cfg.beta,
                                                     label_smoothing=loss_cfg.label_smoothing,
                                                     loss_type=lt)
    metrics = {**losses.dpo_metrics(per_pair, rew_c, rew_r, pol_c, pol_r), **extra}
    return jnp.mean(per_pair), metrics


def _narrowed(tree, cfg: LlamaConfig, keep: Callable = lambda w: w):
    """Leaves wider than ``cfg.compute_dtype`` cast to it; the others through ``keep``."""
    cdt = jnp.dtype(cfg.compute_dtype)
    return jax.tree.map(lambda w: w.astype(cdt) if w.dtype.itemsize > cdt.itemsize else keep(w),
                        tree)


def with_compute_layers(params: Params, cfg: LlamaConfig) -> Params:
    """``params`` with the decoder layers cast to the compute dtype, once per step.

    The layer loop would cast each fp32 master weight to bf16 anyway, in the forward and again
    in the backward, and again for every micro-batch; differentiating with respect to the bf16
    copy gives the bf16 weight gradients that PyTorch autocast accumulates (XLA may otherwise
    keep them in fp32 as excess precision: they agree to bf16 rounding, tested), and an
    8B-shaped step on a GPU sheds those re-casts (under fsdp the per-layer all-gathers also
    move bf16). Embedding and head keep their own casts: the embedding's gradient is a
    scatter-add that must stay fp32."""
    return {**params, "layers": _narrowed(params["layers"], cfg)}


def make_train_step(cfg: LlamaConfig, loss_cfg: LossConfig, tx: optax.GradientTransformation,
                    lr_schedule: Callable | None = None):
    """The pure step ``(state, ref_params, batch) -> (state, metrics)``."""

    def train_step(state: State, ref_params: Params | None, batch: Batch):
        params = state["params"]
        compute_params = with_compute_layers(params, cfg)
        # bfloat16: the accumulator and the averaged gradients that reach the optimiser stay
        # bf16 (8B: 16 GB instead of 32 for the gradient tree; the optimiser's fp32 moments and
        # master weights are untouched). float32: PyTorch's fp32 .grad buffers.
        gdt = jnp.dtype(loss_cfg.grad_dtype)
        grad_fn = jax.value_and_grad(
            lambda p, micro: loss_and_metrics(p, ref_params, micro, cfg, loss_cfg), has_aux=True)

        def accumulate(carry, micro):
            grads_acc, metrics_acc = carry
            (_, metrics), grads = grad_fn(compute_params, micro)
            grads_acc = jax.tree.map(lambda a, g: a + g.astype(gdt), grads_acc, grads)
            metrics_acc = jax.tree.map(jnp.add, metrics_acc, metrics)
            return (grads_acc, metrics_acc), None

        n_micro = batch.input_ids.shape[0]
        first = jax.tree.map(lambda x: x[0], batch)
        if n_micro == 1:
            # No fp32 accumulator to zero-fill and add into (two passes over the parameters).
            (_, metrics), grads = grad_fn(compute_params, first)
        else:
            metrics_shape = jax.eval_shape(lambda: grad_fn(compute_params, first)[0][1])
            zeros = (jax.tree.map(lambda p: jnp.zeros(p.shape, gdt), params),
                     jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), metrics_shape))
            (grads, metrics), _ = jax.lax.scan(accumulate, zeros, batch)
        grads = jax.tree.map(
            lambda g, p: (g.astype(jnp.float32) / n_micro).astype(
                p.dtype if gdt == jnp.float32 else gdt), grads, params)
        metrics = jax.tree.map(lambda m: m / n_micro, metrics)
        if "tokens/target" in metrics:
            metrics["tokens/target"] = metrics["tokens/target"] * n_micro

        grad_norm = optax.tree.norm(jax.tree.map(lambda g: g.astype(jnp.float32), grads))
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)

        def update(params, opt_state):
            updates, new_opt = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), new_opt

        # A branch rather than where(finite, new, old): the select made XLA copy every
        # parameter and optimiser moment each step (docs/design.md).
        new_params, new_opt = jax.lax.cond(finite, update, lambda p, o: (p, o),
                                           params, state["opt_state"])
        new_state = {
            "step": state["step"] + finite.astype(jnp.int32),
            "params": new_params,
            "opt_state": new_opt,
            "rng": state["rng"],
        }
        metrics["grad_norm"] = grad_norm
        metrics["nonfinite"] = 1.0 - finite.astype(jnp.float32)
        if lr_schedule is not None:
            metrics["lr"] = lr_schedule(state["step"])
        return new_state, metrics

    return train_step


def reference_params(params: Params, cfg: LlamaConfig) -> Params:
    """The frozen DPO reference, stored in the compute dtype when that is narrower.

    The forward casts every weight to ``cfg.compute_dtype`` before its first use (embedding
    rows, norms, layer matrices, the head), so with fp32 master weights and bf16 compute a bf16
    copy gives the reference log-probs bit for bit, at half the memory (8B: 16 GB instead of
    32) and without re-casting 8B weights on every micro-batch. Call it under ``jax.jit`` with
    the parameter shardings as ``out_shardings``."""
    return _narrowed(params, cfg, keep=jnp.copy)


# ------------------------------------------------------------------------- shardings
def micro_batch_sharding(mesh, ndim: int) -> NamedSharding:
    """``[grad_accum, rows, ...]``: rows over (data, fsdp)."""
    return NamedSharding(mesh, P(None, shd.LOGICAL_TO_MESH["batch"], *([None] * (ndim - 2))))


def batch_shardings(batch: Batch, mesh) -> Batch:
    """The batch's shardings, one rule per field, as the same container: the per-pair side
    values (``batches.PAIR_KEYS``) replicated (tiny, and a pair count need not divide the
    device count), every other field's rows over the rules table's ``batch`` axes; a field
    left None gets none. Takes a micro-batched batch (``to_micro_batches``) or its shapes."""
    return batch.replace(**{
        f.name: (None if (x := getattr(batch, f.name)) is None else
                 shd.replicated(mesh) if f.name in PAIR_KEYS else micro_batch_sharding(mesh, x.ndim))
        for f in dataclasses.fields(batch)})


def state_shardings(state_shapes: State, tx: optax.GradientTransformation, mesh) -> State:
    """Params by the rules table; optimiser moments like the params they track; scalars replicated."""
    param_sh = shd.param_shardings(state_shapes["params"], mesh)
    opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, state_shapes["opt_state"], param_sh,
                                   transform_non_params=lambda _: shd.replicated(mesh))
    return {"step": shd.replicated(mesh), "params": param_sh, "opt_state": opt_sh,
            "rng": shd.replicated(mesh)}


def init_state(params: Params, tx: optax.GradientTransformation, seed: int) -> State:
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
            "rng": jax.random.key_data(jax.random.key(seed))}


def jit_train_step(step_fn, mesh, state_sh: State, batch_example: Batch, with_ref: bool):
    """``jax.jit`` with explicit in/out shardings; the state (argument 0) is donated."""
    batch_sh = batch_shardings(batch_example, mesh)
    ref_sh = state_sh["params"] if with_ref else None
    return jax.jit(step_fn, in_shardings=(state_sh, ref_sh, batch_sh),
                   out_shardings=(state_sh, shd.replicated(mesh)), donate_argnums=(0,))


def to_micro_batches(batch: Batch, grad_accum: int) -> Batch:
    """Host batch ``[rows, ...]`` -> the same container ``[grad_accum, rows/grad_accum, ...]``,
    keeping each micro-batch's chosen rows paired with its rejected rows (a ``TwoRowBatch``'s
    row fields; prompt-shared rows are pairs already, per-pair values split like the pairs).
    The host-only ``index`` is dropped."""
    concatenated = isinstance(batch, TwoRowBatch)
    out = {"index": None}
    for field in dataclasses.fields(batch):
        key, x = field.name, getattr(batch, field.name)
        if key == "index" or x is None:
            continue
        if concatenated and key in ROW_KEYS:
            half = x.shape[0] // 2
            if half % grad_accum:
                raise ValueError(f"{half} pairs do not split into grad_accum={grad_accum} micro-batches")
            c = x[:half].reshape(grad_accum, half // grad_accum, *x.shape[1:])
            r = x[half:].reshape(grad_accum, half // grad_accum, *x.shape[1:])
            out[key] = np.concatenate([c, r], axis=1)
        else:
            if x.shape[0] % grad_accum:
                raise ValueError(f"batch of {x.shape[0]} rows does not split into "
                                 f"grad_accum={grad_accum} micro-batches")
            out[key] = x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:])
    return batch.replace(**out)
