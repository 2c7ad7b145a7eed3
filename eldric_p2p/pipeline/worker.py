"""Worker role: offer memory, load an assigned layer range, serve it as a pipeline stage over links.

HTTP (docs/pipeline.md has the bodies):

    POST /api/v1/pipeline/load     an Assignment -> 202 {"state": "fetching", "needed", "free"}
                                   409 {"error", "needed", "offered", "free"} when it does not fit
    POST /api/v1/pipeline/unload   {"deployment_id"} -> 200; frees the stage's memory
    GET  /api/v1/worker/status     device, memory offered/reserved/free, link port, shards with progress

A load reads the model header from a data peer, checks `estimate_stage_bytes` against the memory still free,
then (in the background) fetches the layers' bytes with the fetcher and builds the `Stage` in a thread.

Pipeline frames on links (eldric_p2p.net.frames). Stages form a ring: head -> ... -> tail -> head. Each stage
accepts links from its previous hop and keeps one outgoing link (`Downstream`) to its next hop:

    OPEN_SESSION  ext {deployment, params, history, ctx, wire}   opens a KV cache; passed on (not by the tail)
    HIDDEN        [T, hidden] at positions [start, start+T)      forward; HIDDEN on, or the tail samples and
                                                                 sends TOKEN [1] at start+T to the head
    TRUNCATE / CLOSE_SESSION                                     applied, passed on
    ERROR         ext {stage, message}                           closes the session; travels on to the head
                                                                 (forward), or back along the links (backward)

A link that breaks ends every session that used it, with an ERROR naming the stage on the far side, sent both
ways so it reaches the head whichever side is still connected. Frames are accepted only from the peer id the
assignment names as the previous hop (TOKEN only from the tail, at the head).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from eldric_p2p.engine.device import available_memory, default_offer, free_memory, resolve_device
from eldric_p2p.errors import (
    DoesNotFit,
    EldricError,
    EngineError,
    FrameError,
    InvalidInput,
    LocalProtocolError,
    PeerUnavailable,
    StageFailed,
    UsageError,
)
from eldric_p2p.http_server import error_response
from eldric_p2p.net.frames import (
    DType,
    Frame,
    FrameReader,
    FrameType,
    FrameWriter,
    hidden_frame,
    payload_to_tensor,
    token_frame,
)
from eldric_p2p.net.identity import Identity
from eldric_p2p.net.links import Link, open_tcp_link, serve_tcp_links
from eldric_p2p.net.peers import fetch_model_index
from eldric_p2p.pipeline.assignment import Assignment
from eldric_p2p.units import format_size

if TYPE_CHECKING:
    from eldric_p2p.data.gguf_index import GGUFFile, GGUFIndex
    from eldric_p2p.engine.model import Stage
    from eldric_p2p.engine.sampling import Sampler
    from eldric_p2p.engine.tokenizer import Tokenizer
    from eldric_p2p.net.connector import Connector

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_BODY = 256 * 1024
LINK_TIMEOUT_S = 5.0
SESSION_SLACK = 2  # sessions a stage accepts beyond the planned count (CLOSE frames still in flight)


# --------------------------------------------------------------------------------------------- shards


@dataclass(eq=False)
class StageSession:
    """A session at a non-head stage: where its frames come from, and (tail) how it samples."""

    sid: int
    shard: Shard
    link: Link  # the inbound link it was opened on
    back: FrameWriter  # backward frames (ERROR) to the previous hop
    wire: DType = DType.F32
    sampler: Sampler | None = None
    history: list[int] = field(default_factory=list)


class Downstream:
    """The outgoing link from a shard to its next hop: forward frames out, backward ERROR frames in."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.writer = FrameWriter(link)
        self.broken = False

    async def send(self, frame: Frame) -> None:
        if self.broken:
            raise PeerUnavailable("link to the next hop is closed")
        try:
            await self.writer.send(frame)
        except PeerUnavailable:
            self.broken = True
            raise
        except trio.ClosedResourceError as exc:  # closed by the reader task when the peer went away
            self.broken = True
            raise PeerUnavailable("link to the next hop is closed") from exc


