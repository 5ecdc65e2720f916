"""Dynamic batching for a server: concurrent requests share one ``generate`` call.

Requests wait in a queue; the batch loop takes the oldest, waits at most ``wait_s`` (counted
from that request's arrival) for company, takes up to ``max_batch`` that ``fits`` allows
together, and runs them in ONE worker thread. One batch at a time keeps the accelerator (or
the CPU) to a single program and the event loop free to accept requests meanwhile; what
arrives during a batch forms the next one. Host-side and JAX-free: ``run_batch`` does the work.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import time
from typing import Any, Callable, Sequence


@dataclasses.dataclass
class Job:
    payload: Any
    future: asyncio.Future
    arrived: float


@dataclasses.dataclass
class BatchStats:
    """Counters a test or an operator can read (``GET /stats``)."""
    requests: int = 0
    batches: int = 0
    max_batch_seen: int = 0
    failed_batches: int = 0
    busy_s: float = 0.0
    batch_sizes: dict[int, int] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "busy_s": round(self.busy_s, 3),
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())}}


class Batcher:
    """``await submit(payload)`` -> the matching item of ``run_batch([payloads])``.

    ``fits(payloads)`` says whether a candidate group may run together (e.g. its padded shape
    stays within the model's context); a request that does not fit starts the next batch.
    """

    def __init__(self, run_batch: Callable[[list[Any]], Sequence[Any]], *, max_batch: int = 16,
                 wait_s: float = 0.005, fits: Callable[[list[Any]], bool] | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if wait_s < 0:
            raise ValueError(f"batch wait must be >= 0, got {wait_s}")
        self.run_batch, self.max_batch, self.wait_s = run_batch, max_batch, wait_s
        self.fits = fits or (lambda payloads: True)
        self.stats = BatchStats()
        self._pending: collections.deque[Job] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="generate")

    async def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.create_task(self._loop(), name="batcher")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for job in self._pending:
            if not job.future.done():
                job.future.set_exception(RuntimeError("server shutting down"))
        self._executor.shutdown(wait=True)

    async def submit(self, payload: Any) -> Any:
        if self._task is None:
            raise RuntimeError("Batcher.start() was not awaited")
        loop = asyncio.get_running_loop()
        job = Job(payload, loop.create_future(), loop.time())
        self._pending.append(job)
        self._wakeup.set()
        return await job.future

    def _take_batch(self) -> list[Job]:
        batch: list[Job] = []
        while self._pending and len(batch) < self.max_batch:
            job = self._pending[0]
            if job.future.done():          # the client went away: drop it
                self._pending.popleft()
                continue
            if batch and not self.fits([j.payload for j in batch + [job]]):
                break
            batch.append(self._pending.popleft())
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            # Give late-comers until `wait_s` after the oldest request arrived.
            deadline = self._pending[0].arrived + self.wait_s
            while len(self._pending) < self.max_batch and loop.time() < deadline:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), deadline - loop.time())
                except asyncio.TimeoutError:
                    break
            batch = self._take_batch()
            if not batch:
                continue
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(
                    self._executor, self.run_batch, [j.payload for j in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"run_batch returned {len(results)} results for "
                                       f"{len(batch)} requests")
            except Exception as e:  # one bad batch must not kill the server
                self.stats.failed_batches += 1
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(e)
                continue
            finally:
                self.stats.busy_s += time.perf_counter() - started
            self.stats.requests += len(batch)
            self.stats.batches += 1
            self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(batch))
            self.stats.batch_sizes[len(batch)] = self.stats.batch_sizes.get(len(batch), 0) + 1
            for job, result in zip(batch, results):
                if not job.future.done():
                    job.future.set_result(result)
