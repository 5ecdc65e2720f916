"""Full-forward throughput on SmolLM2-135M (real embedded weights): JAX vs PyTorch, fp32.

Batch 4 x 256 tokens; both sides compute the full [4, 256, 49152] float32 logits, the same
input ids, no gradients. JAX: one jitted ``forward`` (after compile), results blocked on.
PyTorch: transformers ``LlamaForCausalLM`` under ``torch.inference_mode``.
Run: ``python bench/forward.py`` (part of ``make bench``).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402  (sets the cache / offline environment first)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from cosa_jax.models import EMBEDDED_MODEL, forward, load_hf, resolve_model_dir

    model_dir = resolve_model_dir(EMBEDDED_MODEL)
    ids = np.random.default_rng(0).integers(3, 49152, (args.batch, args.seq)).astype(np.int32)
    tokens = args.batch * args.seq

    # ---- ours
    model, cfg = load_hf(model_dir, dtype="float32")
    params = model.params()
    fwd = jax.jit(forward, static_argnums=1)
    ids_j = jnp.asarray(ids)
    # ---- peer
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids_t = torch.as_tensor(ids, dtype=torch.long)

    def torch_step():
        with torch.inference_mode():
            return hf(input_ids=ids_t).logits

    times = common.time_interleaved(
        {"jax": lambda: fwd(params, cfg, ids_j).block_until_ready(), "torch": torch_step},
        reps=args.reps, warmup=1)
    jax_times, torch_times = times["jax"], times["torch"]
    jax_logits = np.asarray(fwd(params, cfg, ids_j))
    torch_logits = torch_step().float().numpy()

    diff = float(np.max(np.abs(jax_logits - torch_logits)))
    print(f"[forward] SmolLM2-135M fp32, batch {args.batch} x {args.seq} tokens, full logits, "
          f"median of {args.reps} reps; jax {jax.__version__} ({jax.devices()[0].platform}), "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    common.report("forward", "tokens/s", tokens / common.median(jax_times),
                  tokens / common.median(torch_times), "PyTorch", target=1.2,
                  detail=f"max |logits diff| = {diff:.2e}; jax reps {[round(t, 3) for t in jax_times]} s, "
                         f"torch reps {[round(t, 3) for t in torch_times]} s")


if __name__ == "__main__":
    main()
