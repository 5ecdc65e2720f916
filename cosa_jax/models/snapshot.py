"""A Llama-3.1 checkpoint with seeded random weights, in the hub's snapshot layout.

The real Llama-3.1-8B-Instruct is gated; runs and tests that need "a Llama-3.1 checkpoint"
(its shapes, its tokenizer, its file layout) use this instead::

    python -m cosa_jax.models.snapshot --shape llama-3.1-8b --out DIR [--seed N] [--meta-only]
    python -m cosa_jax.models.snapshot --shape tiny --out DIR

DIR gets a hub-style ``config.json`` (``rope_theta`` + ``rope_scaling`` as the hub spells it),
``generation_config.json``, sharded safetensors with ``model.safetensors.index.json`` and the
Llama-3.1 tokenizer files (``cosa_jax.models.llama3_tokenizer``). Weights are drawn tensor by
tensor from a generator seeded with (seed, tensor name), so they do not depend on the shard
layout, and written shard by shard: at most one shard is ever in memory, never the whole 8B.
Each shard is renamed into place once complete, so a rerun after a crash keeps the finished
shards and writes the rest. ``--meta-only`` writes everything except the weight files (the
index still lists them), e.g. to inspect the 8B plan without 16 GB of disk.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import zlib
from pathlib import Path

import numpy as np

from cosa_jax.models.config import LlamaConfig
from cosa_jax.models.hf_io import _LAYER_TENSORS, hf_shapes

GB = 10**9  # transformers' "5GB" shard size is decimal

# Llama-3.1-8B-Instruct's config.json as the hub spells it.
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 128256,
}

# The same architecture and vocabulary, small enough for a CPU test: 2 layers, GQA 4:2, and a
# short original context so every rope frequency band occurs.
TINY = {
    **LLAMA31_8B,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rope_scaling": {**LLAMA31_8B["rope_scaling"], "original_max_position_embeddings": 64},
}


@dataclasses.dataclass(frozen=True)
class Shape:
    hf_config: dict
    max_shard_bytes: int  # the tiny shape shards small so the index path is exercised


SHAPES = {"llama-3.1-8b": Shape(LLAMA31_8B, 5 * GB), "tiny": Shape(TINY, 12 * 2**20)}
GENERATION_CONFIG = {"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
                     "do_sample": True, "temperature": 0.6, "top_p": 0.9}
_RECORD = "cosa_snapshot.json"  # what was asked for, so a resumed run can check it matches


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """Tensor names in file order, each one's shape, and which shard file holds it."""

    names: tuple[str, ...]
    shapes: dict
    shard_of: dict
    files: tuple[str, ...]
    total_bytes: int

    def tensors_in(self, k: int) -> list[str]:
        return [n for n in self.names if self.shard_of[n] == k]


def hub_order(cfg: LlamaConfig) -> list[str]:
    """Embedding, then layer by layer, then the final norm and the head (the hub's order)."""
    names = ["model.embed_tokens.weight"]
    for i in range(cfg.num_layers):
        names += [pattern.format(i=i) for pattern, _, _ in _LAYER_TENSORS.values()]
    names.append("model.norm.weight")
    if not cfg.tie_word_embeddings:
        names.append("lm_head.weight")
    return names


def plan_shards(cfg: LlamaConfig, *, itemsize: int, max_shard_bytes: int) -> ShardPlan:
    """Greedy packing in hub order: a new shard starts when the next tensor would overflow."""
    shapes = hf_shapes(cfg)
    names = hub_order(cfg)
    shard_of, sizes = {}, [0]
    for name in names:
        nbytes = int(np.prod(shapes[name])) * itemsize
        if sizes[-1] and sizes[-1] + nbytes > max_shard_bytes:
            sizes.append(0)
        shard_of[name] = len(sizes) - 1
        sizes[-1] += nbytes
    n = len(sizes)
    files = tuple(f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n))
    return ShardPlan(tuple(names), shapes, shard_of, files, int(sum(sizes)))