class Shard:
    """One assignment on this worker: its loading state, its stage, its sessions."""

    def __init__(self, a: Assignment, needed: int, fmt: str) -> None:
        self.a = a
        self.needed = needed
        self.fmt = fmt
        self.state = "fetching"  # fetching -> loading -> ready | failed
        self.error: str | None = None
        self.progress = (0, 0)
        self.bytes_fetched = 0
        self.fetch_s = self.load_s = 0.0
        self.stage: Stage | None = None
        self.file: GGUFFile | None = None
        self.index: GGUFIndex | None = None
        self.tokenizer: Tokenizer | None = None
        self.downstream: Downstream | None = None
        self.downstream_lock = trio.Lock()
        self.next_hop_ok = True  # False once the link to the next hop broke or could not be opened
        self.scopes: set[trio.CancelScope] = set()
        self.head_sessions: dict[int, trio.MemorySendChannel[Frame]] = {}
        self.backend: Any = None  # pipeline.PipelineBackend, made on first use (head only)
        self.created = time.time()

    @property
    def label(self) -> str:
        return self.a.me.label()

    def status(self) -> dict[str, Any]:
        a = self.a
        return {
            "deployment_id": a.deployment_id,
            "model_id": a.model_id,
            "role": a.role,
            "stage_index": a.stage_index,
            "n_stages": len(a.stages),
            "start": a.start,
            "end": a.end,
            "state": self.state,
            "error": self.error,
            "needed": self.needed,
            "weights": self.fmt,
            "bytes_fetched": self.bytes_fetched,
            "progress": {"done": self.progress[0], "total": self.progress[1]},
            "fetch_s": round(self.fetch_s, 3),
            "load_s": round(self.load_s, 3),
            "next_hop_ok": self.next_hop_ok,
            "link": self.downstream.link.path
            if self.downstream is not None and not self.downstream.broken
            else None,
            "sessions": len(self.head_sessions) if a.stage_index == 0 else None,
        }


def error_frame(sid: int, stage: str, message: str) -> Frame:
    return Frame(FrameType.ERROR, sid, ext={"stage": stage[:200], "message": message[:1000]})


def _error_text(frame: Frame) -> tuple[str, str]:
    ext = frame.ext or {}
    return str(ext.get("stage", "a stage"))[:200], str(ext.get("message", "failed"))[:1000]


# --------------------------------------------------------------------------------------------- the worker


