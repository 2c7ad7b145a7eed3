"""The coordinator's side of recovery: a pipeline with a lost stage is re-planned and deployed again.

When a heartbeat finds a stage lost (its worker refuses connections, stays silent for `lost_after_s`, or was
revoked), `recover` re-deploys the model: each lost stage's worker is replaced by a *spare* (a live worker
the deployment does not use, most free memory first) and the other stages keep their workers, so their
layers come back from their shard caches; with no spare it plans over the survivors. The old shards are
unloaded first (the survivors need the memory for their new ranges). Requests in flight are resumed on the
new pipeline by the node that took them (`api.recovery`); the coordinator only makes the pipeline exist.

`replacement_workers` is the pure choice of workers, tested on its own.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from eldric_p2p.errors import EldricError
from eldric_p2p.pipeline.planner import WorkerView

if TYPE_CHECKING:
    from eldric_p2p.pipeline.coordinator import Coordinator, Deployment

log = logging.getLogger(__name__)

BAD_STATES = ("lost", "failed", "unloaded")


def replacement_workers(dep: Deployment, live: list[WorkerView]) -> tuple[list[str], list[str]]:
    """(worker names for the new plan, the spares among them): lost stages' workers replaced by spares."""
    names_live = {v.name for v in live}
    in_use = {s.stage.name for s in dep.shards}
    spares = sorted((v for v in live if v.name not in in_use), key=lambda v: (-v.free, v.name))
    names: list[str] = []
    used: list[str] = []
    for shard in dep.shards:
        if shard.state in BAD_STATES or shard.stage.name not in names_live:
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
    async with coord.client_factory() as client:
        await coord.peers.refresh()
        live = await coord.worker_views(client)
    names, spares = replacement_workers(dep, live)
    how = f"spares {', '.join(spares)}" if spares else f"the survivors {', '.join(names) or '(none)'}"
    log.warning("%s lost %s: re-planning onto %s", dep_id, ", ".join(lost), how)
    try:
        await coord.undeploy(dep_id)
    except EldricError as exc:
        log.info("unloading %s: %s", dep_id, exc)
    options = dict(data_peers=dep.data_peers, strategy=dep.strategy, weights=dep.weights, max_ctx=dep.max_ctx,
                   sessions=dep.sessions)  # fmt: skip
    for workers in (names, None) if names else (None,):  # the chosen workers, else any live ones
        try:
            new = await coord.deploy(dep.model, workers=workers, **options)  # type: ignore[arg-type]
        except EldricError as exc:
            log.warning("re-deploying %s on %s failed: %s", dep.model, workers or "any worker", exc)
            continue
        new.note = f"recovered from {dep_id} ({', '.join(lost)} lost) in {time.perf_counter() - t0:.1f} s"
        coord.recovered.append({"from": dep_id, "to": new.id, "lost": lost, "spares": spares,
                                "seconds": round(time.perf_counter() - t0, 3)})  # fmt: skip
        log.warning("%s", new.note)
        return new
    return None
