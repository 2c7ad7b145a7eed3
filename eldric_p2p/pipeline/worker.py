"""Worker role: offer memory, load an assigned layer range, serve it as a pipeline stage over links.

Its HTTP routes are in `worker_routes`, the frames it serves on links in `stage_links` (its base class
`StageLinks`), a loaded assignment in `shard`.

A load reads the model header from a data peer, checks `estimate_stage_bytes` against the memory still free,
then (in the background) fetches the layers' bytes with the fetcher and builds the `Stage` in a thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
import trio

from eldric_p2p.engine.device import available_memory, default_offer, free_memory, resolve_device
from eldric_p2p.engine.warm import KeepWarm
from eldric_p2p.errors import DoesNotFit, EldricError, UsageError
from eldric_p2p.net.identity import Identity
from eldric_p2p.net.links import serve_tcp_links
from eldric_p2p.net.peers import fetch_model_index
from eldric_p2p.pipeline.assignment import Assignment
from eldric_p2p.pipeline.batching import StepBatcher
from eldric_p2p.pipeline.shard import Shard, StageSession
from eldric_p2p.pipeline.stage_links import SESSION_SLACK, StageLinks
from eldric_p2p.tasks import open_nursery
from eldric_p2p.units import format_size

if TYPE_CHECKING:
    from eldric_p2p.net.connector import Connector

log = logging.getLogger(__name__)
T = TypeVar("T")


class Worker(StageLinks):
    """The worker role of a node. `await nursery.start(worker.run)` returns the link port."""

    def __init__(
        self,
        identity: Identity,
        *,
        name: str,
        data_dir: Path,
        device: str = "auto",
        memory: int | None = None,
        link_host: str = "127.0.0.1",
        link_port: int = 0,
        connector: Connector | None = None,
        keep_warm: float | None = None,
    ) -> None:
        import torch

        self.identity = identity
        # With a connector, next hops, data peers and peer URLs are reached by peer id (direct or relayed)
        # and incoming links go through its dispatch (HTTP-tagged links to the API, the rest to us).
        self.connector = connector
        self.link_handler = self.serve_link if connector is None else connector.dispatch
        self.name = name
        self.data_dir = Path(data_dir)
        self.device = resolve_device(device)
        self.offered = memory if memory is not None else default_offer(self.device)
        self.link_host = link_host
        self.link_port = link_port
        self.shards: dict[str, Shard] = {}
        self.limiter = trio.CapacityLimiter(1)  # one torch forward at a time: each uses every core
        # the CPUs that compute (and the event loop's) stay awake between steps: see engine/warm.py
        self.warm = KeepWarm(keep_warm, cpus=torch.get_num_threads() + 1)
        self._stage_sessions: dict[int, StageSession] = {}
        self._head_sessions: dict[int, Shard] = {}
        self._nursery: trio.Nursery | None = None
        self.frames_refused = 0
        self.draining: str | None = None  # why this worker takes no new work (stopping, its owner is back)
        self._changed = trio.Event()  # set when a shard goes (drain waits on it)

    # ---- memory and status --------------------------------------------------------------------------------

    @property
    def reserved(self) -> int:
        return sum(s.needed for s in self.shards.values())

    @property
    def free(self) -> int:
        return 0 if self.draining else max(0, self.offered - self.reserved)

    def default_weights(self) -> str:
        import torch

        from eldric_p2p.engine.weights import resolve_weights

        return resolve_weights("auto", torch.device(self.device))

    def summary(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "offered": self.offered,
            "free": self.free,
            "link_port": self.link_port,
        }

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "peer_id": self.identity.peer_id,
            "device": self.device,
            "weights": self.default_weights(),
            "offered": self.offered,
            "reserved": self.reserved,
            "free": self.free,
            "available": available_memory(self.device),
            "link_port": self.link_port,
            "shards": [s.status() for s in self.shards.values()],
            "frames_refused": self.frames_refused,
            "draining": self.draining,
            "keep_warm": self.warm.status(),
        }

    def http_client(self) -> httpx.AsyncClient:
        """An httpx client that also reaches peer URLs (through the connector, when there is one)."""
        from eldric_p2p.net.connector import http_client_factory

        return http_client_factory(self.connector)()

    def open_sessions(self, shard: Shard) -> int:
        """Sessions open on `shard`: the head's own, or those opened by the previous hop."""
        if shard.a.stage_index == 0:
            return len(shard.head_sessions)
        return sum(1 for s in self._stage_sessions.values() if s.shard is shard)

    def heads(self) -> list[Shard]:
        """Head shards that can serve: loaded, and their next hop not known to be gone."""
        return [
            s
            for s in self.shards.values()
            if s.a.stage_index == 0 and s.state == "ready" and s.next_hop_ok and not s.retiring
        ]

    # ---- draining: moving work away, gracefully ----------------------------------------------------------

    async def drain(self, reason: str, timeout: float) -> bool:  # noqa: ASYNC109 (a bound on the whole drain)
        """Take no new work and wait (at most `timeout` s) for the coordinators to move our shards away (they
        see `draining` in our status at their next heartbeat). Returns whether none is left."""
        self.draining = reason
        log.warning("worker %s draining (%s): %d shard(s) to move", self.name, reason, len(self.shards))
        with trio.move_on_after(timeout):
            while self.shards:
                await self._changed.wait()
        return not self.shards

    def undrain(self) -> None:
        if self.draining:
            log.warning("worker %s offers %s again", self.name, format_size(self.offered))
        self.draining = None

    async def retire(self, deployment_id: str) -> bool:
        """A head that takes no new session and unloads itself once its sessions are done (a pipeline moving
        to a new plan: the old one finishes what it started). False if not loaded here."""
        shard = self.shards.get(deployment_id)
        if shard is None:
            return False
        shard.retiring = True
        if shard.a.stage_index != 0 or not shard.head_sessions:
            await self.unload(deployment_id)
            return True

        async def when_idle() -> None:
            while shard.head_sessions:  # noqa: ASYNC110 (sessions end in other tasks)
                await trio.sleep(0.1)
            await self.unload(deployment_id)

        self._spawn(shard, when_idle)
        return True

    # ---- running ------------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept links and run loads until cancelled. Starts with the bound link port."""
        async with open_nursery() as nursery:
            self._nursery = nursery
            listeners = await nursery.start(
                serve_tcp_links, self.identity, self.link_host, self.link_port, self.link_handler
            )
            self.link_port = listeners[0].socket.getsockname()[1]
            task_status.started(self.link_port)

    async def compute(self, fn: Callable[..., T], *args: Any, quick: bool = False) -> T:
        """Run blocking torch work, one at a time on this worker: in a thread, or with `quick` (work known to
        take a few milliseconds: a decode step, see StepBatcher._quick) on the event loop itself, which spares
        the hand-off to a thread and back."""
        try:
            if quick:
                async with self.limiter:
                    return fn(*args)
            return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter, abandon_on_cancel=True)
        finally:
            self.warm.touch()

    def _spawn(self, shard: Shard, fn: Callable[..., Any], *args: Any) -> None:
        """Start a task tied to `shard`: unloading the shard cancels it."""
        assert self._nursery is not None

        async def task() -> None:
            with trio.CancelScope() as scope:
                shard.scopes.add(scope)
                try:
                    await fn(*args)
                finally:
                    shard.scopes.discard(scope)

        self._nursery.start_soon(task)

    # ---- load / unload ------------------------------------------------------------------------------------

    async def load(self, a: Assignment, client: httpx.AsyncClient) -> Shard:
        """Check the assignment fits, then fetch and load it in the background. Raises DoesNotFit, UsageError,
        ModelNotFound, PeerUnavailable. Poll `status()` for readiness."""
        needed, fmt = await self.needs(a, client)
        if self.draining:
            raise DoesNotFit(f"worker {self.name} takes no new work: {self.draining}")
        if needed > self.free:
            raise DoesNotFit(self.refusal(a, needed, fmt))
        return self.start_load(a, needed, fmt)

    def refusal(self, a: Assignment, needed: int, fmt: str) -> str:
        return (
            f"layers {a.start}-{a.end - 1} of {a.model_id} need {format_size(needed)} ({fmt} weights + KV "
            f"for {a.sessions} sessions x {a.max_ctx} tokens); worker {self.name} offers "
            f"{format_size(self.offered)}, "
            f"{format_size(self.free)} free"
        )

    async def needs(self, a: Assignment, client: httpx.AsyncClient) -> tuple[int, str]:
        """(bytes the assignment needs, weight format) from the model header on its data peers."""
        import torch

        from eldric_p2p.engine.model import estimate_stage_bytes
        from eldric_p2p.engine.weights import resolve_weights

        if a.me.peer_id != self.identity.peer_id:
            raise UsageError(f"assignment is for peer {a.me.peer_id}, this worker is {self.identity.peer_id}")
        if a.deployment_id in self.shards:
            raise UsageError(f"deployment {a.deployment_id!r} is already loaded here; unload it first")
        fmt = resolve_weights(a.weights, torch.device(self.device))
        index = await fetch_model_index(client, list(a.data_peers), a.model_id)
        if a.stages[-1].end != index.n_layers:
            raise UsageError(f"plan covers {a.stages[-1].end} layers, {a.model_id!r} has {index.n_layers}")
        needed = estimate_stage_bytes(
            index, a.start, a.end, weights=fmt, max_ctx=a.max_ctx, sessions=a.sessions
        )
        return needed, fmt

    def start_load(self, a: Assignment, needed: int, fmt: str) -> Shard:
        """Reserve the memory and fetch + load in the background (state: fetching, loading, ready|failed)."""
        if a.deployment_id in self.shards:
            raise UsageError(f"deployment {a.deployment_id!r} is already loaded here; unload it first")
        shard = Shard(a, needed, fmt)
        self.shards[a.deployment_id] = shard
        self._spawn(shard, self._load, shard)
        return shard

    async def _load(self, shard: Shard) -> None:
        from eldric_p2p.data.fetcher import fetch_assignment
        from eldric_p2p.net.connector import fetch_connect
        from eldric_p2p.net.federation.httpauth import auth_headers_for

        a = shard.a
        try:
            t0 = time.perf_counter()

            def progress(done: int, total: int) -> None:
                shard.progress = (done, total)

            result = await fetch_assignment(
                list(a.data_peers),
                a.model_id,
                a.start,
                a.end,
                cache_root=self.data_dir / "shards",
                progress=progress,
                connect=fetch_connect(self.connector) if self.connector is not None else None,
                sign=lambda method, target, host: auth_headers_for(self.identity, method, target, host, b""),
            )
            shard.bytes_fetched = result.bytes_fetched
            shard.fetch_s = time.perf_counter() - t0
            shard.state = "loading"
            t1 = time.perf_counter()
            await self.compute(self._build_stage, shard, result.path)
            shard.load_s = time.perf_counter() - t1
            batch = a.sessions + SESSION_SLACK
            shard.batcher = StepBatcher(lambda: shard.stage, self.compute, max_batch=batch,
                                        active=lambda: self.open_sessions(shard))  # fmt: skip
            self._spawn(shard, shard.batcher.serve)
            shard.state = "ready"
            if not a.single:  # open the next hop now: the first request does not wait for it, and the
                try:  # coordinator's status shows the link's path (direct | relayed) from the start
                    await self._downstream(shard)
                except EldricError as exc:
                    shard.next_hop_ok = True  # not fatal yet: the first frame tries again
                    log.info("%s: next hop not reachable yet: %s", shard.label, exc)
            log.info(
                "%s ready: fetched %s in %.1f s, loaded in %.1f s",
                shard.label,
                format_size(shard.bytes_fetched),
                shard.fetch_s,
                shard.load_s,
            )
        except EldricError as exc:
            shard.state, shard.error = "failed", str(exc)
            log.warning("%s failed to load: %s", shard.label, exc)
        except OSError as exc:
            shard.state, shard.error = "failed", f"{type(exc).__name__}: {exc}"
            log.warning("%s failed to load: %s", shard.label, exc)

    def _build_stage(self, shard: Shard, path: Path) -> None:
        from eldric_p2p.data.gguf_index import GGUFFile
        from eldric_p2p.engine.model import Stage
        from eldric_p2p.engine.tokenizer import Tokenizer

        a = shard.a
        f = GGUFFile(path)
        shard.file, shard.index = f, f.index
        shard.stage = Stage(f, a.start, a.end, device=self.device, weights=shard.fmt, max_ctx=a.max_ctx)
        if a.stage_index == 0:
            shard.tokenizer = Tokenizer.from_gguf_metadata(f.index.metadata)

    async def unload(self, deployment_id: str) -> bool:
        """Stop a shard's tasks, end its sessions, free its memory. False if it was not loaded."""
        shard = self.shards.pop(deployment_id, None)
        if shard is None:
            return False
        for scope in list(shard.scopes):
            scope.cancel()
        for sess in [s for s in self._stage_sessions.values() if s.shard is shard]:
            self._forget_stage_session(sess)
        for sid in list(shard.head_sessions):
            await self._fail(shard, sid, shard.label, "the pipeline was undeployed", forward=False)
        if shard.downstream is not None:
            await trio.aclose_forcefully(shard.downstream.link)
        shard.stage = None
        if shard.file is not None:
            shard.file.close()  # the mapping goes once the stage's views are collected
        shard.file = None
        shard.state = "unloaded"
        self._changed.set()
        self._changed = trio.Event()
        await trio.to_thread.run_sync(free_memory, self.device)
        return True
