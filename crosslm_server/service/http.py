"""The operators' HTTP app: /healthz, /readyz, /metrics (open, for probes) and /v1/submissions
(every silo's submissions: only with the operator's bearer token, `[server] operator_token`)."""
from __future__ import annotations

import hmac
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from crosslm_shared.convert import submission_to_dict
from crosslm_server.service.metrics import Metrics
from crosslm_server.service.store import Store


def build_app(*, readiness: Callable[[], tuple[bool, str]], metrics: Metrics, store: Store,
              operator_token: str = "") -> Starlette:
    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "alive"})

    async def readyz(request: Request) -> Response:
        ok, reason = readiness()
        return JSONResponse({"ready": ok, "reason": reason}, status_code=200 if ok else 503)

    async def metrics_view(request: Request) -> Response:
        metrics.queue_depth.set(store.queue_depth())
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def submissions(request: Request) -> Response:
        if not operator_token:
            return JSONResponse({"error": "the submissions view is off: set [server] operator_token to use it"},
                                status_code=404)
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {operator_token}".encode()):
            return JSONResponse({"error": "send the operator token as 'Authorization: Bearer <token>'"},
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        silo = request.query_params.get("silo")
        return JSONResponse({"submissions": [submission_to_dict(s) for s in store.list_submissions(silo=silo)]})

    return Starlette(routes=[
        Route("/healthz", healthz), Route("/readyz", readyz), Route("/metrics", metrics_view),
        Route("/v1/submissions", submissions),
    ])
