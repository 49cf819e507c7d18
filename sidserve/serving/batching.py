"""Batching concurrent requests into one model call, without a wait and without a task hop.

A replica (or ``serve --local``) answers many requests at once on one event loop, and one model
call for the items of all of them costs about what one request's call costs (the forward is
dispatch-bound at these sizes). ``Batcher.submit(job)`` gives that: a job that arrives while no
call runs leads the next call itself, on its own task, after one pass of the event loop (the
requests ready by then join it; a lone job waits for nothing else); jobs that arrive during a
call queue, and the next call takes up to ``max_batch_size`` of them in arrival order. The
caller whose job is answered hands the lead to the first job still queued, so no caller runs
other callers' batches after its own is done.

Ray Serve's ``@serve.batch`` does the same with a background task and a queue: measured 0.44 ms
between handing a lone one-item job over and its model call starting (docs/benchmarks.md,
issue 49.2), a tenth of the whole request. ``wait_s`` > 0 waits that long for more jobs
before a call that is not full (``batch_wait_timeout_s``), for callers that prefer bigger
batches to latency.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

J = TypeVar("J")
R = TypeVar("R")

_LEAD = object()  # what a queued job's future resolves to when its caller must run the next batch


class Batcher(Generic[J, R]):
    def __init__(self, fn: Callable[[list[J]], Awaitable[list[R]]], max_batch_size: int, wait_s: float = 0.0):
        self.fn = fn
        self.configure(max_batch_size, wait_s)
        self._queue: deque[list] = deque()  # [job, future] in arrival order
        self._leading = False

    def configure(self, max_batch_size: int, wait_s: float = 0.0) -> None:
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a positive int, got {max_batch_size!r}")
        if not wait_s >= 0:
            raise ValueError(f"wait_s must be >= 0, got {wait_s!r}")
        self.max_batch_size, self.wait_s = max_batch_size, wait_s

    async def submit(self, job: J) -> R:
        """``fn([..., job, ...])``'s result for ``job``, computed in a batch with the jobs
        submitted meanwhile."""
        loop = asyncio.get_running_loop()
        entry = [job, loop.create_future()]  # [job, future]; the future is replaced on taking the lead
        self._queue.append(entry)
        if self._leading:
            got = await entry[1]  # a result, an exception, or the lead
            if got is not _LEAD:
                return got
            entry[1] = loop.create_future()  # (the entry is still first in line)
        self._leading = True
        try:
            while not entry[1].done():
                await self._run_batch()
        finally:
            if not entry[1].done():  # this caller was cancelled: its job leaves the line
                if entry in self._queue:
                    self._queue.remove(entry)
                entry[1].cancel()
            while self._queue and self._queue[0][1].done():  # callers cancelled while waiting
                self._queue.popleft()
            if self._queue:  # the next caller in line runs the next batch
                self._queue[0][1].set_result(_LEAD)
            else:
                self._leading = False
        return entry[1].result()

    async def _run_batch(self) -> None:
        if len(self._queue) < self.max_batch_size:
            # one pass of the event loop (or wait_s): the requests that are ready to be read and
            # parsed reach submit() and join this call; a model call runs inline and holds the
            # loop, so without this pass nothing would ever queue behind it
            await asyncio.sleep(self.wait_s)
        batch = []
        while self._queue and len(batch) < self.max_batch_size:
            entry = self._queue.popleft()
            if not entry[1].done():  # (a caller cancelled while waiting)
                batch.append(entry)
        if not batch:
            return
        try:
            results = await self.fn([job for job, _ in batch])
        except asyncio.CancelledError:
            # the leader's caller went away mid-call (a large call runs in a thread): the others
            # of the batch are not answered, so they go back to the front of the line
            self._queue.extendleft(reversed(batch))
            raise
        except Exception as err:  # every job of the batch gets the error
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(err)
            return
        if len(results) != len(batch):
            err = RuntimeError(f"the batch function returned {len(results)} results for {len(batch)} jobs")
            for _, fut in batch:
                fut.set_exception(err)
            return
        for (_, fut), result in zip(batch, results):
            if not fut.done():
                fut.set_result(result)
