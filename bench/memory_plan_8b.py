"""XLA's memory plan of the full 32-layer 8B DPO step on ONE device, without a device.

Compiles the step abstractly (ShapeDtypeStructs: no weights are made) under the settings that
shrink it, one variant per run, and prints ``cosa_jax.train.memory_plan``'s report: what
launch.train checks before a run. On CPU it is XLA:CPU's buffer assignment, an estimate for a
GPU's (see bench/results/memory_plan_8b_cpu.txt); on a GPU it is that GPU's own.
    python bench/memory_plan_8b.py bf16grads,precompute,remat
Variant words: bf16grads (train.grad_dtype), precompute (dpo.precompute_ref), remat
(model.remat=dots_with_no_batch_dims), bf16params (model.param_dtype); none = the 4-GPU recipe's
settings on one device. Batch: the recipe's 32 prompt-shared pairs in 16 micro-batches of 2.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402,F401  (sets the cache / offline environment first)
from train_step import dpo_batch, shared_batch  # noqa: E402
from train_step_8b import LLAMA31_8B  # noqa: E402


def main(argv=None) -> None:
    import jax
    import numpy as np

    from cosa_jax import sharding as shd
    from cosa_jax.models.config import LlamaConfig
    from cosa_jax.models.llama import init_params
    from cosa_jax.train import memory_plan, optim
    from cosa_jax.train import step as ts

    words = set((argv or sys.argv[1:] or ["none"])[0].split(","))
    precompute = "precompute" in words
    cfg = LlamaConfig(**LLAMA31_8B, param_dtype="bfloat16" if "bf16params" in words else "float32",
                      compute_dtype="bfloat16",
                      remat="dots_with_no_batch_dims" if "remat" in words else "none",
                      attention_impl="xla" if jax.devices()[0].platform == "cpu" else "cudnn",
                      scan_layers=True)
    mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    grad_accum, pairs = 16, 32
    batch = shared_batch(dpo_batch(pairs, 768, cfg.vocab_size, 512), pairs, 512)
    tx = optim.make_optimizer(5e-7, 150, clip_norm=10.0)
    loss_cfg = ts.LossConfig(mode="dpo", save_logits=True, precomputed_ref=precompute,
                             grad_dtype="bfloat16" if "bf16grads" in words else "float32")

    def abstract(tree, shardings):
        return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                            tree, shardings)

    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    state_shape = jax.eval_shape(lambda p: ts.init_state(p, tx, 0), params)
    state_sh = ts.state_shardings(state_shape, tx, mesh)
    ref = None if precompute else abstract(
        jax.eval_shape(lambda p: ts.reference_params(p, cfg), params), state_sh["params"])
    if precompute:
        zeros = np.zeros(pairs, np.float32)
        batch = batch.replace(ref_chosen_logps=zeros, ref_rejected_logps=zeros)
    micro = ts.to_micro_batches(batch, grad_accum)
    step = ts.jit_train_step(ts.make_train_step(cfg, loss_cfg, tx), mesh, state_sh, micro,
                             with_ref=not precompute)
    micro = abstract(micro, ts.batch_shardings(micro, mesh))
    t0 = time.perf_counter()
    compiled = step.lower(abstract(state_shape, state_sh), ref, micro).compile()
    plan = memory_plan.from_compiled(compiled, jax.devices()[0], 141.0)
    print(f"[memory_plan_8b] {','.join(sorted(words))} on {jax.devices()[0].device_kind} "
          f"(compiled in {time.perf_counter() - t0:.0f} s; jax {jax.__version__}): {plan.report()}")


if __name__ == "__main__":
    main()
