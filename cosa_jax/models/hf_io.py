"""Hugging Face checkpoints in and out: config.json + (sharded) safetensors.

``load_hf`` reads one stacked weight at a time in the checkpoint's own dtype and, given a mesh,
hands each device only its shard (cast there), so an 8B model never sits on the host in fp32.
``save_hf`` streams weights back out, one stacked weight at a time, into safetensors shards that
transformers and vLLM load.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from cosa_jax import sharding as shd
from cosa_jax.models.config import ConfigError, LlamaConfig
from cosa_jax.models.llama import Llama, Params

log = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"


class CheckpointError(ValueError):
    """A safetensors checkpoint that does not match its config (missing tensor, wrong shape)."""


# ours -> (HF name pattern, HF->ours, ours->HF); {i} is the layer index.
_LAYER_TENSORS: dict[str, tuple[str, Callable, Callable]] = {
    "input_norm": ("model.layers.{i}.input_layernorm.weight", lambda w, c: w, lambda w, c: w),
    "post_attn_norm": ("model.layers.{i}.post_attention_layernorm.weight",
                       lambda w, c: w, lambda w, c: w),
    "q_proj": ("model.layers.{i}.self_attn.q_proj.weight",
               lambda w, c: w.T.reshape(c.hidden_size, c.num_heads, c.head_dim),
               lambda w, c: w.reshape(c.hidden_size, -1).T),
    "k_proj": ("model.layers.{i}.self_attn.k_proj.weight",
               lambda w, c: w.T.reshape(c.hidden_size, c.num_kv_heads, c.head_dim),
               lambda w, c: w.reshape(c.hidden_size, -1).T),
    "v_proj": ("model.layers.{i}.self_attn.v_proj.weight",
               lambda w, c: w.T.reshape(c.hidden_size, c.num_kv_heads, c.head_dim),
               lambda w, c: w.reshape(c.hidden_size, -1).T),
    "o_proj": ("model.layers.{i}.self_attn.o_proj.weight",
               lambda w, c: w.T.reshape(c.num_heads, c.head_dim, c.hidden_size),
               lambda w, c: w.reshape(-1, c.hidden_size).T),
    "gate_proj": ("model.layers.{i}.mlp.gate_proj.weight", lambda w, c: w.T, lambda w, c: w.T),
    "up_proj": ("model.layers.{i}.mlp.up_proj.weight", lambda w, c: w.T, lambda w, c: w.T),
    "down_proj": ("model.layers.{i}.mlp.down_proj.weight", lambda w, c: w.T, lambda w, c: w.T),
}
_TOP_TENSORS: dict[str, tuple[str, Callable, Callable]] = {
    "embed_tokens": ("model.embed_tokens.weight", lambda w, c: w, lambda w, c: w),
    "norm": ("model.norm.weight", lambda w, c: w, lambda w, c: w),
    "lm_head": ("lm_head.weight", lambda w, c: w.T, lambda w, c: w.T),
}


def hf_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Expected HF tensor shapes, for checking a checkpoint against its config."""
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    nh, kh = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_layer = {"input_norm": (d,), "post_attn_norm": (d,), "q_proj": (nh, d), "k_proj": (kh, d),
                 "v_proj": (kh, d), "o_proj": (d, nh), "gate_proj": (f, d), "up_proj": (f, d),
                 "down_proj": (d, f)}
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, d)
    for i in range(cfg.num_layers):
        for ours, (pattern, _, _) in _LAYER_TENSORS.items():
            shapes[pattern.format(i=i)] = per_layer[ours]
    return shapes


