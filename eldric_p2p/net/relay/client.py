"""Member side of the edge relay: one outbound QUIC connection, kept up with reconnects and backoff.

`RelayMember.run` connects, registers (proving our peer id), mirrors the relay's directory into the
`PeerTable` as source "relay" via `address` (entries of its own: a node that is a member of several relays
keeps each relay's peers apart, and one relay's update or disconnect leaves the others'), answers
keepalives, re-announces when `announcement_fn()` changes, and hands incoming relayed streams to
`stream_handler(stream, source_peer_id)`. `open_stream(peer_id)` asks the relay for a stream to another
member.

Relayed streams are plain `trio.abc.Stream`s of opaque bytes. `source_peer_id` is only what the relay
claims; run the link handshake over the stream to authenticate the other end.

The TCP lane: when the relay has one (REGISTERED `tcp_port`), `open_stream` asks for it and returns a TCP
connection to the relay that the relay splices to the target's (tcplane.py); an INCOMING with a ticket is
answered by dialing the lane the same way. If the lane cannot be dialed, the stream is opened again as a
spliced QUIC stream and the lane is not tried for `TCP_RETRY_S`.

Hole punching (with a `punch_handler`): the member keeps one UDP socket (endpoint.py) for as long as it runs,
so the relay connection, punch probes and punched QUIC connections share one NAT mapping; `punch(peer_id)`
asks the relay to broker a punch and returns a direct QUIC connection (punching.py), whose streams the peer
opens reach `punch_handler(stream, peer_id)`. A relay that does not broker punches makes `can_punch` False.

In a federation (`identity.federated`) every registration carries our membership chain, read afresh each
time (it changes on renewal); a joiner with no certificate yet registers with its invite's `ticket` instead.
A relay that refuses us says why in `last_error`, and we keep retrying: we may become a member later.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from eldric_p2p.errors import EldricError, PeerUnavailable, RemoteProtocolError
from eldric_p2p.net.discovery import Announcement, PeerTable, peer_info_from_fields
from eldric_p2p.net.federation.certs import MembershipError, chain_to_text
from eldric_p2p.net.identity import Identity
from eldric_p2p.net.relay import protocol as p
from eldric_p2p.net.relay.control import MemberControl
from eldric_p2p.net.relay.endpoint import UdpEndpoint, local_address, resolve_udp
from eldric_p2p.net.relay.fields import format_address
from eldric_p2p.net.relay.framing import read_message, write_message
from eldric_p2p.net.relay.punching import Puncher
from eldric_p2p.net.relay.quic import QuicConn, QuicStream
from eldric_p2p.net.relay.quic_config import client_configuration
from eldric_p2p.net.relay.tcplane import dial
from eldric_p2p.tasks import open_nursery

log = logging.getLogger(__name__)

StreamHandler = Callable[[trio.abc.Stream, str], Awaitable[None]]
TCP_RETRY_S = 60.0  # after the relay's TCP lane failed us, relayed streams go over QUIC for this long


class _LaneFailed(Exception):
    """The TCP lane could not carry this stream; open it over QUIC instead."""


class RelayMember:
    """Membership in one relay. Start `run` in a nursery; it reconnects by itself until cancelled."""

    def __init__(
        self,
        identity: Identity,
        host: str,
        port: int,
        table: PeerTable,
        announcement_fn: Callable[[], Announcement | dict[str, Any]],
        stream_handler: StreamHandler | None = None,
        *,
        expected_relay_id: str | None = None,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        announce_interval_s: float = 1.0,
        open_timeout_s: float = 10.0,
        handshake_timeout_s: float = 10.0,
        max_datagram_size: int = 1350,
        stream_window: int = 128 * 1024,
        ticket: str | None = None,
        punch_handler: StreamHandler | None = None,
    ) -> None:
        """`ticket`: a join ticket's text (`invites.Ticket.to_text`), sent while we hold no certificate.
        `punch_handler`: take part in hole punching, and hand it the streams peers open on punched paths."""
        self.identity = identity
        self.host = host
        self.port = port
        self.table = table
        self.announcement_fn = announcement_fn
        self.stream_handler = stream_handler
        self.expected_relay_id = expected_relay_id
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.announce_interval_s = announce_interval_s
        self.open_timeout_s = open_timeout_s
        self.handshake_timeout_s = handshake_timeout_s
        self.max_datagram_size = max_datagram_size
        self.stream_window = stream_window
        self.ticket = ticket
        self.punch_handler = punch_handler
        self.endpoint: UdpEndpoint | None = None  # our UDP socket, kept across reconnects
        self.puncher: Puncher | None = None
        self._endpoint_scope: trio.CancelScope | None = None
        self._control: MemberControl | None = None
        self._send_control: Callable[[], Awaitable[None]] | None = None
        self.relay_id: str | None = None
        self.connects = 0  # successful registrations so far
        self.last_error: str | None = None
        self._conn: QuicConn | None = None
        self._changed = trio.Event()
        self._relay_host: str | None = None  # the relay's address we reached (its TCP lane is there too)
        self._lane_failed_at: float | None = None
        self.lane_streams = 0  # relayed streams that went over the TCP lane (both directions)

    @property
    def address(self) -> str:
        """This relay as "HOST:PORT": the `via` of the peer-table entries learned through it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def registered(self) -> bool:
        return self._conn is not None

    def _set_conn(self, conn: QuicConn | None) -> None:
        self._conn = conn
        self._changed.set()
        self._changed = trio.Event()

    async def wait_registered(self) -> None:
        """Wait until registered with the relay (returns at once if already)."""
        while not self.registered:
            await self._changed.wait()

    def _announcement(self) -> dict[str, Any]:
        ann = self.announcement_fn()
        return ann.to_fields() if isinstance(ann, Announcement) else dict(ann)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Stay a member until cancelled: connect, serve, and on any failure retry with jittered backoff."""
        task_status.started()
        backoff = self.backoff_initial_s
        async with open_nursery() as nursery:  # our UDP socket (and punched connections) outlive sessions
            while True:
                connects = self.connects
                try:
                    await self._session(nursery)
                except* (EldricError, trio.BrokenResourceError, trio.ClosedResourceError) as group:
                    exc = _first_leaf(group)
                    error = f"{type(exc).__name__}: {exc}"
                    refused = (
                        isinstance(exc, MembershipError) and error != self.last_error
                    )  # say a new one loudly
                    self.last_error = error
                    log.log(
                        logging.WARNING if refused else logging.INFO,
                        "relay %s:%d: %s",
                        self.host,
                        self.port,
                        error,
                    )
                finally:
                    self._set_conn(None)
                    self._control = self._send_control = None
                    self.table.replace_source("relay", [], via=self.address)  # only this relay's peers go
                if self.connects > connects:
                    backoff = self.backoff_initial_s
                await trio.sleep(backoff * random.uniform(0.75, 1.25))
                backoff = min(backoff * 2, self.backoff_max_s)

    async def _endpoint(self, family: int, nursery: trio.Nursery) -> UdpEndpoint:
        """Our UDP socket for `family`: the one we have, or a new one (with its Puncher) in `nursery`."""
        if self.endpoint is not None and self.endpoint.sock.family == family:
            return self.endpoint
        if self._endpoint_scope is not None:  # the relay's name now resolves to the other family
            self._endpoint_scope.cancel()
        endpoint = await UdpEndpoint.open(family)
        self._endpoint_scope = await nursery.start(self._serve_endpoint, endpoint)
        self.endpoint = endpoint
        return endpoint

    async def _serve_endpoint(
        self, endpoint: UdpEndpoint, *, task_status: trio.TaskStatus[trio.CancelScope]
    ) -> None:
        with trio.CancelScope() as scope:
            async with open_nursery() as nursery:
                await nursery.start(endpoint.run)
                if self.punch_handler is not None:
                    self.puncher = Puncher(
                        self.identity,
                        endpoint,
                        self.punch_handler,
                        stream_window=self.stream_window,
                        max_datagram_size=self.max_datagram_size,
                    )
                    await nursery.start(self.puncher.run)
                task_status.started(scope)

    async def _session(self, nursery: trio.Nursery) -> None:
        config = client_configuration(
            idle_timeout=60.0, max_datagram_size=self.max_datagram_size, stream_window=self.stream_window
        )
        family, addr = await resolve_udp(self.host, self.port)
        endpoint = await self._endpoint(family, nursery)
        punching = self.punch_handler is not None
        local = local_address(family, addr, endpoint.port) if punching else None
        if self.puncher is not None:
            self.puncher.relay_address = addr  # the relay that forwards our channels (PUNCH_GO `channel`)
        self._relay_host = str(addr[0])
        async with endpoint.connect(
            addr, config, handshake_timeout=self.handshake_timeout_s, send_window=self.stream_window
        ) as conn:
            membership = self.identity.membership if self.identity.federated else None
            cert = chain_to_text(membership.chain) if membership is not None else None
            control = MemberControl(
                self.identity,
                self._announcement(),
                expected_relay_id=self.expected_relay_id,
                cert=cert,
                ticket=self.ticket if cert is None else None,
                features=((p.FEATURE_PUNCH, p.FEATURE_FORWARD) if punching else ()) + (p.FEATURE_TCP,),
                local=(format_address(local),) if local is not None else (),
            )
            stream = conn.open_stream()
            lock = trio.Lock()

            async def send_pending() -> None:
                data = control.data_to_send()
                if data:
                    async with lock:
                        await stream.send_all(data)

            control.hello()
            await send_pending()
            self._control, self._send_control = control, send_pending
            async with open_nursery() as nursery:
                nursery.start_soon(self._watch_connection, conn, nursery.cancel_scope)
                dead_after = self.handshake_timeout_s
                last_heard = trio.current_time()
                deadline = trio.CancelScope(deadline=last_heard + dead_after)
                while True:
                    with deadline:
                        data = await stream.receive_some()
                    if deadline.cancelled_caught:
                        raise PeerUnavailable(f"relay silent for {dead_after:g} s")
                    if not data:
                        raise PeerUnavailable("relay closed the control stream")
                    now = trio.current_time()
                    for event in control.receive_data(data):
                        if isinstance(event, p.Registered):
                            dead_after = 3 * event.keepalive_s + 1
                            self.relay_id = control.relay_id
                            self.connects += 1
                            self._set_conn(conn)
                            log.info("registered with relay %s as %s", self.relay_id, self.identity.peer_id)
                            nursery.start_soon(self._accept_streams, conn, nursery)
                            nursery.start_soon(self._reannounce, control, send_pending)
                        elif isinstance(event, (p.Directory, p.DirectoryUpdate)):
                            self._apply_directory(event, now)
                        elif isinstance(event, p.PunchGo) and self.puncher is not None:
                            self.puncher.on_go(event)
                        elif isinstance(event, p.PunchFail) and self.puncher is not None:
                            self.puncher.on_fail(event)
                    await send_pending()
                    deadline = trio.CancelScope(deadline=now + dead_after)

    def _apply_directory(self, event: p.Directory | p.DirectoryUpdate, now: float) -> None:
        """Mirror this relay's directory (a snapshot or a change) into the table's entries via `address`."""
        via = self.address
        if isinstance(event, p.Directory):
            infos = [peer_info_from_fields(m.peer_id, m.announcement, "relay", now) for m in event.members]
            self.table.replace_source("relay", infos, via=via)
            return
        for peer_id in event.removed:
            self.table.remove(peer_id, "relay", via=via)
        for m in event.added:
            self.table.upsert(peer_info_from_fields(m.peer_id, m.announcement, "relay", now, via=via))

    @staticmethod
    async def _watch_connection(conn: QuicConn, scope: trio.CancelScope) -> None:
        await conn.wait_closed()
        scope.cancel()

    async def _reannounce(self, control: MemberControl, send_pending: Callable[[], Awaitable[None]]) -> None:
        current = control.announcement
        while True:
            await trio.sleep(self.announce_interval_s)
            ann = self._announcement()
            if ann != current:
                current = ann
                control.announce(ann)
                await send_pending()

    async def _accept_streams(self, conn: QuicConn, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await conn.accept_stream()
            except PeerUnavailable:
                return
            nursery.start_soon(self._incoming, stream)

    async def _incoming(self, stream: QuicStream) -> None:
        try:
            with trio.move_on_after(self.open_timeout_s) as cs:
                msg = await read_message(stream)
            if cs.cancelled_caught or not isinstance(msg, p.Incoming):
                stream.abort()
                return
            if self.stream_handler is None:
                await write_message(
                    stream, p.Refuse(p.RefuseCode.NO_HANDLER, "this node takes no relayed streams")
                )
                await stream.aclose()
                return
            if msg.ticket:  # the TCP lane: dial it, then the QUIC stream has done its job
                try:
                    lane = await self._dial_lane(msg.ticket)
                except _LaneFailed as exc:
                    await write_message(stream, p.Refuse(p.RefuseCode.TCP_FAILED, str(exc)))
                    return
                async with lane:
                    await write_message(stream, p.Accept())
                    await stream.aclose()
                    self.lane_streams += 1
                    await self.stream_handler(lane, msg.source)
                return
            await write_message(stream, p.Accept())
            await self.stream_handler(stream, msg.source)
        except (EldricError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info("relayed stream from the relay failed: %s", exc)
            stream.abort()
        finally:
            await stream.aclose()

    @property
    def can_punch(self) -> bool:
        """Registered with a relay that brokers punches, and we take part."""
        return self._control is not None and self._control.can_punch and self.puncher is not None

    def punched(self, peer_id: str) -> QuicConn | None:
        """The live punched connection to `peer_id`, if any (made by either side)."""
        return self.puncher.live(peer_id) if self.puncher is not None else None

    async def punch(self, peer_id: str) -> QuicConn:
        """A direct QUIC connection to `peer_id` by hole punching through this relay (opaque streams:
        authenticate them with the link handshake). Raises PeerUnavailable when the relay does not broker
        punches or refuses, or no direct path works within the punch timeout (a few seconds)."""
        control, send, puncher = self._control, self._send_control, self.puncher
        if control is None or send is None or puncher is None or not control.can_punch:
            raise PeerUnavailable(f"relay {self.address} brokers no hole punch for us")

        async def request() -> None:
            control.punch(peer_id)
            await send()

        return await puncher.punch(peer_id, request)

    @property
    def tcp_lane(self) -> bool:
        """The relay has a TCP lane for us and it has not failed us lately: `open_stream` will use it."""
        control = self._control
        if control is None or control.tcp_port is None or self._relay_host is None:
            return False
        failed = self._lane_failed_at
        return failed is None or trio.current_time() - failed > TCP_RETRY_S

    async def _dial_lane(self, ticket: bytes) -> trio.SocketStream:
        control, host = self._control, self._relay_host
        if control is None or control.tcp_port is None or host is None:
            raise _LaneFailed("the relay offered no TCP lane")
        try:
            with trio.fail_after(self.open_timeout_s):
                return await dial(host, control.tcp_port, ticket)
        except (OSError, trio.TooSlowError) as exc:
            self._lane_failed_at = trio.current_time()
            raise _LaneFailed(f"cannot reach the relay's TCP lane {host}:{control.tcp_port}: {exc}") from exc

    async def open_stream(self, peer_id: str, *, tcp: bool = True) -> trio.abc.Stream:
        """A relayed stream to `peer_id` (opaque bytes; authenticate it with the link handshake): a TCP
        connection through the relay's TCP lane when it has one (and `tcp`), else a QUIC stream the relay
        splices.

        Raises PeerUnavailable if we are not registered, the relay refuses (unknown peer id, limits), or
        nothing answers within `open_timeout_s`.
        """
        if tcp and self.tcp_lane:
            try:
                return await self._open_stream(peer_id, tcp=True)
            except _LaneFailed as exc:
                self._lane_failed_at = trio.current_time()
                log.info("relay %s: %s; relayed streams go over QUIC for now", self.address, exc)
        return await self._open_stream(peer_id, tcp=False)

    async def _open_stream(self, peer_id: str, *, tcp: bool) -> trio.abc.Stream:
        conn = self._conn
        if conn is None or not self.registered:
            raise PeerUnavailable(f"not connected to relay {self.host}:{self.port}")
        stream = conn.open_stream()
        ok = False
        try:
            with trio.fail_after(self.open_timeout_s):
                await write_message(stream, p.Open(peer_id, tcp))
                reply = await read_message(stream)
            if isinstance(reply, p.Refuse):
                if tcp and reply.code == p.RefuseCode.TCP_FAILED:
                    raise _LaneFailed(f"no TCP lane to {peer_id}: {reply.reason}")
                raise PeerUnavailable(f"relay refused a stream to {peer_id}: {reply.code} ({reply.reason})")
            if not isinstance(reply, p.Accept) or (reply.ticket and not tcp):
                raise RemoteProtocolError(f"relay answered OPEN with {reply!r}")
            if reply.ticket:
                lane = await self._dial_lane(reply.ticket)
                ok = True
                await stream.aclose()
                self.lane_streams += 1
                return lane
            ok = True
            return stream
        except trio.TooSlowError as exc:
            raise PeerUnavailable(f"no answer from the relay for a stream to {peer_id}") from exc
        finally:
            if not ok:
                stream.abort()


def _first_leaf(group: BaseException) -> BaseException:
    while isinstance(group, BaseExceptionGroup) and group.exceptions:
        group = group.exceptions[0]
    return group
