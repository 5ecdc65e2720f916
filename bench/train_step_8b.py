"""MFU of an 8B-shaped DPO step on an accelerator (issue target: >= 45% on a lent GPU).

The step is ours (``cosa_jax.train.step.make_train_step`` under the trainer's sharded ``jax.jit``
with the state donated) at the shapes and model settings of the 8B DPO recipe
(configs/cosalign_llama31_8b_dpo.py: fp32 master weights, bf16 compute, cuDNN attention, unrolled
layers): Llama-3.1-8B layers and vocabulary, prompt-shared rows of a 512-token prompt and two
128-token responses, 2 pairs per device in each of 4 micro-batches (the recipe's 32 pairs on 4
GPUs), saved window logits, the frozen bf16 reference in the step. Weights are random (MFU does
not depend on their values; the loss drops to ~0 after the first RMSprop step, whose sign-like
update of every weight moves random-model log-probs a lot).

One GPU does not hold the full model with fp32 master weights, RMSprop moments, gradients and
a reference copy, so ``--layers`` keeps fewer of the 32 identical layers (default 8): per-layer
shapes, and so the matmul efficiency, stay those of the 8B model; the vocabulary head is whole.
With all devices on the fsdp axis, 4 GPUs run ``--layers 32``. The script prints XLA's memory
analysis of the compiled step before running it (H200, 8 layers: about 46 GiB).

The peer is the device itself: 20 queued bf16 ``jnp.dot`` of ``--peak-n``^3 timed in the same
run (``mfu_vs_measured_peak``), and the vendor's dense bf16 peak where the device kind is known.
FLOPs are counted as in bench/train_step.py: unembedding on the response windows only, attention
on 10/16 of the square (what our XLA attention's causal query blocks execute; cuDNN, masked,
runs the whole square, so the count is conservative there), no recomputation.
With ``--attention`` other than xla it first prints how far that kernel's log-probs are from our
XLA attention's on the step's own rows. ``--profile`` adds the device time by kernel name.
On CPU it refuses unless ``--tiny`` (shrunk dimensions: a smoke test of this script).
Run: ``python bench/train_step_8b.py`` on the GPU machine (``make bench-gpu``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402  (sets the cache / offline environment first)
from train_step import dpo_batch, shared_batch, step_flops  # noqa: E402

# Dense bf16 peak FLOP/s by device kind (vendor datasheets, SXM parts, no sparsity).
VENDOR_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12}

LLAMA31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                  num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500_000.0)
TINY = dict(vocab_size=2048, hidden_size=128, intermediate_size=448, num_layers=32,
            num_heads=4, num_kv_heads=2, head_dim=32, rope_theta=500_000.0)


def vendor_peak(device) -> float | None:
    kind = getattr(device, "device_kind", "")
    return next((v for k, v in VENDOR_BF16_PEAK.items() if k in kind), None)


def recipe_model_config():
    """``model`` of configs/cosalign_llama31_8b_dpo.py: the bench runs the recipe's settings."""
    from configs.cosalign_llama31_8b_dpo import get_config
    return get_config().model


def device_matmul_peak(n: int, calls: int = 20, reps: int = 5) -> float:
    """Best FLOP/s of ``calls`` back-to-back bf16 n^3 products, waiting once at the end: on a
    GPU a wait after each ~1.4 ms product would count launch and sync gaps against the peak."""
    import jax
    import jax.numpy as jnp
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        outs = [dot(a, a) for _ in range(calls)]
        jax.block_until_ready(outs)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 * calls / best


