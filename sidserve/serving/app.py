"""The FastAPI app: routes, auth, error mapping and request metrics.

The same app runs under Ray Serve (``sidserve.serving.deployment``) and plain uvicorn
(``sidserve serve --local``); ``get_service`` returns the host's ``TokenizeService``.

    POST /tokenize   items -> SIDs (catalog lookup, or computed; content-only when cold)
    GET  /healthz    the process answers
    GET  /readyz     model (and snapshot, when configured) loaded: 200, else 503
    GET  /v1/model   version, config summary, SID layout, snapshot in use
    GET  /docs       OpenAPI docs
"""

from __future__ import annotations

import hmac
import os
import time
from collections.abc import Callable

import orjson
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from sidserve.serving.core import NotReady, RequestTiming, TokenizeService
from sidserve.serving.schema import RequestError, TokenizeRequest, TokenizeResponse
from sidserve.serving.state import API_KEY_ENV, MODEL_INFO_OPEN_ENV

_REQUEST_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/TokenizeRequest"}}}}}
OPEN_PATHS = {"/healthz", "/readyz", "/docs", "/openapi.json", "/docs/oauth2-redirect", "/metrics"}


def make_app(get_service: Callable[[], TokenizeService], *, metrics_route: Callable[[], bytes] | None = None
             ) -> FastAPI:
    app = FastAPI(title="sidserve", version="1",
                  description="Semantic IDs for recommender items (ADC-SID). "
                              "Send embeddings, get SIDs; known items come from the published snapshot.")

    app.add_middleware(AuthAndMetrics, get_service=get_service)

    @app.exception_handler(NotReady)
    async def not_ready(_: Request, err: NotReady):
        return not_ready_response(err)

    endpoint = TokenizeEndpoint(get_service)

    @app.post("/tokenize", response_model=TokenizeResponse, openapi_extra=_REQUEST_BODY,
              responses={413: {"description": "too many items"}, 422: {"description": "bad item field"},
                         401: {"description": "bearer token required"}, 503: {"description": "not ready"}})
    async def tokenize(request: Request):
        """SIDs for a batch of items. An item whose ``item_id`` is in the published snapshot
        gets its published SID and dedup (``path: catalog``) unless ``recompute`` is set."""
        timing = RequestTiming()
        body = await request.body()
        timing.mark("read")
        return await endpoint.respond(body, timing)

    # FastAPI documents the route; requests skip its request/dependency wrappers (about 6%
    # of a 32-item request's CPU at concurrency 64, measured with py-spy) and go to the same
    # endpoint.respond as a plain ASGI app. Should a FastAPI release stop honouring
    # route.app, the declared handler above answers identically, only slower.
    route = next(r for r in app.routes if getattr(r, "path", None) == "/tokenize")
    route.app = endpoint

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        service = get_service()
        state = service.state
        # an open route: readiness and versions only; error texts (paths, URIs) go to the log
        # and to the authenticated GET /v1/model
        if state is None:
            reason = "loading" if service.last_error is None else "model not loaded (see GET /v1/model or the log)"
            return JSONResponse({"ready": False, "reason": reason}, status_code=503)
        return {"ready": True, "model_version": state.model_version, "snapshot_version": state.snapshot_version,
                "catalog_lookup": state.catalog_usable}

    @app.get("/v1/model")
    async def model_info():
        if not os.environ.get(API_KEY_ENV) and os.environ.get(MODEL_INFO_OPEN_ENV) != "1":
            # fail closed: the details (URIs, config, error texts) are for whoever holds the key
            return JSONResponse({"detail": f"GET /v1/model shows the model URI, the service config and the last "
                                           f"load error: set {API_KEY_ENV} in the replicas' environment (clients "
                                           f"then send Authorization: Bearer <key>), or {MODEL_INFO_OPEN_ENV}=1 "
                                           "to show them without a key"}, status_code=403)
        service = get_service()
        info = service.current().describe()
        info["service_config"] = service.config.to_dict()
        info["last_error"] = service.last_error  # e.g. a snapshot that failed to load (still serving)
        return info

    def openapi():
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            request = TokenizeRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(request.pop("$defs", {}))
            components["TokenizeRequest"] = request
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi

    if metrics_route is not None:
        @app.get("/metrics", include_in_schema=False)
        async def metrics():
            return Response(metrics_route(), media_type="text/plain; version=0.0.4")

    return app


