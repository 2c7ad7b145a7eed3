"""The dashboard at `GET /`: a static page (eldric_p2p/api/static/, no build step, nothing from the internet) that
polls the node's JSON and redraws every two seconds.

It reads `/api/v1/node`, `/api/v1/peers`, `/api/v1/pipeline/status` (deployments with their stages: worker,
layers [start, end), role head/middle/tail, state, and `link` direct/punched/relayed when known) and
`/api/v1/dashboard`, added here: the models the router reaches with their backends and queues, live
tokens/s, active sessions, request count and mean time to first token from the metrics registry. An endpoint a
node does not have (404) shows as "not available" in its panel; the rest keeps working.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from eldric_p2p.api import metrics
from eldric_p2p.api.router import Router

ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}


def _asset(name: str) -> str:
    return resources.files("eldric_p2p.api").joinpath("static", name).read_text(encoding="utf-8")


def dashboard_json(router: Router | None, registry: metrics.Registry = metrics.REGISTRY) -> dict[str, Any]:
    """Live figures for the page: models and backends, tokens/s, active sessions, requests, mean TTFT."""
    models = router.models() if router is not None else []
    rate = registry.get(metrics.TOKENS_PER_S.name)
    active = registry.get(metrics.ACTIVE.name)
    requests = registry.get(metrics.REQUESTS.name)
    ttft = registry.get(metrics.TTFT.name)
    per_model: dict[str, dict[str, float]] = {}
    for m in models:
        mid = m["id"]
        per_model[mid] = {
            "tokens_per_s": rate.rate(model=mid) if isinstance(rate, metrics.Rate) else 0.0,
            "active": active.value(model=mid) if isinstance(active, metrics.Gauge) else 0.0,
        }
    ttft_mean = 0.0
    if isinstance(ttft, metrics.Summary):
        samples = ttft.samples()
        total = sum(v for name, _, v in samples if name.endswith("_sum"))
        count = sum(v for name, _, v in samples if name.endswith("_count"))
        ttft_mean = total / count if count else 0.0
    return {
        "models": models,
        "per_model": per_model,
        "tokens_per_s": rate.total_rate() if isinstance(rate, metrics.Rate) else 0.0,
        "active_sessions": sum(v for _, _, v in active.samples()) if isinstance(active, metrics.Gauge) else 0,
        "requests_total": requests.total() if isinstance(requests, metrics.Counter) else 0,
        "ttft_mean_s": ttft_mean,
    }


def dashboard_routes(
    router: Router | None = None, registry: metrics.Registry = metrics.REGISTRY
) -> list[Route]:
    """`GET /` (the page), `GET /static/dashboard.{js,css}`, `GET /api/v1/dashboard` (live JSON)."""
    page = _asset("dashboard.html")
    assets = {name: (_asset(name), media) for name, media in ASSETS.items()}

    async def index(request: Request) -> Response:
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    async def static(request: Request) -> Response:
        found = assets.get(request.path_params["name"])
        if found is None:
            return JSONResponse({"error": {"message": "no such asset", "type": "not_found_error",
                                           "code": "not_found"}}, status_code=404)  # fmt: skip
        text, media = found
        return Response(text, media_type=media, headers={"Cache-Control": "no-cache"})

    async def live(request: Request) -> Response:
        return JSONResponse(dashboard_json(router, registry))

    return [
        Route("/", index, methods=["GET"]),
        Route("/static/{name}", static, methods=["GET"]),
        Route("/api/v1/dashboard", live, methods=["GET"]),
    ]
