"""Server config (``launch.serve``): every key with its default, and validation naming the key.

``python -m launch.serve --config.model=embedded:smollm2-135m-instruct`` serves a model;
``--config.upstream=http://host:port/v1`` runs the policy gateway in front of another server
instead. configs/serve.py is this default; copy it to keep a deployment's settings in a file.
"""

from __future__ import annotations

import ml_collections

from cosa_jax.config_tools import ConfigError, check_keys, one_of, positive

DTYPES = ("float32", "bfloat16", "float16")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = ""  # HF model directory, hub id, or embedded:smollm2-135m-instruct
    c.upstream = ""  # OpenAI base URL to run a policy gateway in front of, instead of a model
    c.upstream_key_env = "COSA_UPSTREAM_API_KEY"  # env var holding the upstream's API key
    c.host = "127.0.0.1"  # address to listen on
    c.port = 8000  # port to listen on
    c.served_model_name = ""  # the 'model' name clients send (default: model as given)
    c.max_batch = 16  # engine slots: requests decoded together (continuous batching)
    c.batch_wait_ms = 2.0  # while nothing decodes, how long a request waits to share its prefill
    c.max_cache_len = 0  # longest prompt + max_tokens a slot holds (0: the model's context)
    c.prefill_budget = 512  # prompt tokens prefilled between two decode steps
    c.auth_registry = ""  # JSON file mapping API keys to the safety configs they may set
    c.default_safety_config = ""  # the deployment's safety config (text or a file holding it)
    c.dtype = "float32"  # parameter dtype: float32 | bfloat16 | float16
    c.compute_dtype = ""  # compute dtype ('' = the parameter dtype)
    c.mesh = ""  # data,fsdp,tensor sizes (e.g. 1,4,1) to shard the weights over devices
    c.warmup = False  # compile the engine's first programs before accepting requests
    c.limits = ml_collections.ConfigDict()  # request limits (cosa_jax.inference.requests.ServerLimits)
    c.limits.max_body_bytes = 4 * 2**20  # largest request body accepted (413 past it)
    c.limits.max_messages = 512  # most chat messages in one request (400 past it)
    c.limits.max_concurrent_per_key = 64  # generation requests one API key may have in flight (429 past it)
    c.limits.max_queue = 256  # requests waiting for an engine slot before new ones get a 429
    return c


def mesh_shape(text: str) -> tuple[int, int, int] | None:
    if not text:
        return None
    try:
        shape = tuple(int(x) for x in str(text).split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3:
        raise ConfigError(f"config key mesh: expected three integers like 1,4,1, got {text!r}")
    return shape


def validate(c: ml_collections.ConfigDict) -> None:
    """Raise ConfigError naming the first bad key."""
    check_keys(c, default_config(), where="config")
    if bool(c.model) == bool(c.upstream):
        raise ConfigError("config key model: give exactly one of --config.model (serve it) and "
                          "--config.upstream (gateway in front of it)")
    if c.upstream and not str(c.upstream).startswith(("http://", "https://")):
        raise ConfigError(f"config key upstream: expected an http(s) URL, got {c.upstream!r}")
    if not 0 < int(c.port) < 65536:
        raise ConfigError(f"config key port: must be in 1..65535, got {c.port}")
    positive("max_batch", c.max_batch)
    positive("batch_wait_ms", c.batch_wait_ms, allow_zero=True)
    positive("max_cache_len", c.max_cache_len, allow_zero=True)
    positive("prefill_budget", c.prefill_budget)
    for key in ("max_body_bytes", "max_messages", "max_concurrent_per_key", "max_queue"):
        positive(f"limits.{key}", c.limits[key])
    one_of("dtype", c.dtype, DTYPES)
    if c.compute_dtype:
        one_of("compute_dtype", c.compute_dtype, DTYPES)
    mesh_shape(c.mesh)