def compiled_peak_gib(compiled) -> float | None:
    """Per-device bytes the compiled step needs at its peak, in GiB (None if XLA won't say)."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.temp_size_in_bytes) / 2**30


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=8, help="of the 32 8B layers (memory)")
    p.add_argument("--pairs-per-device", type=int, default=2, help="in each micro-batch")
    p.add_argument("--grad-accum", type=int, default=4,
                   help="micro-batches a step (the 8B recipe: 32 pairs on 4 GPUs = 4 x 2 x 4)")
    p.add_argument("--attention", default=None,
                   help="LlamaConfig.attention_impl (default: the recipe's; xla on CPU)")
    p.add_argument("--scan-layers", action=argparse.BooleanOptionalAction, default=None,
                   help="LlamaConfig.scan_layers (default: the recipe's)")
    p.add_argument("--profile", action="store_true",
                   help="also print the device time of the step's kernels, by name")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--response", type=int, default=128)
    p.add_argument("--remat", default="none", help="LlamaConfig.remat: none | dots | full")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--peak-n", type=int, default=8192)
    p.add_argument("--tiny", action="store_true", help="shrunk dimensions (CPU smoke test)")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from cosa_jax import sharding as shd
    from cosa_jax.models.config import LlamaConfig
    from cosa_jax.models.llama import CAUSAL_QUERY_BLOCKS, init_params
    from cosa_jax.train import optim
    from cosa_jax.train import logprobs
    from cosa_jax.train import step as ts

    platform = jax.devices()[0].platform
    if platform == "cpu" and not args.tiny:
        raise SystemExit("train_step_8b: no accelerator here; the 8B-shaped step is for a GPU or "
                         "TPU (use --tiny for a CPU smoke test of this script)")
    recipe = recipe_model_config()
    attention = args.attention or recipe.attention_impl
    if platform == "cpu" and attention == "cudnn":
        attention = "xla"
    scan_layers = recipe.scan_layers if args.scan_layers is None else args.scan_layers
    dims = dict(TINY if args.tiny else LLAMA31_8B, num_layers=args.layers)
    cfg = LlamaConfig(**dims, param_dtype=recipe.param_dtype, compute_dtype=recipe.compute_dtype,
                      remat=args.remat, attention_impl=attention, scan_layers=scan_layers)
    mesh = shd.make_mesh()
    n_dev = mesh.devices.size
    pairs = args.pairs_per_device * n_dev * args.grad_accum
    # Chosen/rejected rows sharing each prompt, then one prompt-shared row per pair.
    batch = shared_batch(dpo_batch(pairs, args.prompt + args.response, cfg.vocab_size,
                                   args.prompt), pairs, args.prompt)

    tx = optim.make_optimizer(1e-6, 0, clip_norm=10.0)
    loss_cfg = ts.LossConfig(mode="dpo", beta=0.1, save_logits=True)
    params_shape = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    state_shape = jax.eval_shape(lambda p: ts.init_state(p, tx, 0), params_shape)
    state_sh = ts.state_shardings(state_shape, tx, mesh)
    state = jax.jit(lambda: ts.init_state(init_params(cfg, jax.random.key(0)), tx, 0),
                    out_shardings=state_sh)()
    ref_params = jax.jit(lambda p: ts.reference_params(p, cfg),
                         out_shardings=state_sh["params"])(state["params"])
    micro = ts.to_micro_batches(batch, args.grad_accum)
    step = ts.jit_train_step(ts.make_train_step(cfg, loss_cfg, tx), mesh, state_sh, micro, True)
    micro = jax.device_put(micro, ts.batch_shardings(micro, mesh))
    if attention != "xla":
        # The fused kernel against our XLA attention on the step's own rows (prompt-shared
        # segment masks): the same log-probs up to bf16 rounding.
        first = jax.tree.map(lambda x: x[0], micro)
        xla_cfg = dataclasses.replace(cfg, attention_impl="xla")
        got, want = (jax.jit(lambda p, m, c=c: logprobs.pair_logps(p, c, m, 128))(ref_params, first)
                     for c in (cfg, xla_cfg))
        diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(got, want))
        print(f"[train_step_8b] {attention} vs xla attention, summed response log-probs "
              f"{float(want[0][0]):.1f}: max |diff| {diff:.3f}")
    t0 = time.perf_counter()
    compiled = step.lower(state, ref_params, micro).compile()
    peak_gib = compiled_peak_gib(compiled)
    if peak_gib is not None:
        print(f"[train_step_8b] compiled step, per device: peak ~{peak_gib:.2f} GiB "
              f"(arguments + outputs not aliased + temporaries, XLA's memory analysis)")
    holder = {"state": state}
    losses = []

    def run():
        holder["state"], metrics = compiled(holder["state"], ref_params, micro)
        losses.append(float(jax.block_until_ready(metrics["loss"])))

    run()
    warm = time.perf_counter() - t0  # compile and the first step
    times = common.time_reps(run, reps=args.reps, warmup=0)
    peak_n = min(args.peak_n, 1024) if args.tiny else args.peak_n
    peak_dev = device_matmul_peak(peak_n)

    if args.profile:
        print("[train_step_8b] " + (common.kernel_time_summary(run) or "profiler wrote no trace"))
    row_len, window = batch.input_ids.shape[1], batch.chosen_targets.shape[1]
    square = (CAUSAL_QUERY_BLOCKS + 1) / (2 * CAUSAL_QUERY_BLOCKS)
    flops, _ = step_flops(cfg, pairs, row_len, head_positions=pairs * window,
                          attn_fraction=square)
    med = common.median(times)
    achieved_dev = flops / med / n_dev
    print(f"[train_step_8b] {'TINY ' if args.tiny else ''}Llama-3.1-8B-shaped DPO step: "
          f"{cfg.num_layers} layers (d={cfg.hidden_size}, ffn={cfg.intermediate_size}, "
          f"V={cfg.vocab_size}), {pairs} prompt-shared rows of {row_len} tokens ({args.prompt}-token "
          f"prompt + 2 x {args.response}) in {args.grad_accum} micro-batches, window {window}, {cfg.compute_dtype} compute, "
          f"{cfg.param_dtype} master, attention {attention}, scan_layers={scan_layers}, remat="
          f"{args.remat}; {n_dev} x {jax.devices()[0].device_kind}; jax {jax.__version__}")
    print(f"[train_step_8b] executed FLOPs/step {flops / 1e12:.2f} TFLOP; step median "
          f"{med:.3f} s (reps {[round(t, 3) for t in times]}, compile+first {warm:.1f} s); "
          f"{achieved_dev / 1e12:.1f} TFLOP/s per device")
    mfu = achieved_dev / peak_dev
    print(f"[train_step_8b] measured bf16 matmul peak ({peak_n}^3 jnp.dot, 20 queued): "
          f"{peak_dev / 1e12:.1f} TFLOP/s; mfu_vs_measured_peak: {mfu:.1%}  "
          f"(target >= 45%: {'met' if mfu >= 0.45 else 'NOT met'})")
    vendor = vendor_peak(jax.devices()[0])
    if vendor:
        print(f"[train_step_8b] mfu_vs_vendor_peak ({vendor / 1e12:.0f} TFLOP/s dense bf16): "
              f"{achieved_dev / vendor:.1%}")
    print(f"[train_step_8b] losses: {[round(x, 5) for x in losses]}")
    return {"mfu": mfu, "losses": losses, "step_s": med, "peak_gib": peak_gib}


if __name__ == "__main__":
    main()