# ---------------------------------------------------------------------------- paths
def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A local HF directory for ``path``: a directory, ``embedded:NAME``, or a hub repo id."""
    text = str(path)
    if text == "embedded" or text.startswith(EMBEDDED_PREFIX):
        from cosa_jax.models import embedded
        return embedded.embedded_model_dir(text[len(EMBEDDED_PREFIX):] if ":" in text else None)
    local = Path(text).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise NotADirectoryError(f"{local}: expected a Hugging Face model directory, got a file")
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download
            return Path(snapshot_download(
                text, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja"]))
        except Exception as e:  # offline, gated, or unknown repo: say which
            raise FileNotFoundError(
                f"{text}: not a local directory, and fetching it from the Hugging Face hub failed "
                f"({type(e).__name__}: {e}). Download it with `hf download {text}` on a machine "
                f"with network access and pass the snapshot directory.") from e
    raise FileNotFoundError(f"{text}: no such model directory")


class _SafetensorsReader:
    """Name -> numpy array over one or many safetensors files (index.json aware)."""

    def __init__(self, model_dir: Path):
        index = model_dir / "model.safetensors.index.json"
        single = model_dir / "model.safetensors"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: corrupt safetensors index ({e!r})") from e
            self.files = {name: model_dir / fname for name, fname in weight_map.items()}
        elif single.exists():
            self.files = None
            self.single = single
        else:
            found = sorted(p.name for p in model_dir.iterdir())
            raise FileNotFoundError(
                f"{model_dir}: no model.safetensors or model.safetensors.index.json "
                f"(found: {found[:10]}); cosa-jax reads safetensors checkpoints only")
        self._handles: dict[Path, object] = {}
        if self.files is None:
            self.names = set(self._open(self.single).keys())
        else:
            self.names = set(self.files)

    def _open(self, path: Path):
        if path not in self._handles:
            if not path.exists():
                raise FileNotFoundError(f"{path}: safetensors shard listed in the index is missing")
            try:
                self._handles[path] = safe_open(str(path), framework="numpy")
            except Exception as e:
                raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from e
        return self._handles[path]

    def get(self, name: str, expected_shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.names:
            where = self.single if self.files is None else "model.safetensors.index.json"
            raise CheckpointError(f"{where}: tensor {name!r} is missing")
        path = self.single if self.files is None else self.files[name]
        array = self._open(path).get_tensor(name)
        if tuple(array.shape) != tuple(expected_shape):
            raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(array.shape)}, "
                                  f"config.json implies {tuple(expected_shape)}")
        return array


# ---------------------------------------------------------------------------- load
def _place(host: np.ndarray, dtype, sharding) -> jax.Array:
    """Host array -> device array; with a sharding, each device casts only its own shard."""
    if sharding is None:
        return jnp.asarray(host.astype(dtype, copy=False))
    return jax.make_array_from_callback(host.shape, sharding,
                                        lambda idx: host[idx].astype(dtype, copy=False))


def load_params(model_dir: Path, cfg: LlamaConfig, mesh=None) -> Params:
    """Read weights into the stacked params pytree (``cfg.param_dtype``), sharded if ``mesh``."""
    reader = _SafetensorsReader(model_dir)
    expected = hf_shapes(cfg)
    dtype = jnp.dtype(cfg.param_dtype)

    def sharding_for(key: str, shape):
        if mesh is None:
            return None
        spec = shd.logical_to_spec(shd.PARAM_LOGICAL_AXES[key], shape, mesh, name=key)
        return jax.sharding.NamedSharding(mesh, spec)

    params: Params = {"layers": {}}
    tops = ["embed_tokens", "norm"] + ([] if cfg.tie_word_embeddings else ["lm_head"])
    for ours in tops:
        hf_name, to_ours, _ = _TOP_TENSORS[ours]
        host = to_ours(reader.get(hf_name, expected[hf_name]), cfg)
        params[ours] = _place(host, dtype, sharding_for(ours, host.shape))
    for ours, (pattern, to_ours, _) in _LAYER_TENSORS.items():
        host = np.stack([to_ours(reader.get(pattern.format(i=i), expected[pattern.format(i=i)]), cfg)
                         for i in range(cfg.num_layers)])
        params["layers"][ours] = _place(host, dtype, sharding_for(f"layers/{ours}", host.shape))
        del host
    return params


def load_hf(path, *, dtype="float32", compute_dtype=None, mesh=None, attention_impl="xla",
            remat="none", scan_layers=True):
    """Load a Llama HF directory (or ``embedded:NAME`` or a hub id) -> ``(Llama, LlamaConfig)``.

    ``dtype`` is the parameter dtype; ``compute_dtype`` defaults to it. With ``mesh`` every
    weight is created directly with its sharding from ``cosa_jax.sharding``.
    """
    model_dir = resolve_model_dir(path)
    dtype = jnp.dtype(dtype).name
    cfg = LlamaConfig.from_json_file(model_dir / "config.json", param_dtype=dtype,
                                     compute_dtype=jnp.dtype(compute_dtype or dtype).name,
                                     attention_impl=attention_impl, remat=remat,
                                     scan_layers=scan_layers)
    params = load_params(model_dir, cfg, mesh)
    return Llama(cfg, params), cfg


# ---------------------------------------------------------------------------- save
def _to_host(x: jax.Array) -> np.ndarray:
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _hf_names(cfg: LlamaConfig):
    """(HF name, our key) in the order save_hf writes them."""
    for ours in ("embed_tokens", "norm", "lm_head"):
        if not (ours == "lm_head" and cfg.tie_word_embeddings):
            yield _TOP_TENSORS[ours][0], ours
    for ours, (pattern, _, _) in _LAYER_TENSORS.items():
        for i in range(cfg.num_layers):
            yield pattern.format(i=i), f"layers/{ours}"


def _hf_tensors(params: Params, cfg: LlamaConfig, dtype):
    """Yield (HF name, numpy array), fetching each stacked weight from devices once."""
    for ours in ("embed_tokens", "norm", "lm_head"):
        if ours == "lm_head" and cfg.tie_word_embeddings:
            continue
        hf_name, _, to_hf = _TOP_TENSORS[ours]
        yield hf_name, np.ascontiguousarray(to_hf(_to_host(params[ours]), cfg).astype(dtype))
    for ours, (pattern, _, to_hf) in _LAYER_TENSORS.items():
        stacked = _to_host(params["layers"][ours])
        for i in range(cfg.num_layers):
            yield pattern.format(i=i), np.ascontiguousarray(to_hf(stacked[i], cfg).astype(dtype))


def save_hf(model, config: LlamaConfig, out_dir, tokenizer=None, *, dtype=None,
            max_shard_bytes: int = 5 * 1024**3) -> Path:
    """Write config.json, generation_config.json, sharded safetensors (+ index) and tokenizer.

    ``model`` is a ``Llama`` or a params pytree; ``dtype`` defaults to the parameter dtype.
    Only process 0 writes; every process must call it (multi-host gathers are collective).
    """
    params = model.params() if isinstance(model, Llama) else model
    dtype = jnp.dtype(dtype or config.param_dtype)
    out = Path(out_dir)
    writer = jax.process_index() == 0
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob("model*.safetensors*"):
            stale.unlink()
    # Plan the shards from the shapes first, then stream: only one shard is ever on the host.
    shapes = hf_shapes(config)
    order = [name for name, _ in _hf_names(config)]
    shard_of, sizes = {}, [0]
    for name in order:
        nbytes = int(np.prod(shapes[name])) * dtype.itemsize
        if sizes[-1] and sizes[-1] + nbytes > max_shard_bytes:
            sizes.append(0)
        shard_of[name] = len(sizes) - 1
        sizes[-1] += nbytes
    n = len(sizes)
    fnames = ["model.safetensors"] if n == 1 else [
        f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    buffer: dict[str, np.ndarray] = {}
    current = 0
    for name, array in _hf_tensors(params, config, dtype):
        if shard_of[name] != current:
            if writer:
                save_file(buffer, str(out / fnames[current]), metadata={"format": "pt"})
            buffer, current = {}, shard_of[name]
        buffer[name] = array
    if not writer:
        return out
    save_file(buffer, str(out / fnames[current]), metadata={"format": "pt"})
    if n > 1:
        weight_map = {name: fnames[shard_of[name]] for name in order}
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": int(sum(sizes))}, "weight_map": weight_map}, indent=2))
    hf_config = config.to_hf_dict()
    hf_config.update(torch_dtype=dtype.name, dtype=dtype.name)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    generation = {"bos_token_id": config.bos_token_id, "do_sample": False}
    if config.eos_token_id:
        eos = list(config.eos_token_id)
        generation["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def load_tokenizer(path):
    """The transformers tokenizer (with chat template) of a model path or ``embedded:NAME``."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(resolve_model_dir(path)))


__all__ = ["load_hf", "save_hf", "load_params", "load_tokenizer", "resolve_model_dir",
           "CheckpointError", "ConfigError", "hf_shapes"]
