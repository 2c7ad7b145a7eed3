"""The edge-relay role: members connect over QUIC, prove their peer id, get the directory and spliced streams.

`run_relay(host, port, identity)` serves until cancelled. Per member: a control stream (REGISTER, directory
pushes, keepalive PINGs) and any number of data streams up to `max_streams_per_member`, each opened with OPEN
and spliced to a stream the relay opens toward the target. A member that stops answering PINGs for
`dead_after_s` (or whose QUIC connection idles out) is dropped and every other member is told.

Bytes in flight per member are bounded: each spliced direction holds at most `stream_window` unread bytes
(QUIC flow control) plus `stream_window` unacknowledged ones, so a member holds at most
`max_streams_per_member * 4 * stream_window` of relay memory (8 MiB with the defaults).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import trio

from eldric_p2p.errors import AuthenticationError, EldricError, PeerUnavailable, RemoteProtocolError
from eldric_p2p.net.identity import Identity
from eldric_p2p.net.relay import protocol as p
from eldric_p2p.net.relay.control import RelayControl
from eldric_p2p.net.relay.framing import read_message, splice, write_message
from eldric_p2p.net.relay.quic import QuicConn, QuicStream
from eldric_p2p.net.relay.quic_config import server_configuration
from eldric_p2p.net.relay.quic_udp import QuicServer, open_udp_socket
from eldric_p2p.tasks import open_nursery

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RelayLimits:
    max_members: int = 256
    max_streams_per_member: int = 16
    stream_window: int = 128 * 1024
    keepalive_s: float = 5.0
    dead_after_s: float = 15.0
    handshake_timeout_s: float = 10.0
    register_timeout_s: float = 10.0
    open_timeout_s: float = 10.0
    max_datagram_size: int = 1350
    outbox: int = 64  # control messages queued for one member before it counts as too slow


@dataclass
class RelayStats:
    registered: int = 0
    rejected: int = 0  # failed REGISTER (bad proof, protocol error, timeout, relay full)
    dropped_dead: int = 0  # missed keepalives
    dropped_slow: int = 0  # control outbox overflowed
    streams_spliced: int = 0
    streams_refused: int = 0
    bytes_spliced: int = 0


@dataclass(eq=False)
class _Member:
    peer_id: str
    public_key: bytes
    announcement: p.Announcement
    conn: QuicConn
    control: RelayControl
    outbox: trio.MemorySendChannel[bytes]
    last_heard: float
    streams: int = 0
    kill: trio.CancelScope = field(default_factory=trio.CancelScope)

    def entry(self) -> p.Member:
        return p.Member(self.peer_id, self.public_key, self.announcement)


class Relay:
    """Relay state: the members and what they announced. Start with `run`."""

    def __init__(self, identity: Identity, limits: RelayLimits | None = None) -> None:
        self.identity = identity
        self.limits = limits or RelayLimits()
        self.members: dict[str, _Member] = {}
        self.stats = RelayStats()
        self.address: tuple[str, int] | None = None
        self.server: QuicServer | None = None

    async def run(
        self, host: str, port: int, *, task_status: trio.TaskStatus[Relay] = trio.TASK_STATUS_IGNORED
    ) -> None:
        lim = self.limits
        sock = await open_udp_socket(host, port)
        with sock:
            self.address = sock.getsockname()[:2]
            config = server_configuration(
                idle_timeout=lim.dead_after_s,
                max_datagram_size=lim.max_datagram_size,
                stream_window=lim.stream_window,
            )
            self.server = QuicServer(
                sock,
                config,
                self._serve_member,
                max_connections=lim.max_members + 64,
                handshake_timeout=lim.handshake_timeout_s,
                send_window=lim.stream_window,
                max_pending_streams=lim.max_streams_per_member,
            )
            log.info("relay %s listening on udp %s:%d", self.identity.peer_id, *self.address)
            async with open_nursery() as nursery:
                await nursery.start(self.server.run)
                task_status.started(self)

    # ------------------------------------------------------------------------------------------ members

    async def _serve_member(self, conn: QuicConn) -> None:
        lim = self.limits
        control = RelayControl(self.identity)
        register: p.Register | None = None
        with trio.move_on_after(lim.register_timeout_s):
            try:
                stream = await conn.accept_stream()
                while register is None:
                    data = await stream.receive_some()
                    if not data:
                        return
                    events = control.receive_data(data)
                    await stream.send_all(control.data_to_send())
                    register = next((e for e in events if isinstance(e, p.Register)), None)
            except (RemoteProtocolError, AuthenticationError) as exc:
                self.stats.rejected += 1
                control.error("rejected", str(exc))
                await _send_quietly(stream, control.data_to_send())
                return
            except (PeerUnavailable, trio.BrokenResourceError, trio.ClosedResourceError):
                return
        if register is None:
            self.stats.rejected += 1
            return
        if register.peer_id not in self.members and len(self.members) >= lim.max_members:
            self.stats.rejected += 1
            control.error("full", f"relay has {lim.max_members} members")
            await _send_quietly(stream, control.data_to_send())
            return

        outbox_send, outbox = trio.open_memory_channel[bytes](lim.outbox)
        member = _Member(
            register.peer_id,
            register.public_key,
            register.announcement,
            conn,
            control,
            outbox_send,
            trio.current_time(),
        )
        previous = self.members.get(member.peer_id)
        if previous is not None:  # the same node reconnected before we noticed its old connection die
            previous.kill.cancel()
        control.accept(lim.keepalive_s)
        control.send(p.Directory(tuple(m.entry() for m in self.members.values() if m is not previous)))
        self.members[member.peer_id] = member
        self.stats.registered += 1
        self._flush(member)
        self._broadcast(p.DirectoryUpdate(added=(member.entry(),)), exclude=member)
        log.info("member %s registered from %s", member.peer_id, conn.remote_address)
        try:
            with member.kill:
                async with open_nursery() as nursery:
                    nursery.start_soon(self._write_control, member, stream, outbox)
                    nursery.start_soon(self._read_control, member, stream)
                    nursery.start_soon(self._keepalive, member)
                    nursery.start_soon(self._accept_streams, member, nursery)
        finally:
            if self.members.get(member.peer_id) is member:
                del self.members[member.peer_id]
                self._broadcast(p.DirectoryUpdate(removed=(member.peer_id,)), exclude=member)
                log.info("member %s left", member.peer_id)

    def _flush(self, member: _Member) -> None:
        data = member.control.data_to_send()
        if not data:
            return
        try:
            member.outbox.send_nowait(data)
        except trio.WouldBlock:
            self.stats.dropped_slow += 1
            member.kill.cancel()
        except trio.ClosedResourceError:
            pass

    def _broadcast(self, update: p.DirectoryUpdate, *, exclude: _Member) -> None:
        for other in list(self.members.values()):
            if other is not exclude:
                other.control.send(update)
                self._flush(other)

    async def _write_control(
        self, member: _Member, stream: QuicStream, outbox: trio.MemoryReceiveChannel[bytes]
    ) -> None:
        async for data in outbox:
            await stream.send_all(data)

    async def _read_control(self, member: _Member, stream: QuicStream) -> None:
        while True:
            try:
                data = await stream.receive_some()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                member.kill.cancel()
                return
            if not data:
                member.kill.cancel()
                return
            member.last_heard = trio.current_time()
            try:
                events = member.control.receive_data(data)
            except RemoteProtocolError as exc:
                member.control.error("protocol", str(exc))
                await _send_quietly(stream, member.control.data_to_send())
                member.kill.cancel()
                return
            for event in events:
                if isinstance(event, p.Announce):
                    member.announcement = event.announcement
                    self._broadcast(p.DirectoryUpdate(added=(member.entry(),)), exclude=member)

    async def _keepalive(self, member: _Member) -> None:
        while True:
            await trio.sleep(self.limits.keepalive_s)
            if trio.current_time() - member.last_heard > self.limits.dead_after_s:
                self.stats.dropped_dead += 1
                log.info("member %s missed its keepalives", member.peer_id)
                member.conn.close(reason="keepalive timeout")
                member.kill.cancel()
                return
            member.control.ping()
            self._flush(member)

    # ------------------------------------------------------------------------------------------ streams

    async def _accept_streams(self, member: _Member, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await member.conn.accept_stream()
            except PeerUnavailable:
                member.kill.cancel()
                return
            nursery.start_soon(self._open, member, stream)

    async def _refuse(self, stream: QuicStream, code: str, reason: str) -> None:
        self.stats.streams_refused += 1
        with trio.move_on_after(2):
            try:
                await write_message(stream, p.Refuse(code, reason))
            except PeerUnavailable:
                pass
        await stream.aclose()

    async def _open(self, member: _Member, stream: QuicStream) -> None:
        lim = self.limits
        with trio.move_on_after(lim.open_timeout_s) as cs:
            try:
                request = await read_message(stream)
            except EldricError:
                request = None
        if cs.cancelled_caught or not isinstance(request, p.Open):
            stream.abort()
            return
        target = self.members.get(request.target)
        if target is None:
            return await self._refuse(stream, p.RefuseCode.UNKNOWN_PEER, f"{request.target} is not connected")
        if target is member:
            return await self._refuse(stream, p.RefuseCode.SELF, "cannot open a stream to yourself")
        if member.streams >= lim.max_streams_per_member or target.streams >= lim.max_streams_per_member:
            return await self._refuse(
                stream,
                p.RefuseCode.TOO_MANY_STREAMS,
                f"limit {lim.max_streams_per_member} streams per member",
            )
        member.streams += 1
        target.streams += 1
        try:
            await self._splice_to(member, stream, target)
        finally:
            member.streams -= 1
            target.streams -= 1

    async def _splice_to(self, member: _Member, stream: QuicStream, target: _Member) -> None:
        try:
            onward = target.conn.open_stream()
        except PeerUnavailable:
            return await self._refuse(stream, p.RefuseCode.UNKNOWN_PEER, "target just left")
        reply: p.Message | None = None
        with trio.move_on_after(self.limits.open_timeout_s):
            try:
                await write_message(onward, p.Incoming(member.peer_id))
                reply = await read_message(onward)
            except EldricError:
                reply = None
        if not isinstance(reply, p.Accept):
            onward.abort()
            if isinstance(reply, p.Refuse):
                return await self._refuse(stream, reply.code, reply.reason)
            return await self._refuse(stream, p.RefuseCode.TIMEOUT, "target did not answer")
        done = False
        try:
            await write_message(stream, p.Accept())
            self.stats.streams_spliced += 1
            self.stats.bytes_spliced += await splice(stream, onward, self.limits.stream_window)
            done = True
        except PeerUnavailable:
            pass
        finally:
            if done:
                await stream.aclose()
                await onward.aclose()
            else:  # cancelled (a member left) or broken: both ends see a reset, not a silent hang
                stream.abort()
                onward.abort()


async def _send_quietly(stream: QuicStream, data: bytes) -> None:
    if data:
        with trio.move_on_after(2):
            try:
                await stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass


async def run_relay(
    host: str,
    port: int,
    identity: Identity,
    *,
    limits: RelayLimits | None = None,
    task_status: trio.TaskStatus[Relay] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve as an edge relay on UDP `host:port` until cancelled; `nursery.start` returns the `Relay`
    (its `.address` holds the bound address when `port` is 0)."""
    await Relay(identity, limits).run(host, port, task_status=task_status)