def validation_detail(errors) -> list[dict]:
    """Pydantic errors -> FastAPI's 422 ``detail``, each message led by the field path."""
    detail = []
    for e in errors:
        loc = list(e.get("loc", ()))
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[1:]).lstrip(".")
        detail.append({"loc": loc, "msg": f"{where or 'body'}: {e.get('msg')}", "type": e.get("type")})
    return detail


def not_ready_response(err: NotReady) -> JSONResponse:
    return JSONResponse({"detail": f"not ready: {err}"}, status_code=503, headers={"Retry-After": "5"})


class TokenizeEndpoint:
    """``POST /tokenize`` as a plain ASGI app: raw body -> service -> JSON, every refusal
    (bad JSON shape, bad item, not ready) as its 4xx/503 response."""

    def __init__(self, get_service: Callable[[], TokenizeService]):
        self.get_service = get_service

    async def respond(self, body: bytes, timing: RequestTiming) -> Response:
        try:
            result = await self.get_service().tokenize(body, timing)
        except ValidationError as err:
            errors = [{**e, "loc": ("body", *e["loc"])} for e in err.errors()]
            return JSONResponse({"detail": validation_detail(errors)}, status_code=422)
        except RequestError as err:
            return JSONResponse({"detail": err.detail}, status_code=err.status)
        except NotReady as err:
            return not_ready_response(err)
        # orjson: 0.01 ms instead of json.dumps' 0.2 ms for a 32-item response
        content = orjson.dumps(result, option=orjson.OPT_SERIALIZE_NUMPY)
        timing.mark("respond")
        timing.add("app", sum(timing.stages.values()))
        return Response(content, media_type="application/json", headers={"Server-Timing": timing.header()})

    async def __call__(self, scope, receive, send):
        timing = RequestTiming()
        service = self.get_service()
        if service.state is None:  # no model yet: the 503 comes before a byte of the body is read
            try:
                service.current()
            except NotReady as err:
                await not_ready_response(err)(scope, receive, send)
                return
        limit = service.body_limit()
        if limit is not None:
            declared = dict(scope["headers"]).get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                await _too_large(limit, int(declared))(scope, receive, send)  # nothing read
                return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left; nothing to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if limit is not None and size > limit:  # chunked or lying: stop reading here
                await _too_large(limit, None)(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        timing.mark("read")
        response = await self.respond(b"".join(chunks), timing)
        await response(scope, receive, send)


def _too_large(limit: int, declared: int | None) -> JSONResponse:
    what = f"of {declared} bytes " if declared is not None else ""
    return JSONResponse({"detail": [{"loc": ["body"], "type": "too_large",
                                     "msg": f"request body {what}exceeds the limit of {limit} bytes "
                                            f"(max_body_bytes, or max_items_per_request items of this model): "
                                            "split the batch"}]},
                        status_code=413, headers={"Connection": "close"})


class AuthAndMetrics:
    """Pure ASGI middleware (Starlette's BaseHTTPMiddleware costs about a millisecond a
    request): bearer-token check when $SIDSERVE_API_KEY is set, then one
    requests/latency observation per request, labelled by route template and status."""

    def __init__(self, app, get_service: Callable[[], TokenizeService]):
        self.app = app
        self.get_service = get_service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500
        key = os.environ.get(API_KEY_ENV)
        if key and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not (given.startswith(b"Bearer ") and hmac.compare_digest(given[7:], key.encode())):
                response = JSONResponse({"detail": "missing or wrong bearer token (Authorization: Bearer <key>)"},
                                        status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                self._record(scope, 401, t0)
                return

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self._record(scope, status, t0)

    def _record(self, scope, status: int, t0: float) -> None:
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        self.get_service().telemetry.request(route, status, (time.perf_counter() - t0) * 1e3)
