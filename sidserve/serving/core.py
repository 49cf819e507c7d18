"""The serving logic, independent of how it is hosted (Ray Serve replica or uvicorn).

``TokenizeService`` owns the current ``ServingState``, swaps it on a new ``user_config``
or a new ``LATEST``, and answers a validated request: catalog items from the snapshot,
the rest through ``encode`` (the batched model call of the host).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from sidserve.artifact import read_manifest
from sidserve.items import ItemArrays
from sidserve.serving.batching import Batcher
from sidserve.serving.schema import Prepared, concat_arrays, read_request
from sidserve.serving.state import ServiceConfig, ServingState, load_state
from sidserve.serving.telemetry import Telemetry
from sidserve.snapshot import SnapshotRoot
from sidserve.tokenizers.base import Encoding

log = logging.getLogger(__name__)

GAUGE_REFRESH_S = 5.0


class NotReady(Exception):
    """No state loaded yet (or the last load failed before any state existed)."""


class RequestTiming:
    """Where one request's time went, in ms per stage, sent back as the standard
    ``Server-Timing`` response header (``read;dur=0.01, parse;dur=0.18, ...``): ``read`` the
    body, ``parse`` JSON and validation, ``lookup`` the snapshot, ``queue`` from handing the
    items to the batcher to the start of their model call (``@serve.batch``'s wait), ``model``
    that call (shared by the requests batched into it), ``respond`` building the results and
    the JSON, ``app`` all of it. What a client measures beyond ``app`` is the HTTP stack and,
    under Ray Serve, its proxy."""

    __slots__ = ("stages", "_t")

    def __init__(self):
        self.stages: dict[str, float] = {}
        self._t = time.perf_counter()

    def mark(self, stage: str) -> None:
        """The time since the last mark (or the start) goes to ``stage``."""
        now = time.perf_counter()
        self.stages[stage] = self.stages.get(stage, 0.0) + (now - self._t) * 1e3
        self._t = now

    def restart(self) -> None:
        """The next mark counts from now (time already given to stages by ``add``)."""
        self._t = time.perf_counter()

    def add(self, stage: str, ms: float) -> None:
        self.stages[stage] = self.stages.get(stage, 0.0) + ms

    def header(self) -> str:
        return ", ".join(f"{k};dur={v:.3f}" for k, v in self.stages.items())


@dataclass
class EncodeJob:
    """One request's items to compute, with the state they must be computed with; ``timing``
    gets the job's wait for its model call (queue) and the call (model)."""

    state: ServingState
    arrays: ItemArrays
    timing: RequestTiming | None = None
    queued_at: float = 0.0


def encode_jobs(jobs: list[EncodeJob], telemetry: Telemetry, batch_size: int) -> list[Encoding]:
    """One model call per distinct state (normally one) for all jobs; results split back."""
    out: list[Encoding | None] = [None] * len(jobs)
    by_state: dict[int, list[int]] = {}
    for i, job in enumerate(jobs):
        by_state.setdefault(id(job.state), []).append(i)
    for idx in by_state.values():
        tok = jobs[idx[0]].state.tokenizer
        arrays = concat_arrays([jobs[i].arrays for i in idx])
        telemetry.batch(len(arrays))
        t0 = time.perf_counter()
        enc = tok.encode(arrays, batch_size=batch_size)
        t1 = time.perf_counter()
        for i in idx:
            if jobs[i].timing is not None:
                jobs[i].timing.add("queue", (t0 - jobs[i].queued_at) * 1e3)
                jobs[i].timing.add("model", (t1 - t0) * 1e3)
        start = 0
        for i in idx:
            n = len(jobs[i].arrays)
            sl = slice(start, start + n)
            out[i] = Encoding(enc.sid[sl], enc.behavior_weights[sl], enc.path[sl])
            start += n
    return out  # type: ignore[return-value]


INLINE_MAX_ITEMS = 2048  # model calls up to this size run on the event loop (see run_encode)


async def run_encode(jobs: list[EncodeJob], telemetry: Telemetry, batch_size: int) -> list[Encoding]:
    """A small model call runs inline: it is a few ms of GIL-bound torch dispatch, and a
    thread hop costs more than it frees (measured: 2.1x the requests/s at concurrency 64
    with one-item requests). A large one goes to a worker thread so that health checks
    and request parsing go on meanwhile."""
    if sum(len(j.arrays) for j in jobs) <= INLINE_MAX_ITEMS:
        return encode_jobs(jobs, telemetry, batch_size)
    return await asyncio.to_thread(encode_jobs, jobs, telemetry, batch_size)


class TokenizeService:
    def __init__(self, telemetry: Telemetry,
                 encode: Callable[[EncodeJob], Awaitable[Encoding]] | None = None):
        """``encode``: how a request's items reach the model; by default the service's
        ``Batcher`` (concurrent requests share model calls, up to ``max_batch_size`` jobs)."""
        self.telemetry = telemetry
        self.config = ServiceConfig()
        self.batcher = Batcher(self._encode_batch, self.config.max_batch_size, self.config.batch_wait_timeout_s)
        self.state: ServingState | None = None
        self.last_error: str | None = None
        self.load_failing = False  # the last load of a new state failed (exported as a metric)
        self._encode = encode or self.batcher.submit
        self._lock = asyncio.Lock()
        self._poller: asyncio.Task | None = None

    async def _encode_batch(self, jobs: list[EncodeJob]) -> list[Encoding]:
        return await run_encode(jobs, self.telemetry, self.config.encode_batch_size)

    # ---- state -------------------------------------------------------------------
    async def reconfigure(self, user_config: dict | None) -> None:
        """Apply a new user_config: load in a worker thread, then swap. A bad config
        raises (Serve keeps the replica on its previous config) and leaves state as is."""
        config = ServiceConfig.from_dict(user_config).validate()
        async with self._lock:
            try:
                state = await asyncio.to_thread(load_state, config, current=self.state)
            except Exception as err:
                self.last_error = f"{type(err).__name__}: {err}"
                self.load_failing = True
                self.telemetry.load_failed("reconfigure")
                log.error("reconfigure failed, keeping the previous state: %s", self.last_error)
                raise
            self.set_config(config)
            self.swap(state)
        self.start_polling()

    def set_config(self, config: ServiceConfig) -> None:
        """A validated ServiceConfig: the service's, and the batcher's size and wait."""
        self.config = config
        self.batcher.configure(config.max_batch_size, config.batch_wait_timeout_s)

    def swap(self, state: ServingState) -> None:
        old = self.state
        self.state = state
        self.last_error = None
        self.load_failing = False
        self.telemetry.model(state.model_version, state.snapshot_version)
        self.telemetry.refresh(False, state.snapshot_time)
        self.telemetry.probe(state.probe["status"] == "mismatch")
        if old is None or (old.model_version, old.snapshot_version) != (state.model_version, state.snapshot_version):
            log.info("serving model %s, snapshot %s (%s)", state.model_version, state.snapshot_version,
                     "catalog lookups on" if state.catalog_usable else state.catalog_reason or "no catalog")

    def start_polling(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll_forever())

    async def _poll_forever(self) -> None:
        """Every few seconds: re-report the model gauge (Ray evicts gauges not refreshed
        within two export intervals), and check LATEST when ``snapshot_poll_s`` is due."""
        last_check = time.monotonic()
        while True:
            interval = self.config.snapshot_poll_s
            await asyncio.sleep(min(interval, GAUGE_REFRESH_S) if interval > 0 else GAUGE_REFRESH_S)
            if self.state is not None:
                self.telemetry.model(self.state.model_version, self.state.snapshot_version)
                self.telemetry.refresh(self.load_failing, self.state.snapshot_time)
                self.telemetry.probe(self.state.probe["status"] == "mismatch")
            if interval > 0 and time.monotonic() - last_check >= interval:
                last_check = time.monotonic()
                try:
                    await self.check_latest()
                except Exception as err:  # noqa: BLE001 - keep serving the current state
                    self.last_error = f"{type(err).__name__}: {err}"
                    self.load_failing = True
                    self.telemetry.load_failed("poll")
                    log.error("could not load the new snapshot: %s (still serving %s)", err,
                              self.state.snapshot_version if self.state else None)

    async def check_latest(self) -> bool:
        """Reload when ``LATEST`` moved or the artifact at the model's URI was replaced (its
        manifest names another version); True when the state changed."""
        if self.state is None:
            return False
        root_uri = self.config.resolved_snapshot_root
        latest = await asyncio.to_thread(SnapshotRoot(root_uri).latest) if root_uri is not None else None
        moved = latest is not None and latest != self.state.snapshot_version
        model_now = (await asyncio.to_thread(read_manifest, self.state.model_uri))["version"]
        if not moved and model_now == self.state.model_version:
            return False
        async with self._lock:
            state = await asyncio.to_thread(load_state, self.config, snapshot_version=latest, current=self.state)
            self.swap(state)
        return True

    def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()

    def body_limit(self) -> int | None:
        """Largest request body accepted now (None before a model is loaded: the request will
        get its 503 without being read)."""
        return None if self.state is None else self.config.body_limit(self.state.tokenizer.config)

    def current(self) -> ServingState:
        if self.state is None:
            raise NotReady(self.last_error or "the model is still loading")
        return self.state

    # ---- requests ----------------------------------------------------------------
    async def tokenize(self, body: bytes, timing: RequestTiming | None = None) -> dict:
        """A raw request body -> the response dict. Raises pydantic.ValidationError or
        RequestError for a bad request (see ``read_request``), NotReady before a model.
        ``timing`` gets the stages parse, lookup, queue, model (RequestTiming)."""
        timing = timing or RequestTiming()
        state = self.current()  # one state for the whole request
        prepared: Prepared = read_request(body, state.tokenizer.config, self.config.max_items_per_request,
                                          max_id_chars=self.config.max_item_id_chars)
        timing.mark("parse")
        n = len(prepared.item_ids)
        results: list[dict | None] = [None] * n
        hit = np.zeros(n, dtype=bool)
        if state.catalog_usable and not prepared.recompute:
            hits = state.catalog.lookup(prepared.item_ids)
            if hits.found.any():
                pos = np.flatnonzero(hits.found)
                rows = state.catalog.rows(hits.rows[pos])
                for j, i in enumerate(pos):
                    results[i] = {"item_id": prepared.item_ids[i], "sid": rows["sid"][j],
                                  "sid_str": rows["sid_str"][j], "dedup": rows["dedup"][j],
                                  "behavior_weights": rows["behavior_weights"][j], "path": "catalog"}
                hit = hits.found
        todo = np.flatnonzero(~hit)
        timing.mark("lookup")
        if todo.size:
            arrays = prepared.arrays if todo.size == n else prepared.arrays.take(todo)
            enc = await self._encode(EncodeJob(state, arrays, timing, time.perf_counter()))
            timing.restart()  # queue and model were added by the batch
            sids = enc.sid.tolist()
            weights = enc.behavior_weights.tolist()
            for j, i in enumerate(todo.tolist()):
                results[i] = {"item_id": prepared.item_ids[i], "sid": sids[j],
                              "sid_str": "-".join(map(str, sids[j])), "dedup": None,
                              "behavior_weights": weights[j], "path": str(enc.path[j])}
        for path in ("catalog", "full", "content_only"):
            self.telemetry.items(path, sum(r["path"] == path for r in results))
        return {"model_version": state.model_version, "results": results}