def random_tensor(name: str, shape: tuple[int, ...], seed: int, dtype) -> np.ndarray:
    """One weight from a generator seeded by (seed, name): norms near 1, matrices with
    1/sqrt(fan_in) scale (so activations stay O(1) through the layers), the embedding 0.02."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    if name.endswith("norm.weight"):
        w = 1.0 + 0.05 * rng.standard_normal(shape, dtype=np.float32)
    elif name == "model.embed_tokens.weight":
        w = 0.02 * rng.standard_normal(shape, dtype=np.float32)
    else:
        w = rng.standard_normal(shape, dtype=np.float32)
        w *= np.float32(shape[1] ** -0.5)
    return w.astype(dtype)


def _numpy_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _shard_complete(path: Path, expected: list[str]) -> bool:
    if not path.exists():
        return False
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="numpy") as f:
            return sorted(f.keys()) == sorted(expected)
    except Exception:
        return False


def write_snapshot(shape: str, out_dir, *, seed: int = 0, dtype: str = "bfloat16",
                   meta_only: bool = False, max_shard_bytes: int | None = None,
                   log=print) -> ShardPlan:
    """Write the snapshot directory for ``shape`` (see the module docstring); returns the plan."""
    from safetensors.numpy import save_file

    from cosa_jax.models import llama3_tokenizer

    if shape not in SHAPES:
        raise ValueError(f"unknown snapshot shape {shape!r}; expected one of {sorted(SHAPES)}")
    spec = SHAPES[shape]
    hf_config = {**spec.hf_config, "torch_dtype": dtype}
    cfg = LlamaConfig.from_hf_dict(hf_config, source=f"snapshot shape {shape!r}")
    np_dtype = _numpy_dtype(dtype)
    plan = plan_shards(cfg, itemsize=np_dtype.itemsize,
                       max_shard_bytes=max_shard_bytes or spec.max_shard_bytes)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    record = {"shape": shape, "seed": seed, "dtype": dtype, "files": list(plan.files)}
    record_path = out / _RECORD
    if record_path.exists() and json.loads(record_path.read_text()) != record:
        log(f"{out}: holds a snapshot of another shape/seed/dtype; replacing its weight files")
        for stale in out.glob("model*.safetensors*"):
            stale.unlink()
    record_path.write_text(json.dumps(record, indent=2))

    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(llama3_tokenizer.tokenizer_dir() / name, out / name)
    index = {"metadata": {"total_size": plan.total_bytes},
             "weight_map": {n: plan.files[plan.shard_of[n]] for n in plan.names}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if meta_only:
        return plan

    for k, fname in enumerate(plan.files):
        names = plan.tensors_in(k)
        path = out / fname
        if _shard_complete(path, names):
            log(f"{fname}: already complete, kept")
            continue
        tensors = {n: random_tensor(n, plan.shapes[n], seed, np_dtype) for n in names}
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path)
        log(f"{fname}: {len(names)} tensors, {sum(t.nbytes for t in tensors.values()) / GB:.2f} GB")
        del tensors
    return plan


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", required=True, choices=sorted(SHAPES))
    parser.add_argument("--out", required=True, help="directory to write the snapshot into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--max-shard-bytes", type=int, default=None,
                        help="shard size limit (default: 5 GB for llama-3.1-8b, 12 MiB for tiny)")
    parser.add_argument("--meta-only", action="store_true",
                        help="write config, index and tokenizer but not the weight files")
    args = parser.parse_args(argv)
    plan = write_snapshot(args.shape, args.out, seed=args.seed, dtype=args.dtype,
                          meta_only=args.meta_only, max_shard_bytes=args.max_shard_bytes)
    print(f"{args.out}: {len(plan.names)} tensors in {len(plan.files)} shards, "
          f"{plan.total_bytes / GB:.2f} GB{' (metadata only)' if args.meta_only else ''}")


if __name__ == "__main__":
    main()
