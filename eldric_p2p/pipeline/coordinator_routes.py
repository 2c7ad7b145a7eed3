"""The coordinator's HTTP routes: JSON bodies in, `Coordinator` calls, JSON (or a mapped error) out.

    POST /api/v1/pipeline/deploy     {model, data_peer?, workers?, strategy?, weights?, max_ctx?, sessions?,
                                      replicas?}
                                     -> 200 the deployment (plan + shard states) once every shard is ready
                                        (with replicas > 1, "replicas": each pipeline, on disjoint workers);
                                        409 {"error", "needed", "free", "workers", "best"}: does not fit
    GET  /api/v1/pipeline/status     every deployment: each shard's state, layers, memory, last heartbeat
    GET  /api/v1/pipeline/models     deployed models and where their heads are
    POST /api/v1/pipeline/undeploy   {deployment_id | model}: by model, every replica of it
    POST /api/v1/pipeline/rebalance  {deployment_id | model}: plan again over the live workers and redeploy
    GET  /api/v1/peers               the peer table

The planning itself is pure and lives in pipeline/planner.py; the deploy and heartbeat I/O in
pipeline/coordinator.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from eldric_p2p.errors import DoesNotFit, EldricError, ModelNotFound, UsageError
from eldric_p2p.http_server import error_response
from eldric_p2p.pipeline.coordinator import Coordinator
from eldric_p2p.pipeline.planner import PlanDoesNotFit


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > 64 * 1024:
        raise UsageError("request body over 64 KiB")
    try:
        body = json.loads(raw or b"{}")
    except ValueError as exc:
        raise UsageError(f"request body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise UsageError("request body must be a JSON object")
    return body


def _error(exc: EldricError) -> Response:
    if isinstance(exc, PlanDoesNotFit):
        err = {"message": str(exc), "type": "invalid_request_error", "code": "does_not_fit"}
        return JSONResponse({"error": err, **exc.details}, status_code=409)
    if isinstance(exc, DoesNotFit):
        return error_response(409, str(exc), "invalid_request_error", "does_not_fit")
    if isinstance(exc, ModelNotFound):
        return error_response(404, str(exc), "not_found_error", "model_not_found")
    if isinstance(exc, UsageError):
        return error_response(422, str(exc), "invalid_request_error", "invalid_request")
    return error_response(502, str(exc), "peer_error", "peer_unavailable")


MAX_REPLICAS = 16


def coordinator_routes(coord: Coordinator) -> list[Route]:
    async def deploy(request: Request) -> Response:
        try:
            b = await _body(request)
            model = b.get("model")
            if not isinstance(model, str) or not model:
                raise UsageError("model is required")
            dp = b.get("data_peer") or b.get("data_peers")
            data_peers = [dp] if isinstance(dp, str) else dp
            if data_peers is not None and not (
                isinstance(data_peers, list) and all(isinstance(p, str) for p in data_peers)
            ):
                raise UsageError("data_peer must be a URL or a list of URLs")
            workers = b.get("workers")
            if isinstance(workers, str):
                workers = [w for w in workers.split(",") if w]
            if workers is not None and not (
                isinstance(workers, list) and all(isinstance(w, str) for w in workers)
            ):
                raise UsageError("workers must be a list of names")
            opts = {k: b[k] for k in ("strategy", "weights", "max_ctx", "sessions") if k in b}
            for k in ("max_ctx", "sessions"):
                if k in opts and (not isinstance(opts[k], int) or opts[k] < 1):
                    raise UsageError(f"{k} must be a positive integer")
            replicas = b.get("replicas", 1)
            if not isinstance(replicas, int) or not 1 <= replicas <= MAX_REPLICAS:
                raise UsageError(f"replicas must be an integer 1-{MAX_REPLICAS}")
            try:
                deps = await coord.deploy_replicas(
                    model, replicas, data_peers=data_peers, workers=workers or None, **opts
                )
            except PlanDoesNotFit as exc:  # kept: deployed by itself when enough memory joins
                coord.pending[model] = {"data_peers": data_peers, **opts}
                exc.details["pending"] = True
                raise PlanDoesNotFit(
                    f"{exc}; kept as pending: it is deployed by itself when enough memory joins "
                    f"(undeploy {model} forgets it)",
                    exc.details,
                ) from exc
        except EldricError as exc:
            return _error(exc)
        now = trio.current_time()
        out = deps[0].as_json(now)
        if replicas > 1:
            out["replicas"] = [d.as_json(now) for d in deps]
        return JSONResponse(out)

    async def status(request: Request) -> Response:
        return JSONResponse(coord.status())

    async def models(request: Request) -> Response:
        return JSONResponse({"models": coord.models()})

    async def by_key(request: Request, action: Callable[[str], Any]) -> Response:
        try:
            b = await _body(request)
            key = b.get("deployment_id") or b.get("model")
            if not isinstance(key, str):
                raise UsageError("deployment_id or model is required")
            dep = await action(key)
        except EldricError as exc:
            return _error(exc)
        return JSONResponse(dep.as_json(trio.current_time()))

    async def undeploy(request: Request) -> Response:
        return await by_key(request, undeploy_all)

    async def undeploy_all(key: str) -> Any:
        """A deployment by id; by model, every deployment (replica) of it. Returns the first."""
        dep = await coord.undeploy(key)
        if key == dep.model:
            while any(d.model == key for d in coord.deployments.values()):
                await coord.undeploy(key)
        return dep

    async def rebalance(request: Request) -> Response:
        return await by_key(request, coord.rebalance)

    async def peers(request: Request) -> Response:
        return JSONResponse({"peers": coord.peers.listing()})

    return [
        Route("/api/v1/pipeline/deploy", deploy, methods=["POST"]),
        Route("/api/v1/pipeline/status", status, methods=["GET"]),
        Route("/api/v1/pipeline/models", models, methods=["GET"]),
        Route("/api/v1/pipeline/undeploy", undeploy, methods=["POST"]),
        Route("/api/v1/pipeline/rebalance", rebalance, methods=["POST"]),
        Route("/api/v1/peers", peers, methods=["GET"]),
    ]
