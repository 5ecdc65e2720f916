"""A run killed with SIGKILL mid-way and restarted re-sends no completed request (counted at the server)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cosa_jax.endpoint.journal import Journal, read_counts
from cosa_jax.testing.scripted_server import FakeChatServer, echo_reply

REPO = Path(__file__).resolve().parents[1]
N = 300

CHILD = r"""
import sys
from cosa_jax.endpoint.client import ChatRequest, EndpointConfig, run_requests_sync
from cosa_jax.endpoint.journal import Journal
base_url, journal_path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
ep = EndpointConfig(model="m", base_url=base_url, api_key_env="", concurrency=8, timeout_s=2.0,
                    backoff_base_s=0.01, backoff_max_s=0.05, max_attempts=20)
reqs = [ChatRequest([{"role": "user", "content": f"item {i}"}]) for i in range(n)]
with Journal(journal_path) as j:
    res, usage = run_requests_sync(ep, j, reqs, progress=False)
assert all(r is not None for r in res)
print("DONE", usage.requests, usage.cached, flush=True)
"""


def _child(srv, journal):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, srv.base_url, str(journal), str(N)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _done(path: Path) -> int:
    """Completed rows, read from the database while the child writes it (no lock taken)."""
    try:
        return read_counts(path).done
    except (FileNotFoundError, RuntimeError):
        return 0


def test_sigkill_then_resume_sends_no_completed_request(tmp_path):
    journal = tmp_path / "journal.sqlite"
    expected = {echo_reply({"messages": [{"content": f"item {i}"}]}): f"item {i}" for i in range(N)}
    with FakeChatServer(latency_s=0.02, fault_rate=0.15, fault_kinds=("429", "500", "garbage"), seed=3) as srv:
        p = _child(srv, journal)
        deadline = time.monotonic() + 60
        while _done(journal) < N // 3 and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.01)
        assert p.poll() is None, f"child finished before it could be killed: {p.communicate()}"
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        assert p.returncode == -signal.SIGKILL

        with Journal(journal) as j:  # a kill mid-commit leaves the last transaction out, never half
            done_run1 = {expected[j.get(k)["text"]] for k in j.keys()}
        assert N // 3 <= len(done_run1) < N, len(done_run1)
        n_log_run1 = len(srv.log)

        p2 = _child(srv, journal)
        out, err = p2.communicate(timeout=120)
        assert p2.returncode == 0, err[-2000:]
        assert out.startswith("DONE")
        sent_run2 = {content for _, content in srv.log[n_log_run1:]}

    # no request completed (journaled) in run 1 went over the wire again in run 2
    assert not (sent_run2 & done_run1)
    # and everything else did: nothing lost
    assert sent_run2 | done_run1 == set(expected.values())
    # the journal holds every record exactly once
    with Journal(journal) as j:
        keys = list(j.keys())
        assert j.counts() == {"done": N, "failed": 0, "pending": 0}
    assert len(keys) == N == len(set(keys))
    _, requests, cached = out.split()
    print(f"\ncrash-resume: N={N}, journaled before SIGKILL={len(done_run1)}, requests seen by server "
          f"in run 1={n_log_run1}, in run 2={len(srv.log) - n_log_run1} (completed ones re-sent: 0)")
    assert int(cached) == len(done_run1) and int(requests) == N - len(done_run1)
