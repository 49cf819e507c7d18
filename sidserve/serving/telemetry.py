"""The service's metrics, in two back ends with the same names.

Under Ray Serve they go through ``ray.serve.metrics`` (Ray's metrics agent exports them
on each node's metrics port with a ``ray_`` prefix, next to Ray's own Serve metrics); in
local mode through a prometheus-client registry served at ``GET /metrics``.

    sidserve_requests_total{route, status}              requests answered
    sidserve_request_latency_ms{route}                  histogram, handler time
    sidserve_batch_size_items                           histogram, items per model call
    sidserve_items_total{path}                          items answered, by path
                                                        (cold share = content_only / all)
    sidserve_model_info{model_version, snapshot_version}  1 for the state being served
    sidserve_load_failures_total{stage}                 failed loads of a new model or snapshot
                                                        (stage: reconfigure = a new user_config,
                                                        poll = a new LATEST or replaced model)
    sidserve_load_failing                               1 while the last load failed (the replica
                                                        serves its previous state), 0 after a success
    sidserve_snapshot_timestamp_seconds                 when the served snapshot was written (its
                                                        age: time() - this)
    sidserve_probe_mismatch                             1 when this replica's probe hash differs from
                                                        the snapshot encoders' (exactness not assured)
"""

from __future__ import annotations

LATENCY_BUCKETS_MS = [0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 150, 250, 500, 1000, 2500, 5000]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]


class Telemetry:
    def request(self, route: str, status: int, latency_ms: float) -> None:
        raise NotImplementedError

    def batch(self, n_items: int) -> None:
        raise NotImplementedError

    def items(self, path: str, n: int) -> None:
        raise NotImplementedError

    def model(self, model_version: str, snapshot_version: str | None) -> None:
        raise NotImplementedError

    def refresh(self, failing: bool, snapshot_time: float | None) -> None:
        """Set the state gauges: load_failing, the served snapshot's write time. After a load
        (failing False) and from the poller every few seconds (Ray drops a gauge not set
        within two export intervals)."""
        raise NotImplementedError

    def load_failed(self, stage: str) -> None:
        """A new model or snapshot could not be loaded (the previous state keeps serving)."""
        raise NotImplementedError

    def probe(self, mismatch: bool) -> None:
        """Set sidserve_probe_mismatch (with the state gauges: after a load and from the poller)."""
        raise NotImplementedError



class RayTelemetry(Telemetry):
    """Inside a Serve replica."""

    def __init__(self):
        from ray.serve import metrics

        self._requests = metrics.Counter("sidserve_requests", "requests answered",
                                         tag_keys=("route", "status"))
        self._latency = metrics.Histogram("sidserve_request_latency_ms", "handler latency (ms)",
                                          boundaries=LATENCY_BUCKETS_MS, tag_keys=("route",))
        self._batch = metrics.Histogram("sidserve_batch_size_items", "items per model call",
                                        boundaries=BATCH_BUCKETS)
        self._items = metrics.Counter("sidserve_items", "items answered", tag_keys=("path",))
        self._model = metrics.Gauge("sidserve_model_info", "1 for the model/snapshot being served",
                                    tag_keys=("model_version", "snapshot_version"))
        self._failures = metrics.Counter("sidserve_load_failures", "failed loads of a new model or snapshot",
                                         tag_keys=("stage",))
        self._failing = metrics.Gauge("sidserve_load_failing", "1 while the last load of a new state failed")
        self._snapshot_time = metrics.Gauge("sidserve_snapshot_timestamp_seconds",
                                            "when the served snapshot was written (unix seconds)")
        self._probe = metrics.Gauge("sidserve_probe_mismatch",
                                    "1 when this replica's probe hash differs from the snapshot encoders'")
        self._current: tuple[str, str] | None = None

    def request(self, route, status, latency_ms):
        self._requests.inc(1, tags={"route": route, "status": str(status)})
        self._latency.observe(latency_ms, tags={"route": route})

    def batch(self, n_items):
        self._batch.observe(n_items)

    def items(self, path, n):
        if n:
            self._items.inc(n, tags={"path": path})

    def model(self, model_version, snapshot_version):
        tags = (model_version, snapshot_version or "none")
        if self._current is not None and self._current != tags:
            self._model.set(0, tags=dict(zip(("model_version", "snapshot_version"), self._current, strict=True)))
        self._model.set(1, tags={"model_version": tags[0], "snapshot_version": tags[1]})
        self._current = tags

    def load_failed(self, stage):
        self._failures.inc(1, tags={"stage": stage})
        self._failing.set(1)

    def refresh(self, failing, snapshot_time):
        self._failing.set(1 if failing else 0)
        if snapshot_time is not None:
            self._snapshot_time.set(snapshot_time)

    def probe(self, mismatch):
        self._probe.set(1 if mismatch else 0)


class PrometheusTelemetry(Telemetry):
    """Local mode (plain uvicorn): its own registry, exposed by the app at /metrics."""

    def __init__(self):
        import prometheus_client as pc

        self.registry = pc.CollectorRegistry()
        self._requests = pc.Counter("sidserve_requests", "requests answered", ("route", "status"),
                                    registry=self.registry)
        self._latency = pc.Histogram("sidserve_request_latency_ms", "handler latency (ms)", ("route",),
                                     buckets=LATENCY_BUCKETS_MS, registry=self.registry)
        self._batch = pc.Histogram("sidserve_batch_size_items", "items per model call",
                                   buckets=BATCH_BUCKETS, registry=self.registry)
        self._items = pc.Counter("sidserve_items", "items answered", ("path",), registry=self.registry)
        self._model = pc.Gauge("sidserve_model_info", "1 for the model/snapshot being served",
                               ("model_version", "snapshot_version"), registry=self.registry)
        self._failures = pc.Counter("sidserve_load_failures", "failed loads of a new model or snapshot",
                                    ("stage",), registry=self.registry)
        self._failing = pc.Gauge("sidserve_load_failing", "1 while the last load of a new state failed",
                                 registry=self.registry)
        self._snapshot_time = pc.Gauge("sidserve_snapshot_timestamp_seconds",
                                       "when the served snapshot was written (unix seconds)", registry=self.registry)
        self._probe = pc.Gauge("sidserve_probe_mismatch",
                               "1 when this replica's probe hash differs from the snapshot encoders'",
                               registry=self.registry)
        self._current: tuple[str, str] | None = None

    def request(self, route, status, latency_ms):
        self._requests.labels(route, str(status)).inc()
        self._latency.labels(route).observe(latency_ms)

    def batch(self, n_items):
        self._batch.observe(n_items)

    def items(self, path, n):
        if n:
            self._items.labels(path).inc(n)

    def model(self, model_version, snapshot_version):
        tags = (model_version, snapshot_version or "none")
        if self._current is not None and self._current != tags:
            self._model.labels(*self._current).set(0)
        self._model.labels(*tags).set(1)
        self._current = tags

    def load_failed(self, stage):
        self._failures.labels(stage).inc()
        self._failing.set(1)

    def refresh(self, failing, snapshot_time):
        self._failing.set(1 if failing else 0)
        if snapshot_time is not None:
            self._snapshot_time.set(snapshot_time)

    def probe(self, mismatch):
        self._probe.set(1 if mismatch else 0)

    def exposition(self) -> bytes:
        import prometheus_client as pc

        return pc.generate_latest(self.registry)
