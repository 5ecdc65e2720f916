"""Serve a model over the OpenAI API: ``python -m launch.serve --model PATH_OR_embedded:NAME``,
or put the policy in front of another server: ``python -m launch.serve --upstream URL``.

Without ``--auth-registry`` the server is OPEN: anyone who can reach it may set any safety
config as the system message. With a registry (see ``cosa_jax/inference/auth.py``), only keys
authorised for a config may set it; everyone else gets ``--default-config``. With
``--upstream http://host:port/v1`` no model is loaded: the same rules are applied and the
request is forwarded to that OpenAI-compatible backend (vLLM, another cosa-jax server).
"""

from __future__ import annotations

import argparse
import logging

from aiohttp import web


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launch.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="HF model directory, hub id, or embedded:smollm2-135m-instruct")
    p.add_argument("--upstream", default=None,
                   help="run as a policy gateway in front of this OpenAI base URL "
                        "(e.g. http://127.0.0.1:8001/v1) instead of serving a model")
    p.add_argument("--upstream-key-env", default="COSA_UPSTREAM_API_KEY",
                   help="environment variable holding the upstream's API key (if it needs one)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None,
                   help="the 'model' name clients send (default: --model as given)")
    p.add_argument("--max-batch", type=int, default=16,
                   help="engine slots: requests decoded together (continuous batching)")
    p.add_argument("--batch-wait-ms", type=float, default=2.0,
                   help="while nothing decodes, how long a request waits for others to share "
                        "its prefill")
    p.add_argument("--max-cache-len", type=int, default=None,
                   help="longest prompt + max_tokens a slot holds (default: the model's context)")
    p.add_argument("--prefill-budget", type=int, default=512,
                   help="prompt tokens prefilled between two decode steps")
    p.add_argument("--max-body-bytes", type=int, default=4 * 2**20,
                   help="largest request body accepted (413 past it)")
    p.add_argument("--max-messages", type=int, default=512,
                   help="most chat messages in one request (400 past it)")
    p.add_argument("--max-concurrent-per-key", type=int, default=64,
                   help="generation requests one API key may have in flight (429 past it)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting for an engine slot before new ones get a 429")
    p.add_argument("--auth-registry", default=None,
                   help="JSON file mapping API keys to the safety configs they may set")
    p.add_argument("--default-config", default=None,
                   help="the deployment's safety config (text, or a file holding it): the system "
                        "prompt for callers not authorised to set one")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="parameter dtype")
    p.add_argument("--compute-dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--mesh", default=None,
                   help="data,fsdp,tensor sizes (e.g. 1,4,1) to shard the weights over devices")
    p.add_argument("--warmup", action="store_true",
                   help="compile the engine's first programs before accepting requests")
    args = p.parse_args(argv)
    for flag in ("max_body_bytes", "max_messages", "max_concurrent_per_key", "max_queue"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be a positive integer")
    if (args.model is None) == (args.upstream is None):
        p.error("give exactly one of --model (serve it) and --upstream (gateway in front of it)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import os

    from cosa_jax.inference.auth import load_registry
    from cosa_jax.inference.server import read_config_arg

    registry = load_registry(args.auth_registry) if args.auth_registry else None
    default_config = read_config_arg(args.default_config)
    if registry is None:
        logging.warning("no --auth-registry: the %s is open and passes system messages "
                        "(safety configs) through from any caller",
                        "gateway" if args.upstream else "server")
    if args.upstream:
        from cosa_jax.inference.gateway import create_gateway_app
        app = create_gateway_app(args.upstream, registry=registry, default_config=default_config,
                                 upstream_key=os.environ.get(args.upstream_key_env))
        print(f"[serve] policy gateway at http://{args.host}:{args.port}/v1 -> {args.upstream}",
              flush=True)
        web.run_app(app, host=args.host, port=args.port, print=None)
        return

    from cosa_jax.inference.requests import ServerLimits
    from cosa_jax.inference.server import STATE_KEY, ChatModel, create_app
    mesh = None
    if args.mesh:
        from cosa_jax.sharding import make_mesh
        try:
            shape = tuple(int(x) for x in args.mesh.split(","))
        except ValueError:
            raise SystemExit(f"--mesh: expected three integers like 1,4,1, got {args.mesh!r}")
        mesh = make_mesh(shape)
    model = ChatModel.load(args.model, dtype=args.dtype, compute_dtype=args.compute_dtype, mesh=mesh)
    name = args.served_model_name or args.model
    app = create_app(model, served_model_name=name, registry=registry,
                     default_config=default_config, max_batch=args.max_batch,
                     batch_wait_ms=args.batch_wait_ms, max_cache_len=args.max_cache_len,
                     prefill_budget=args.prefill_budget,
                     limits=ServerLimits(max_body_bytes=args.max_body_bytes,
                                         max_messages=args.max_messages,
                                         max_concurrent_per_key=args.max_concurrent_per_key,
                                         max_queue=args.max_queue))
    if args.warmup:
        from cosa_jax.inference.sampler import SamplingParams
        engine = app[STATE_KEY].engine.start()
        engine.generate([model.encode([{"role": "user", "content": "Hi"}])],
                        SamplingParams(max_new_tokens=8))
    print(f"[serve] model {name!r} at http://{args.host}:{args.port}/v1", flush=True)
    web.run_app(app, host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
