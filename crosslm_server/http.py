"""The operators' HTTP app: /healthz, /readyz, /metrics, /v1/submissions."""
from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from crosslm_shared.convert import submission_to_dict
from crosslm_server.metrics import Metrics
from crosslm_server.store import Store


def build_app(*, readiness: Callable[[], tuple[bool, str]], metrics: Metrics, store: Store) -> Starlette:
    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "alive"})

    async def readyz(request: Request) -> Response:
        ok, reason = readiness()
        return JSONResponse({"ready": ok, "reason": reason}, status_code=200 if ok else 503)

    async def metrics_view(request: Request) -> Response:
        metrics.queue_depth.set(store.queue_depth())
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def submissions(request: Request) -> Response:
        silo = request.query_params.get("silo")
        return JSONResponse({"submissions": [submission_to_dict(s) for s in store.list_submissions(silo=silo)]})

    return Starlette(routes=[
        Route("/healthz", healthz), Route("/readyz", readyz), Route("/metrics", metrics_view),
        Route("/v1/submissions", submissions),
    ])
