"""Coordinator role: gather the workers' offered memory, deploy the planner's layer ranges, watch, rebalance.

The plan comes from `plan_layers` (pipeline/planner.py, pure: no I/O); this module does the I/O around it:
worker status reads, pushing assignments (tail first, head last), waiting until every shard is ready,
heartbeats that mark a silent worker lost, undeploy and rebalance. Its HTTP routes are in
pipeline/coordinator_routes.py.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Collection
from typing import Any

import httpx
import trio

from eldric_p2p.errors import DoesNotFit, ModelNotFound, PeerUnavailable, UsageError
from eldric_p2p.net.peers import PeerDirectory, fetch_model_index, get_json, post_json, split_url
from eldric_p2p.pipeline.assignment import Assignment, StageRef
from eldric_p2p.pipeline.cache import MODEL_TTL_S
from eldric_p2p.pipeline.deployment import Deployment, ShardState
from eldric_p2p.pipeline.planner import STRATEGIES, WorkerView, plan_layers
from eldric_p2p.tasks import open_nursery

log = logging.getLogger(__name__)

HEARTBEAT_S = 2.0
LOST_AFTER_S = 8.0
READY_TIMEOUT_S = 900.0


def parse_worker_status_untrusted(url: str, st: Any) -> WorkerView:
    """The planner's view of the worker at `url` from its status JSON. Raises PeerUnavailable for a malformed
    status."""
    try:
        host, _port = split_url(url)
        return WorkerView(
            str(st["name"])[:64],
            str(st["peer_id"]),
            url,
            host,
            int(st["link_port"]),
            str(st["device"]),
            str(st["weights"]),
            int(st["offered"]),
            int(st["free"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise PeerUnavailable(f"{url}: malformed worker status ({exc})") from exc


class Coordinator:
    """Plans and deploys pipelines; `await nursery.start(coord.run)` runs the heartbeat loop."""

    def __init__(
        self,
        peers: PeerDirectory,
        *,
        own_url: Callable[[], str | None],
        own_models: Callable[[], list[str]],
        own_is_worker: bool,
        heartbeat_s: float = HEARTBEAT_S,
        lost_after_s: float = LOST_AFTER_S,
        client_factory: Callable[[], httpx.AsyncClient] = httpx.AsyncClient,
        revoked: Callable[[str], bool] = lambda peer_id: False,
        auto_recover: bool = True,
    ) -> None:
        self.peers = peers
        self.revoked = revoked  # a peer put out of the federation: its shards are lost at the next heartbeat
        self.client_factory = client_factory  # a Connector's client reaches peers behind NAT by peer URL
        self.own_url = own_url
        self.own_models = own_models
        self.own_is_worker = own_is_worker
        self.heartbeat_s = heartbeat_s
        self.lost_after_s = lost_after_s
        self.deployments: dict[str, Deployment] = {}
        self.deploying: dict[str, Deployment] = {}  # pushed, not yet ready: status shows their progress
        self.auto_recover = auto_recover  # re-plan a pipeline whose stage is lost (pipeline.recovery)
        self.recovered: list[dict[str, Any]] = []  # what recovery did, newest last
        self._recovering: set[str] = set()
        self.pending: dict[str, dict[str, Any]] = {}  # model -> deploy options refused for lack of memory
        self._pending_version = -1  # the peer table's version when the pending deploys were last tried
        self._lock = trio.Lock()  # one deploy/undeploy at a time
        # the model cache (pipeline.cache): on-demand loads, TTL, LRU eviction
        self.on_demand = False  # a /v1 request for a model nothing serves deploys it
        self.on_demand_options: dict[str, Any] = {}  # deploy options of on-demand loads (max_ctx, sessions)
        self.model_ttl = MODEL_TTL_S  # on-demand deployments unload after this long unused
        self.loading: dict[str, Any] = {}  # model -> the on-demand load in flight (pipeline.cache._Load)
        self.evicted: list[dict[str, Any]] = []  # what the cache unloaded and why, newest last
        self._sweeping = False
        self.auto_rebalance = True  # a worker joins: move deployments onto fewer stages when they fit

    # ---- who is out there ---------------------------------------------------------------------------------

    def _node_urls(self) -> list[tuple[str, dict[str, Any]]]:
        own = self.own_url()
        out: list[tuple[str, dict[str, Any]]] = []
        if own:
            out.append(
                (own, {"roles": ["worker"] if self.own_is_worker else [], "models": self.own_models()})
            )
        for info in self.peers.table.peers():
            url = self.peers.url_for(info)
            if isinstance(url, str):
                out.append((url, info.fields))
        return out

    def data_peers_for(self, model: str) -> list[str]:
        return [url for url, f in self._node_urls() if model in (f.get("models") or [])]

    def resolve_model(self, model: str) -> str:
        """A served model id for `model`: itself, or a reference model's alias. Raises ModelNotFound."""
        if self.data_peers_for(model):
            return model
        from eldric_p2p.data.refmodels import lookup

        try:
            stem = lookup(model).filename.removesuffix(".gguf")
        except ModelNotFound:
            stem = model.removesuffix(".gguf")
        if self.data_peers_for(stem):
            return stem
        raise ModelNotFound(f"no data peer known to this node serves {model!r}")

    async def worker_views(
        self, client: httpx.AsyncClient, names: list[str] | None = None
    ) -> list[WorkerView]:
        """Workers that answer their status, in the order of `names` (default: by name)."""
        urls = [u for u, f in self._node_urls() if "worker" in (f.get("roles") or [])]
        views: list[WorkerView] = []

        async def one(url: str) -> None:
            try:
                views.append(
                    parse_worker_status_untrusted(url, await get_json(client, f"{url}/api/v1/worker/status"))
                )
            except PeerUnavailable as exc:
                log.info("worker %s not available: %s", url, exc)

        async with open_nursery() as nursery:
            for url in urls:
                nursery.start_soon(one, url)
        if names is None:
            return sorted(views, key=lambda v: (v.name, v.peer_id))
        picked: list[WorkerView] = []
        for name in names:
            match = [
                v
                for v in views
                if name in (v.name, v.peer_id) or (len(name) >= 6 and v.peer_id.startswith(name))
            ]
            if not match:
                known = ", ".join(sorted(v.name for v in views)) or "none"
                raise UsageError(f"no worker named {name!r} answers (workers: {known})")
            if match[0] not in picked:
                picked.append(match[0])
        return picked

    # ---- deploy -------------------------------------------------------------------------------------------

    async def deploy(
        self,
        model: str,
        *,
        data_peers: list[str] | None = None,
        workers: list[str] | None = None,
        strategy: str = "proportional",
        weights: str = "auto",
        max_ctx: int = 4096,
        sessions: int = 4,
        ready_timeout: float = READY_TIMEOUT_S,
        ttl: float = 0.0,
        on_demand: bool = False,
        exclude: Collection[str] = (),
        note: str = "",
    ) -> Deployment:
        """Plan, push (tail first), wait until every shard is ready; `note`, if given, replaces the plan's
        note. Raises PlanDoesNotFit, DoesNotFit (a worker refused), ModelNotFound, PeerUnavailable (a worker
        failed to load; nothing stays loaded), UsageError."""
        if strategy not in STRATEGIES:
            raise UsageError(f"unknown strategy {strategy!r}: use {' or '.join(STRATEGIES)}")
        await self.peers.refresh()
        if not data_peers:
            model = self.resolve_model(model)
            data_peers = self.data_peers_for(model)
        async with self._lock, self.client_factory() as client:
            for old in [d for d in self.deployments.values() if d.model == model]:
                await self._poll(client, old, strict=True)
                if (
                    old.state == "degraded"
                ):  # a broken pipeline of this model: free its memory for the new one
                    log.info("replacing degraded deployment %s", old.id)
                    await self._unload(client, old.id, old.shards)
                    del self.deployments[old.id]
            index = await fetch_model_index(client, data_peers, model)
            views = [
                v
                for v in await self.worker_views(client, workers)
                if v.name not in exclude and v.peer_id not in exclude
            ]
            plan, plan_note = plan_layers(
                index, views, strategy=strategy, weights=weights, max_ctx=max_ctx, sessions=sessions
            )
            dep_id = f"{model[:48]}-{secrets.token_hex(3)}"
            stages = tuple(
                StageRef(
                    i, p.start, p.end, p.worker.peer_id, p.worker.name, p.worker.host, p.worker.link_port
                )
                for i, p in enumerate(plan)
            )
            dep = Deployment(
                dep_id,
                model,
                list(data_peers),
                strategy,
                weights,
                max_ctx,
                sessions,
                [ShardState(s, p.worker.url, p.needed) for s, p in zip(stages, plan, strict=True)],
                note or plan_note,
                workers_asked=workers,
                ttl_s=max(0.0, float(ttl)),
                on_demand=on_demand,
                known_workers={v.peer_id for v in views} | set(self._live_workers()),
            )
            log.info("deploying %s: %s", dep_id, ", ".join(f"{s.name} {s.start}-{s.end - 1}" for s in stages))
            pushed: list[ShardState] = []
            self.deploying[dep_id] = dep
            try:
                for shard in reversed(dep.shards):  # tail first, head last
                    a = Assignment(
                        dep_id,
                        model,
                        tuple(data_peers),
                        shard.stage.index,
                        stages,
                        weights,
                        max_ctx,
                        sessions,
                    )
                    status, body = await post_json(
                        client, f"{shard.url}/api/v1/pipeline/load", a.to_json(), timeout=60
                    )
                    if status != 202:
                        msg = (body.get("error") or {}).get("message") if isinstance(body, dict) else None
                        text = f"{shard.stage.label()} refused: {msg or status}"
                        raise DoesNotFit(text) if status == 409 else PeerUnavailable(text)
                    pushed.append(shard)
                    shard.state = "fetching"
                await self._wait_ready(client, dep, ready_timeout)
            except BaseException:
                with trio.CancelScope(shield=True), trio.move_on_after(10):
                    await self._unload(client, dep_id, pushed)
                raise
            finally:
                del self.deploying[dep_id]
            self.deployments[dep_id] = dep
            return dep

    async def deploy_replicas(self, model: str, replicas: int, **options: Any) -> list[Deployment]:
        """`replicas` pipelines of `model` on disjoint workers (pipeline.placement)."""
        from eldric_p2p.pipeline.placement import deploy_replicas

        return await deploy_replicas(self, model, replicas, **options)

    async def _wait_ready(self, client: httpx.AsyncClient, dep: Deployment, timeout: float) -> None:
        with trio.move_on_after(timeout) as scope:
            while True:
                await self._poll(client, dep)
                bad = [s for s in dep.shards if s.state in ("failed", "lost", "unloaded")]
                if bad:
                    raise PeerUnavailable(
                        f"{bad[0].stage.label()} failed to load: {bad[0].error or bad[0].state}"
                    )
                if all(s.state == "ready" for s in dep.shards):
                    return
                await trio.sleep(0.2)
        if scope.cancelled_caught:
            slow = [s.stage.label() for s in dep.shards if s.state != "ready"]
            raise PeerUnavailable(f"not ready within {timeout:.0f} s: {', '.join(slow)}")

    async def _poll(self, client: httpx.AsyncClient, dep: Deployment, *, strict: bool = False) -> None:
        """Heartbeat: refresh each shard's state from its worker's status. A worker silent for `lost_after_s`
        (`strict`: silent now) is lost."""
        now = trio.current_time()

        async def one(shard: ShardState) -> None:
            if self.revoked(shard.stage.peer_id):
                shard.state, shard.error = "lost", f"{shard.stage.peer_id} was revoked from the federation"
                return
            try:
                st = await get_json(
                    client, f"{shard.url}/api/v1/worker/status", timeout=min(2.0, self.lost_after_s)
                )
            except PeerUnavailable as exc:
                refused = isinstance(exc.__cause__, httpx.ConnectError)  # nothing listens: the node is gone
                silent = shard.last_heartbeat and now - shard.last_heartbeat > self.lost_after_s
                if strict or refused or silent:
                    shard.state, shard.error = "lost", str(exc)
                elif not shard.last_heartbeat:
                    shard.last_heartbeat = now  # count silence from the first try
                return
            if not isinstance(st, dict) or st.get("peer_id") != shard.stage.peer_id:
                shard.state, shard.error = "lost", "another node answers at this address"
                return
            mine = [
                s for s in st.get("shards", []) if isinstance(s, dict) and s.get("deployment_id") == dep.id
            ]
            shard.last_heartbeat = trio.current_time()
            draining = st.get("draining")
            shard.draining = str(draining)[:200] if draining else None
            if not mine:
                shard.state, shard.error = "unloaded", "the worker no longer holds this shard"
                return
            s = mine[0]
            if shard.stage.index == 0:  # the head owns the sessions: when the pipeline was last used
                used, active = s.get("last_used"), s.get("sessions")
                if isinstance(used, int | float) and used > dep.last_used:
                    dep.last_used = min(float(used), time.time())
                dep.active = active if isinstance(active, int) and active >= 0 else 0
            shard.state = str(s.get("state"))
            shard.error = s.get("error")
            shard.bytes_fetched = int(s.get("bytes_fetched") or 0)
            shard.progress = s.get("progress") or {}
            shard.next_hop_ok = s.get("next_hop_ok") is not False
            link = s.get("link")
            shard.link = link if link in ("direct", "punched", "relayed") else None
            carrier = s.get("link_transport")
            shard.link_transport = carrier if shard.link and carrier in ("tcp", "quic") else None

        async with open_nursery() as nursery:
            for shard in dep.shards:
                nursery.start_soon(one, shard)

    async def _unload(self, client: httpx.AsyncClient, dep_id: str, shards: list[ShardState]) -> None:
        async def one(shard: ShardState) -> None:
            try:
                await post_json(
                    client, f"{shard.url}/api/v1/pipeline/unload", {"deployment_id": dep_id}, timeout=10
                )
            except PeerUnavailable as exc:
                log.info("could not unload %s: %s", shard.stage.label(), exc)

        async with open_nursery() as nursery:
            for shard in shards:
                nursery.start_soon(one, shard)

    def find(self, key: str) -> Deployment:
        """A deployment by id, or the newest of a model. Raises ModelNotFound."""
        if key in self.deployments:
            return self.deployments[key]
        deps = [d for d in self.deployments.values() if d.model == key]
        if not deps:
            raise ModelNotFound(f"no deployment {key[:200]!r} on this coordinator")
        return max(deps, key=lambda d: d.created)

    async def undeploy(self, key: str) -> Deployment:
        self.pending.pop(key, None)
        async with self._lock, self.client_factory() as client:
            dep = self.find(key)
            del self.deployments[dep.id]  # first: a heartbeat that sees its shards go must not recover it
            await self._unload(client, dep.id, dep.shards)
        await self.peers.refresh()  # the peers' answers no longer list its head: routing stops using it
        return dep

    async def rebalance(self, key: str) -> Deployment:
        """Unload the pipeline, plan again over the workers that answer now, and deploy that plan.

        The old shards are unloaded first: the survivors need their memory back for their new ranges.
        """
        old = await self.undeploy(key)
        async with self.client_factory() as client:
            await self.peers.refresh()
            live = {v.name for v in await self.worker_views(client)}
        names = [n for n in old.workers_asked if n in live] if old.workers_asked else None
        return await self.deploy(
            old.model,
            data_peers=old.data_peers,
            workers=names,
            strategy=old.strategy,
            weights=old.weights,
            max_ctx=old.max_ctx,
            sessions=old.sessions,
            ttl=old.ttl_s,
            on_demand=old.on_demand,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Heartbeats: poll every deployment's workers every `heartbeat_s`."""
        from eldric_p2p.pipeline.recovery import BAD_STATES

        async with self.client_factory() as client, open_nursery() as nursery:
            task_status.started()
            while True:
                await trio.sleep(self.heartbeat_s)
                for dep in list(self.deployments.values()):
                    await self._poll(client, dep)
                    if dep.id not in self.deployments:
                        continue  # undeployed while we polled
                    lost = any(s.state in BAD_STATES for s in dep.shards)
                    draining = any(s.draining for s in dep.shards)
                    if (lost or draining) and self.auto_recover and dep.id not in self._recovering:
                        self._recovering.add(dep.id)
                        nursery.start_soon(self._recover, dep.id, not lost)
                if not self._sweeping and any(d.ttl_s for d in self.deployments.values()):
                    self._sweeping = True
                    nursery.start_soon(self._sweep)
                if self.auto_rebalance:
                    workers = self._live_workers()
                    for dep in list(self.deployments.values()):
                        joined = sorted(workers[p] for p in workers.keys() - dep.known_workers)
                        if joined and dep.id not in self._recovering and dep.state == "ready":
                            dep.known_workers |= workers.keys()  # each newcomer is considered once
                            if not dep.workers_asked:
                                self._recovering.add(dep.id)
                                nursery.start_soon(self._improve, dep.id, joined)
                changed = self.peers.table.version != self._pending_version
                if self.pending and changed and not self._lock.locked():
                    self._pending_version = self.peers.table.version  # a worker came, went or changed
                    nursery.start_soon(self._deploy_pending)

    async def _recover(self, dep_id: str, graceful: bool) -> None:
        from eldric_p2p.pipeline.recovery import move, recover

        try:
            await (move if graceful else recover)(self, dep_id)
        finally:
            self._recovering.discard(dep_id)

    def _live_workers(self) -> dict[str, str]:
        """peer id -> name of the workers in the peer table."""
        return {
            info.peer_id: info.name
            for info in self.peers.table.peers()
            if "worker" in (info.fields.get("roles") or [])
        }

    async def _improve(self, dep_id: str, joined: list[str]) -> None:
        from eldric_p2p.pipeline.placement import improve

        try:
            await improve(self, dep_id, joined)
        finally:
            self._recovering.discard(dep_id)

    async def _sweep(self) -> None:
        from eldric_p2p.pipeline.cache import sweep_idle

        try:
            await sweep_idle(self)
        finally:
            self._sweeping = False
        self.auto_rebalance = True  # a worker joins: move deployments onto fewer stages when they fit

    async def load_on_demand(self, model: str) -> Deployment:
        from eldric_p2p.pipeline.cache import load_on_demand

        return await load_on_demand(self, model)

    async def _deploy_pending(self) -> None:
        from eldric_p2p.pipeline.recovery import deploy_pending

        await deploy_pending(self)

    def status(self) -> dict[str, Any]:
        now = trio.current_time()
        return {
            "deployments": [d.as_json(now) for d in self.deployments.values()],
            "deploying": [d.as_json(now) for d in self.deploying.values()],
            "recovered": self.recovered[-20:],
            "pending": [{"model": m, **opts} for m, opts in self.pending.items()],
            "evicted": self.evicted[-20:],
        }

    def models(self) -> list[dict[str, Any]]:
        return [
            {
                "id": d.model,
                "deployment_id": d.id,
                "state": d.state,
                "head": d.shards[0].url,
                "stages": len(d.shards),
            }
            for d in self.deployments.values()
        ]
