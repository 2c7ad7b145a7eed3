"""The edge-relay role: members connect over QUIC, prove their peer id, get the directory and spliced streams.

`run_relay(host, port, identity)` serves until cancelled. Per member: a control stream (REGISTER, directory
pushes, keepalive PINGs) and any number of data streams up to `max_streams_per_member`, each opened with OPEN
and spliced to a stream the relay opens toward the target. A member that stops answering PINGs for
`dead_after_s` (or whose QUIC connection idles out) is dropped and every other member is told.

Bytes in flight per member are bounded: each spliced direction holds at most `stream_window` unread bytes
(QUIC flow control) plus `stream_window` unacknowledged ones, so a member holds at most
`max_streams_per_member * 4 * stream_window` of relay memory (8 MiB with the defaults).

Hole punching: REGISTERED offers FEATURE_PUNCH (unless `RelayLimits.punch` is None); a member that declared
it too may send PUNCH, and `PunchBroker` (punch.py) answers with PUNCH_GO to both members, carrying what the
relay's socket observes as each one's address, or with PUNCH_FAIL. Guests do not punch. With FEATURE_FORWARD
(unless `RelayLimits.channels` is None) a PUNCH_GO also names a forwarding channel, and the relay's UDP reader
passes channel datagrams between the two members unopened (channels.py): the path when the punch fails.

The TCP lane (unless `RelayLimits.tcp` is None): the relay also listens on TCP, on the UDP port's number
when it is free, and says where in REGISTERED `tcp_port`; an OPEN asking for `tcp` between two members that
declared it gets tickets instead of a spliced QUIC stream, and the two members' TCP connections are spliced
(tcplane.py). The splice counts against both members' stream limits and ends when either member leaves.

A relay whose own identity is in a federation admits members of it only (control.check_credential_untrusted):
a REGISTER without a valid certificate is refused with ERROR not_member; one with a join ticket instead is a
*guest*, kept out of the directory, reachable by nobody, and allowed streams only to its inviter until the
ticket expires. A member is dropped as soon as `Membership.on_revoked` names it (or its inviter, for a
guest), and each keepalive re-checks its credential, so an expired certificate or ticket (or a revocation read
from disk, which calls no callback) drops it too.
"""

from __future__ import annotations

import logging

import trio

from eldric_p2p.errors import AuthenticationError, PeerUnavailable, RemoteProtocolError
from eldric_p2p.net.federation.certs import MembershipError
from eldric_p2p.net.federation.invites import Ticket
from eldric_p2p.net.identity import Identity
from eldric_p2p.net.pacing import unpaced
from eldric_p2p.net.relay import protocol as p
from eldric_p2p.net.relay.channels import ChannelTable
from eldric_p2p.net.relay.control import (
    Credential,
    RelayControl,
    check_credential_untrusted,
    recheck_credential,
)
from eldric_p2p.net.relay.punch import PunchBroker
from eldric_p2p.net.relay.quic import NetworkAddress, QuicConn, QuicStream
from eldric_p2p.net.relay.quic_config import server_configuration
from eldric_p2p.net.relay.quic_udp import QuicServer, open_udp_socket
from eldric_p2p.net.relay.state import MemberState as _Member
from eldric_p2p.net.relay.state import RelayLimits as RelayLimits  # re-exported: what callers configure
from eldric_p2p.net.relay.state import RelayStats
from eldric_p2p.net.relay.streams import serve_open
from eldric_p2p.net.relay.tcplane import TcpLane
from eldric_p2p.tasks import open_nursery

log = logging.getLogger(__name__)

REFUSAL_LOG_S = 10.0  # log a refused peer at most once per this many seconds


