"""Where pipelines go beyond one plan: replicas of a model on disjoint workers, and re-planning a running
model onto a better plan when a worker joins.

`deploy_replicas`: several pipelines of one model, each a deployment of its own. The router picks one per
session (`Router.route_rank`: a free session slot first, then the fewest hops, the smaller load, the faster
per token), and a session whose pipeline fails resumes at once on another (`api.recovery`), with nothing to
fetch, while the coordinator re-plans the broken one.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from eldric_p2p.errors import EldricError

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
