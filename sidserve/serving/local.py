"""``sidserve serve --local``: the same FastAPI app under plain uvicorn, no Ray.

For development and for the latency baseline of ``bench/serve_latency.py``. Concurrent
requests share model calls as in a replica (the service's Batcher); metrics are served
at ``GET /metrics`` from a prometheus-client registry.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from sidserve.serving.app import make_app
from sidserve.serving.core import TokenizeService
from sidserve.serving.state import ServiceConfig, load_state
from sidserve.serving.telemetry import PrometheusTelemetry


def build_local_app(user_config: dict | None = None) -> FastAPI:
    """A FastAPI app serving ``user_config`` (ServiceConfig fields). The model and the
    snapshot are loaded here, so a bad config fails before any port is opened."""
    telemetry = PrometheusTelemetry()
    service = TokenizeService(telemetry)
    service.set_config(ServiceConfig.from_dict(user_config).validate())
    service.swap(load_state(service.config))
    app = make_app(lambda: service, metrics_route=telemetry.exposition)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        service.start_polling()  # follows LATEST, like a replica
        yield
        service.stop()

    app.router.lifespan_context = lifespan
    app.state.service = service
    return app


def serve_local(user_config: dict | None, host: str, port: int, log_level: str = "info") -> None:
    import uvicorn

    uvicorn.run(build_local_app(user_config), host=host, port=port, log_level=log_level)