class Relay:
    """Relay state: the members and what they announced. Start with `run`."""

    def __init__(self, identity: Identity, limits: RelayLimits | None = None) -> None:
        self.identity = identity
        self.limits = limits or RelayLimits()
        self.members: dict[str, _Member] = {}
        self.guests: dict[str, _Member] = {}
        self.stats = RelayStats()
        self.channels: ChannelTable | None = None
        if self.limits.channels is not None and self.limits.punch is not None:  # channels ride on PUNCH_GO
            self.channels = ChannelTable(self._address_of, self.limits.channels)
        self.punches = (
            PunchBroker(self.limits.punch, channels=self.channels) if self.limits.punch is not None else None
        )
        self._refusals_logged: dict[str, float] = {}
        self.address: tuple[str, int] | None = None
        self.server: QuicServer | None = None
        self.lane = TcpLane(self.limits.tcp) if self.limits.tcp is not None else None
        self.tcp_port = 0  # where the lane listens, once it does

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
            membership = self.identity.membership
            if membership is not None:
                membership.on_revoked.append(self._on_revoked)
            try:
                async with open_nursery() as nursery:
                    if self.channels is not None:
                        self.server.forward = self._forward
                        nursery.start_soon(self._expire_channels)
                    if self.lane is not None:
                        await self._listen_tcp(host, nursery)
                    await nursery.start(self.server.run)
                    task_status.started(self)
            finally:
                if membership is not None:
                    membership.on_revoked.remove(self._on_revoked)

    async def _listen_tcp(self, host: str, nursery: trio.Nursery) -> None:
        """The TCP lane's listener: on the UDP port's number (one number for a firewall to open), else on
        any free port (REGISTERED says which); without one the relay runs without the lane."""
        assert self.lane is not None and self.address is not None
        listeners: list[trio.SocketListener] = []
        for port in (self.address[1], 0):
            try:
                with unpaced():  # what the relay passes on leaves whole (net/pacing.py)
                    listeners = await trio.open_tcp_listeners(port, host=host or None)
                break
            except OSError as exc:
                log.warning("relay: TCP lane cannot listen on %s:%d: %s", host, port, exc)
        if not listeners:
            self.lane = None
            return
        self.tcp_port = listeners[0].socket.getsockname()[1]
        log.info("relay TCP lane listening on tcp %s:%d", host, self.tcp_port)
        await nursery.start(trio.serve_listeners, self.lane.handle, listeners)

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
        credential: Credential | None = None
        if self.identity.federated:
            assert self.identity.membership is not None
            try:
                credential = check_credential_untrusted(self.identity.membership, register)
            except MembershipError as exc:
                text = f"not a member of federation {self.identity.membership.id}: {exc.code}: {exc}"
                self.stats.rejected_not_member += 1
                self._log_refusal(register.peer_id, conn, text)
                return await self._reject(conn, stream, control, "not_member", text)
        guest_of = credential.inviter if isinstance(credential, Ticket) else None
        book, limit = (self.guests, lim.max_guests) if guest_of else (self.members, lim.max_members)
        if register.peer_id not in book and len(book) >= limit:
            what = "guests" if guest_of else "members"
            return await self._reject(conn, stream, control, "full", f"relay has {limit} {what}")

        outbox_send, outbox = trio.open_memory_channel[bytes](lim.outbox)
        member = _Member(
            register.peer_id,
            register.public_key,
            register.announcement,
            conn,
            control,
            outbox_send,
            trio.current_time(),
            credential=credential,
            guest_of=guest_of,
        )
        previous = self.members.get(member.peer_id) or self.guests.get(member.peer_id)
        if previous is not None:  # the same node reconnected before we noticed its old connection die
            previous.kill.cancel()
        features: tuple[str, ...] = (p.FEATURE_PUNCH,) if self.punches is not None else ()
        if self.channels is not None:
            features += (p.FEATURE_FORWARD,)
        control.accept(lim.keepalive_s, features, self.tcp_port if self.lane is not None else 0)
        book[member.peer_id] = member
        if isinstance(credential, Ticket):  # a guest sees nobody (and goes at the keepalive after its ticket)
            control.send(p.Directory(()))
            self.stats.guests += 1
            log.info(
                "guest %s (invited by %s) registered from %s", member.peer_id, guest_of, conn.remote_address
            )
        else:
            others = (m.entry() for m in self.members.values() if m is not previous and m is not member)
            control.send(p.Directory(tuple(others)))
            self.stats.registered += 1
            self._broadcast(p.DirectoryUpdate(added=(member.entry(),)), exclude=member)
            log.info("member %s registered from %s", member.peer_id, conn.remote_address)
        self._flush(member)
        try:
            with member.kill:
                async with open_nursery() as nursery:
                    nursery.start_soon(self._write_control, member, stream, outbox)
                    nursery.start_soon(self._read_control, member, stream)
                    nursery.start_soon(self._keepalive, member)
                    nursery.start_soon(self._accept_streams, member, nursery)
        finally:
            self._forget(member)

    async def _reject(
        self, conn: QuicConn, stream: QuicStream, control: RelayControl, code: str, text: str
    ) -> None:
        """Refuse a REGISTER with ERROR `code`, and give the member a moment to read why before the close."""
        self.stats.rejected += 1
        control.error(code, text)
        await _send_quietly(stream, control.data_to_send())
        with trio.move_on_after(1):
            await conn.wait_closed()

    def _log_refusal(self, peer_id: str, conn: QuicConn, text: str) -> None:
        now = trio.current_time()
        if now - self._refusals_logged.get(peer_id, -REFUSAL_LOG_S) < REFUSAL_LOG_S:
            return
        if len(self._refusals_logged) >= 1024:  # a flood of new peer ids: forget, at worst log a few twice
            self._refusals_logged.clear()
        self._refusals_logged[peer_id] = now
        log.info("refused %s from %s: %s", peer_id, conn.remote_address, text)

    def _forget(self, member: _Member) -> None:
        """Take `member` out of the relay's books (once) and tell the others when it was in the directory."""
        book = self.guests if member.guest_of else self.members
        if book.get(member.peer_id) is member:
            del book[member.peer_id]
            if self.punches is not None:
                self.punches.forget(member.peer_id)
            if self.channels is not None:
                self.channels.forget(member.peer_id)
            if member.guest_of is None:
                self._broadcast(p.DirectoryUpdate(removed=(member.peer_id,)), exclude=member)
            log.info("%s %s left", "guest" if member.guest_of else "member", member.peer_id)

    def _address_of(self, peer_id: str) -> NetworkAddress | None:
        """Where a member's relay connection is now: a channel's datagrams come from and go to it."""
        member = self.members.get(peer_id) or self.guests.get(peer_id)
        return member.conn.remote_address if member is not None else None

    def _forward(self, data: bytes, addr: NetworkAddress) -> tuple[bytes, NetworkAddress] | None:
        assert self.channels is not None
        return self.channels.forward_untrusted(data, addr, trio.current_time())

    async def _expire_channels(self) -> None:
        assert self.channels is not None
        while True:
            await trio.sleep(self.channels.limits.idle_s / 4)
            self.channels.expire(trio.current_time())

    def _drop(self, member: _Member, reason: str) -> None:
        """End a registration now: out of the directory, its connection closed, its tasks cancelled."""
        self._forget(member)
        member.conn.close(reason=reason)
        member.kill.cancel()

    def _on_revoked(self, peer_id: str) -> None:
        """`Membership.on_revoked`: drop the revoked member at once, and the guests it invited."""
        for member in [*self.members.values(), *self.guests.values()]:
            if peer_id in (member.peer_id, member.guest_of):
                self.stats.dropped_not_member += 1
                log.info("dropping %s: %s was revoked", member.peer_id, peer_id)
                self._drop(member, f"{peer_id} was revoked")

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
                    if member.guest_of is None:  # a guest stays out of the directory
                        self._broadcast(p.DirectoryUpdate(added=(member.entry(),)), exclude=member)
                elif isinstance(event, p.Pong) and event.seq == member.ping[0]:
                    member.rtt = member.last_heard - member.ping[1]
                elif isinstance(event, p.Punch):
                    self._punch(member, event.target)

    def _punch(self, member: _Member, target_id: str) -> None:
        """Broker a PUNCH: PUNCH_GO to both members, or PUNCH_FAIL to the asker (punch.PunchBroker)."""
        assert self.punches is not None  # a member sends PUNCH only when REGISTERED offered it
        target = self.members.get(target_id) or self.guests.get(target_id)
        now = trio.current_time()
        replies = self.punches.request(member.party(), target_id, target.party() if target else None, now)
        for peer_id, msg in replies:
            to = member if peer_id == member.peer_id else target
            if to is not None:
                to.control.send(msg)
                self._flush(to)

    async def _keepalive(self, member: _Member) -> None:
        while True:
            await trio.sleep(self.limits.keepalive_s)
            if trio.current_time() - member.last_heard > self.limits.dead_after_s:
                self.stats.dropped_dead += 1
                log.info("member %s missed its keepalives", member.peer_id)
                self._drop(member, "keepalive timeout")
                return
            if self.identity.federated:
                assert self.identity.membership is not None
                try:
                    recheck_credential(self.identity.membership, member.credential, member.peer_id)
                except MembershipError as exc:
                    self.stats.dropped_not_member += 1
                    log.info("dropping %s: %s", member.peer_id, exc)
                    self._drop(member, f"{exc.code}: {exc}")
                    return
            member.ping = (member.control.ping(), trio.current_time())
            self._flush(member)

    # ------------------------------------------------------------------------------------------ streams

    async def _accept_streams(self, member: _Member, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await member.conn.accept_stream()
            except PeerUnavailable:
                member.kill.cancel()
                return
            nursery.start_soon(serve_open, self, member, stream)


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
