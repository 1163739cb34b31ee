"""The BentoML service: ``bentoml serve sessionrec.serving.service:Recommender``, and what the Bento runs.

The whole API is the Starlette app of `app.py`, mounted into the service. Two settings remove most of BentoML's
per-request cost (2-core machine, benchmarks/serve_load.py: an echo endpoint mounted with BentoML's defaults
answers ~300-400 req/s; with these, the service's own ``/feedback`` answers ~2,300-3,600 req/s):

* `ApiFirst`, an ASGI middleware, hands our paths straight to our app. BentoML's own routes for ``/healthz``,
  ``/readyz`` and ``/metrics`` come before mounted apps and would otherwise answer instead of ours (ours say which
  model is loaded and why not), and its router adds work to every request.
* OpenTelemetry spans are switched off for our paths (``tracing.excluded_urls``): they were the largest per-request
  cost of BentoML's stack. BentoML's metrics and access-log middlewares are off; the service exports its own
  metrics and logs failures.

Settings: the file named by ``SESSIONREC_SETTINGS_FILE`` (written by `server.serve`, so that a CLI invocation's
settings reach the worker processes whole), else `load_settings()` (``sessionrec.toml`` and ``SESSIONREC_*``).
"""

from __future__ import annotations

import os
from pathlib import Path

import bentoml
from starlette.types import ASGIApp, Receive, Scope, Send

from sessionrec.config import Settings, load_settings
from sessionrec.serving.app import RecommenderApp
from sessionrec.serving.model_provider import RegistrySource
from sessionrec.serving.server import SETTINGS_FILE_ENV

SERVICE_NAME = "sessionrec-recommender"
#: Paths our app answers (everything else falls through to BentoML).
API_PATHS = frozenset(
    {"/recommend", "/events", "/feedback", "/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"}
)
API_PREFIXES = ("/admin/",)


def settings_from_environment() -> Settings:
    path = os.environ.get(SETTINGS_FILE_ENV)
    if path:
        return Settings.model_validate_json(Path(path).read_text(encoding="utf-8"))
    return load_settings()


class ApiFirst:
    """Routes requests for our paths to ``api`` before BentoML's router sees them."""

    def __init__(self, app: ASGIApp, api: ASGIApp) -> None:
        self.app = app
        self.api = api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (scope["path"] in API_PATHS or scope["path"].startswith(API_PREFIXES)):
            await self.api(scope, receive, send)
        else:
            await self.app(scope, receive, send)


settings = settings_from_environment()
api = RecommenderApp(settings, lambda: RegistrySource(settings.tracking_uri, settings.tracking.registered_model))


@bentoml.asgi_app(api.starlette, path="/")  # mounted for its lifespan (BentoML runs a mounted Starlette's)
@bentoml.service(
    name=SERVICE_NAME,
    workers=settings.serving.workers,
    traffic={"timeout": 30},
    metrics={"enabled": False},
    logging={"access": {"enabled": False}},
    tracing={"excluded_urls": [f"{path}$" for path in sorted(API_PATHS)] + [f"{p}.*" for p in API_PREFIXES]},
)
class Recommender:
    """Session-based recommendations from the champion (and canary challenger) of the model registry."""


Recommender.add_asgi_middleware(ApiFirst, api=api)
