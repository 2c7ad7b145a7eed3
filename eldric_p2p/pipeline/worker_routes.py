"""The worker's HTTP routes (docs/pipeline.md has the bodies):

    POST /api/v1/pipeline/load     an Assignment -> 202 {"state": "fetching", "needed", "free"}
                                   409 {"error", "needed", "offered", "free"} when it does not fit
    POST /api/v1/pipeline/unload   {"deployment_id", "when"?} -> 200; frees the stage's memory; with
                                   "when": "idle" a head takes no new session and unloads when its are done
    GET  /api/v1/worker/status     device, memory offered/reserved/free, link port, shards with progress
"""

from __future__ import annotations

import json
import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from eldric_p2p.errors import EldricError, PeerUnavailable, UsageError
from eldric_p2p.http_server import error_response
from eldric_p2p.pipeline.assignment import Assignment
from eldric_p2p.pipeline.worker import Worker

log = logging.getLogger(__name__)

MAX_BODY = 256 * 1024


async def _json_body(request: Request) -> Any:
    body = await request.body()
    if len(body) > MAX_BODY:
        raise UsageError(f"request body of {len(body)} bytes over {MAX_BODY}")
    try:
        return json.loads(body)
    except ValueError as exc:
        raise UsageError(f"request body is not JSON: {exc}") from exc


def worker_routes(worker: Worker) -> list[Route]:
    """The worker's HTTP routes (load, unload, status)."""

    async def load(request: Request) -> Response:
        try:
            a = Assignment.from_json_untrusted(await _json_body(request))
            async with worker.http_client() as client:
                needed, fmt = await worker.needs(a, client)
            if worker.draining:
                message = f"worker {worker.name} takes no new work: {worker.draining}"
                error = {"message": message, "type": "invalid_request_error", "code": "does_not_fit"}
                return JSONResponse({"error": error, "needed": needed, "offered": worker.offered, "free": 0},
                                    status_code=409)  # fmt: skip
            if needed > worker.free:
                message = worker.refusal(a, needed, fmt)
                log.info("refused an assignment: %s", message)
                error = {"message": message, "type": "invalid_request_error", "code": "does_not_fit"}
                return JSONResponse(
                    {"error": error, "needed": needed, "offered": worker.offered, "free": worker.free},
                    status_code=409,
                )
            shard = worker.start_load(a, needed, fmt)
        except UsageError as exc:
            code = "model_not_found" if type(exc).__name__ == "ModelNotFound" else "invalid_assignment"
            return error_response(
                404 if code == "model_not_found" else 400, str(exc), "invalid_request_error", code
            )
        except (PeerUnavailable, EldricError) as exc:
            return error_response(502, str(exc), "peer_error", "data_peer_unavailable")
        return JSONResponse(
            {"state": shard.state, "needed": shard.needed, "free": worker.free}, status_code=202
        )

    async def unload(request: Request) -> Response:
        try:
            body = await _json_body(request)
        except UsageError as exc:
            return error_response(400, str(exc), "invalid_request_error", "bad_request")
        dep = body.get("deployment_id") if isinstance(body, dict) else None
        if not isinstance(dep, str):
            return error_response(400, "deployment_id is required", "invalid_request_error", "bad_request")
        if body.get("when") == "idle":  # a moving pipeline: the old head finishes its sessions first
            return JSONResponse({"retiring": await worker.retire(dep), "free": worker.free})
        found = await worker.unload(dep)
        return JSONResponse({"unloaded": found, "free": worker.free})

    async def status(request: Request) -> Response:
        return JSONResponse(worker.status())

    return [
        Route("/api/v1/pipeline/load", load, methods=["POST"]),
        Route("/api/v1/pipeline/unload", unload, methods=["POST"]),
        Route("/api/v1/worker/status", status, methods=["GET"]),
    ]
