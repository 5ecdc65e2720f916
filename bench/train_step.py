"""Throughput of one full DPO train step on SmolLM2-135M: our jitted step vs the PyTorch step.

One step = policy forward + frozen-reference forward on the concatenated chosen/rejected batch,
summed response log-probs, DPO sigmoid loss (beta 0.1), policy backward, global-norm clipping
at 10 and an RMSprop update (alpha 0.99, eps 1e-8). Batch: 2 pairs x 256 tokens (4 rows, every
token real, a shared prompt masked out of the labels). The prompt takes 204 of the 256 tokens
by default, CoSAlign's proportion (the reference truncation keeps 512-token prompts of 640-token
rows, and a safety config in the system prompt makes prompts long: the shipped mini data's
median prompt is 72% of its rows); ``--prompt-len 64`` gives the short-prompt shape, also run by
``make bench``. Real embedded weights, fp32 parameters; JAX runs fp32 compute (the row compared
with PyTorch) and bf16 compute.

  ours: ``cosa_jax.train.step.make_train_step`` under ``jax.jit`` with the state donated, on
        the same concatenated rows as PyTorch ("jax fp32"; like the trainer's batches they carry
        response windows, so the vocabulary projection skips the prompt) and on prompt-shared
        rows ("jax fp32 shared", ``dpo.share_prompt``: one row per pair, prompt | chosen |
        rejected, so each prompt runs once; the configs of the paper recipe use it). The
        window logits are kept for the backward (``train.save_logits``, on in configs/demo.py
        and the 8B DPO config; PyTorch's autograd keeps its full logits too).
  peer: transformers ``LlamaForCausalLM`` fp32 policy + frozen reference, full logits,
        ``clip_grad_norm_`` and ``torch.optim.RMSprop`` (the step tests/test_train_step.py checks
        our step against).

Reps alternate between the contenders (warm-up / compile excluded) so that load from other
processes on a shared machine falls on all alike; tokens/s uses the median rep. Each timed
step comes right after an untimed step of the same contender (``--lead-in 1``), as steps follow
each other in training: on a VM that hands freed memory back to the host, a step timed right
after the other framework's step re-faults its buffers at several times the cost
(``common.time_interleaved``).

FLOPs per step (stated so the MFU can be checked), with T = 256, tokens = 4 x 256:
  N     = non-embedding weights (q, k, v, o, gate, up, down) + the unembedding d x V matmul
  attn  = 4 * L * n_heads * head_dim * T   per token forward (QK^T and PV, full T x T, as computed)
  step  = tokens * (6 N + 3 attn)  [policy forward + backward]
        + tokens * (2 N + attn)    [reference forward]
tokens/s counts the 2 x pairs x T tokens of the DPO batch for every contender (the same work).
Our rows give FLOP/s twice: the standard count above (what the step delivers, and what
PyTorch executes) and the FLOPs they execute: the unembedding only on each row's response
window (``data.collate``); attention on the part of the square that causal query blocks form
(``llama.causal_attention``: 4 blocks, 10/16); for prompt-shared rows, rows of 2T - prompt
tokens padded to a multiple of 64 with attention over that length. Recomputation (the
attention softmax; the window logits under ``--recompute-logits``) is not counted, as MFU
conventions have it. The 70% target is judged on executed FLOPs.
Peak: best of several jitted 2048^3 fp32 ``jnp.dot`` calls, measured before and after the steps
(``mfu_vs_measured_peak``). Because other processes share the CPU, the same matmul also runs
between the timed steps, and ``mfu_vs_adjacent_matmul`` divides each rep's step FLOP/s by the
FLOP/s of the matmul timed next to it (median over reps): the load-matched figure.
Run: ``python bench/train_step.py`` (part of ``make bench``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402  (sets the cache / offline environment first)

BETA = 0.1
LR = 1e-6
CLIP = 10.0


def step_flops(cfg, rows: int, seq: int, head_positions: int | None = None,
               attn_fraction: float = 1.0) -> tuple[float, float]:
    """(FLOPs of one DPO step, N) by the formula in the module docstring (rows of seq tokens;
    the d x V unembedding on head_positions of them, default all; attn_fraction of the T x T
    score square formed)."""
    d, f, v, hd = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    per_layer = d * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 3 * d * f
    body, head = cfg.num_layers * per_layer, d * v
    attn = attn_fraction * 4 * cfg.num_layers * cfg.num_heads * hd * seq
    tokens = rows * seq
    head_positions = tokens if head_positions is None else head_positions
    flops = tokens * (8 * body + 4 * attn) + head_positions * 8 * head
    return flops, body + head


def dpo_batch(pairs: int, seq: int, vocab: int, prompt_len: int, seed: int = 0):
    """Chosen rows then rejected rows; each pair shares a prompt whose labels are -100."""
    import numpy as np

    from cosa_jax.train.batches import TwoRowBatch
    rng = np.random.default_rng(seed)
    rows = 2 * pairs
    ids = rng.integers(3, vocab, (rows, seq)).astype(np.int32)
    ids[pairs:, :prompt_len] = ids[:pairs, :prompt_len]
    labels = ids.copy()
    labels[:, :prompt_len] = -100
    return TwoRowBatch(input_ids=ids, attention_mask=np.ones((rows, seq), np.int32), labels=labels,
                       position_ids=np.broadcast_to(np.arange(seq, dtype=np.int32), (rows, seq)).copy())


def shared_batch(batch, pairs: int, prompt_len: int):
    """The same pairs as one prompt-shared row each (``cosa_jax.train.data`` layout)."""
    from cosa_jax.train import data as td
    ids = batch.input_ids
    examples = [td.TokenizedExample(tuple(ids[i, :prompt_len].tolist()),
                                    (tuple(ids[i, prompt_len:].tolist()),
                                     tuple(ids[pairs + i, prompt_len:].tolist())), False)
                for i in range(pairs)]
    return td.collate_prompt_shared(examples, pad_id=0, pad_multiple=64)


def matmul_probe(n: int = 2048, calls: int = 3, dtype: str = "float32"):
    """A callable doing ``calls`` jitted n^3 ``jnp.dot``s in ``dtype``, and the FLOPs it performs."""
    import jax
    import jax.numpy as jnp
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()

    def run():
        for _ in range(calls):
            dot(a, b).block_until_ready()

    return run, 2 * n ** 3 * calls


def matmul_peak(reps: int = 5, n: int = 2048, dtype: str = "float32") -> float:
    """Best FLOP/s of the matmul probe (one n^3 product a rep)."""
    run, flops = matmul_probe(n, calls=1, dtype=dtype)
    return flops / min(common.time_reps(run, reps=reps))


def make_jax_step(model_dir, compute_dtype: str, batch, chunk: int, attention_impl: str,
                  remat: str, ref_params=None, save_logits: bool = True):
    """A zero-argument callable running one jitted step on a donated state, and its losses."""
    import jax
    import jax.numpy as jnp

    from cosa_jax.models import load_hf
    from cosa_jax.train import optim
    from cosa_jax.train import step as ts

    model, cfg = load_hf(model_dir, dtype="float32", compute_dtype=compute_dtype,
                         attention_impl=attention_impl, remat=remat)
    params = model.params()
    if ref_params is None:
        ref_params = ts.reference_params(params, cfg)
    tx = optim.make_optimizer(LR, 0, clip_norm=CLIP)
    loss_cfg = ts.LossConfig(mode="dpo", beta=BETA, logps_chunk=chunk, save_logits=save_logits)
    step = jax.jit(ts.make_train_step(cfg, loss_cfg, tx),
                   donate_argnums=(0,))
    micro = jax.device_put(ts.to_micro_batches(batch, 1))
    holder = {"state": ts.init_state(params, tx, 0)}
    losses = []

    def run():
        holder["state"], metrics = step(holder["state"], ref_params, micro)
        losses.append(float(jax.block_until_ready(metrics["loss"])))

    return run, losses, cfg, ref_params


def make_torch_step(model_dir, batch):
    """The same DPO step in PyTorch (full fp32 logits, as a transformers user writes it)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).train()
    reference = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    opt = torch.optim.RMSprop(policy.parameters(), lr=LR, alpha=0.99, eps=1e-8)
    ids = torch.as_tensor(batch.input_ids, dtype=torch.long)
    mask = torch.as_tensor(batch.attention_mask, dtype=torch.long)
    labels = torch.as_tensor(batch.labels, dtype=torch.long)[:, 1:]
    keep = labels != -100
    targets = labels.clamp(min=0).unsqueeze(-1)
    half = ids.shape[0] // 2
    losses = []

    def seq_logps(model):
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        picked = torch.gather(logits.log_softmax(-1), 2, targets).squeeze(-1)
        return (picked * keep).sum(-1)

    def run():
        opt.zero_grad(set_to_none=True)
        pol = seq_logps(policy)
        with torch.no_grad():
            ref = seq_logps(reference)
        h = (pol[:half] - pol[half:]) - (ref[:half] - ref[half:])
        loss = -F.logsigmoid(BETA * h).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), CLIP)
        opt.step()
        losses.append(loss.item())

    return run, losses


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=204, help="of --seq (CoSAlign: 512 of 640)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--logps-chunk", type=int, default=128, help="LossConfig.logps_chunk of our step")
    p.add_argument("--attention-impl", default="xla", choices=["xla", "reference"])
    p.add_argument("--remat", default="none")
    p.add_argument("--recompute-logits", action="store_true",
                   help="train.save_logits=False: form the window logits again in the backward")
    p.add_argument("--lead-in", type=int, default=1,
                   help="untimed steps of a contender right before each of its timed steps")
    p.add_argument("--no-bf16", action="store_true", help="skip the bf16-compute JAX row")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch step (investigations)")
    args = p.parse_args(argv)

    import jax
    import numpy as np
    import torch

    from cosa_jax.models import EMBEDDED_MODEL, resolve_model_dir

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    model_dir = resolve_model_dir(EMBEDDED_MODEL)
    peak_before = matmul_peak()

    rows = 2 * args.pairs
    tokens = rows * args.seq
    from cosa_jax.models import LlamaConfig
    cfg = LlamaConfig.from_json_file(model_dir / "config.json")
    batch = dpo_batch(args.pairs, args.seq, cfg.vocab_size, args.prompt_len)
    from cosa_jax.train import data as td
    windowed = td.add_response_windows(batch, window_multiple=64)  # as data.collate gives it
    shared = shared_batch(batch, args.pairs, args.prompt_len)
    contenders, losses = {}, {}
    def jax_step(compute_dtype, rows_batch, ref_params=None):
        return make_jax_step(model_dir, compute_dtype, rows_batch, args.logps_chunk,
                             args.attention_impl, args.remat, ref_params,
                             save_logits=not args.recompute_logits)

    contenders["jax fp32"], losses["jax fp32"], cfg, ref = jax_step("float32", windowed)
    contenders["jax fp32 shared"], losses["jax fp32 shared"], _, _ = jax_step("float32", shared, ref)
    if not args.no_bf16:
        contenders["jax bf16"], losses["jax bf16"], _, _ = jax_step("bfloat16", windowed, ref)
    if not args.no_torch:
        contenders["torch fp32"], losses["torch fp32"] = make_torch_step(model_dir, batch)
    # Warm-up (the JAX compile) is timed separately so that it is visible but excluded.
    warm = {}
    for name, fn in contenders.items():
        t0 = time.perf_counter()
        fn()
        warm[name] = time.perf_counter() - t0
    probe, probe_flops = matmul_probe()
    contenders["matmul"] = probe
    times = common.time_interleaved(contenders, reps=args.reps, warmup=0, lead_in=args.lead_in)
    probe_times = times.pop("matmul")
    peak = max(peak_before, matmul_peak())

    flops, n_params = step_flops(cfg, rows, args.seq)
    row_window = windowed.targets.shape[1]
    from cosa_jax.models.llama import CAUSAL_QUERY_BLOCKS
    square = (CAUSAL_QUERY_BLOCKS + 1) / (2 * CAUSAL_QUERY_BLOCKS)  # query blocks (llama.causal_attention)
    executed = {"jax fp32": step_flops(cfg, rows, args.seq, head_positions=rows * row_window,
                                       attn_fraction=square)[0]}
    executed["jax bf16"] = executed["jax fp32"]
    shared_len, window = shared.input_ids.shape[1], shared.chosen_targets.shape[1]
    executed["jax fp32 shared"] = step_flops(cfg, args.pairs, shared_len,
                                             head_positions=args.pairs * window,
                                             attn_fraction=square)[0]
    print(f"[train_step] SmolLM2-135M DPO step, {args.pairs} pairs x {args.seq} tokens "
          f"({tokens} tokens, {args.prompt_len}-token prompts, policy + reference), fp32 params, "
          f"median of {args.reps} reps (each after {args.lead_in} untimed step(s) of its own); "
          f"jax {jax.__version__} ({jax.devices()[0].platform}), "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads); "
          f"logps_chunk={args.logps_chunk}, save_logits={not args.recompute_logits}, "
          f"attention={args.attention_impl}, remat={args.remat}; "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}")
    if "glibc.malloc.hugetlb" not in os.environ.get("GLIBC_TUNABLES", ""):
        print("[train_step] note: without GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (set by `make bench`) "
              "both contenders' large buffers fault in 4 KiB pages; the JAX step loses ~12%")
    print(f"[train_step] FLOPs/step = tokens*(6N+3A) + tokens*(2N+A) = {flops / 1e9:.1f} GFLOP "
          f"(N = {n_params / 1e6:.1f}M non-embedding + unembedding weights, A = 4*L*heads*head_dim*T); "
          f"executed: two rows per pair {executed['jax fp32'] / 1e9:.1f} GFLOP (unembedding on "
          f"{row_window}-token response windows), prompt-shared rows "
          f"{executed['jax fp32 shared'] / 1e9:.1f} GFLOP ({args.pairs} rows x {shared_len} "
          f"tokens, padding included; {window}-token windows)")
    print(f"[train_step] measured fp32 matmul peak (jitted 2048^3 jnp.dot, best): "
          f"{peak / 1e9:.1f} GFLOP/s")
    for name, ts_ in times.items():
        med = common.median(ts_)
        extra = ""
        if name in executed:
            extra = (f"; executed {executed[name] / med / 1e9:.1f} GFLOP/s "
                     f"({executed[name] / med / peak:.1%} of peak)")
        print(f"[train_step] {name:15s}: {tokens / med:8.1f} tokens/s  {flops / med / 1e9:6.1f} GFLOP/s "
              f"({flops / med / peak:5.1%} of peak){extra}  reps {[round(t, 2) for t in ts_]} s, "
              f"warm-up {warm[name]:.1f} s")
    mfu = {name: executed[name] / common.median(times[name]) / peak
           for name in ("jax fp32", "jax fp32 shared")}
    if "torch fp32" in times:
        peer = tokens / common.median(times["torch fp32"])
        for name in ("jax fp32", "jax fp32 shared"):
            print(f"[train_step] --- {name} vs torch fp32 (same pairs, same loss)")
            common.report("train_step", "tokens/s", tokens / common.median(times[name]), peer,
                          "PyTorch", target=1.3)
            best = min(times["torch fp32"]) / min(times[name])
            print(f"[train_step] ratio ours/peer, fastest rep of each (less sensitive to load "
                  f"spikes): {best:.2f}x")
    for name, value in mfu.items():
        verdict = "met" if value >= 0.70 else "NOT met"
        print(f"[train_step] mfu_vs_measured_peak ({name}, executed FLOPs): {value:.1%}  "
              f"(target >= 70%: {verdict})")
    for name in ("jax fp32", "jax fp32 shared"):
        adjacent = [(executed[name] / t) / (probe_flops / tp)
                    for t, tp in zip(times[name], probe_times)]
        print(f"[train_step] mfu_vs_adjacent_matmul ({name}, executed FLOPs): "
              f"{common.median(adjacent):.1%}  (per rep {[f'{x:.0%}' for x in adjacent]})")
    print(f"[train_step] adjacent matmul per rep: "
          f"{[round(probe_flops / tp / 1e9) for tp in probe_times]} GFLOP/s")
    if "torch fp32" in times:
        adjacent_t = [(flops / t) / (probe_flops / tp) for t, tp in zip(times["torch fp32"], probe_times)]
        print(f"[train_step] mfu_vs_adjacent_matmul (torch fp32): {common.median(adjacent_t):.1%}")
    if "jax bf16" in times:
        print(f"[train_step] mfu_vs_measured_peak (jax bf16, executed FLOPs, vs fp32 peak): "
              f"{executed['jax bf16'] / common.median(times['jax bf16']) / peak:.1%}")
    # Both sides start from the same weights on the same batch: the losses must agree.
    for name, ls in losses.items():
        print(f"[train_step] losses {name:15s}: {[round(x, 5) for x in ls]}")
    first = losses["jax fp32"][0]
    if not math.isclose(first, math.log(2), abs_tol=1e-5):
        raise SystemExit(f"first DPO loss {first} != ln 2: the JAX step is not the DPO step")
    if "torch fp32" in losses:
        for name in ("jax fp32", "jax fp32 shared"):
            gap = float(np.max(np.abs(np.array(losses[name]) - np.array(losses["torch fp32"]))))
            print(f"[train_step] max |loss {name} - loss torch| over steps: {gap:.2e}")


if __name__ == "__main__":
    main()
