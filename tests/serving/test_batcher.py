"""The dynamic batcher on its own: what batches together, in what order, and what happens
when the queue is full, a job times out, or a batch fails."""

import asyncio
import subprocess
import sys
import threading
import time

import pytest

from ldm.serving.batcher import Batcher, QueueFull


class _Recorder:
    """A ``run`` that records each batch's payloads and answers ``payload * 10``."""

    def __init__(self, delay: float = 0.0, fail_on: object = None):
        self.batches: list[list] = []
        self.delay, self.fail_on = delay, fail_on
        self.started = threading.Event()

    def __call__(self, jobs):
        self.started.set()
        self.batches.append([job.payload for job in jobs])
        time.sleep(self.delay)
        if any(job.payload == self.fail_on for job in jobs):
            raise RuntimeError("the model failed")
        return [job.payload * 10 for job in jobs]


async def _with(batcher: Batcher, coro):
    batcher.start()
    try:
        return await coro
    finally:
        await batcher.stop()


def test_compatible_requests_batch_and_others_wait_their_turn():
    run = _Recorder()
    batcher = Batcher(run, max_batch=4, max_wait=0.2)

    async def go():
        jobs = [("a", 1, 1), ("b", 1, 2), ("a", 2, 3), ("a", 1, 4), ("a", 1, 5), ("b", 1, 6)]
        return await asyncio.gather(*(batcher.submit(k, n, p) for k, n, p in jobs))

    results = asyncio.run(_with(batcher, go()))
    assert results == [10, 20, 30, 40, 50, 60]  # every job gets its own answer
    # "a" fills its batch (1 + 2 + 1 images); the 5th "a" job no longer fits and waits.
    assert run.batches == [[1, 3, 4], [2, 6], [5]]


def test_a_lone_request_waits_at_most_max_wait():
    run = _Recorder()
    batcher = Batcher(run, max_batch=8, max_wait=0.05)

    async def go():
        start = time.monotonic()
        await batcher.submit("a", 1, 1)
        return time.monotonic() - start

    assert asyncio.run(_with(batcher, go())) < 1.0
    assert run.batches == [[1]]


def test_a_full_queue_refuses_and_a_timed_out_job_never_runs():
    run = _Recorder(delay=0.3)
    batcher = Batcher(run, max_batch=1, max_wait=0.0, max_queue=1)

    async def go():
        first = asyncio.ensure_future(batcher.submit("a", 1, 1))
        while not run.started.is_set():  # the first job is running, the queue is empty
            await asyncio.sleep(0.01)
        second = asyncio.ensure_future(batcher.submit("a", 1, 2, timeout=0.05))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await batcher.submit("a", 1, 3)
        with pytest.raises(TimeoutError):
            await second
        assert batcher.depth == 0  # dropped before it started
        return await first

    assert asyncio.run(_with(batcher, go())) == 10
    assert run.batches == [[1]]


def test_a_failed_batch_fails_its_jobs_and_the_batcher_goes_on():
    run = _Recorder(fail_on=2)
    batcher = Batcher(run, max_batch=2, max_wait=0.1)

    async def go():
        results = await asyncio.gather(
            batcher.submit("a", 1, 1), batcher.submit("a", 1, 2), return_exceptions=True
        )
        return results, await batcher.submit("a", 1, 3)

    (first, second), after = asyncio.run(_with(batcher, go()))
    assert isinstance(first, RuntimeError) and isinstance(second, RuntimeError)
    assert after == 30


def test_requests_larger_than_a_batch_are_refused():
    batcher = Batcher(_Recorder(), max_batch=2)
    with pytest.raises(ValueError, match="exceed the batch size"):
        asyncio.run(_with(batcher, batcher.submit("a", 3, 1)))


def test_a_batch_running_at_shutdown_does_not_hold_the_process():
    # An executor's worker thread is joined at interpreter exit, so a long batch would keep
    # the process alive past the server's shutdown timeout; the batch thread must not.
    script = """
import asyncio, time
from ldm.serving.batcher import Batcher

def run(jobs):
    time.sleep(60)
    return [None for _ in jobs]

async def main():
    batcher = Batcher(run, max_wait=0)
    batcher.start()
    request = asyncio.ensure_future(batcher.submit("k", 1, None))
    while not batcher.running:
        await asyncio.sleep(0.01)
    await batcher.stop()
    request.cancel()
    print("stopped", flush=True)

asyncio.run(main())
"""
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=50
    )
    assert done.returncode == 0 and "stopped" in done.stdout, done.stderr
    assert time.monotonic() - start < 30  # not the batch's 60 s