class Worker:
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
    ) -> None:
        self.identity = identity
        # With a connector, next hops, data peers and peer URLs are reached by peer id (direct or relayed)
        # and incoming links go through its dispatch (HTTP-tagged links to the API, the rest to us).
        self.connector = connector
        self.link_handler = self._serve_link if connector is None else connector.dispatch
        self.name = name
        self.data_dir = Path(data_dir)
        self.device = resolve_device(device)
        self.offered = memory if memory is not None else default_offer(self.device)
        self.link_host = link_host
        self.link_port = link_port
        self.shards: dict[str, Shard] = {}
        self.limiter = trio.CapacityLimiter(1)  # one torch forward at a time: each uses every core
        self._stage_sessions: dict[int, StageSession] = {}
        self._head_sessions: dict[int, Shard] = {}
        self._nursery: trio.Nursery | None = None
        self.frames_refused = 0

    # ---- memory and status --------------------------------------------------------------------------------

    @property
    def reserved(self) -> int:
        return sum(s.needed for s in self.shards.values())

    @property
    def free(self) -> int:
        return max(0, self.offered - self.reserved)

    def default_weights(self) -> str:
        import torch

        from eldric_p2p.engine.model import resolve_weights

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
        }

    def http_client(self) -> httpx.AsyncClient:
        """An httpx client that also reaches peer URLs (through the connector, when there is one)."""
        from eldric_p2p.net.connector import http_client_factory

        return http_client_factory(self.connector)()

    def heads(self) -> list[Shard]:
        """Head shards that can serve: loaded, and their next hop not known to be gone."""
        return [
            s for s in self.shards.values() if s.a.stage_index == 0 and s.state == "ready" and s.next_hop_ok
        ]

    # ---- running ------------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept links and run loads until cancelled. Starts with the bound link port."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            listeners = await nursery.start(
                serve_tcp_links, self.identity, self.link_host, self.link_port, self.link_handler
            )
            self.link_port = listeners[0].socket.getsockname()[1]
            task_status.started(self.link_port)

    async def compute(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking torch work in a thread, one at a time on this worker."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter, abandon_on_cancel=True)

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

        from eldric_p2p.engine.model import estimate_stage_bytes, resolve_weights

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
            )
            shard.bytes_fetched = result.bytes_fetched
            shard.fetch_s = time.perf_counter() - t0
            shard.state = "loading"
            t1 = time.perf_counter()
            await self.compute(self._build_stage, shard, result.path)
            shard.load_s = time.perf_counter() - t1
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
        await trio.to_thread.run_sync(free_memory, self.device)
        return True

    # ---- links: outgoing ----------------------------------------------------------------------------------

    async def send_down(self, shard: Shard, frame: Frame) -> None:
        """Send a frame to the shard's next hop, opening the link if needed. Raises StageFailed naming it."""
        nxt = shard.a.next
        try:
            ds = await self._downstream(shard)
            await ds.send(frame)
        except (PeerUnavailable, FrameError, OSError) as exc:
            if isinstance(exc, StageFailed):
                raise
            raise StageFailed(f"{nxt.label()}: {exc}") from exc

    async def _downstream(self, shard: Shard) -> Downstream:
        async with shard.downstream_lock:
            ds = shard.downstream
            if ds is not None and not ds.broken:
                return ds
            nxt = shard.a.next
            try:
                if self.connector is not None:
                    link = await self.connector.open_link(
                        nxt.peer_id, port=nxt.link_port, hints=[(nxt.host, nxt.link_port)]
                    )
                else:
                    link = await open_tcp_link(
                        nxt.host, nxt.link_port, self.identity, nxt.peer_id, handshake_timeout=LINK_TIMEOUT_S
                    )
            except PeerUnavailable:
                shard.next_hop_ok = False
                raise
            shard.next_hop_ok = True
            ds = shard.downstream = Downstream(link)
            self._spawn(shard, self._read_backward, shard, ds)
            return ds

    async def _read_backward(self, shard: Shard, ds: Downstream) -> None:
        """Read what the next hop sends back on our outgoing link: ERROR frames, and its closing."""
        nxt = shard.a.next
        reason = "closed the link"
        try:
            async for frame in FrameReader(ds.link):
                if frame.type == FrameType.ERROR:
                    stage, message = _error_text(frame)
                    await self._fail(shard, frame.session_id, stage, message, forward=False)
        except (FrameError, PeerUnavailable, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            reason = f"link failed: {exc}"
        ds.broken = True
        shard.next_hop_ok = False
        await trio.aclose_forcefully(ds.link)
        if shard.state != "ready":
            return
        sids = (
            list(shard.head_sessions)
            if shard.a.stage_index == 0
            else [s.sid for s in self._stage_sessions.values() if s.shard is shard]
        )
        if sids:
            log.warning("%s: next hop %s %s; ending %d sessions", shard.label, nxt.label(), reason, len(sids))
        for sid in sids:
            await self._fail(shard, sid, nxt.label(), f"peer {nxt.peer_id} {reason}", forward=False)

    # ---- failing a session --------------------------------------------------------------------------------

    async def _fail(self, shard: Shard, sid: int, stage: str, message: str, *, forward: bool) -> None:
        """End session `sid` at this shard because `stage` failed; tell the head, forward or backward."""
        frame = error_frame(sid, stage, message)
        if shard.a.stage_index == 0:
            chan = shard.head_sessions.get(sid)
            if chan is not None:
                try:
                    chan.send_nowait(frame)
                except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            return
        sess = self._stage_sessions.get(sid)
        if sess is None or sess.shard is not shard:
            return
        self._forget_stage_session(sess)
        with trio.move_on_after(LINK_TIMEOUT_S):
            try:
                if forward:
                    await self.send_down(shard, frame)
                else:
                    await sess.back.send(frame)
            except (PeerUnavailable, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                log.info("%s: could not pass on the failure of %s: %s", shard.label, stage, exc)

    def _forget_stage_session(self, sess: StageSession) -> None:
        self._stage_sessions.pop(sess.sid, None)
        if sess.shard.stage is not None:
            sess.shard.stage.close_session(str(sess.sid))

    # ---- head sessions (used by pipeline.PipelineBackend) -------------------------------------------------

    def open_head_session(self, shard: Shard, sid: int) -> trio.MemoryReceiveChannel[Frame]:
        if sid in self._head_sessions or sid in self._stage_sessions:
            raise LocalProtocolError(f"session id {sid} in use")
        send, recv = trio.open_memory_channel[Frame](4)
        shard.head_sessions[sid] = send
        self._head_sessions[sid] = shard
        return recv

    def close_head_session(self, shard: Shard, sid: int) -> None:
        chan = shard.head_sessions.pop(sid, None)
        self._head_sessions.pop(sid, None)
        if chan is not None:
            chan.close()

    # ---- links: incoming ----------------------------------------------------------------------------------

    async def _serve_link(self, link: Link) -> None:
        """Frames from one authenticated peer (a previous hop, or the tail sending tokens to our head)."""
        back = FrameWriter(link)
        reader = FrameReader(link)
        try:
            while (frame := await reader.next()) is not None:
                await self._on_frame(link, back, frame)
        except FrameError as exc:
            self.frames_refused += 1
            log.info("refusing frames from %s: %s", link.peer_id, exc)
            with trio.move_on_after(1):
                try:
                    await back.send(error_frame(0, f"worker {self.name}", f"bad frame: {exc}"))
                except (PeerUnavailable, trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
        except (PeerUnavailable, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info("link from %s broke: %s", link.peer_id, exc)
        finally:
            orphans = [s for s in self._stage_sessions.values() if s.link is link]
            for sess in orphans:
                prev = sess.shard.a.prev
                await self._fail(
                    sess.shard, sess.sid, prev.label(), f"peer {prev.peer_id} closed the link", forward=True
                )
            for shard in self.shards.values():
                if shard.a.stage_index == 0 and not shard.a.single and shard.a.prev.peer_id == link.peer_id:
                    for sid in list(shard.head_sessions):
                        await self._fail(
                            shard,
                            sid,
                            shard.a.prev.label(),
                            "the tail closed its link to the head",
                            forward=True,
                        )

    async def _refuse(self, back: FrameWriter, sid: int, message: str) -> None:
        self.frames_refused += 1
        log.info("refused a frame: %s", message)
        await back.send(error_frame(sid, f"worker {self.name}", message))

    async def _on_frame(self, link: Link, back: FrameWriter, frame: Frame) -> None:
        t, sid = frame.type, frame.session_id
        if t == FrameType.PING:
            await back.send(Frame(FrameType.PONG, sid))
        elif t == FrameType.OPEN_SESSION:
            await self._open_stage_session(link, back, frame)
        elif t in (FrameType.HIDDEN, FrameType.TRUNCATE, FrameType.CLOSE_SESSION):
            sess = self._stage_sessions.get(sid)
            if sess is None or sess.link is not link:
                if t == FrameType.HIDDEN:
                    await self._refuse(back, sid, f"unknown session {sid}")
                return
            if t == FrameType.HIDDEN:
                await self._hidden(sess, frame)
            elif t == FrameType.TRUNCATE:
                await self._truncate(sess, frame)
            else:
                self._forget_stage_session(sess)
                if sess.shard.a.role != "tail":
                    await self._pass_on(sess, frame)
        elif t == FrameType.TOKEN:
            shard = self._head_sessions.get(sid)
            if shard is None or shard.a.prev.peer_id != link.peer_id:
                return  # a token for a session that already ended (or not from our tail): drop it
            chan = shard.head_sessions.get(sid)
            if chan is not None:
                try:
                    chan.send_nowait(frame)
                except trio.WouldBlock:
                    self.close_head_session(shard, sid)  # the tail sent tokens we did not ask for
        elif t == FrameType.ERROR:
            stage, message = _error_text(frame)
            sess = self._stage_sessions.get(sid)
            if sess is not None and sess.link is link:
                await self._fail(sess.shard, sid, stage, message, forward=True)
            elif (shard := self._head_sessions.get(sid)) is not None and shard.a.prev.peer_id == link.peer_id:
                await self._fail(shard, sid, stage, message, forward=True)
            else:
                log.info("error from %s: %s: %s", link.peer_id, stage, message)

    async def _open_stage_session(self, link: Link, back: FrameWriter, frame: Frame) -> None:
        from eldric_p2p.engine.sampling import Sampler, SamplingParams

        sid, ext = frame.session_id, frame.ext or {}
        shard = self.shards.get(str(ext.get("deployment", "")))
        if shard is None or shard.state != "ready" or shard.stage is None:
            await self._refuse(
                back, sid, f"no ready stage for deployment {str(ext.get('deployment'))[:128]!r}"
            )
            return
        if shard.a.stage_index == 0 or shard.a.prev.peer_id != link.peer_id:
            await self._refuse(back, sid, f"peer {link.peer_id} is not the previous hop of {shard.label}")
            return
        if sid in self._stage_sessions or sid in self._head_sessions or sid == 0:
            await self._refuse(back, sid, f"session id {sid} is in use")
            return
        n_open = sum(1 for s in self._stage_sessions.values() if s.shard is shard)
        if n_open >= shard.a.sessions + SESSION_SLACK:
            await self._refuse(back, sid, f"{shard.label} already serves {n_open} sessions")
            return
        try:
            ctx = ext.get("ctx", shard.a.max_ctx)
            if not isinstance(ctx, int) or not 1 <= ctx <= shard.a.max_ctx:
                raise InvalidInput(f"context {ctx!r} outside [1, {shard.a.max_ctx}]")
            wire = {"f32": DType.F32, "f16": DType.F16, "bf16": DType.BF16}.get(str(ext.get("wire", "f32")))
            if wire is None:
                raise InvalidInput(f"unknown wire dtype {ext.get('wire')!r}")
            sess = StageSession(sid, shard, link, back, wire)
            if shard.a.role == "tail":
                sess.sampler = Sampler(SamplingParams.from_dict(ext.get("params", {})))
                history = ext.get("history", [])
                if not isinstance(history, list) or not all(isinstance(i, int) for i in history):
                    raise InvalidInput("history must be a list of token ids")
                sess.history = list(history)
        except EldricError as exc:
            await self._refuse(back, sid, str(exc))
            return
        shard.stage.open_session(str(sid), ctx)
        self._stage_sessions[sid] = sess
        if shard.a.role != "tail":
            await self._pass_on(sess, frame)

    async def _pass_on(self, sess: StageSession, frame: Frame) -> None:
        try:
            await self.send_down(sess.shard, frame)
        except StageFailed as exc:
            await self._fail(sess.shard, sess.sid, sess.shard.a.next.label(), str(exc), forward=False)

    async def _truncate(self, sess: StageSession, frame: Frame) -> None:
        stage = sess.shard.stage
        assert stage is not None
        try:
            stage.truncate(str(sess.sid), frame.start)
            if sess.shard.a.role == "tail":
                del sess.history[frame.start :]  # history holds sampled ids; the head resends what it keeps
        except EngineError as exc:
            await self._fail(sess.shard, sess.sid, sess.shard.label, str(exc), forward=True)
            return
        if sess.shard.a.role != "tail":
            await self._pass_on(sess, frame)

    async def _hidden(self, sess: StageSession, frame: Frame) -> None:
        import torch

        shard = sess.shard
        stage = shard.stage
        assert stage is not None
        x = payload_to_tensor(frame)  # [T, hidden]
        if x.dtype != torch.float32:
            x = x.float()
        tail = shard.a.role == "tail"

        def step() -> torch.Tensor | int:
            out = stage.forward(str(sess.sid), x, frame.start, last_only=tail)  # [T, hidden] or [1, vocab]
            if not tail:
                return out if sess.wire == DType.F32 else out.to(wire_dtype(sess.wire))
            assert sess.sampler is not None
            return sess.sampler.sample(out[-1], sess.history)

        try:
            out = await self.compute(step)
        except EngineError as exc:
            await self._fail(shard, sess.sid, shard.label, str(exc), forward=True)
            return
        if sess.sid not in self._stage_sessions:
            return  # ended while computing
        if tail:
            assert isinstance(out, int)
            sess.history.append(out)
            reply = token_frame(sess.sid, frame.start + frame.n_tokens, [out])
        else:
            assert not isinstance(out, int)
            reply = hidden_frame(sess.sid, frame.start, out)
        try:
            await self.send_down(shard, reply)
        except StageFailed as exc:
            await self._fail(shard, sess.sid, shard.a.next.label(), str(exc), forward=False)


def wire_dtype(wire: DType) -> Any:
    """The torch dtype hidden states travel in."""
    import torch

    return {DType.F16: torch.float16, DType.BF16: torch.bfloat16, DType.F32: torch.float32}[wire]


# --------------------------------------------------------------------------------------------- HTTP routes


async def _json_body(request: Request) -> Any:
    body = await request.body()
    if len(body) > MAX_BODY:
        raise UsageError(f"request body of {len(body)} bytes over {MAX_BODY}")
    import json

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
        found = await worker.unload(dep)
        return JSONResponse({"unloaded": found, "free": worker.free})

    async def status(request: Request) -> Response:
        return JSONResponse(worker.status())

    return [
        Route("/api/v1/pipeline/load", load, methods=["POST"]),
        Route("/api/v1/pipeline/unload", unload, methods=["POST"]),
        Route("/api/v1/worker/status", status, methods=["GET"]),
    ]


def new_session_id() -> int:
    return secrets.randbits(63) | 1
