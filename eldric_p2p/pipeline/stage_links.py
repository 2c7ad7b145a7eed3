"""The frame side of a worker: links in from the previous hop, one link out to the next, sessions on both.

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

`StageLinks` is a base of `Worker` (eldric_p2p.pipeline.worker), which owns the shards, memory and loading;
this half owns what happens to a frame once a shard is ready.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from eldric_p2p.errors import (
    EldricError,
    EngineError,
    FrameError,
    InvalidInput,
    LocalProtocolError,
    PeerUnavailable,
    StageFailed,
)
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
from eldric_p2p.net.links import Link, open_tcp_link
from eldric_p2p.pipeline.shard import Downstream, Shard, StageSession, error_frame, error_text, wire_dtype

if TYPE_CHECKING:
    from eldric_p2p.net.connector import Connector

log = logging.getLogger(__name__)
T = TypeVar("T")

LINK_TIMEOUT_S = 5.0
SESSION_SLACK = 2  # sessions a stage accepts beyond the planned count (CLOSE frames still in flight)


class StageLinks:
    """Sending, receiving and failing frames for the shards of a worker."""

    identity: Identity
    name: str
    connector: Connector | None
    shards: dict[str, Shard]
    frames_refused: int
    _stage_sessions: dict[int, StageSession]
    _head_sessions: dict[int, Shard]

    async def compute(self, fn: Callable[..., T], *args: Any, quick: bool = False) -> T:
        raise NotImplementedError

    def _spawn(self, shard: Shard, fn: Callable[..., Any], *args: Any) -> None:
        raise NotImplementedError

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
        if (ds := shard.downstream) is not None and not ds.broken:
            return ds  # open: no lock (a yield to the scheduler per frame); the send yields anyway
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
                    stage, message = error_text(frame)
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
        sess.shard.touch()
        if sess.shard.stage is not None:
            sess.shard.stage.close_session(str(sess.sid))

    # ---- head sessions (used by pipeline.PipelineBackend) -------------------------------------------------

    def open_head_session(self, shard: Shard, sid: int) -> trio.MemoryReceiveChannel[Frame]:
        if sid in self._head_sessions or sid in self._stage_sessions:
            raise LocalProtocolError(f"session id {sid} in use")
        send, recv = trio.open_memory_channel[Frame](4)
        shard.head_sessions[sid] = send
        self._head_sessions[sid] = shard
        shard.touch()
        return recv

    def close_head_session(self, shard: Shard, sid: int) -> None:
        chan = shard.head_sessions.pop(sid, None)
        self._head_sessions.pop(sid, None)
        shard.touch()
        if chan is not None:
            chan.close()

    # ---- links: incoming ----------------------------------------------------------------------------------

    async def serve_link(self, link: Link) -> None:
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
                if sess.busy:  # the previous hop waits for our output before it sends the next step
                    await self._fail(sess.shard, sid, sess.shard.label,
                                     "a second step before the first was answered", forward=True)  # fmt: skip
                    return
                sess.busy = True  # computed in its own task: the next frames on this link (other
                self._spawn(sess.shard, self._hidden, sess, frame)  # sessions' steps) join its batch
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
            stage, message = error_text(frame)
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
        shard.touch()
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

        t_in = time.perf_counter()
        shard = sess.shard
        stage = shard.stage
        assert stage is not None
        x = payload_to_tensor(frame)  # [T, hidden]
        if x.dtype != torch.float32:
            x = x.float()
        tail = shard.a.role == "tail"

        def post(out: torch.Tensor) -> torch.Tensor | int:  # [T, hidden] or [1, vocab]
            if not tail:
                return out if sess.wire == DType.F32 else out.to(wire_dtype(sess.wire))
            assert sess.sampler is not None
            return sess.sampler.sample(out[-1], sess.history)

        assert shard.batcher is not None
        try:
            out = await shard.batcher.step(str(sess.sid), x, frame.start, last_only=tail, post=post)
        except (EngineError, PeerUnavailable) as exc:
            if sess.sid in self._stage_sessions:
                await self._fail(shard, sess.sid, shard.label, str(exc), forward=True)
            return
        finally:
            sess.busy = False
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
            return
        if frame.n_tokens == 1:  # a decode step
            shard.hop_ms.append((time.perf_counter() - t_in) * 1000)
