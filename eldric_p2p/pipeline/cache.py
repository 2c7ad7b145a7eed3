"""The model cache of a coordinator: models loaded on demand, unloaded when idle, evicted least recently used.

With `--on-demand`, a `/v1` request for a model that no pipeline serves but some data peer holds deploys it
(`load_on_demand`, over the swarm when it does not fit one node; concurrent requests for the same model wait
for one load). Such a deployment gets the node's `--model-ttl` (default 30 min): once its head has had no
session for that long, `sweep_idle` (run at each heartbeat) unloads it. When a load does not fit the memory
the workers offer, the idle deployments that have a TTL are unloaded least recently used first until it fits
(`evict_order`, pure). Models deployed by hand stay until undeployed, unless deployed with a `ttl`; a
deployment with sessions open is never evicted.

    GET    /api/v1/cache          what this node holds: its coordinator's deployments (memory, last use, TTL,
                                  when it expires) and the worker's shards, with the memory budget
    DELETE /api/v1/cache/{model}  unload a deployment (by model or deployment id) -> 200, 404 unknown
    DELETE /api/v1/cache          unload every idle deployment of this coordinator; busy ones are kept

"Last use" is when the head last opened or closed a session, read from its status at each heartbeat.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from eldric_p2p.errors import DoesNotFit, EldricError, ModelNotFound, PeerUnavailable
from eldric_p2p.http_server import error_response
from eldric_p2p.units import format_size

if TYPE_CHECKING:
    from eldric_p2p.pipeline.coordinator import Coordinator, Deployment
    from eldric_p2p.pipeline.worker import Worker

log = logging.getLogger(__name__)

MODEL_TTL_S = 30 * 60.0
MAX_EVICTED_KEPT = 50


def evict_order(deployments: list[Deployment]) -> list[Deployment]:
    """The deployments that may be unloaded to make room, least recently used first: those with a TTL, no
    session open, and not still loading."""
    idle = [d for d in deployments if d.ttl_s > 0 and d.active == 0 and d.state != "loading"]
    return sorted(idle, key=lambda d: (d.last_used, d.created))


def expired(deployments: list[Deployment], wall: float) -> list[Deployment]:
    """The deployments idle for longer than their TTL."""
    return [d for d in deployments if d.ttl_s > 0 and d.active == 0 and d.idle_s(wall) > d.ttl_s]


async def sweep_idle(coord: Coordinator) -> None:
    """Unload every deployment idle past its TTL (called after each heartbeat's polls)."""
    for dep in expired(list(coord.deployments.values()), time.time()):
        idle = dep.idle_s(time.time())
        await _evict(coord, dep, f"idle for {idle:.0f} s (ttl {dep.ttl_s:.0f} s)")


async def _evict(coord: Coordinator, dep: Deployment, why: str) -> None:
    try:
        await coord.undeploy(dep.id)
    except EldricError as exc:
        log.info("unloading %s: %s", dep.id, exc)
        return
    log.warning("unloaded %s (%s, %s): %s", dep.model, dep.id, format_size(dep.memory), why)
    coord.evicted.append({"model": dep.model, "deployment_id": dep.id, "memory": dep.memory,
                          "reason": why, "at": round(time.time(), 3)})  # fmt: skip
    del coord.evicted[:-MAX_EVICTED_KEPT]


class _Load:
    """One on-demand load in flight: the requests that want the same model wait for its outcome."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: Deployment | None = None
        self.error: EldricError | None = None


async def load_on_demand(coord: Coordinator, model: str) -> Deployment:
    """A ready deployment of `model`, deploying it (and evicting idle ones when memory is short) if there is
    none. One load per model at a time: other callers wait for it and share its outcome. Raises ModelNotFound
    (no data peer has it), DoesNotFit (too big even with every idle model unloaded), PeerUnavailable."""
    for dep in coord.deployments.values():  # one deployment per model: a broken one is the recovery's job
        if dep.model == model:
            if dep.state != "ready":
                raise PeerUnavailable(f"the pipeline of {model} is {dep.state}: it is being re-planned")
            return dep
    flight = coord.loading.get(model)
    if flight is not None:
        await flight.done.wait()
        if flight.result is not None:
            return flight.result
        assert flight.error is not None
        raise flight.error
    flight = coord.loading[model] = _Load()
    try:
        await coord.peers.refresh()
        served = coord.resolve_model(model)  # ModelNotFound
        flight.result = await (
            load_on_demand(coord, served) if served != model else _deploy_evicting(coord, model)
        )
        return flight.result
    except EldricError as exc:
        flight.error = exc
        raise
    finally:
        del coord.loading[model]
        flight.done.set()


async def _deploy_evicting(coord: Coordinator, model: str) -> Deployment:
    from eldric_p2p.pipeline.planner import PlanDoesNotFit

    t0 = time.perf_counter()
    opts = dict(coord.on_demand_options)
    evicted: list[str] = []
    while True:
        try:
            dep = await coord.deploy(model, ttl=coord.model_ttl, on_demand=True, **opts)
        except PlanDoesNotFit as exc:
            victims = [
                d for d in evict_order(list(coord.deployments.values())) if d.model != model
            ]
            if not victims:
                busy = [d.model for d in coord.deployments.values() if d.active]
                raise DoesNotFit(
                    f"{exc}" + (f"; models in use, not unloaded: {', '.join(busy)}" if busy else "")
                ) from exc
            lru = victims[0]
            evicted.append(lru.model)
            await _evict(coord, lru, f"least recently used: memory for {model}")
            continue
        dep.note = f"loaded on demand in {time.perf_counter() - t0:.1f} s" + (
            f" (evicted {', '.join(evicted)})" if evicted else ""
        )
        log.warning("%s %s", model, dep.note)
        return dep


# --------------------------------------------------------------------------------------------- HTTP


def cache_listing(coord: Coordinator, worker: Worker | None) -> dict[str, Any]:
    wall = time.time()
    models = []
    for d in sorted(coord.deployments.values(), key=lambda d: -d.last_used):
        idle = d.idle_s(wall)
        models.append(
            {
                "model": d.model,
                "deployment_id": d.id,
                "state": d.state,
                "memory": d.memory,
                "stages": [
                    {"worker": s.stage.name, "start": s.stage.start, "end": s.stage.end, "memory": s.needed}
                    for s in d.shards
                ],  # fmt: skip
                "on_demand": d.on_demand,
                "sessions_active": d.active,
                "last_used": round(d.last_used, 3),
                "idle_s": round(idle, 1),
                "ttl_s": d.ttl_s,
                "expires_in_s": round(max(0.0, d.ttl_s - idle), 1) if d.ttl_s else None,
            }
        )
    out: dict[str, Any] = {
        "on_demand": coord.on_demand,
        "model_ttl_s": coord.model_ttl,
        "models": models,
        "evicted": coord.evicted[-20:],
    }
    if worker is not None:
        out["worker"] = {
            "offered": worker.offered,
            "reserved": worker.reserved,
            "free": worker.free,
            "shards": [
                {
                    "deployment_id": s.a.deployment_id,
                    "model": s.a.model_id,
                    "role": s.a.role,
                    "start": s.a.start,
                    "end": s.a.end,
                    "memory": s.needed,
                    "state": s.state,
                    "last_used": round(s.last_used, 3),
                    "idle_s": round(max(0.0, wall - s.last_used), 1),
                }  # fmt: skip
                for s in worker.shards.values()
            ],
        }
    return out


def cache_routes(coord: Coordinator, worker: Worker | None) -> list[Route]:
    async def listing(request: Request) -> Response:
        return JSONResponse(cache_listing(coord, worker))

    async def delete_one(request: Request) -> Response:
        key = request.path_params["key"]
        try:
            dep = coord.find(key)
        except ModelNotFound as exc:
            return error_response(404, str(exc), "not_found_error", "model_not_found")
        try:
            await _evict(coord, dep, "unloaded through DELETE /api/v1/cache")
        except EldricError as exc:  # pragma: no cover - _evict logs and swallows peer errors
            return error_response(502, str(exc), "peer_error", "peer_unavailable")
        return JSONResponse(
            {"unloaded": [{"model": dep.model, "deployment_id": dep.id, "memory": dep.memory}]}
        )

    async def delete_all(request: Request) -> Response:
        unloaded, kept = [], []
        for dep in list(coord.deployments.values()):
            if dep.active:
                kept.append({"model": dep.model, "deployment_id": dep.id, "sessions_active": dep.active})
                continue
            await _evict(coord, dep, "unloaded through DELETE /api/v1/cache")
            unloaded.append({"model": dep.model, "deployment_id": dep.id, "memory": dep.memory})
        return JSONResponse({"unloaded": unloaded, "kept_busy": kept})

    return [
        Route("/api/v1/cache", listing, methods=["GET"]),
        Route("/api/v1/cache", delete_all, methods=["DELETE"]),
        Route("/api/v1/cache/{key:path}", delete_one, methods=["DELETE"]),
    ]
