"""Where pipelines go beyond one plan: replicas of a model on disjoint workers, and re-planning a running
model onto a better plan when a worker joins.

`deploy_replicas`: several pipelines of one model, each a deployment of its own. The router picks one per
session (`Router.route_rank`: a free session slot first, then the fewest hops, the smaller load, the faster
per token), and a session whose pipeline fails resumes at once on another (`api.recovery`), with nothing to
fetch, while the coordinator re-plans the broken one.

`improve`: when a worker joins, a running deployment (not pinned to named workers) is re-planned if the
workers' free memory now holds it in fewer stages (fewer hops per token). The new plan is deployed beside
the old one (make before break: the free memory does not count the old plan's); new sessions use it, the
old head finishes its sessions and then every old stage unloads (`recovery.retire`). It fits where it did
not before is the pending deploys' case (`recovery.deploy_pending`).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from eldric_p2p.errors import EldricError
from eldric_p2p.net.peers import fetch_model_index
from eldric_p2p.pipeline.planner import PlanDoesNotFit, WorkerView, plan_layers

if TYPE_CHECKING:
    from eldric_p2p.pipeline.coordinator import Coordinator, Deployment

log = logging.getLogger(__name__)


async def deploy_replicas(coord: Coordinator, model: str, replicas: int, **options: Any) -> list[Deployment]:
    """`replicas` pipelines of `model` on disjoint workers, as many as memory allows (at least one: when
    none fits, `deploy`'s error is raised). Each is a deployment of its own: routing picks one per
    session (`Router.route_rank`), and a session whose pipeline fails resumes on another at once, with
    nothing to fetch. With the proportional strategy and no `workers`, the live workers are dealt into
    `replicas` groups of about equal memory first (proportional would otherwise give the first replica
    every worker); a group too small falls back to any unused workers."""
    if replicas <= 1:
        return [await coord.deploy(model, **options)]
    groups: list[list[str]] = []
    if options.get("workers") is None and options.get("strategy", "proportional") == "proportional":
        async with coord.client_factory() as client:
            await coord.peers.refresh()
            views = sorted(await coord.worker_views(client), key=lambda v: (-v.free, v.name))
        groups = [[v.name for v in views[i::replicas]] for i in range(replicas)]
    opts = {k: v for k, v in options.items() if k != "workers"}
    deps: list[Deployment] = []
    used: set[str] = set()  # names and peer ids of the workers the replicas so far run on
    for k in range(replicas):
        group = [n for n in groups[k] if n not in used] if groups else []
        if k == 0 and options.get("workers"):
            tries: list[list[str] | None] = [options["workers"]]
        else:
            tries = [group, None] if group else [None]
        error: EldricError | None = None
        for workers in tries:
            try:
                dep = await coord.deploy(deps[0].model if deps else model, workers=workers,
                                        exclude=() if workers else used, **opts)  # fmt: skip
            except EldricError as exc:
                error = exc
                continue
            break
        else:
            assert error is not None
            if not deps:
                raise error
            first = deps[0]
            first.note = f"{first.note}; replica {k + 1} of {replicas} not deployed: {error}".lstrip("; ")
            log.warning("%s: %s", first.model, first.note)
            break
        if deps:
            dep.note = f"replica {k + 1} of {deps[0].id}"
        else:
            opts["data_peers"] = dep.data_peers
        deps.append(dep)
        used |= {s.stage.peer_id for s in dep.shards} | {s.stage.name for s in dep.shards}
    return deps


def fewer_hops_plan(dep: Deployment, index: Any, views: list[WorkerView]) -> list[str] | None:
    """Worker names of a plan for `dep` with fewer stages over `views`' free memory, or None."""
    try:
        plan, _ = plan_layers(index, views, strategy="fewest-hops", weights=dep.weights, max_ctx=dep.max_ctx,
                              sessions=dep.sessions)  # fmt: skip
    except PlanDoesNotFit:
        return None
    return [p.worker.name for p in plan] if len(plan) < len(dep.shards) else None


async def improve(coord: Coordinator, dep_id: str, joined: list[str]) -> Deployment | None:
    """Move `dep_id` onto a plan with fewer stages if one fits now (make before break). None: no better
    plan, or it could not be deployed (logged; the old plan keeps serving)."""
    from eldric_p2p.pipeline.recovery import _options, other_replicas, retire

    dep = coord.deployments.get(dep_id)
    if dep is None or dep.state != "ready" or dep.workers_asked:
        return None
    t0 = time.perf_counter()
    async with coord.client_factory() as client:
        try:
            index = await fetch_model_index(client, dep.data_peers, dep.model)
        except EldricError as exc:
            log.info("re-planning %s: %s", dep_id, exc)
            return None
        avoid = other_replicas(coord, dep)
        views = [v for v in await coord.worker_views(client) if v.name not in avoid]
    names = fewer_hops_plan(dep, index, views)
    if names is None:
        return None
    log.warning("%s: %s joined; %d stages now fit in %d (%s): moving", dep_id, ", ".join(joined),
                len(dep.shards), len(names), ", ".join(names))  # fmt: skip
    try:
        new = await coord.deploy(dep.model, workers=names, **_options(dep))  # type: ignore[arg-type]
    except EldricError as exc:
        log.warning("re-planning %s onto %s failed: %s; the old plan keeps serving", dep_id, names, exc)
        return None
    new.workers_asked = None  # placed by us: a later join may improve it again
    await retire(coord, dep)
    seconds = time.perf_counter() - t0
    new.note = f"re-planned from {dep_id} ({len(dep.shards)} -> {len(new.shards)} stages) in {seconds:.1f} s"
    better = f"{len(dep.shards)} -> {len(new.shards)} stages"
    coord.recovered.append({"from": dep_id, "to": new.id, "better": better, "joined": joined,
                            "seconds": round(seconds, 3)})  # fmt: skip
    log.warning("%s", new.note)
    return new
