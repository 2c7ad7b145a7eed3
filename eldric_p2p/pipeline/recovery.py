"""The coordinator's side of recovery: a pipeline with a lost stage is re-planned and deployed again.

When a heartbeat finds a stage lost (its worker refuses connections, stays silent for `lost_after_s`, or was
revoked), `recover` re-deploys the model: each lost stage's worker is replaced by a *spare* (a live worker
the deployment does not use, most free memory first) and the other stages keep their workers, so their
layers come back from their shard caches; with no spare it plans over the survivors. The old shards are
unloaded first (the survivors need the memory for their new ranges). Requests in flight are resumed on the
new pipeline by the node that took them (`api.recovery`); the coordinator only makes the pipeline exist.

Two gentler cases share the machinery. `move`: a worker *drains* (its node is stopping, or its owner wants
the machine back): the new plan is deployed first while the old one keeps serving; then the old head takes
no new session and unloads once its sessions are done, and the rest of the old stages after it. New sessions
use the new plan, old ones finish on the old; if the new plan does not fit beside the old, it falls back to
`recover` (and sessions in flight resume). `deploy_pending`: a deploy refused for lack of memory is kept and
tried again whenever the peer table changes (a worker joined), over every live worker.

`replacement_workers` is the pure choice of workers, tested on its own.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import trio

from eldric_p2p.errors import EldricError, ModelNotFound, PeerUnavailable
from eldric_p2p.net.peers import get_json, post_json
from eldric_p2p.pipeline.planner import PlanDoesNotFit, WorkerView

if TYPE_CHECKING:
    from eldric_p2p.pipeline.coordinator import Coordinator, Deployment

log = logging.getLogger(__name__)

BAD_STATES = ("lost", "failed", "unloaded")
RETIRE_WAIT_S = 300.0  # the longest an old head may finish its sessions before it is unloaded anyway


def replacement_workers(
    dep: Deployment, live: list[WorkerView], avoid: set[str] = frozenset()  # type: ignore[assignment]
) -> tuple[list[str], list[str]]:
    """(worker names for the new plan, the spares among them): lost stages' workers replaced by spares.
    Workers in `avoid` (those of the model's other replicas) are never spares: a replica re-planned onto
    them would no longer be an independent route."""
    names_live = {v.name for v in live}
    in_use = {s.stage.name for s in dep.shards} | avoid
    spares = sorted((v for v in live if v.name not in in_use), key=lambda v: (-v.free, v.name))
    names: list[str] = []
    used: list[str] = []
    spares = [v for v in spares if v.free > 0]  # a draining worker offers nothing
    for shard in dep.shards:
        if shard.state in BAD_STATES or shard.draining or shard.stage.name not in names_live:
            if spares:
                spare = spares.pop(0).name
                names.append(spare)
                used.append(spare)
        elif shard.stage.name not in names:
            names.append(shard.stage.name)
    return names, used


async def recover(coord: Coordinator, dep_id: str) -> Deployment | None:
    """Deploy `dep_id`'s model again without its lost stages. Returns the new deployment, None on failure
    (logged; the model is then not deployed until someone deploys it)."""
    dep = coord.deployments.get(dep_id)
    if dep is None:
        return None
    t0 = time.perf_counter()
    lost = [s.stage.label() for s in dep.shards if s.state in BAD_STATES]
    why = {s.stage.label(): s.error for s in dep.shards if s.state in BAD_STATES}
    async with coord.client_factory() as client:
        await coord.peers.refresh()
        live = await coord.worker_views(client)
    names, spares = replacement_workers(dep, live, other_replicas(coord, dep))
    how = f"spares {', '.join(spares)}" if spares else f"the survivors {', '.join(names) or '(none)'}"
    log.warning("%s lost %s: re-planning onto %s", dep_id, ", ".join(lost), how)
    try:
        await coord.undeploy(dep_id)
    except ModelNotFound:
        log.info("%s was undeployed meanwhile: not re-planned", dep_id)
        return None
    except EldricError as exc:
        log.info("unloading %s: %s", dep_id, exc)
    options = _options(dep)
    for workers in (names, None) if names else (None,):  # the chosen workers, else any live ones
        try:
            new = await coord.deploy(dep.model, workers=workers, **options)  # type: ignore[arg-type]
        except EldricError as exc:
            log.warning("re-deploying %s on %s failed: %s", dep.model, workers or "any worker", exc)
            continue
        new.note = f"recovered from {dep_id} ({', '.join(lost)} lost) in {time.perf_counter() - t0:.1f} s"
        coord.recovered.append({"from": dep_id, "to": new.id, "lost": lost, "why": why, "spares": spares,
                                "seconds": round(time.perf_counter() - t0, 3)})  # fmt: skip
        log.warning("%s", new.note)
        return new
    return None


def other_replicas(coord: Coordinator, dep: Deployment) -> set[str]:
    """The workers of the model's other deployments (replicas)."""
    return {s.stage.name for d in coord.deployments.values() if d.model == dep.model and d.id != dep.id
            for s in d.shards}  # fmt: skip


def _options(dep: Deployment) -> dict[str, object]:
    """The deploy options a re-plan of `dep` keeps (its TTL and on-demand mark too)."""
    return dict(data_peers=dep.data_peers, strategy=dep.strategy, weights=dep.weights, max_ctx=dep.max_ctx,
                sessions=dep.sessions, ttl=dep.ttl_s, on_demand=dep.on_demand)  # fmt: skip


async def move(coord: Coordinator, dep_id: str) -> Deployment | None:
    """Move `dep_id` off its draining workers without dropping a session (make before break)."""
    dep = coord.deployments.get(dep_id)
    if dep is None:
        return None
    t0 = time.perf_counter()
    leaving = [s.stage.label() for s in dep.shards if s.draining]
    async with coord.client_factory() as client:
        await coord.peers.refresh()
        live = await coord.worker_views(client)
    names, spares = replacement_workers(dep, live, other_replicas(coord, dep))
    log.warning(
        "%s: %s draining; deploying a new plan on %s first", dep_id, ", ".join(leaving), ", ".join(names)
    )
    try:
        new = await coord.deploy(dep.model, workers=names or None, **_options(dep))  # type: ignore[arg-type]
    except EldricError as exc:
        log.warning("no room for a new plan beside %s (%s): re-planning after unloading it", dep_id, exc)
        return await recover(coord, dep_id)
    await retire(coord, dep)
    new.note = f"moved from {dep_id} ({', '.join(leaving)} draining) in {time.perf_counter() - t0:.1f} s"
    coord.recovered.append({"from": dep_id, "to": new.id, "draining": leaving, "spares": spares,
                            "seconds": round(time.perf_counter() - t0, 3)})  # fmt: skip
    log.warning("%s", new.note)
    return new


async def retire(coord: Coordinator, dep: Deployment) -> None:
    """The old head finishes its sessions (no new ones), then every old stage unloads."""
    coord.deployments.pop(dep.id, None)
    head = dep.shards[0]
    async with coord.client_factory() as client:
        try:
            await post_json(client, f"{head.url}/api/v1/pipeline/unload",
                            {"deployment_id": dep.id, "when": "idle"}, timeout=10)  # fmt: skip
            with trio.move_on_after(RETIRE_WAIT_S):
                while True:
                    st = await get_json(client, f"{head.url}/api/v1/worker/status", timeout=5)
                    ids = [x.get("deployment_id") for x in st.get("shards", []) if isinstance(x, dict)]
                    if dep.id not in ids:
                        break
                    await trio.sleep(0.5)
        except (PeerUnavailable, AttributeError) as exc:
            log.info("retiring %s's head: %s", dep.id, exc)
        await coord._unload(client, dep.id, dep.shards)


PENDING_NOTE = "deployed by itself: it was refused for lack of memory until more joined"


async def deploy_pending(coord: Coordinator) -> None:
    """Try each deploy that was refused for lack of memory again, over every live worker."""
    for model, opts in list(coord.pending.items()):
        if any(d.model == model for d in coord.deployments.values()):
            coord.pending.pop(model, None)
            continue
        try:
            new = await coord.deploy(model, workers=None, note=PENDING_NOTE, **opts)  # type: ignore[arg-type]
        except PlanDoesNotFit:
            continue  # still too little memory: wait for the next change
        except EldricError as exc:
            log.info("pending deploy of %s: %s", model, exc)
            continue
        coord.pending.pop(model, None)
        log.warning("pending deploy of %s done: %s", model, ", ".join(s.stage.name for s in new.shards))
