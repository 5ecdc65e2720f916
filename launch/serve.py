"""Serve a model over the OpenAI API: ``python -m launch.serve --config.model=PATH_OR_embedded:NAME``,
or put the policy in front of another server: ``python -m launch.serve --config.upstream=URL``.

Without ``--config.auth_registry`` the server is OPEN: anyone who can reach it may set any safety
config as the system message. With a registry (see ``cosa_jax/inference/auth.py``), only keys
authorised for a config may set it; everyone else gets ``--config.default_safety_config``. With
``--config.upstream=http://host:port/v1`` no model is loaded: the same rules are applied and the
request is forwarded to that OpenAI-compatible backend (vLLM, another cosa-jax server).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from launch import runner

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_CONFIG = ROOT / "configs" / "serve.py"


def _run(c) -> None:
    from aiohttp import web

    from cosa_jax.inference.auth import load_registry
    from cosa_jax.inference.serve_config import mesh_shape
    from cosa_jax.inference.server import read_config_arg

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    registry = load_registry(c.auth_registry) if c.auth_registry else None
    default_config = read_config_arg(c.default_safety_config or None)
    if flags.FLAGS.dry_run:
        if c.model and not c.model.startswith("embedded:") and c.model.startswith((".", "/")) \
                and not Path(c.model).is_dir():
            raise runner.UserError(f"config key model: {c.model} is not a directory")
        print(f"[serve] dry run: config valid ({'gateway to ' + c.upstream if c.upstream else c.model}); "
              "nothing loaded or served")
        return
    if registry is None:
        logging.warning("no --config.auth_registry: the %s is open and passes system messages "
                        "(safety configs) through from any caller",
                        "gateway" if c.upstream else "server")
    if c.upstream:
        from cosa_jax.inference.gateway import create_gateway_app
        app = create_gateway_app(c.upstream, registry=registry, default_config=default_config,
                                 upstream_key=os.environ.get(c.upstream_key_env))
        print(f"[serve] policy gateway at http://{c.host}:{c.port}/v1 -> {c.upstream}", flush=True)
        web.run_app(app, host=c.host, port=c.port, print=None)
        return

    from cosa_jax.inference.requests import ServerLimits
    from cosa_jax.inference.server import STATE_KEY, ChatModel, create_app
    mesh = None
    shape = mesh_shape(c.mesh)
    if shape:
        from cosa_jax.sharding import make_mesh
        mesh = make_mesh(shape)
    model = ChatModel.load(c.model, dtype=c.dtype, compute_dtype=c.compute_dtype or None, mesh=mesh)
    name = c.served_model_name or c.model
    app = create_app(model, served_model_name=name, registry=registry,
                     default_config=default_config, max_batch=c.max_batch,
                     batch_wait_ms=c.batch_wait_ms, max_cache_len=c.max_cache_len or None,
                     prefill_budget=c.prefill_budget,
                     limits=ServerLimits(**c.limits.to_dict()))
    if c.warmup:
        from cosa_jax.inference.sampler import SamplingParams
        engine = app[STATE_KEY].engine.start()
        engine.generate([model.encode([{"role": "user", "content": "Hi"}])],
                        SamplingParams(max_new_tokens=8))
    print(f"[serve] model {name!r} at http://{c.host}:{c.port}/v1", flush=True)
    web.run_app(app, host=c.host, port=c.port, print=None)


def main(argv=None) -> None:
    from cosa_jax.inference.serve_config import default_config, validate
    if SHIPPED_CONFIG.exists():  # a checkout: configs/serve.py, or the file given by --config
        runner.run(_run, prog="cosa-jax serve", doc=__doc__, default_config=default_config,
                   validate=validate, config_default=str(SHIPPED_CONFIG), argv=argv,
                   define_config=lambda: config_flags.DEFINE_config_file(
                       "config", None, "server config file (default configs/serve.py)"))
    else:  # an installed package without the configs/ folder: the defaults themselves
        runner.run(_run, prog="cosa-jax serve", doc=__doc__, default_config=default_config,
                   validate=validate, argv=argv,
                   define_config=lambda: config_flags.DEFINE_config_dict(
                       "config", default_config(), "server settings"))


if __name__ == "__main__":
    main()
