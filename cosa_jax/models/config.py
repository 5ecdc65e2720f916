"""LlamaConfig: the architecture and runtime options of a Llama-3.x decoder.

Frozen and hashable so it can be a static argument of ``jax.jit``. Read from and written to
Hugging Face ``config.json`` dictionaries; both the transformers-4 spelling
(``rope_theta`` + ``rope_scaling``) and the transformers-5 spelling (``rope_parameters``) are
accepted, because hub snapshots carry the first and freshly saved models the second.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("xla", "cudnn", "reference")
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims")


class ConfigError(ValueError):
    """A config.json (or config dict) that we cannot turn into a LlamaConfig."""


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500_000.0
    # ("llama3", factor, low_freq_factor, high_freq_factor, original_max_position_embeddings),
    # ("linear", factor) or ("default",): a tuple keeps the config hashable.
    rope_scaling: tuple = ("default",)
    max_position_embeddings: int = 131_072
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # Runtime options (not part of the checkpoint).
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    attention_impl: str = "xla"
    remat: str = "none"
    # One lax.scan over stacked layers (compile time flat in depth) or a Python loop (MaxText's
    # scan_layers=False): unrolled, XLA need not stack per-layer residuals for the backward, at
    # the cost of a compile that grows with depth. Scanning suits CPU, unrolling XLA:GPU
    # (docs/design.md, "Scanned or unrolled layers").
    scan_layers: bool = True

    def __post_init__(self):
        for name in ("param_dtype", "compute_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"{name}={getattr(self, name)!r}; expected one of {DTYPES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(f"attention_impl={self.attention_impl!r}; expected one of {ATTENTION_IMPLS}")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"remat={self.remat!r}; expected one of {REMAT_POLICIES}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}")
        if self.rope_scaling[0] not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"rope type {self.rope_scaling[0]!r} unsupported; "
                              f"supported: {SUPPORTED_ROPE_TYPES}")

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    @property
    def num_params(self) -> int:
        d, f, v, hd = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        attn = d * hd * (self.num_heads * 2 + self.num_kv_heads * 2)
        layer = attn + 3 * d * f + 2 * d
        return v * d * (1 if self.tie_word_embeddings else 2) + self.num_layers * layer + d

    # ------------------------------------------------------------------ HF dicts
    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], *, source: str = "config", **runtime) -> "LlamaConfig":
        """Build from a Hugging Face config dict; ``source`` names the file in errors."""
        if not isinstance(hf, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(hf).__name__}")
        archs = hf.get("architectures") or ["LlamaForCausalLM"]
        model_type = hf.get("model_type", "llama")
        if model_type != "llama" or not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            raise ConfigError(
                f"{source}: unsupported architecture {archs} (model_type={model_type!r}); "
                f"cosa-jax implements {SUPPORTED_ARCHITECTURES}")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise ConfigError(f"{source}: {flag}=true is not supported")

        def need(key, kind=int):
            if key not in hf:
                raise ConfigError(f"{source}: missing required key {key!r}")
            value = hf[key]
            if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ConfigError(f"{source}: {key!r} must be a positive integer, got {value!r}")
            return value

        hidden = need("hidden_size")
        heads = need("num_attention_heads")
        kv_heads = hf.get("num_key_value_heads") or heads
        head_dim = hf.get("head_dim") or hidden // heads
        rope_theta, rope_scaling = _rope_from_hf(hf, source)
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        return cls(
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(hf.get("max_position_embeddings", 131_072)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos_ids,
            pad_token_id=hf.get("pad_token_id"),
            **runtime,
        )

    @classmethod
    def from_json_file(cls, path, **runtime) -> "LlamaConfig":
        try:
            with open(path) as f:
                hf = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no config.json (is this a Hugging Face model directory?)")
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: corrupt JSON ({e})") from e
        return cls.from_hf_dict(hf, source=str(path), **runtime)

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json that transformers' LlamaForCausalLM reads back to this architecture."""
        rope: dict[str, Any] = {"rope_type": self.rope_scaling[0], "rope_theta": self.rope_theta}
        if self.rope_scaling[0] == "llama3":
            _, factor, low, high, original = self.rope_scaling
            rope.update(factor=factor, low_freq_factor=low, high_freq_factor=high,
                        original_max_position_embeddings=original)
        elif self.rope_scaling[0] == "linear":
            rope.update(factor=self.rope_scaling[1])
        eos = list(self.eos_token_id)
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "rope_scaling": None if self.rope_scaling[0] == "default" else rope,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.param_dtype,
            "dtype": self.param_dtype,
        }


def _rope_from_hf(hf: dict, source: str) -> tuple[float, tuple]:
    """Accept ``rope_parameters`` (transformers 5) or ``rope_theta`` + ``rope_scaling`` (hub)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise ConfigError(f"{source}: rope_parameters / rope_scaling must be JSON objects")
    merged = {**scaling, **params}
    theta = float(merged.get("rope_theta", hf.get("rope_theta", 10_000.0)))
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    try:
        if rope_type == "llama3":
            scaled = ("llama3", float(merged["factor"]), float(merged["low_freq_factor"]),
                      float(merged["high_freq_factor"]),
                      int(merged["original_max_position_embeddings"]))
        elif rope_type == "linear":
            scaled = ("linear", float(merged["factor"]))
        elif rope_type == "default":
            scaled = ("default",)
        else:
            raise ConfigError(f"{source}: rope type {rope_type!r} unsupported; "
                              f"supported: {SUPPORTED_ROPE_TYPES}")
    except KeyError as e:
        raise ConfigError(f"{source}: rope scaling {rope_type!r} lacks key {e.args[0]!r}") from None
    return theta, scaled
