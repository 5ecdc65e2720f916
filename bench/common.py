"""Shared timing and reporting for the benchmarks: median of timed reps after warm-up.

Both sides of a comparison are measured in the same process, one after the other, so the
ratio is meaningful on a shared machine even when absolute times drift.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable

os.environ.setdefault("COSA_JAX_CACHE", os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), ".cache", "cosa_jax"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def time_reps(fn: Callable[[], object], *, reps: int, warmup: int = 1) -> list[float]:
    """Seconds per call for ``reps`` calls after ``warmup`` untimed calls.

    ``fn`` must block until its result is ready (``block_until_ready`` on the JAX side).
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def time_interleaved(fns: dict[str, Callable[[], object]], *, reps: int,
                     warmup: int = 1, lead_in: int = 0) -> dict[str, list[float]]:
    """Like ``time_reps`` for several contenders, alternating them rep by rep so that load from
    other processes on a shared machine falls on both sides alike.

    ``lead_in`` untimed calls of a contender run right before each of its timed calls, so that
    a timed train step follows a step of its own kind, as in a training loop. Why: on a VM with
    free page reporting (virtio-balloon, as here), memory a process frees and leaves unused
    for ~2 s is handed back to the host, and faulting it in again costs several times more.
    Measured on the 2-core VM: a JAX DPO step right after its own step spends 0.5-0.8 s in the
    kernel, after a PyTorch step or a 6 s pause 5-6 s, and takes 2-3 s longer."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            for _ in range(lead_in):
                fn()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def report(title: str, unit: str, ours: float, peer: float, peer_name: str, target: float | None = None,
           detail: str = "") -> float:
    """Print ours / peer / ratio (higher is better for both) and return the ratio."""
    ratio = ours / peer
    verdict = "" if target is None else ("  (target >= %.1fx: %s)" % (target, "met" if ratio >= target else "NOT met"))
    print(f"[{title}] ours (JAX)      : {ours:10.1f} {unit}")
    print(f"[{title}] peer ({peer_name}): {peer:10.1f} {unit}")
    print(f"[{title}] ratio ours/peer : {ratio:10.2f}x{verdict}")
    if detail:
        print(f"[{title}] {detail}")
    return ratio


def kernel_time_summary(fn: Callable[[], object], *, calls: int = 2, top: int = 25) -> str:
    """Where a jitted step's device time goes: run ``fn`` ``calls`` times under the JAX profiler
    and total the trace's device-side events by name (GPU kernels on a GPU; XLA's thunks on CPU).

    Parses the Perfetto JSON that ``jax.profiler.trace`` writes, so no TensorBoard plugin is
    needed on the machine. Returns the table as text (or the trace's process names if it holds no device events)."""
    import glob
    import gzip
    import json
    import tempfile
    from collections import defaultdict

    import jax

    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(calls):
                fn()
        paths = glob.glob(os.path.join(tmp, "**", "perfetto_trace.json.gz"), recursive=True)
        if not paths:
            return ""
        with gzip.open(paths[0], "rt") as f:
            events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    device_pids = {pid for pid, n in names.items() if "/device:" in n}
    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in device_pids:
            totals[e["name"]] += float(e.get("dur", 0.0)) / 1e3 / calls
            counts[e["name"]] += 1
    if not totals:
        return f"no device events in the trace (processes: {sorted(names.values())})"
    total = sum(totals.values())
    lines = [f"device events per call: {total:.2f} ms summed over {len(totals)} names "
             f"(processes: {sorted(names[p] for p in device_pids)})"]
    for name, ms in sorted(totals.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {ms:9.3f} ms {100 * ms / total:5.1f}%  x{counts[name] // calls:<4d} {name[:110]}")
    return "\n".join(lines)
