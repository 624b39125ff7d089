"""Dynamic batching: requests with the same settings (the same ``key``) that arrive within
``max_wait`` seconds of the first one run as one batch of at most ``max_batch`` images.

A worker thread runs the batches, one at a time (the model is shared and holds the
adapters' weights); the event loop keeps accepting requests meanwhile. The thread is a
daemon: a batch still running at shutdown does not hold the process past it. Requests that do
not fit the batch being gathered wait for the next one, in arrival order.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any


class QueueFull(Exception):
    """The queue holds ``max_queue`` requests already: try again later."""


@dataclass
class Job:
    """One request: ``size`` images of the same ``key`` (the settings a batch shares)."""

    key: Hashable
    size: int
    payload: Any
    future: asyncio.Future = field(repr=False)
    arrived: float = field(default_factory=time.monotonic)


# A batch of jobs (same key) -> one result per job.
RunBatch = Callable[[Sequence[Job]], Sequence[Any]]


class Batcher:
    """``await batcher.submit(key, size, payload)`` -> that job's result from ``run``."""

    def __init__(
        self,
        run: RunBatch,
        *,
        max_batch: int = 8,
        max_wait: float = 0.02,
        max_queue: int = 64,
        on_batch: Callable[[int], None] | None = None,  # called with each batch's image count
    ):
        if max_batch < 1 or max_wait < 0 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1, max_wait >= 0")
        self.run, self.max_batch, self.max_wait = run, max_batch, max_wait
        self.max_queue = max_queue
        self.on_batch = on_batch
        self.pending: list[Job] = []
        self.running = 0  # images in the batch being computed
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def alive(self) -> bool:
        """The gathering loop runs."""
        return self._task is not None and not self._task.done()

    @property
    def depth(self) -> int:
        """Requests waiting (not yet in a running batch)."""
        return len(self.pending)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Stop gathering (pending requests are cancelled) and let a running batch end."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for job in self.pending:
            job.future.cancel()
        self.pending.clear()

    async def submit(
        self, key: Hashable, size: int, payload: Any, timeout: float | None = None
    ) -> Any:
        """Queue a job and wait for its result; ``QueueFull`` when ``max_queue`` requests
        wait already, ``TimeoutError`` after ``timeout`` seconds (the job is dropped if it
        has not started)."""
        if size > self.max_batch:
            raise ValueError(f"{size} images exceed the batch size {self.max_batch}")
        if len(self.pending) >= self.max_queue:
            raise QueueFull(f"{len(self.pending)} requests are waiting")
        job = Job(key, size, payload, asyncio.get_running_loop().create_future())
        self.pending.append(job)
        self._wake.set()
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), timeout)
        except (asyncio.TimeoutError, asyncio.CancelledError):  # TimeoutError on 3.11+
            if job in self.pending:  # not started: it never runs
                self.pending.remove(job)
                job.future.cancel()
            raise

    def _take(self) -> list[Job]:
        """The first job and the later ones of its key that fit, in arrival order."""
        first = self.pending[0]
        batch, size = [], 0
        for job in self.pending:
            if job.key == first.key and size + job.size <= self.max_batch:
                batch.append(job)
                size += job.size
        for job in batch:
            self.pending.remove(job)
        return batch

    def _ready(self) -> bool:
        first = self.pending[0]
        same = sum(job.size for job in self.pending if job.key == first.key)
        return same >= self.max_batch or time.monotonic() - first.arrived >= self.max_wait

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.pending:
                self._wake.clear()
                await self._wake.wait()
            while not self._ready():  # gather until full or the first job waited max_wait
                self._wake.clear()
                left = self.max_wait - (time.monotonic() - self.pending[0].arrived)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), max(left, 0.0))
                if not self.pending:  # every waiting job timed out
                    break
            if not self.pending:
                continue
            batch = self._take()
            self.running = sum(job.size for job in batch)
            if self.on_batch is not None:
                self.on_batch(self.running)
            try:
                results = await _in_daemon_thread(loop, self.run, batch)
            except Exception as err:  # the batch fails, the server does not
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(err)
            else:
                for job, result in zip(batch, results, strict=True):
                    if not job.future.done():
                        job.future.set_result(result)
            finally:
                self.running = 0


def _in_daemon_thread(
    loop: asyncio.AbstractEventLoop, fn: RunBatch, batch: list[Job]
) -> asyncio.Future:
    """``fn(batch)`` in a daemon thread, as a future of ``loop``. Unlike an executor's
    worker, which the interpreter joins at exit, a daemon thread never delays the exit."""
    future = loop.create_future()

    def settle(error: BaseException | None, result: Any) -> None:
        if future.done():  # cancelled meanwhile
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def work() -> None:
        error, result = None, None
        try:
            result = fn(batch)
        except BaseException as err:  # handed to the awaiting loop, as an executor would
            error = err
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
            loop.call_soon_threadsafe(settle, error, result)

    threading.Thread(target=work, name="ldm-batch", daemon=True).start()
    return future
