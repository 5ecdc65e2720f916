"""Many requests through run_requests and the SQLite journal, SIGKILLed in the middle and resumed:
0 lost, 0 duplicated, and the process's memory does not grow with the replies it has journaled.

The client is the production path with an in-process reply (cosa_jax.testing.instant_client), so
the test exercises the journal, not HTTP. It runs 12k requests (100k take minutes on the shared
2-core test machine); ``make bench`` (bench/soak.py) runs 100k over HTTP with faults and a kill.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cosa_jax.endpoint.journal import Journal, read_counts
from cosa_jax.testing.instant_client import reply_text

REPO = Path(__file__).resolve().parents[1]
N = 12_000
REPLY_BYTES = 8192  # the ~6k replies of run 2 held in memory would be ~48 MiB: past the bound below

CHILD = r"""
import asyncio, json, os, sys, threading, time
from cosa_jax.endpoint.client import ChatRequest, EndpointConfig, run_requests
from cosa_jax.endpoint.journal import Journal
from cosa_jax.testing.instant_client import InstantChatClient

db, sent_log, n, reply_bytes, fail_rate, rss_log = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), sys.argv[6]
page = os.sysconf("SC_PAGE_SIZE")
client = InstantChatClient(EndpointConfig(model="m", base_url="http://127.0.0.1:9/v1", api_key_env="", concurrency=64),
                           reply_bytes=reply_bytes, fail_rate=fail_rate, sent_log=sent_log)
samples = []
stop = False
def sample():  # (replies received so far in this run, resident set in bytes)
    while not stop:
        with open("/proc/self/statm") as f:
            samples.append((client.calls, int(f.read().split()[1]) * page))
        time.sleep(0.05)
reqs = [ChatRequest([{"role": "user", "content": f"item {i}"}]) for i in range(n)]
t = threading.Thread(target=sample, daemon=True)

async def main():
    with Journal(db) as j:
        t.start()
        res = await run_requests(client, j, reqs, progress=False)
        global stop
        stop = True
        t.join()
        await client.close()
        n_none = sum(r is None for r in res)
        del res
        return n_none, j.counts()

n_none, counts = asyncio.run(main())
json.dump(samples, open(rss_log, "w"))
print("DONE", n_none, client.usage.cached, json.dumps(counts, separators=(",", ":")), flush=True)
"""


def _child(tmp, n, fail_rate, run):
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp / "j.sqlite"), str(tmp / f"sent{run}.log"), str(n), str(REPLY_BYTES),
         str(fail_rate), str(tmp / f"rss{run}.json")],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_12k_requests_sigkill_midway_none_lost_none_duplicated_memory_flat(tmp_path):
    db = tmp_path / "j.sqlite"
    p = _child(tmp_path, N, 0.01, 1)  # 1% of requests fail in run 1 (journaled as failed)
    deadline = time.monotonic() + 300
    while p.poll() is None and time.monotonic() < deadline:
        try:
            if read_counts(db).done >= N // 2:  # read while the child writes
                break
        except (FileNotFoundError, RuntimeError):
            pass
        time.sleep(0.02)
    assert p.poll() is None, f"run 1 ended before the kill: {p.communicate()}"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    c1 = read_counts(db)
    assert N // 2 <= c1.done < N and c1.failed > 0 and c1.total == N, c1
    with Journal(db) as j:
        done1 = set(j.keys())

    p2 = _child(tmp_path, N, 0.0, 2)
    out, err = p2.communicate(timeout=600)
    assert p2.returncode == 0, err[-3000:]
    _, n_none, cached, counts = out.split()
    assert n_none == "0" and json.loads(counts) == {"done": N, "failed": 0, "pending": 0}
    assert int(cached) == len(done1)

    sent1 = (tmp_path / "sent1.log").read_text().split()
    sent2 = (tmp_path / "sent2.log").read_text().split()
    assert len(sent2) == len(set(sent2)) == N - len(done1)  # run 2 sent each missing request once
    assert not set(sent2) & done1  # and none that run 1 had completed: 0 duplicated
    with Journal(db) as j:
        keys = list(j.keys())
        assert len(keys) == len(set(keys)) == N  # 0 lost
        assert set(keys) == set(sent1) | set(sent2)
        for k in keys[::97]:
            assert j.get(k) == {"text": reply_text(k, REPLY_BYTES), "finish_reason": "stop", "model": "m",
                                "prompt_tokens": 0, "completion_tokens": 0}

    # memory while run 2 journals ~6k replies of 8 KiB: flat (they are on disk, not in a dict)
    samples = json.loads((tmp_path / "rss2.json").read_text())
    last = max(calls for calls, _ in samples)  # after the last reply run_requests builds its result list
    during = [rss for calls, rss in samples if 1_000 <= calls < last]
    assert len(during) >= 3, samples[:5]
    growth = max(during) - during[0]
    print(f"\njournal scale: N={N}, done before SIGKILL={len(done1)} (failed {c1.failed}), sent in run 2="
          f"{len(sent2)}, RSS during run 2 {during[0] / 2**20:.0f}-{max(during) / 2**20:.0f} MiB")
    assert growth < 24 * 2**20, (during[0], max(during))
