"""Soak the OpenAI server with mixed traffic on loopback (issue 25.4, server half).

Valid chats, malformed bodies, oversized bodies and clients that disconnect mid-stream run
against one in-process server for ``--minutes``; prints requests served, responses by status,
the 5xx count (target 0) and p50/p99 latency of the valid requests, then checks the server still
answers. Exits non-zero on any 5xx or if the server stops answering.

    python bench/soak_server.py --minutes 2          # make bench
    python bench/soak_server.py --minutes 10         # the issue's soak
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODEL = "soak"
MALFORMED = [
    b"{not json",
    b'{"model": "soak", "messages": [{"role": "user", "content": "x"}], "n": 1e400}',
    b'{"model": "soak", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
    b'{"model": "soak", "messages": [{"role": "user", "content": "\xff"}]}',
    b'{"model": "soak", "messages": [{"role": "user", "content": "x"}], "top_k": -1'
    + b"0" * 400 + b"}",
    json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                "min_tokens": 3}).encode(),
    json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                "max_tokens": -1}).encode(),
    json.dumps({"model": MODEL, "messages": [{"role": "user", "content": 5}]}).encode(),
    json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                "temperature": True}).encode(),
    json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                "max_tokens": 10**6}).encode(),
    b"[" * 20000 + b"]" * 20000,
]


def post(base, body: bytes, timeout=300):
    req = urllib.request.Request(base + "/chat/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        e.read()
        return e.code
    except (ConnectionError, urllib.error.URLError):
        return "conn"


def disconnect(port, body: bytes):
    s = socket.create_connection(("127.0.0.1", port), timeout=300)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
              b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    got = b""
    while b"data:" not in got and len(got) < 2**16:
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    s.close()
    return "disconnected"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=2.0)
    p.add_argument("--model", default="embedded:smollm2-135m-instruct")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=16)
    args = p.parse_args(argv)

    from cosa_jax.inference.requests import ServerLimits
    from cosa_jax.inference.server import BackgroundServer, ChatModel, create_app
    model = ChatModel.load(args.model)
    limits = ServerLimits(max_body_bytes=256 * 1024)
    app = create_app(model, served_model_name=MODEL, max_batch=args.max_batch,
                     max_cache_len=1024, limits=limits)
    statuses: collections.Counter = collections.Counter()
    latencies: list[float] = []
    lock = threading.Lock()
    with BackgroundServer(app) as srv:
        base = srv.base_url

        def valid(rng):
            body = json.dumps({"model": MODEL, "max_tokens": args.max_tokens,
                               "temperature": rng.choice([0, 0.7]), "seed": rng.randrange(1000),
                               "stream": rng.random() < 0.3, "messages": [
                                   {"role": "user", "content": f"Tell me about {rng.random()}"}]})
            t0 = time.perf_counter()
            status = post(base, body.encode())
            if status == 200:
                with lock:
                    latencies.append(time.perf_counter() - t0)
            return status

        post(base, json.dumps({"model": MODEL, "max_tokens": 2, "messages": [
            {"role": "user", "content": "warm up"}]}).encode())
        deadline = time.time() + args.minutes * 60

        def worker(seed):
            rng = random.Random(seed)
            while time.time() < deadline:
                kind = rng.choices(["valid", "malformed", "oversized", "disconnect"],
                                   [5, 3, 1, 1])[0]
                if kind == "valid":
                    status = valid(rng)
                elif kind == "malformed":
                    status = post(base, rng.choice(MALFORMED))
                elif kind == "oversized":
                    status = post(base, json.dumps({"model": MODEL, "messages": [
                        {"role": "user", "content": "x" * (300 * 1024)}]}).encode())
                else:
                    status = disconnect(srv.port, json.dumps({
                        "model": MODEL, "max_tokens": 200, "stream": True, "messages": [
                            {"role": "user", "content": "Go on and on."}]}).encode())
                with lock:
                    statuses[(kind, status)] += 1

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.clients)]
        t0 = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.time() - t0
        after = post(base, json.dumps({"model": MODEL, "max_tokens": 2, "messages": [
            {"role": "user", "content": "still there?"}]}).encode(), timeout=120)

    total = sum(statuses.values())
    by_status = collections.Counter()
    for (_, status), n in statuses.items():
        by_status[status] += n
    n5xx = sum(n for s, n in by_status.items() if isinstance(s, int) and s >= 500)
    lat = sorted(latencies)
    pct = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan"))
    print(f"soak_server: {elapsed:.0f} s, {args.clients} clients, {total} requests, "
          f"{by_status.get(200, 0)} served (200)")
    print("  by kind/status: " + ", ".join(f"{k}:{s}={n}" for (k, s), n in sorted(
        statuses.items(), key=lambda x: (x[0][0], str(x[0][1])))))
    print("  by status: " + ", ".join(f"{s}={n}" for s, n in sorted(by_status.items(), key=str)))
    print(f"  5xx: {n5xx} (target 0); valid latency p50 {pct(0.5):.3f} s, p99 {pct(0.99):.3f} s")
    print(f"  server answers afterwards: {after == 200}")
    return 0 if n5xx == 0 and after == 200 and by_status.get("conn", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
