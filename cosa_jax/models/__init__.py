"""Llama-3.x in Flax: config, pure forward, NNX wrapper, Hugging Face I/O, embedded model."""

from cosa_jax.models.config import ConfigError, LlamaConfig
from cosa_jax.models.hf_io import (CheckpointError, load_hf, load_params, load_tokenizer,
                                   resolve_model_dir, save_hf)
from cosa_jax.models.llama import (KVCache, Llama, forward, forward_hidden, init_cache,
                                   init_params, unembed, unembed_matrix)

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"

__all__ = ["LlamaConfig", "ConfigError", "CheckpointError", "Llama", "KVCache", "load_hf",
           "save_hf", "load_params", "load_tokenizer", "resolve_model_dir", "forward",
           "forward_hidden", "init_cache", "init_params", "unembed", "unembed_matrix",
           "EMBEDDED_MODEL"]
