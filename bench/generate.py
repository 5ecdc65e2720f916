"""Decode throughput on SmolLM2-135M: the JAX KV-cache sampler vs transformers ``generate``.

Greedy, fp32, exactly 128 new tokens per row on both sides (JAX: no end-of-sequence id;
PyTorch: ``min_new_tokens=128``), the same 32-token prompts, batch 1 and 16. Tokens/s counts
new tokens only; both timings include the prefill. Then constrained vs free decoding at batch 16
(every row under the 8-way risk JSON schema vs the same prompts free, tokens/s, interleaved).
Then the server: requests/s with 16 concurrent clients vs one client, small ``max_tokens``,
through the official ``openai`` client.
Run: ``python bench/generate.py`` (part of ``make bench``).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import sys
import time
import urllib.request

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
    common.report(f"generate b={batch}", "new tokens/s", tokens / common.median(times["jax"]),
                  tokens / common.median(times["torch"]), "transformers generate",
                  target=2.0 if batch >= 16 else None,
                  detail=f"greedy tokens identical: {same}/{tokens}; jax reps "
                         f"{[round(t, 2) for t in times['jax']]} s, torch reps "
                         f"{[round(t, 2) for t in times['torch']]} s")


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


def bench_server(params, cfg, tokenizer, clients: int, requests: int, max_tokens: int):
    import openai

    from cosa_jax.inference.sampler import SamplingParams
    from cosa_jax.inference.server import BackgroundServer, ChatModel, GenJob, create_app

    model = ChatModel(params, cfg, tokenizer)
    topics = ["rivers", "bread", "chess", "volcanoes", "owls", "jazz", "glass", "tides",
              "maps", "bees", "clocks", "salt", "kites", "moss", "rain", "ink"]

    def ask(c, i):
        r = c.chat.completions.create(
            model="smol", max_tokens=max_tokens, temperature=0,
            messages=[{"role": "user", "content": f"Tell me one fact about {topics[i % 16]}."}])
        return r.usage.completion_tokens

    with BackgroundServer(create_app(model, served_model_name="smol", max_batch=16,
                                     batch_wait_ms=5)) as srv:
        c = openai.OpenAI(base_url=srv.base_url, api_key="bench", max_retries=0, timeout=600)
        # Warm-up: compile every batch bucket the runs may use (1, 2, 4, ... up to max batch),
        # so no compile lands inside a timed run; then one request through HTTP.
        job = GenJob(model.encode([{"role": "user", "content": "Tell me one fact about owls."}]),
                     SamplingParams(max_new_tokens=max_tokens))
        size = 1
        while size <= clients:
            model.run_batch([job] * size)
            size *= 2
        ask(c, 0)

        t0 = time.perf_counter()
        single_tokens = sum(ask(c, i) for i in range(requests // 4))
        single_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(clients) as pool:
            many_tokens = sum(pool.map(lambda i: ask(c, i), range(requests)))
        many_s = time.perf_counter() - t0
        with urllib.request.urlopen(srv.base_url.replace("/v1", "/stats"), timeout=30) as r:
            stats = json.loads(r.read())
    single_rps, many_rps = (requests // 4) / single_s, requests / many_s
    print(f"[server] {clients} concurrent clients: {many_rps:8.2f} requests/s "
          f"({many_tokens / many_s:.1f} completion tokens/s, {requests} requests)")
    print(f"[server] 1 client               : {single_rps:8.2f} requests/s "
          f"({single_tokens / single_s:.1f} completion tokens/s, {requests // 4} requests)")
    print(f"[server] ratio {clients} clients / 1    : {many_rps / single_rps:8.2f}x "
          f"(batch sizes served: {stats['batch_sizes']})")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--batches", default="1,16")
    p.add_argument("--reps", type=int, default=1,
                   help="timed reps per side (PyTorch at batch 16 takes minutes per rep on 2 cores)")
    p.add_argument("--server-clients", type=int, default=16)
    p.add_argument("--server-requests", type=int, default=32)
    p.add_argument("--server-max-tokens", type=int, default=16)
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
    for b in (int(x) for x in args.batches.split(",") if x.strip()):
        bench_decode(params, cfg, hf, b, args.new_tokens, args.prompt_len, args.reps)
    del hf
    if not args.skip_constrained:
        bench_constrained(params, cfg, load_tokenizer(model_dir), 16, args.constrained_reps)
    if not args.skip_server:
        bench_server(params, cfg, load_tokenizer(model_dir), args.server_clients,
                     args.server_requests, args.server_max_tokens)


if __name__ == "__main__":
    main()
