"""Shared test setup: 4 fake CPU devices, an in-repo model cache, offline hub."""

import os
from pathlib import Path

os.environ.setdefault("COSA_JAX_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "cosa_jax"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_platforms", "cpu")
