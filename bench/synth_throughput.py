"""Synthesis client throughput against a local server with a fixed per-request latency.

The server (the test-double ``cosa_jax.testing.scripted_server``, in its own process) sleeps a fixed
``--latency`` per request, so the ideal rate at concurrency c is c / latency. We push requests
through the real path (``run_requests``: openai.AsyncOpenAI, retry loop, limiter, journal with a
commit per record) and print completed requests/s against that ideal, plus a check that every
record arrived exactly once. Target: >= 80% of ideal at concurrency 128 with nothing lost.

    python bench/synth_throughput.py [--latency 0.05 0.5] [--concurrency 1 8 32 128]

At 50 ms the ideal at concurrency 128 is 2,560 req/s, which needs < 0.4 ms of client CPU per
request; the openai SDK spends ~1.5-2 ms of Python per request (request/URL/header objects), so on
a small CPU that row measures the client's CPU ceiling rather than its concurrency handling. The
2 s row (a typical LLM request latency) measures the latter. The script also prints the measured
CPU ceiling (requests/s with zero server latency) and the latency above which 80% is reachable.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cosa_jax.endpoint.client import ChatClient, ChatRequest, EndpointConfig, run_requests  # noqa: E402
from cosa_jax.endpoint.journal import Journal  # noqa: E402
from cosa_jax.testing.scripted_server import echo_reply  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"benchmark server did not come up on port {port}")


async def _run(base_url: str, concurrency: int, n: int, journal_path: Path) -> tuple[float, int, int, dict]:
    ep = EndpointConfig(model="bench", base_url=base_url, api_key_env="", concurrency=concurrency,
                        timeout_s=30.0, max_attempts=5, backoff_base_s=0.05)
    reqs = [ChatRequest([{"role": "user", "content": f"c{concurrency}-item-{i}"}]) for i in range(n)]
    # warm the connection pool so the timing measures steady state, not TCP handshakes
    warm = [ChatRequest([{"role": "user", "content": f"warm-{concurrency}-{i}"}]) for i in range(concurrency)]
    async with ChatClient(ep, "bench") as client:
        with Journal(journal_path.with_suffix(".warm.sqlite")) as jw:
            await run_requests(client, jw, warm, progress=False)
        with Journal(journal_path) as j:
            t0 = time.perf_counter()
            res = await run_requests(client, j, reqs, progress=False)
            dt = time.perf_counter() - t0
            ok = sum(r is not None and r["text"] == echo_reply({"messages": q.messages}) for r, q in zip(res, reqs))
            lines = j.counts()["done"]
    return dt, ok, lines, dict(client.usage.errors)


def _table(latency: float, concurrencies: list[int], rounds: int) -> list[tuple]:
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "cosa_jax.testing.scripted_server", "--port", str(port), "--latency", str(latency)],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    rows = []
    try:
        _wait_port(port)
        base_url = f"http://127.0.0.1:{port}/v1"
        with tempfile.TemporaryDirectory() as d:
            for c in concurrencies:
                n = rounds * c
                dt, ok, lines, errors = asyncio.run(_run(base_url, c, n, Path(d) / f"c{c}.sqlite"))
                rate, ideal = n / dt, (c / latency if latency else float("inf"))
                rows.append((c, n, rate, ideal, rate / ideal, ok == n == lines, errors))
    finally:
        server.terminate()
        server.wait(10)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latency", type=float, nargs="+", default=[0.05, 2.0], help="server seconds per request")
    ap.add_argument("--rounds", type=int, default=0, help="requests per run = rounds x concurrency (default: ~1 s of ideal time)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    args = ap.parse_args()
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    print(f"synth client throughput: server = separate process with a fixed latency per request; client = "
          f"run_requests (openai.AsyncOpenAI + retry loop + limiter + journal commit per record); "
          f"{os.cpu_count()} CPUs shared by client and server; load average before: {os.getloadavg()[0]:.2f}")
    ceiling = _table(0.0, [max(args.concurrency)], 10)[0][2]
    print(f"client CPU ceiling (0 ms server latency, concurrency {max(args.concurrency)}): {ceiling:.0f} req/s, so "
          f"80% of ideal at concurrency {max(args.concurrency)} needs a latency of at least ~"
          f"{max(args.concurrency) / (0.8 * ceiling) * 1000:.0f} ms on this machine")
    for latency in args.latency:
        rounds = args.rounds or max(4, int(round(1.0 / latency)))
        rows = _table(latency, args.concurrency, rounds)
        print(f"\nserver latency {latency * 1000:.0f} ms/request")
        print(f"{'concurrency':>11} {'requests':>9} {'req/s':>9} {'ideal req/s':>12} {'ratio':>7}  all exactly once")
        for c, n, rate, ideal, ratio, exact, errors in rows:
            extra = f"  errors={errors}" if errors else ""
            print(f"{c:>11} {n:>9} {rate:>9.1f} {ideal:>12.1f} {ratio:>7.1%}  {'yes' if exact else 'NO'}{extra}")
        last = rows[-1]
        verdict = "meets" if last[4] >= 0.8 and last[5] else "misses"
        print(f"target >= 80% of ideal at concurrency {last[0]}, nothing lost: {verdict} ({last[4]:.1%})")


if __name__ == "__main__":
    main()
