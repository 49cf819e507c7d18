"""The serving batcher (sidserve/serving/batching.py): concurrent callers share calls, a lone
caller waits for nothing, every caller gets its own answer or its batch's error, and callers
that go away do not stall the others."""

import asyncio

import pytest

from sidserve.serving.batching import Batcher


class Recorder:
    """A batch function that records each call's jobs and can be held open until released."""

    def __init__(self, hold: bool = False):
        self.calls: list[list] = []
        self.events: list[str] = []
        self.release = asyncio.Event()
        if not hold:
            self.release.set()

    async def __call__(self, jobs):
        self.calls.append(list(jobs))
        await self.release.wait()
        if "boom" in jobs:
            raise ValueError("bad job in this batch")
        return [f"r-{j}" for j in jobs]


def run(coro):
    return asyncio.run(coro)


def test_a_lone_job_waits_for_nothing_and_jobs_ready_together_share_a_call(monkeypatch):
    slept = []
    real_sleep = asyncio.sleep

    async def spy(delay, *a, **kw):
        slept.append(delay)
        return await real_sleep(delay, *a, **kw)

    monkeypatch.setattr(asyncio, "sleep", spy)

    async def main():
        rec = Recorder()
        b = Batcher(rec, max_batch_size=8)
        assert await b.submit("a") == "r-a"
        # two callers ready in the same pass of the loop (two requests read together): one call
        both = await asyncio.gather(b.submit("b"), b.submit("c"))
        return rec.calls, both

    calls, both = run(main())
    assert calls == [["a"], ["b", "c"]] and both == ["r-b", "r-c"]
    assert slept == [0, 0]  # one pass of the loop before each call, never a timer


def test_jobs_that_arrive_during_a_call_share_the_next_in_order_up_to_the_size():
    async def main():
        rec = Recorder(hold=True)
        b = Batcher(rec, max_batch_size=3)
        first = asyncio.create_task(b.submit(0))
        await asyncio.sleep(0)  # job 0's call is running (held)
        rest = [asyncio.create_task(b.submit(i)) for i in range(1, 6)]
        await asyncio.sleep(0)
        rec.release.set()
        return await asyncio.gather(first, *rest), rec.calls

    results, calls = run(main())
    assert results == [f"r-{i}" for i in range(6)]
    assert calls == [[0], [1, 2, 3], [4, 5]]


def test_an_error_reaches_every_job_of_its_batch_and_no_other():
    async def main():
        rec = Recorder(hold=True)
        b = Batcher(rec, max_batch_size=2)
        first = asyncio.create_task(b.submit("x"))
        await asyncio.sleep(0)
        bad = [asyncio.create_task(b.submit(j)) for j in ("boom", "y")]
        good = asyncio.create_task(b.submit("z"))
        await asyncio.sleep(0)
        rec.release.set()
        return await asyncio.gather(first, *bad, good, return_exceptions=True)

    x, boom, y, z = run(main())
    assert x == "r-x" and z == "r-z"
    assert isinstance(boom, ValueError) and isinstance(y, ValueError)


def test_a_caller_answered_hands_the_lead_on_instead_of_running_the_others_batches():
    async def main():
        order = []
        rec = Recorder(hold=True)
        b = Batcher(rec, max_batch_size=1)

        async def caller(j):
            r = await b.submit(j)
            order.append(f"answered {j}")
            return r

        tasks = [asyncio.create_task(caller(0))]
        await asyncio.sleep(0)
        tasks += [asyncio.create_task(caller(j)) for j in (1, 2)]
        await asyncio.sleep(0)
        rec.release.set()
        await asyncio.gather(*tasks)
        return order

    # caller 0 returns after its own call, before job 2's call has even started
    assert run(main()) == ["answered 0", "answered 1", "answered 2"]


def test_callers_that_go_away_do_not_stall_the_line():
    async def main():
        rec = Recorder(hold=True)
        b = Batcher(rec, max_batch_size=1)
        leader = asyncio.create_task(b.submit("lead"))
        await asyncio.sleep(0)
        waiting = asyncio.create_task(b.submit("gone"))
        last = asyncio.create_task(b.submit("last"))
        await asyncio.sleep(0)
        waiting.cancel()  # a waiting caller leaves
        await asyncio.sleep(0)
        leader.cancel()  # and the leader, in the middle of its call
        await asyncio.sleep(0)
        rec.release.set()
        out = await asyncio.wait_for(last, 5)
        return out, leader, waiting, rec.calls

    out, leader, waiting, calls = run(main())
    assert out == "r-last" and leader.cancelled() and waiting.cancelled()
    assert ["gone"] not in calls  # a job whose caller left is not computed


def test_configure_refuses_bad_values():
    async def fn(jobs):
        return jobs

    with pytest.raises(ValueError, match="max_batch_size"):
        Batcher(fn, 0)
    with pytest.raises(ValueError, match="wait_s"):
        Batcher(fn, 4, wait_s=-1)
