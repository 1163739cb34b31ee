"""The HTTP API: a Starlette app that parses, authenticates, limits and serialises; `ServingRuntime` does the work.

Why Starlette with pydantic models validated by hand rather than FastAPI or BentoML ``@api`` methods: on this
2-core machine a bare Starlette echo endpoint answers ~4,000-9,000 req/s, the same endpoint under FastAPI
~1,300-1,500 and mounted under BentoML's default stack ~300-400 (the same asyncio client as
benchmarks/serve_load.py); the ranking path must fit in 50 ms at 1,000 req/s. The OpenAPI document is generated
from the same pydantic models that validate the bodies (`openapi_document`), so the schema and the behaviour
cannot drift apart.

Bad input is a 4xx whose body says what was wrong: 400 malformed request, 401 missing/unknown key or admin token,
403 admin disabled, 413 body too large, 422 body that breaks the schema (each error with its field path), 429 rate
limited (with Retry-After). 503 only while no champion was ever loaded.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from sessionrec.config import Settings
from sessionrec.serving import api_models as am
from sessionrec.serving.auth import ADMIN_TOKEN_HEADER, API_KEY_HEADER, Denied
from sessionrec.serving.model_provider import ModelSource
from sessionrec.serving.runtime import NotReadyError, ServingRuntime

log = logging.getLogger(__name__)

JSON = "application/json"


class ApiProblem(Exception):
    """An error response: status, stable code, a message for a person."""

    def __init__(self, status: int, code: str, detail: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers or {}


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    payload = json.dumps(body, separators=(",", ":"), allow_nan=False)
    return Response(payload, status_code=status, media_type=JSON, headers=headers)


def _denied(denied: Denied) -> ApiProblem:
    codes = {401: "unauthorized", 403: "forbidden", 429: "rate_limited"}
    headers = {"Retry-After": str(denied.retry_after_s)} if denied.retry_after_s is not None else None
    return ApiProblem(denied.status, codes[denied.status], denied.message, headers)


async def _read_body(request: Request, max_bytes: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiProblem(400, "bad_request", "Content-Length must be a non-negative integer")
        if int(declared) > max_bytes:
            detail = f"request body of {declared} bytes exceeds the limit of {max_bytes}"
            raise ApiProblem(413, "too_large", detail)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise ApiProblem(413, "too_large", f"request body exceeds the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _validation_detail(exc: ValidationError) -> list[dict[str, Any]]:
    """pydantic's errors without the offending input (it may be huge or sensitive)."""
    return [
        {
            "field": ".".join(str(part) for part in error["loc"]) or "(body)",
            "message": error["msg"],
            "type": error["type"],
        }
        for error in exc.errors(include_url=False, include_input=False, include_context=False)
    ]


async def _parse(request: Request, model: type[BaseModel], max_bytes: int) -> Any:
    raw = await _read_body(request, max_bytes)
    if not raw.strip():
        raise ApiProblem(422, "invalid_body", "the request body is empty: send a JSON object")
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise ApiProblem(422, "invalid_body", _validation_detail(exc)) from None


Handler = Callable[[Request], Awaitable[tuple[Response, str]]]


