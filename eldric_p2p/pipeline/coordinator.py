"""Coordinator role: plan layer ranges over the workers' offered memory, deploy, watch, rebalance.

    POST /api/v1/pipeline/deploy     {model, data_peer?, workers?, strategy?, weights?, max_ctx?, sessions?}
                                     -> 200 the deployment (plan + shard states) once every shard is ready;
                                        409 {"error", "needed", "free", "workers", "best"}: does not fit
    GET  /api/v1/pipeline/status     every deployment: each shard's state, layers, memory, last heartbeat
    GET  /api/v1/pipeline/models     deployed models and where their heads are
    POST /api/v1/pipeline/undeploy   {deployment_id | model}
    POST /api/v1/pipeline/rebalance  {deployment_id | model}: plan again over the live workers and redeploy
    GET  /api/v1/peers               the peer table

Planning (`plan_layers`, pure): the memory of a stage [a, b) is `estimate_stage_bytes` (weights in the
worker's
format, the embedding on the head, the output matrix on the tail, KV caches for `sessions` x `max_ctx`).
"proportional" gives each worker a contiguous range whose layer count is proportional to its free memory; when
that range would not fit (the head and tail carry the embedding and the output matrix), it falls back to the
contiguous split that minimises the largest memory use relative to each worker's free memory. "fewest-hops"
uses the fewest workers (largest first) that fit. Assignments are pushed tail first, head last.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from eldric_p2p.errors import DoesNotFit, EldricError, ModelNotFound, PeerUnavailable, UsageError
from eldric_p2p.http_server import error_response
from eldric_p2p.net.peers import PeerDirectory, fetch_model_index, get_json, post_json, split_url
from eldric_p2p.pipeline.assignment import Assignment, StageRef
from eldric_p2p.units import format_size

if TYPE_CHECKING:
    from eldric_p2p.data.gguf_index import GGUFIndex

log = logging.getLogger(__name__)

STRATEGIES = ("proportional", "fewest-hops")
HEARTBEAT_S = 2.0
LOST_AFTER_S = 8.0
READY_TIMEOUT_S = 900.0


@dataclass
class WorkerView:
    """A worker as its status endpoint describes it."""

    name: str
    peer_id: str
    url: str
    host: str
    link_port: int
    device: str
    weights: str
    offered: int
    free: int

    @classmethod
    def from_status(cls, url: str, st: Any) -> WorkerView:
        """Raises PeerUnavailable for a malformed status."""
        try:
            host, _port = split_url(url)
            return cls(
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


@dataclass
class StagePlan:
    worker: WorkerView
    start: int
    end: int
    needed: int


class PlanDoesNotFit(DoesNotFit):
    """No split over the offered workers fits; `details` holds the numbers (JSON-able)."""

    def __init__(self, message: str, details: dict[str, Any]) -> None:
        super().__init__(message)
        self.details = details


def _proportional_bounds(n: int, mems: list[int]) -> list[int]:
    """Boundaries [0, b1, ..., n] with layer counts proportional to `mems`, at least one layer each."""
    total = sum(mems)
    bounds = [0]
    acc = 0
    for i, m in enumerate(mems[:-1]):
        acc += m
        b = round(n * acc / total)
        b = max(b, bounds[-1] + 1)  # at least one layer
        b = min(b, n - (len(mems) - 1 - i))  # leave one for each worker after
        bounds.append(b)
    bounds.append(n)
    return bounds


def _balanced_bounds(n: int, ws: list[WorkerView], cost: Callable[[int, int, int], int]) -> list[int] | None:
    """Contiguous split minimising max(cost / free) over workers (dynamic programming); None if W > n."""
    w = len(ws)
    if w > n:
        return None
    inf = float("inf")
    # best[k][b]: the smallest max-utilisation covering layers [0, b) with the first k workers
    best = [[inf] * (n + 1) for _ in range(w + 1)]
    cut = [[0] * (n + 1) for _ in range(w + 1)]
    best[0][0] = 0.0
    for k in range(1, w + 1):
        free = max(ws[k - 1].free, 1)
        for b in range(k, n - (w - k) + 1):
            for a in range(k - 1, b):
                if best[k - 1][a] == inf:
                    continue
                u = max(best[k - 1][a], cost(k - 1, a, b) / free)
                if u < best[k][b]:
                    best[k][b], cut[k][b] = u, a
    bounds = [n]
    for k in range(w, 0, -1):
        bounds.append(cut[k][bounds[-1]])
    return bounds[::-1]


def plan_layers(
    index: GGUFIndex,
    workers: list[WorkerView],
    *,
    strategy: str = "proportional",
    weights: str = "auto",
    max_ctx: int = 4096,
    sessions: int = 4,
) -> tuple[list[StagePlan], str]:
    """Contiguous layer ranges over `workers` (in order: the first is the head). Returns (plan, note).

    Raises PlanDoesNotFit with the numbers, UsageError for an unknown strategy or no workers.
    """
    from eldric_p2p.engine.model import estimate_stage_bytes

    if strategy not in STRATEGIES:
        raise UsageError(f"unknown strategy {strategy!r}: use {' or '.join(STRATEGIES)}")
    if not workers:
        raise UsageError("no workers to deploy on")
    n = index.n_layers
    memo: dict[tuple[str, int, int], int] = {}

    def fmt(w: WorkerView) -> str:
        return w.weights if weights == "auto" else weights

    def need(w: WorkerView, a: int, b: int) -> int:
        key = (fmt(w), a, b)
        if key not in memo:
            memo[key] = estimate_stage_bytes(index, a, b, weights=key[0], max_ctx=max_ctx, sessions=sessions)
        return memo[key]

    def build(ws: list[WorkerView], bounds: list[int]) -> list[StagePlan]:
        return [StagePlan(w, a, b, need(w, a, b)) for w, a, b in zip(ws, bounds, bounds[1:], strict=False)]

    def fits(plan: list[StagePlan]) -> bool:
        return all(p.needed <= p.worker.free for p in plan)

    usable = [w for w in workers if w.free > 0][:n]
    if strategy == "proportional":
        candidates = [usable]
    else:
        by_size = sorted(usable, key=lambda w: -w.free)
        candidates = [by_size[:k] for k in range(1, len(by_size) + 1)]
    best_attempt: list[StagePlan] = []
    for ws in candidates:
        if not ws:
            continue
        plan = build(ws, _proportional_bounds(n, [w.free for w in ws]))
        if fits(plan):
            return plan, f"{strategy}: layers in proportion to free memory"
        bounds = _balanced_bounds(n, ws, lambda k, a, b, ws=ws: need(ws[k], a, b))  # type: ignore[misc]
        if bounds is not None:
            balanced = build(ws, bounds)
            if fits(balanced):
                return balanced, f"{strategy}: adjusted so the head's embedding and the tail's output fit"
            best_attempt = balanced
        else:
            best_attempt = plan
    whole = need(usable[0], 0, n) if usable else need(workers[0], 0, n)
    free = sum(w.free for w in workers)
    lines = [
        f"{p.worker.name} layers {p.start}-{p.end - 1} need {format_size(p.needed)} of "
        f"{format_size(p.worker.free)} free"
        for p in best_attempt
    ]
    message = (
        f"{index.metadata.get('general.name', 'the model')} does not fit: it needs about "
        f"{format_size(whole)} in one stage (KV for {sessions} sessions x {max_ctx} tokens included), "
        f"the {len(workers)} workers offer "
        f"{format_size(free)} free in total" + (f"; best split: {'; '.join(lines)}" if lines else "")
    )
    details = {
        "needed": whole,
        "free": free,
        "workers": [
            {"name": w.name, "peer_id": w.peer_id, "offered": w.offered, "free": w.free} for w in workers
        ],
        "best": [
            {
                "worker": p.worker.name,
                "start": p.start,
                "end": p.end,
                "needed": p.needed,
                "free": p.worker.free,
            }
            for p in best_attempt
        ],
    }
    raise PlanDoesNotFit(message, details)


# --------------------------------------------------------------------------------------------- deployments


@dataclass
class ShardState:
    stage: StageRef
    url: str
    needed: int
    state: str = "pushed"
    error: str | None = None
    bytes_fetched: int = 0
    progress: dict[str, int] = field(default_factory=dict)
    last_heartbeat: float = 0.0  # trio clock
    next_hop_ok: bool = True
    link: str | None = None  # path of the link to the next hop: "direct" | "relayed" (None: not open yet)


@dataclass
class Deployment:
    id: str
    model: str
    data_peers: list[str]
    strategy: str
    weights: str
    max_ctx: int
    sessions: int
    shards: list[ShardState]
    note: str = ""
    created: float = field(default_factory=time.time)
    workers_asked: list[str] | None = None

    @property
    def state(self) -> str:
        states = {s.state for s in self.shards}
        if any(not s.next_hop_ok for s in self.shards):
            return "degraded"
        if states == {"ready"}:
            return "ready"
        if states & {"lost", "failed", "unloaded"}:
            return "degraded"
        return "loading"

    def as_json(self, now: float) -> dict[str, Any]:
        n = len(self.shards)
        return {
            "id": self.id,
            "model": self.model,
            "state": self.state,
            "strategy": self.strategy,
            "note": self.note,
            "data_peers": self.data_peers,
            "created": self.created,
            "max_ctx": self.max_ctx,
            "sessions": self.sessions,
            "n_layers": self.shards[-1].stage.end if self.shards else 0,
            "head": self.shards[0].url if n else None,
            "stages": [
                {
                    "index": s.stage.index,
                    "worker": s.stage.name,
                    "peer_id": s.stage.peer_id,
                    "url": s.url,
                    "role": "single" if n == 1 else "head" if i == 0 else "tail" if i == n - 1 else "middle",
                    "start": s.stage.start,
                    "end": s.stage.end,
                    "layers": s.stage.end - s.stage.start,
                    "state": s.state,
                    "error": s.error,
                    "memory": s.needed,
                    "bytes_fetched": s.bytes_fetched,
                    "progress": s.progress,
                    "next_hop_ok": s.next_hop_ok,
                    "link": s.link,
                    "last_heartbeat_s": round(now - s.last_heartbeat, 1) if s.last_heartbeat else None,
                }
                for i, s in enumerate(self.shards)
            ],
        }


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
    ) -> None:
        self.peers = peers
        self.client_factory = client_factory  # a Connector's client reaches peers behind NAT by peer URL
        self.own_url = own_url
        self.own_models = own_models
        self.own_is_worker = own_is_worker
        self.heartbeat_s = heartbeat_s
        self.lost_after_s = lost_after_s
        self.deployments: dict[str, Deployment] = {}
        self._lock = trio.Lock()  # one deploy/undeploy at a time

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
                    WorkerView.from_status(url, await get_json(client, f"{url}/api/v1/worker/status"))
                )
            except PeerUnavailable as exc:
                log.info("worker %s not available: %s", url, exc)

        async with trio.open_nursery() as nursery:
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
    ) -> Deployment:
        """Plan, push (tail first), wait until every shard is ready. Raises PlanDoesNotFit, DoesNotFit (a
        worker refused), ModelNotFound, PeerUnavailable (a worker failed to load; nothing stays loaded),
        UsageError."""
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
            views = await self.worker_views(client, workers)
            plan, note = plan_layers(
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
                note,
                workers_asked=workers,
            )
            log.info("deploying %s: %s", dep_id, ", ".join(f"{s.name} {s.start}-{s.end - 1}" for s in stages))
            pushed: list[ShardState] = []
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
            self.deployments[dep_id] = dep
            return dep

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
            try:
                st = await get_json(
                    client, f"{shard.url}/api/v1/worker/status", timeout=min(2.0, self.lost_after_s)
                )
            except PeerUnavailable as exc:
                if strict or (shard.last_heartbeat and now - shard.last_heartbeat > self.lost_after_s):
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
            if not mine:
                shard.state, shard.error = "unloaded", "the worker no longer holds this shard"
                return
            s = mine[0]
            shard.state = str(s.get("state"))
            shard.error = s.get("error")
            shard.bytes_fetched = int(s.get("bytes_fetched") or 0)
            shard.progress = s.get("progress") or {}
            shard.next_hop_ok = s.get("next_hop_ok") is not False
            link = s.get("link")
            shard.link = link if link in ("direct", "relayed") else None

        async with trio.open_nursery() as nursery:
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

        async with trio.open_nursery() as nursery:
            for shard in shards:
                nursery.start_soon(one, shard)

    def find(self, key: str) -> Deployment:
        """A deployment by id, or the newest of a model. Raises ModelNotFound."""
        if key in self.deployments:
            return self.deployments[key]
        deps = [d for d in self.deployments.values() if d.model == key]
        if not deps:
            raise ModelNotFound(f"no deployment {key!r} on this coordinator")
        return max(deps, key=lambda d: d.created)

    async def undeploy(self, key: str) -> Deployment:
        async with self._lock, self.client_factory() as client:
            dep = self.find(key)
            await self._unload(client, dep.id, dep.shards)
            del self.deployments[dep.id]
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
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Heartbeats: poll every deployment's workers every `heartbeat_s`."""
        async with self.client_factory() as client:
            task_status.started()
            while True:
                await trio.sleep(self.heartbeat_s)
                for dep in list(self.deployments.values()):
                    await self._poll(client, dep)

    def status(self) -> dict[str, Any]:
        now = trio.current_time()
        return {"deployments": [d.as_json(now) for d in self.deployments.values()]}

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


# --------------------------------------------------------------------------------------------- HTTP routes


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
            dep = await coord.deploy(model, data_peers=data_peers, workers=workers or None, **opts)
        except EldricError as exc:
            return _error(exc)
        return JSONResponse(dep.as_json(trio.current_time()))

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
        return await by_key(request, coord.undeploy)

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
