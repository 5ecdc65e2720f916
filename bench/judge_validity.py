"""Each judge's valid-verdict rate on the embedded SmolLM2-135M, with and without constraints.

The judges' chats are built from the shipped judge-agreement rows (``cosa_jax/data/
judge_agreement.jsonl``) and answered greedily in process (the demo's judge), once free (text
parsed by the judges' parsers, strict and lenient) and once constrained to each judge's output
schema (``Judge.output``). Writes ``bench/results/judge_validity.json``.
Run: ``python bench/judge_validity.py [--rows N] [--max-tokens T]`` (part of ``make bench``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402,F401  (sets the cache / offline environment first)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16, help="agreement rows per judge")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "judge_validity.json"))
    args = ap.parse_args()

    from cosa_jax import judges
    from cosa_jax.data import DATA_DIR
    from cosa_jax.eval.judge_agreement import KINDS, _chats, load_rows
    from cosa_jax.inference.server import ChatModel
    from cosa_jax.models import EMBEDDED_MODEL
    from cosa_jax.inference.local_chat import chat_fn

    rows = load_rows(DATA_DIR / "judge_agreement.jsonl")[: args.rows]
    fn = chat_fn(ChatModel.load(EMBEDDED_MODEL))
    out = {"model": EMBEDDED_MODEL, "rows": len(rows), "max_tokens": args.max_tokens, "judges": {}}
    for kind in KINDS:
        judge = judges.JUDGES[kind]
        chats = _chats(kind, rows)
        res = {}
        for label, cons in (("free", None), ("constrained", [judge.output.constraint()] * len(chats))):
            t0 = time.perf_counter()
            texts = fn(chats, args.max_tokens, constraints=cons)
            verdicts = [judge.read(t) for t in texts]
            res[label] = {"valid_rate": sum(v.valid for v in verdicts) / len(verdicts),
                          "lenient": sum(v.valid and v.lenient for v in verdicts),
                          "strict_valid_rate": sum(judge.parse(t).valid for t in texts) / len(texts),
                          "seconds": round(time.perf_counter() - t0, 1)}
        out["judges"][kind] = res
        print(f"{kind:14s} free {100 * res['free']['valid_rate']:5.1f} % valid "
              f"(strict {100 * res['free']['strict_valid_rate']:5.1f} %, lenient {res['free']['lenient']})"
              f" | constrained {100 * res['constrained']['valid_rate']:5.1f} %", flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
