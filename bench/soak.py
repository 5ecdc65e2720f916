"""Soak: a long synthesis run against a fault-injecting endpoint, SIGKILLed once and restarted.

Loopback only, bounded in time (``--minutes``). The endpoint is the test-double scripted server
(``cosa_jax.testing.scripted_server``) injecting 429s with Retry-After, 500s, hung requests (the
client times out), dropped connections and garbage bodies; synthesis is the real CLI
(``python -m launch.synthesize``) in its own process, on a generated prompt set sized for about
``--requests`` requests. Once about half of them are journaled the run gets a SIGKILL and is
started again. Printed: requests served and faults by kind, lost / duplicated records (target
0 / 0), and the synthesis process's resident memory against requests done (target: flat, under
500 MB at 100k requests).

    python bench/soak.py [--minutes 2] [--requests 100000] [--section synthesis]

Sections: ``synthesis`` (this file). Issue 25 item 4 also asks for mixed traffic against our own
server (valid, malformed, oversized, disconnecting requests): that part registers itself in
``SECTIONS`` below as ``server``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import bench.common  # noqa: E402,F401  (environment defaults)

import datasets  # noqa: E402
import ml_collections  # noqa: E402

from cosa_jax.endpoint.journal import read_counts  # noqa: E402
from cosa_jax.synth import stages  # noqa: E402
from cosa_jax.synth.inputs import load_mini_prompts  # noqa: E402
from cosa_jax.testing.scripted_server import FakeChatServer, ScriptedReplies  # noqa: E402

# a prompt the judge puts outside the training categories costs one request, one inside 1 + 9
# generations + 18 judges (+ re-asks), fewer where identical chats are sent once: ~12 on average
REQUESTS_PER_PROMPT = 12
FAULT_KINDS = ("429", "500", "hang", "drop", "garbage")

CONFIG = '''
import importlib.util
spec = importlib.util.spec_from_file_location("synth_demo", {demo!r})
demo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo)


def get_config():
    c = demo.get_config()
    c.out_dir = {out!r}
    c.progress = False
    c.sources = [dict(kind="file", path={prompts!r})]
    c.max_per_label_group = 1_000_000
    for role in c.endpoints:
        e = c.endpoints[role]
        e.base_url, e.concurrency, e.timeout_s = {base_url!r}, {concurrency}, 2.0
        e.max_attempts, e.backoff_base_s, e.backoff_max_s = 10, 0.02, 0.2
    return c
'''


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _journaled(out: Path) -> dict[str, int]:
    tot = Counter()
    for db in (out / "journal").glob("*.sqlite") if (out / "journal").exists() else ():
        try:
            c = read_counts(db)
        except (FileNotFoundError, RuntimeError):
            continue
        tot.update(done=c.done, failed=c.failed, pending=c.pending)
    return dict(tot)


def _write_prompts(path: Path, n: int) -> None:
    base = [r["prompt"] for r in load_mini_prompts()]
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"{base[i % len(base)]} (soak case {i})"}) + "\n")


def synthesis_soak(minutes: float, requests: int, concurrency: int, fault_rate: float) -> bool:
    """Returns whether the targets were met (0 lost, 0 duplicated, peak RSS < 500 MB)."""
    t_end = time.monotonic() + minutes * 60
    n_prompts = max(60, requests // REQUESTS_PER_PROMPT)
    tmp = Path(tempfile.mkdtemp(prefix="cosa_soak_"))
    out = tmp / "out"
    _write_prompts(tmp / "prompts.jsonl", n_prompts)
    srv = FakeChatServer(ScriptedReplies(judge_garbage_rate=0.05), fault_rate=fault_rate, fault_kinds=FAULT_KINDS,
                         max_faults_per_request=3, hang_s=4.0, retry_after="0.05", seed=11).start()
    cfg_file = tmp / "soak_config.py"
    cfg_file.write_text(CONFIG.format(demo=str(REPO / "configs" / "synth_demo.py"), out=str(out),
                                      prompts=str(tmp / "prompts.jsonl"), base_url=srv.base_url,
                                      concurrency=concurrency))
    cmd = [sys.executable, "-m", "launch.synthesize", "--config", str(cfg_file)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    print(f"[soak] synthesis: {n_prompts} prompts (~{requests} requests), concurrency {concurrency} per role, "
          f"fault rate {fault_rate} ({', '.join(FAULT_KINDS)}), time bound {minutes} min; work dir {tmp}", flush=True)
    samples: list[tuple[int, int]] = []  # (requests journaled, synthesis RSS bytes)
    kill_at = requests // 2
    killed, finished, timed_out = False, False, False

    def _watch(p: subprocess.Popen, run: int) -> None:
        nonlocal killed, timed_out
        while p.poll() is None:
            done = _journaled(out).get("done", 0)
            samples.append((done, _rss(p.pid)))
            if run == 1 and done >= kill_at:
                os.kill(p.pid, signal.SIGKILL)
                killed = True
                print(f"[soak] SIGKILL at {done} journaled requests ({time.monotonic() - t0:.0f} s); restarting",
                      flush=True)
            elif time.monotonic() > t_end:
                os.kill(p.pid, signal.SIGKILL)
                timed_out = True
            time.sleep(0.25)

    t0 = time.monotonic()
    for run in (1, 2):
        log = open(tmp / f"run{run}.log", "w")
        p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _watch(p, run)
        finally:  # an interrupted bench leaves no synthesis process behind
            if p.poll() is None:
                p.kill()
        p.wait()
        log.close()
        if timed_out:
            break
        if p.returncode == 0:
            finished = True
            break
        if not killed:
            print((tmp / f"run{run}.log").read_text()[-3000:])
            raise SystemExit(f"[soak] synthesis run {run} failed with exit status {p.returncode}")
    wall = time.monotonic() - t0
    srv.stop()

    j = _journaled(out)
    peak = max([rss for _, rss in samples] + [resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024])
    print(f"[soak] {'finished' if finished else 'STOPPED AT THE TIME BOUND'} after {wall:.0f} s, "
          f"killed once: {killed}; journaled requests: {j}")
    served = sum(srv.ok.values())
    print(f"[soak] server: {srv.total_requests()} requests received, {served} answered, faults {dict(srv.faults)}")
    print("[soak] synthesis RSS by requests journaled (both runs):")
    top = max(d for d, _ in samples)
    marks = sorted({m for m in (1_000, requests // 4, requests // 2, 3 * requests // 4, requests, top) if m <= top})
    for m in marks:
        near = [rss for d, rss in samples if d >= m][:8]  # the samples right after the mark
        if near:
            print(f"    {m:>7} requests: {max(near) / 2**20:7.1f} MiB")
    print(f"    peak: {peak / 2**20:.1f} MiB (target under 500 MB)")

    lost = j.get("pending", 0) + j.get("failed", 0)
    dup = 0
    if finished:
        incomplete = [s for s in stages.STAGES if not stages.stage_complete(ml_collections.ConfigDict({"out_dir": str(out)}), s)[0]]
        resp = datasets.load_from_disk(str(out / "responses"))
        lab = datasets.load_from_disk(str(out / "labelled_responses"))
        gen = json.loads((out / "summaries" / "generate_responses.json").read_text())
        kept = json.loads((out / "summaries" / "label_prompts.json").read_text())["kept"]
        expected = 9 * (kept - gen["skipped_outside_train"])
        lost += len(incomplete) + (expected - len(set(resp["response_id"]))) + (len(resp) - len(set(lab["response_id"])))
        dup = (len(resp) - len(set(resp["response_id"]))) + (len(lab) - len(set(lab["response_id"])))
        # generations that differ only in their journal salt (same prompt and sampled config) are
        # one body on the wire: answered once per salt, by design
        same_body = len(resp) - len(set(zip(resp["generator"], resp["system_prompt"], resp["prompt"])))
        print(f"[soak] answered more than once at the wire: {served - len(srv.ok)}, of which {same_body} are "
              f"distinct requests with one body; the other {served - len(srv.ok) - same_body} are replies the client "
              f"no longer waited for (a client timeout under load, or in flight at the kill)")
        pairs = datasets.load_from_disk(str(out / "pairs"))
        print(f"[soak] outputs: {len(resp)} responses (expected {expected}), {len(lab)} labelled, "
              f"{sum(len(v) for v in pairs.values())} pairs; incomplete stages: {incomplete or 'none'}")
    if finished:
        print(f"[soak] lost records: {lost}, duplicated records: {dup} (target 0 / 0)")
    else:
        print(f"[soak] lost / duplicated: not measured, the run did not finish within {minutes} min "
              f"({j.get('done', 0)} of ~{requests} requests): raise --minutes or lower --requests")
    if not killed:
        print("[soak] the run finished before half the requests: no SIGKILL happened (lower REQUESTS_PER_PROMPT)")
    return finished and killed and lost == 0 and dup == 0 and peak < 500e6


# the mixed-traffic soak of our own server (issue 25 item 4, first half) adds "server" here
SECTIONS: dict[str, Callable[..., bool]] = {"synthesis": synthesis_soak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=2.0, help="time bound of the synthesis soak")
    ap.add_argument("--requests", type=int, default=100_000, help="about this many scripted requests")
    ap.add_argument("--concurrency", type=int, default=64, help="concurrent requests per endpoint role")
    ap.add_argument("--fault-rate", type=float, default=0.05, help="share of attempts that get a fault")
    ap.add_argument("--section", choices=sorted(SECTIONS), action="append", help="default: all")
    a = ap.parse_args()
    ok = True
    for name in a.section or list(SECTIONS):
        print(f"== soak: {name}", flush=True)
        if name == "synthesis":
            ok &= SECTIONS[name](a.minutes, a.requests, a.concurrency, a.fault_rate)
        else:
            ok &= SECTIONS[name](a.minutes)
    print(f"[soak] targets {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
