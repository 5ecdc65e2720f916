"""Decode throughput on SmolLM2-135M: the JAX KV-cache sampler vs transformers ``generate``.

Greedy, fp32, exactly 128 new tokens per row on both sides (JAX: no end-of-sequence id;
PyTorch: ``min_new_tokens=128``), the same 32-token prompts, batch 1 and 16. Tokens/s counts
new tokens only; both timings include the prefill. Then constrained vs free decoding at batch 16
(every row under the 8-way risk JSON schema vs the same prompts free, tokens/s, interleaved).
Then the server (continuous batching): 16 concurrent streaming clients through the official
``openai`` client, ``max_tokens`` 128, answers end at their own end-of-turn: completion tokens/s
against the sampler's batch-16 rate of the same run, and time to first token (p50 / p99).
Run: ``python bench/generate.py`` (part of ``make bench``).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402  (sets the cache / offline environment first)


def bench_decode(params, cfg, hf, batch: int, new_tokens: int, prompt_len: int, reps: int):
    import numpy as np
    import torch

    from cosa_jax.inference.sampler import SamplingParams, generate

    ids = np.random.default_rng(batch).integers(3, cfg.vocab_size, (batch, prompt_len))
    prompts = ids.tolist()
    ids_t = torch.as_tensor(ids, dtype=torch.long)
    out = {}

    def ours():
        out["jax"] = generate(params, cfg, prompts, SamplingParams(max_new_tokens=new_tokens),
                              eos_ids=[-1], pad_id=2)

    def peer(n=new_tokens):
        with torch.inference_mode():
            out["torch"] = hf.generate(ids_t, attention_mask=torch.ones_like(ids_t),
                                       max_new_tokens=n, min_new_tokens=n,
                                       do_sample=False, pad_token_id=2)

    # Warm-up: JAX compiles its program for exactly these shapes (that is the whole call);
    # PyTorch has nothing to compile, so a short call warms its kernels.
    ours()
    peer(4)
    times = common.time_interleaved({"jax": ours, "torch": peer}, reps=reps, warmup=0)
    jax_ids = [c.token_ids for c in out["jax"]]
    torch_ids = out["torch"][:, prompt_len:].tolist()
    assert all(len(r) == new_tokens for r in jax_ids + torch_ids), "a side stopped early"
    same = sum(a == b for ra, rb in zip(jax_ids, torch_ids) for a, b in zip(ra, rb))
    tokens = batch * new_tokens
    rate = tokens / common.median(times["jax"])
    common.report(f"generate b={batch}", "new tokens/s", tokens / common.median(times["jax"]),
                  tokens / common.median(times["torch"]), "transformers generate",
                  target=2.0 if batch >= 16 else None,
                  detail=f"greedy tokens identical: {same}/{tokens}; jax reps "
                         f"{[round(t, 2) for t in times['jax']]} s, torch reps "
                         f"{[round(t, 2) for t in times['torch']]} s")
    return rate


def bench_constrained(params, cfg, tokenizer, batch: int, reps: int):
    """Tokens/s with every row under the risk judge's JSON schema (the stepped path: host
    matcher per token) vs free greedy decoding of the same prompts (the fused while_loop).
    The free side ignores end-of-sequence, so it runs all its rows for the bucket's full length
    as the constrained rows nearly do (the schema forces about 90 tokens)."""
    from cosa_jax.inference.constraints import OutputConstraint
    from cosa_jax.inference.sampler import SamplingParams, generate
    from cosa_jax.taxonomy import ALL_CATEGORIES

    names = [c.value for c in ALL_CATEGORIES]
    schema = {"type": "object", "properties": {c: {"type": "boolean"} for c in names},
              "required": names, "additionalProperties": False}
    topics = ["pick a lock", "bake bread", "hide money from taxes", "insult my boss",
              "grow tomatoes", "make a fake ID", "train a puppy", "find someone's address"]
    prompts = [tokenizer.apply_chat_template(
        [{"role": "user", "content": f"Which risk categories does 'how do I {topics[i % 8]}' "
                                     f"touch? Answer with a JSON object of booleans."}],
        add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        for i in range(batch)]
    sampling = SamplingParams(max_new_tokens=96)
    cons = [OutputConstraint("json_schema", schema)] * batch
    out = {}

    def constrained():
        out["c"] = generate(params, cfg, prompts, sampling, tokenizer=tokenizer, constraints=cons)

    def free():
        out["f"] = generate(params, cfg, prompts, sampling, eos_ids=[-1], pad_id=2)

    times = common.time_interleaved({"constrained": constrained, "free": free}, reps=reps, warmup=1)
    c_tokens = sum(len(c.token_ids) for c in out["c"])
    f_tokens = sum(len(c.token_ids) for c in out["f"])
    valid = sum(c.finish_reason == "stop" and set(json.loads(c.text)) == set(names) for c in out["c"])
    c_rate, f_rate = c_tokens / common.median(times["constrained"]), f_tokens / common.median(times["free"])
    print(f"[constrained b={batch}] risk JSON schema: {c_rate:8.1f} new tokens/s ({c_tokens} tokens, "
          f"{valid}/{batch} valid); free: {f_rate:8.1f} new tokens/s ({f_tokens} tokens)")
    print(f"[constrained b={batch}] constrained / free: {c_rate / f_rate:6.2f}x (target >= 0.85x: "
          f"{'met' if c_rate / f_rate >= 0.85 else 'NOT met'}); constrained reps "
          f"{[round(t, 2) for t in times['constrained']]} s, free reps "
          f"{[round(t, 2) for t in times['free']]} s")


def bench_server(params, cfg, tokenizer, clients: int, requests: int, max_tokens: int,
                 sampler_tps: float | None):
    """16 clients through the official openai client, streaming, against the engine's server:
    completion tokens/s (vs the sampler's batch-16 rate measured above in this run) and the
    time to first token (p50 / p99)."""
    import numpy as np
    import openai

    from cosa_jax.inference.server import STATE_KEY, BackgroundServer, ChatModel, create_app

    model = ChatModel(params, cfg, tokenizer)
    topics = ["rivers", "bread", "chess", "volcanoes", "owls", "jazz", "glass", "tides",
              "maps", "bees", "clocks", "salt", "kites", "moss", "rain", "ink"]

    def messages(i):
        return [{"role": "user", "content": f"Tell me one fact about {topics[i % 16]}."}]

    def ask(c, i):
        t0 = time.perf_counter()
        ttft, usage = None, None
        for ch in c.chat.completions.create(model="smol", max_tokens=max_tokens, temperature=0,
                                            messages=messages(i), stream=True,
                                            stream_options={"include_usage": True}):
            if ttft is None and ch.choices and ch.choices[0].delta.content:
                ttft = time.perf_counter() - t0
            if ch.usage is not None:
                usage = ch.usage
        return usage.completion_tokens, ttft if ttft is not None else time.perf_counter() - t0

    from cosa_jax.inference.sampler import SamplingParams, generate
    rows = np.random.default_rng(16).integers(3, cfg.vocab_size, (16, 32)).tolist()

    def sampler_rate():
        t0 = time.perf_counter()
        generate(params, cfg, rows, SamplingParams(max_new_tokens=max_tokens), eos_ids=[-1],
                 pad_id=2)
        return 16 * max_tokens / (time.perf_counter() - t0)

    sampler_rate()   # compile
    app = create_app(model, served_model_name="smol", max_batch=clients, batch_wait_ms=2)
    engine = app[STATE_KEY].engine
    # Compile what the timed runs use (prefill of 1..16 rows, decode at their cache length),
    # so no compile lands inside a timed run.
    engine.warmup(max(len(model.encode(messages(i))) for i in range(16)), max_tokens)
    with BackgroundServer(app) as srv:
        c = openai.OpenAI(base_url=srv.base_url, api_key="bench", max_retries=0, timeout=600)
        with cf.ThreadPoolExecutor(clients) as pool:       # one unmeasured round
            list(pool.map(lambda i: ask(c, i), range(clients)))
        t0 = time.perf_counter()
        single = [ask(c, i) for i in range(4)]
        single_s = time.perf_counter() - t0
        sampler_rates = [sampler_rate()]       # right before and after: the same machine load
        before = engine.stats.as_dict()
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(clients) as pool:
            many = list(pool.map(lambda i: ask(c, i), range(requests)))
        many_s = time.perf_counter() - t0
        after = engine.stats.as_dict()
        sampler_rates.append(sampler_rate())
    many_tokens = sum(n for n, _ in many)
    tps = many_tokens / many_s
    ttfts = np.array([t for _, t in many]) * 1000
    steps = after["decode_steps"] - before["decode_steps"]
    mean_active = (after["slot_steps"] - before["slot_steps"]) / max(steps, 1)
    print(f"[server] {clients} concurrent clients (openai client, streaming): {tps:8.1f} "
          f"completion tokens/s ({many_tokens} tokens, {requests} requests, {many_s:.1f} s; "
          f"{mean_active:.1f} of {clients} slots busy per decode step on average)")
    print(f"[server] time to first token at {clients} clients: p50 {np.percentile(ttfts, 50):.0f} ms,"
          f" p99 {np.percentile(ttfts, 99):.0f} ms")
    print(f"[server] 1 client: {sum(n for n, _ in single) / single_s:8.1f} completion tokens/s, "
          f"time to first token {1000 * np.median([t for _, t in single]):.0f} ms")
    ref = float(np.mean(sampler_rates))
    share = tps / ref
    print(f"[server] sampler generate batch 16 x {max_tokens} tokens, timed right before and after:"
          f" {', '.join(f'{r:.1f}' for r in sampler_rates)} tokens/s"
          + (f" (the decode bench above: {sampler_tps:.1f})" if sampler_tps else ""))
    print(f"[server] {clients} clients / sampler batch 16: {100 * share:5.1f} % "
          f"(target >= 80 %: {'met' if share >= 0.8 else 'NOT met'})")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--batches", default="1,16")
    p.add_argument("--reps", type=int, default=1,
                   help="timed reps per side (PyTorch at batch 16 takes minutes per rep on 2 cores)")
    p.add_argument("--server-clients", type=int, default=16)
    p.add_argument("--server-requests", type=int, default=64)
    p.add_argument("--server-max-tokens", type=int, default=128)
    p.add_argument("--skip-server", action="store_true")
    p.add_argument("--constrained-reps", type=int, default=3)
    p.add_argument("--skip-constrained", action="store_true")
    args = p.parse_args(argv)

    import jax
    import torch
    from transformers import AutoModelForCausalLM

    from cosa_jax.models import EMBEDDED_MODEL, load_hf, load_tokenizer, resolve_model_dir

    model_dir = resolve_model_dir(EMBEDDED_MODEL)
    model, cfg = load_hf(model_dir, dtype="float32")
    params = model.params()
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    print(f"[generate] SmolLM2-135M fp32, greedy, {args.new_tokens} new tokens, prompt "
          f"{args.prompt_len} tokens, median of {args.reps} reps; jax {jax.__version__} "
          f"({jax.devices()[0].platform}), torch {torch.__version__} ({torch.get_num_threads()} threads)")
    rates = {}
    for b in (int(x) for x in args.batches.split(",") if x.strip()):
        rates[b] = bench_decode(params, cfg, hf, b, args.new_tokens, args.prompt_len, args.reps)
    del hf
    if not args.skip_constrained:
        bench_constrained(params, cfg, load_tokenizer(model_dir), 16, args.constrained_reps)
    if not args.skip_server:
        bench_server(params, cfg, load_tokenizer(model_dir), args.server_clients,
                     args.server_requests, args.server_max_tokens, rates.get(16))


if __name__ == "__main__":
    main()
