"""`GET /metrics`: Prometheus text format."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from adapterhub_server.api.json_body import JsonLimitsRoute
from adapterhub_server.api.metrics import ApiMetrics

router = APIRouter(tags=["health"], route_class=JsonLimitsRoute)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
)
async def metrics(request: Request) -> Response:
    """Request, generation, batching and adapter-cache metrics of this server."""
    app_metrics: ApiMetrics = request.app.state.metrics
    body, content_type = app_metrics.render()
    return Response(body, media_type=content_type)
