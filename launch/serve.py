"""Serve a model over the OpenAI chat API: ``python -m launch.serve --model PATH_OR_embedded:NAME``.

Without ``--auth-registry`` the server is OPEN: anyone who can reach it may set any safety
config as the system message. With a registry (see ``cosa_jax/inference/auth.py``), only keys
authorised for a config may set it; everyone else gets ``--default-config``.
"""

from __future__ import annotations

import argparse
import logging

from aiohttp import web


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launch.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="HF model directory, hub id, or embedded:smollm2-135m-instruct")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None,
                   help="the 'model' name clients send (default: --model as given)")
    p.add_argument("--max-batch", type=int, default=16, help="most requests in one generate call")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="how long the oldest queued request waits for others to join its batch")
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
                   help="compile the batch-1 program before accepting requests")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from cosa_jax.inference.auth import load_registry
    from cosa_jax.inference.server import ChatModel, create_app, read_config_arg

    registry = load_registry(args.auth_registry) if args.auth_registry else None
    default_config = read_config_arg(args.default_config)
    mesh = None
    if args.mesh:
        from cosa_jax.sharding import make_mesh
        try:
            shape = tuple(int(x) for x in args.mesh.split(","))
        except ValueError:
            raise SystemExit(f"--mesh: expected three integers like 1,4,1, got {args.mesh!r}")
        mesh = make_mesh(shape)
    model = ChatModel.load(args.model, dtype=args.dtype, compute_dtype=args.compute_dtype, mesh=mesh)
    if args.warmup:
        from cosa_jax.inference.sampler import SamplingParams
        from cosa_jax.inference.server import GenJob
        model.run_batch([GenJob(model.encode([{"role": "user", "content": "Hi"}]),
                                SamplingParams(max_new_tokens=8))])
    name = args.served_model_name or args.model
    app = create_app(model, served_model_name=name, registry=registry,
                     default_config=default_config, max_batch=args.max_batch,
                     batch_wait_ms=args.batch_wait_ms)
    if registry is None:
        logging.warning("no --auth-registry: the server is open and passes system messages "
                        "(safety configs) through from any caller")
    print(f"[serve] model {name!r} at http://{args.host}:{args.port}/v1", flush=True)
    web.run_app(app, host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
