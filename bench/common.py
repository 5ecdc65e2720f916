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
