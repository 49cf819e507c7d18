"""The Ray Serve deployment: ``serve run deploy/serve.yaml`` (import path
``sidserve.serving.deployment:app``).

One replica = one process holding the model and the snapshot index. Concurrent
requests' items are batched into one model call by the service's ``Batcher``
(sidserve/serving/batching.py, not ``@serve.batch``: no task hop for a lone request); its size
and wait come from the ``user_config`` and change in place with it.
"""

from __future__ import annotations

import logging

from ray import serve

from sidserve.serving.app import make_app
from sidserve.serving.core import TokenizeService
from sidserve.serving.telemetry import RayTelemetry

log = logging.getLogger("sidserve.serving")

_SERVICE: TokenizeService | None = None  # the replica's service (one replica per process)


def _set_service(service: TokenizeService) -> None:
    # a module function, so it is imported (not copied) into the replica: Serve ships the
    # decorated class by value, and a ``global`` statement in it would set a copy's global
    global _SERVICE
    _SERVICE = service


def current_service() -> TokenizeService:
    if _SERVICE is None:
        raise RuntimeError("the sidserve replica is not initialised")
    return _SERVICE


fastapi_app = make_app(current_service)


@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 1})
@serve.ingress(fastapi_app)
class SidServe:
    def __init__(self):
        import sidserve  # noqa: F401 - quiets faiss' loader before any model import

        self.service = TokenizeService(RayTelemetry())  # batches with its own Batcher (batching.py)
        _set_service(self.service)

    async def reconfigure(self, user_config: dict) -> None:
        await self.service.reconfigure(user_config)

    def __del__(self):
        if getattr(self, "service", None) is not None:
            self.service.stop()


app = SidServe.bind()