class RecommenderApp:
    """The API bound to one runtime, an ASGI application (the lifespan of its ``starlette`` app starts and stops
    the runtime)."""

    def __init__(self, settings: Settings, make_source: Callable[[], ModelSource]) -> None:
        self.settings = settings
        self.make_source = make_source
        self.models = am.request_models(settings.serving, settings.ingest)
        self.max_bytes = settings.serving.max_request_bytes
        self.runtime: ServingRuntime | None = None
        self.openapi = openapi_document(self.models)
        self._hot = {
            ("POST", "/recommend"): self._endpoint("recommend", self.recommend),
            ("POST", "/events"): self._endpoint("events", self.events),
            ("POST", "/feedback"): self._endpoint("feedback", self.feedback),
        }
        self.starlette = Starlette(
            routes=[
                *(Route(path, endpoint, methods=[method]) for (method, path), endpoint in self._hot.items()),
                Route("/healthz", self.healthz, methods=["GET"]),
                Route("/readyz", self.readyz, methods=["GET"]),
                Route("/metrics", self.metrics, methods=["GET"]),
                Route("/admin/reload", self._endpoint("admin_reload", self.admin_reload), methods=["POST"]),
                Route("/admin/canary", self._endpoint("admin_canary", self.admin_canary), methods=["GET", "POST"]),
                Route("/openapi.json", self.openapi_json, methods=["GET"]),
                Route("/docs", self.docs, methods=["GET"]),
            ],
            lifespan=self._lifespan,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI entry. The hot endpoints are called directly: Starlette's router and its two exception
        middlewares cost ~7% of a `/recommend`, and `_endpoint` already answers every exception itself. Everything
        else (the other paths, their 404/405, the lifespan) goes through the Starlette app."""
        if scope["type"] == "http":
            endpoint = self._hot.get((scope["method"], scope["path"]))
            if endpoint is not None:
                response = await endpoint(Request(scope, receive))
                await response(scope, receive, send)
                return
        await self.starlette(scope, receive, send)

    @asynccontextmanager
    async def _lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        runtime = ServingRuntime(self.settings, self.make_source())
        await runtime.start()
        self.runtime = runtime
        try:
            yield
        finally:
            self.runtime = None
            await runtime.stop()

    def _runtime(self) -> ServingRuntime:
        if self.runtime is None:
            raise ApiProblem(503, "not_ready", "the service is starting")
        return self.runtime

    def _endpoint(self, name: str, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        """Wrap a handler: error responses from `ApiProblem`, latency and status metrics per endpoint/variant."""

        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            variant = "none"
            try:
                response, variant = await handler(request)
            except ApiProblem as problem:
                body = {"error": problem.code, "detail": problem.detail}
                response = _json(body, problem.status, problem.headers)
            except NotReadyError as exc:
                response = _json({"error": "not_ready", "detail": str(exc)}, 503, {"Retry-After": "5"})
            except Exception:  # a bug, not bad input: logged with its traceback, answered as JSON
                log.exception("%s failed", name)
                if self.runtime is not None:
                    self.runtime.metrics.errors.labels("internal").inc()
                response = _json({"error": "internal", "detail": "internal error; it is logged"}, 500)
            if self.runtime is not None:
                metrics = self.runtime.metrics
                metrics.latency.labels(name, variant).observe(time.perf_counter() - started)
                metrics.requests.labels(name, str(response.status_code)).inc()
            return response

        return endpoint

    def _api_key(self, request: Request) -> str:
        key = request.headers.get(API_KEY_HEADER)
        denied = self._runtime().auth.check_key(key)
        if denied is not None:
            raise _denied(denied)
        return key or ""

    def _admin(self, request: Request) -> ServingRuntime:
        runtime = self._runtime()
        denied = runtime.auth.check_admin(request.headers.get(ADMIN_TOKEN_HEADER))
        if denied is not None:
            raise _denied(denied)
        return runtime

    # -- endpoints ---------------------------------------------------------------------------------------------

    async def recommend(self, request: Request) -> tuple[Response, str]:
        started = time.perf_counter()
        key = self._api_key(request)
        body = await _parse(request, self.models.RecommendRequest, self.max_bytes)
        answer = await self._runtime().recommend(body, key, started)
        return _json(answer, headers={"X-Model-Version": answer["model"]["version"]}), answer["variant"]

    async def events(self, request: Request) -> tuple[Response, str]:
        self._api_key(request)
        body = await _parse(request, self.models.EventsRequest, self.max_bytes)
        return _json(await self._runtime().add_events(body)), "none"

    async def feedback(self, request: Request) -> tuple[Response, str]:
        self._api_key(request)
        body = await _parse(request, self.models.FeedbackRequest, self.max_bytes)
        return _json(self._runtime().feedback(body), 202), "none"

    async def admin_reload(self, request: Request) -> tuple[Response, str]:
        runtime = self._admin(request)
        await _read_body(request, self.max_bytes)
        return _json(await runtime.reload()), "none"

    async def admin_canary(self, request: Request) -> tuple[Response, str]:
        runtime = self._admin(request)
        if request.method == "GET":
            return _json(runtime.control_view()), "none"
        body = await _parse(request, am.CanaryRequest, self.max_bytes)
        return _json(await runtime.set_canary(body.share, body.shadow)), "none"

    async def healthz(self, _request: Request) -> Response:
        return _json({"status": "ok"})

    async def readyz(self, _request: Request) -> Response:
        if self.runtime is None:
            return _json({"ready": False, "detail": {"reason": "the service is starting"}}, 503)
        ready, detail = self.runtime.readiness()
        return _json({"ready": ready, "detail": detail}, 200 if ready else 503)

    async def metrics(self, _request: Request) -> Response:
        if self.runtime is None:
            return Response("", media_type="text/plain")
        payload, content_type = self.runtime.metrics.exposition()
        return Response(payload, media_type=content_type)

    async def openapi_json(self, _request: Request) -> Response:
        return _json(self.openapi)

    async def docs(self, _request: Request) -> Response:
        return HTMLResponse(_DOCS_PAGE)


_DOCS_PAGE = """<!doctype html>
<html><head><title>sessionrec recommender API</title>
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css"></head>
<body><div id="ui"></div>
<script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "/openapi.json", dom_id: "#ui"});</script>
<noscript>The OpenAPI document is at <a href="/openapi.json">/openapi.json</a>.</noscript>
</body></html>
"""


def _responses(ok_status: int, ok_schema: str, errors: tuple[int, ...]) -> dict[str, Any]:
    descriptions = {
        200: "OK", 202: "Accepted", 400: "Malformed request", 401: "Missing or unknown credential",
        403: "Admin endpoints disabled", 413: "Body too large", 422: "Body breaks the schema",
        429: "Rate limited", 503: "No champion loaded yet",
    }
    out: dict[str, Any] = {
        str(ok_status): {"description": descriptions[ok_status], "content": {JSON: {"schema": _ref(ok_schema)}}}
    }
    for status in errors:
        out[str(status)] = {"description": descriptions[status], "content": {JSON: {"schema": _ref("Error")}}}
    return out


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def openapi_document(models: am.RequestModels) -> dict[str, Any]:
    """OpenAPI 3.1 for the API, from the pydantic models that validate it."""
    inputs = [models.RecommendRequest, models.EventsRequest, models.FeedbackRequest, am.CanaryRequest]
    outputs = [am.RecommendResponse, am.EventsResponse, am.FeedbackResponse, am.ControlResponse, am.ReloadResponse,
               am.Health, am.Readiness, am.Error]
    _, schemas = models_json_schema(
        [(m, "validation") for m in inputs] + [(m, "serialization") for m in outputs],
        ref_template="#/components/schemas/{model}",
    )
    client = (400, 401, 413, 422, 429)
    key = [{"apiKey": []}]
    admin = [{"adminToken": []}]

    def post(summary: str, body: str, status: int, answer: str, errors: tuple[int, ...], security: list) -> dict:
        return {
            "summary": summary,
            "security": security,
            "requestBody": {"required": True, "content": {JSON: {"schema": _ref(body)}}},
            "responses": _responses(status, answer, errors),
        }

    return {
        "openapi": "3.1.0",
        "info": {"title": "sessionrec recommender", "version": "1"},
        "paths": {
            "/recommend": {"post": post("Rank items for a session", "RecommendRequest", 200, "RecommendResponse",
                                        (*client, 503), key)},
            "/events": {"post": post("Append events to a session", "EventsRequest", 200, "EventsResponse",
                                     client, key)},
            "/feedback": {"post": post("Record what the user did with a recommendation", "FeedbackRequest", 202,
                                       "FeedbackResponse", client, key)},
            "/admin/canary": {
                "get": {"summary": "Canary and shadow state", "security": admin,
                        "responses": _responses(200, "ControlResponse", (401, 403))},
                "post": post("Set the challenger share and shadow mode", "CanaryRequest", 200, "ControlResponse",
                             (400, 401, 403, 413, 422), admin),
            },
            "/admin/reload": {"post": {"summary": "Reload models and business rules now", "security": admin,
                                       "responses": _responses(200, "ReloadResponse", (400, 401, 403, 413))}},
            "/healthz": {"get": {"summary": "Liveness", "responses": _responses(200, "Health", ())}},
            "/readyz": {"get": {"summary": "Readiness: a champion is loaded", "responses": {
                "200": {"description": "Ready", "content": {JSON: {"schema": _ref("Readiness")}}},
                "503": {"description": "Not ready", "content": {JSON: {"schema": _ref("Readiness")}}}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {
                "200": {"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        },
        "components": {
            "schemas": schemas["$defs"],
            "securitySchemes": {
                "apiKey": {"type": "apiKey", "in": "header", "name": API_KEY_HEADER},
                "adminToken": {"type": "apiKey", "in": "header", "name": ADMIN_TOKEN_HEADER},
            },
        },
    }
