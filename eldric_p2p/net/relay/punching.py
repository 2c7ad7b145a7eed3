"""A member's side of hole punching, on trio: runs punch attempts (punch.py's `PunchAttempt`) on its shared
`UdpEndpoint` and keeps the direct QUIC connections they produce, one per peer.

    puncher = Puncher(identity, endpoint, handler)          # handler(stream, peer_id): incoming streams
    await nursery.start(puncher.run)
    puncher.on_go(go); puncher.on_fail(fail)                # PUNCH_GO / PUNCH_FAIL from the relay
    conn = await puncher.punch(peer_id, send_punch_request) # a QuicConn to the peer, or PeerUnavailable

A PUNCH_GO starts an attempt whether we asked or the peer did (it arrives for both). The member whose peer
id sorts first connects as QUIC client to the confirmed address; the other accepts a QUIC Initial only
from an address that sent it a valid probe while the attempt runs. Everything is bounded: at most
`MAX_ATTEMPTS` attempts at once (more PUNCH_GOs are dropped and counted), `max_conns` punched connections,
each attempt `timeout` seconds from its PUNCH_GO, probes as punch.py bounds them.

A punched connection lives while it carries streams; it sends a QUIC PING every `keepalive_s` (NAT
bindings for UDP expire after 30-120 s of silence) and closes after `idle_s` without a stream. Streams on
it are opaque bytes like relayed ones: the connector runs the link handshake over them (`path="punched"`).

When no probe gets through and the PUNCH_GO carried a channel (channels.py), the same two roles run the QUIC
connection through the relay's forwarding channel instead, within `channel_timeout`: relayed, but one QUIC
hop end to end with the relay passing datagrams unopened (`QuicConn.forwarded`; links on it report
`path="relayed"`). It is kept and reused like a punched one.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.packet import QuicHeader

from eldric_p2p.errors import EldricError, PeerUnavailable, RemoteProtocolError
from eldric_p2p.net.identity import Identity
from eldric_p2p.net.relay.channels import CHANNEL_HEADER
from eldric_p2p.net.relay.endpoint import UdpEndpoint
from eldric_p2p.net.relay.fields import parse_address_untrusted
from eldric_p2p.net.relay.protocol import PunchFail, PunchGo
from eldric_p2p.net.relay.punch import PUNCH_TIMEOUT_S, PunchAttempt, parse_probe_untrusted
from eldric_p2p.net.relay.quic import FlowControlledQuicConnection, NetworkAddress, QuicConn, QuicStream
from eldric_p2p.net.relay.quic_config import client_configuration, server_configuration
from eldric_p2p.tasks import open_nursery

log = logging.getLogger(__name__)

ALPN = "eldric-punch/1"
MAX_ATTEMPTS = 8
FAILED_S = 60.0  # after a failed attempt (ours or the peer's) we do not ask to punch to that peer again
MAX_FAILED = 256
KEEPALIVE_S = 10.0
IDLE_S = 120.0
CHANNEL_TIMEOUT_S = 3.0  # after a failed punch: the QUIC handshake through the relay's channel

StreamHandler = Callable[[QuicStream, str], Awaitable[None]]


@dataclass
class PunchStats:
    attempts: int = 0
    punched: int = 0  # attempts that ended in a QUIC connection
    forwarded: int = 0  # attempts whose punch failed and whose connection runs through a relay channel
    failed: int = 0
    dropped_go: int = 0  # PUNCH_GO beyond MAX_ATTEMPTS
    bad_probes: int = 0  # malformed, bad MAC, reflected
    stray_probes: int = 0  # for no attempt in progress
    last_punch_s: float | None = None  # PUNCH_GO to QUIC handshake done, the last success
    times_s: list[float] = field(default_factory=list)  # the last 32 successes


@dataclass(eq=False)
class _Attempt:
    attempt: PunchAttempt
    received: float  # when its PUNCH_GO arrived
    go_channel: bytes = b""  # our channel id from the PUNCH_GO (b"": no channel)
    wake: trio.Event = field(default_factory=trio.Event)
    confirmed: trio.Event = field(default_factory=trio.Event)
    accepted: trio.Event = field(default_factory=trio.Event)
    conn: QuicConn | None = None  # the connection being set up (a server's is made by `_on_initial`)
    channel_conn: QuicConn | None = None  # a server's connection through the channel (`_on_channel_initial`)
    channel_accepted: trio.Event = field(default_factory=trio.Event)


@dataclass(eq=False)
class _Waiter:
    done: trio.Event = field(default_factory=trio.Event)
    conn: QuicConn | None = None
    error: str = ""


class Puncher:
    """Punched connections of one member (one endpoint, one relay). Start `run` before feeding PUNCH_GOs."""

    def __init__(
        self,
        identity: Identity,
        endpoint: UdpEndpoint,
        handler: StreamHandler,
        *,
        timeout: float = PUNCH_TIMEOUT_S,
        keepalive_s: float = KEEPALIVE_S,
        idle_s: float = IDLE_S,
        max_conns: int = 64,
        stream_window: int = 128 * 1024,
        max_datagram_size: int = 1350,
        channel_timeout: float = CHANNEL_TIMEOUT_S,
    ) -> None:
        self.identity = identity
        self.endpoint = endpoint
        self.handler = handler
        self.timeout = timeout
        self.keepalive_s = keepalive_s
        self.idle_s = idle_s
        self.max_conns = max_conns
        self.stream_window = stream_window
        self.max_datagram_size = max_datagram_size
        self.channel_timeout = channel_timeout
        self.relay_address: NetworkAddress | None = None  # where our relay connection goes: channels' relay
        self.stats = PunchStats()
        self.conns: dict[str, QuicConn] = {}  # peer id -> live punched connection
        self._attempts: dict[bytes, _Attempt] = {}  # attempt id -> attempt
        self._waiters: dict[str, _Waiter] = {}
        self._failed: dict[str, float] = {}  # peer id -> when an attempt with it last failed
        self._go_send, self._go_recv = trio.open_memory_channel[PunchGo](MAX_ATTEMPTS)
        self._server_configs: dict[int, QuicConfiguration] = {}  # by datagram size: one certificate each
        endpoint.on_probe = self._on_probe
        endpoint.on_initial = self._on_initial
        endpoint.on_channel_initial = self._on_channel_initial

    # ------------------------------------------------------------------------------------------ interface

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run every attempt and punched connection until cancelled."""
        async with open_nursery() as nursery:
            task_status.started()
            async for go in self._go_recv:
                nursery.start_soon(self._attempt, go, trio.current_time())

    def on_go(self, go: PunchGo) -> None:
        """A PUNCH_GO from the relay: start probing (a repeat of one in progress is ignored)."""
        if any(a.attempt.token == go.token for a in self._attempts.values()):
            return
        if len(self.conns) >= self.max_conns and go.peer not in self.conns:
            self.stats.dropped_go += 1
            return
        try:
            self._go_send.send_nowait(go)
        except trio.WouldBlock:
            self.stats.dropped_go += 1

    def on_fail(self, fail: PunchFail) -> None:
        """A PUNCH_FAIL: whoever waits for that peer gives up now."""
        self._resolve(fail.target, None, f"relay refused a punch: {fail.code} ({fail.reason})")

    def live(self, peer_id: str) -> QuicConn | None:
        conn = self.conns.get(peer_id)
        return conn if conn is not None and conn.alive else None

    async def punch(self, peer_id: str, request: Callable[[], Awaitable[None]]) -> QuicConn:
        """A punched connection to `peer_id`: the live one, or a new one (`request()` sends our PUNCH).

        Raises PeerUnavailable when the relay refuses or no direct path works within `timeout`.
        """
        conn = self.live(peer_id)
        if conn is not None:
            return conn
        failed = self._failed.get(peer_id)
        if failed is not None and trio.current_time() - failed < FAILED_S:
            ago = trio.current_time() - failed
            raise PeerUnavailable(f"no punched path to {peer_id}: an attempt failed {ago:.0f} s ago")
        waiter = self._waiters.get(peer_id)
        if waiter is None:
            waiter = self._waiters[peer_id] = _Waiter()
            if not any(a.attempt.peer_id == peer_id for a in self._attempts.values()):
                try:
                    await request()
                except BaseException:
                    self._waiters.pop(peer_id, None)
                    raise
        # + the relay's round trip for PUNCH_GO, + the channel's handshake where a punch may fall back to one
        fallback = self.channel_timeout if self.relay_address is not None else 0.0
        with trio.move_on_after(self.timeout + 0.5 + fallback):
            await waiter.done.wait()
        if self._waiters.get(peer_id) is waiter and not waiter.done.is_set():
            del self._waiters[peer_id]
        if waiter.conn is not None and waiter.conn.alive:
            return waiter.conn
        raise PeerUnavailable(f"no punched path to {peer_id}: {waiter.error or 'timed out'}")

    # ------------------------------------------------------------------------------------------ attempts

    def _resolve(self, peer_id: str, conn: QuicConn | None, error: str = "") -> None:
        waiter = self._waiters.pop(peer_id, None)
        if waiter is not None:
            waiter.conn, waiter.error = conn, error
            waiter.done.set()

    async def _attempt(self, go: PunchGo, received: float) -> None:
        candidates = [parse_address_untrusted(a) for a in go.addrs]  # checked when the message was parsed
        attempt = PunchAttempt(
            self.identity.peer_id, go.peer, go.token, candidates,
            now=received, delay=go.delay_ms / 1000, timeout=self.timeout,
        )  # fmt: skip
        ctl = _Attempt(attempt, received, go.channel)
        self._attempts[attempt.attempt_id] = ctl
        self.stats.attempts += 1
        conn: QuicConn | None = None
        relay = self.relay_address if go.channel else None
        if relay is not None:  # a peer that gives up on probes first may send its channel Initial early
            self.endpoint.open_channel(go.channel, relay)
        try:
            async with open_nursery() as nursery:  # holds the connection's driver for its whole life
                try:
                    with trio.move_on_at(attempt.deadline):
                        conn = await self._establish(ctl, nursery)
                    if conn is None and ctl.conn is not None:  # a handshake that did not finish in time
                        ctl.conn.close()
                        self.endpoint.detach(ctl.conn)
                    if conn is None and relay is not None:
                        conn = await self._over_channel(ctl, go.channel, relay, nursery)
                finally:
                    del self._attempts[attempt.attempt_id]
                if conn is None:
                    self.stats.failed += 1
                    if len(self._failed) >= MAX_FAILED:
                        del self._failed[next(iter(self._failed))]  # the oldest
                    self._failed.pop(go.peer, None)
                    self._failed[go.peer] = trio.current_time()
                    why = "no probe got through" if attempt.confirmed is None and not attempt.heard else (
                        "no QUIC handshake over the punched path"
                    )
                    log.info("punch to %s failed: %s (%d probes sent, %d heard)", go.peer, why,
                             attempt.probes_sent, attempt.probes_received)  # fmt: skip
                    self._resolve(go.peer, None, why)
                    nursery.cancel_scope.cancel()
                    return
                took = trio.current_time() - received
                role = "client" if attempt.is_client else "server"
                if conn.forwarded:  # the punch failed: no new attempt with this peer for a while
                    self.stats.forwarded += 1
                    self._failed.pop(go.peer, None)
                    self._failed[go.peer] = trio.current_time()
                    log.info("no punched path to %s; QUIC through the relay's channel in %.0f ms (%s)",
                             go.peer, took * 1000, role)  # fmt: skip
                else:
                    self.stats.punched += 1
                    self._failed.pop(go.peer, None)
                    self.stats.last_punch_s = took
                    self.stats.times_s = [*self.stats.times_s[-31:], took]
                    log.info("punched a direct path to %s at %s in %.0f ms (%s)", go.peer,
                             conn.remote_address, took * 1000, role)  # fmt: skip
                old = self.conns.get(go.peer)
                self.conns[go.peer] = conn
                if old is not None and old is not conn:
                    old.close(reason="replaced by a new punch")
                self._resolve(go.peer, conn)
                await self._serve(conn, go.peer)
                nursery.cancel_scope.cancel()
        finally:
            if ctl.channel_conn is not None and ctl.channel_conn is not conn:  # accepted, never used
                ctl.channel_conn.close()
                self.endpoint.detach(ctl.channel_conn)
            if relay is not None:
                self.endpoint.close_channel(go.channel)
            if conn is not None:
                conn.close()
                self.endpoint.detach(conn)
                if self.conns.get(go.peer) is conn:
                    del self.conns[go.peer]

    async def _establish(self, ctl: _Attempt, nursery: trio.Nursery) -> QuicConn | None:
        """Probe until the peer's address is confirmed, then the QUIC handshake; None if it ends first."""
        attempt = ctl.attempt
        async with open_nursery() as probing:
            probing.start_soon(self._probe, ctl)
            if attempt.is_client:
                await ctl.confirmed.wait()
                assert attempt.confirmed is not None
                quic = FlowControlledQuicConnection(configuration=self._configuration(client=True))
                quic.connect(attempt.confirmed, now=trio.current_time())
                ctl.conn = self.endpoint.attach(quic, send_window=self.stream_window)
            else:
                await ctl.accepted.wait()
            conn = ctl.conn
            assert conn is not None
            await nursery.start(conn.run)
            ok = await conn.wait_handshake()  # keeps probing meanwhile: the peer may not be confirmed yet
            probing.cancel_scope.cancel()
        return conn if ok else None

    async def _over_channel(
        self, ctl: _Attempt, channel: bytes, relay: NetworkAddress, nursery: trio.Nursery
    ) -> QuicConn | None:
        """The punch failed: the same roles' QUIC handshake through the relay's channel; None if it fails."""
        conn: QuicConn | None = None
        with trio.move_on_after(self.channel_timeout):
            if ctl.attempt.is_client:
                config = self._configuration(client=True, channel=True)
                quic = FlowControlledQuicConnection(configuration=config)
                quic.connect(relay, now=trio.current_time())
                conn = self.endpoint.attach(quic, send_window=self.stream_window, channel=(channel, relay))
            else:
                await ctl.channel_accepted.wait()
                conn = ctl.channel_conn
            assert conn is not None
            await nursery.start(conn.run)
            if await conn.wait_handshake():
                return conn
        if conn is not None:
            conn.close()
            self.endpoint.detach(conn)
        return None

    async def _probe(self, ctl: _Attempt) -> None:
        attempt = ctl.attempt
        while trio.current_time() < attempt.deadline:
            ctl.wake = trio.Event()  # before sending: a probe that arrives while we send wakes the wait
            for data, addr in attempt.datagrams_to_send(trio.current_time()):
                await self.endpoint.send(data, addr)
            with trio.move_on_at(attempt.get_timer()):
                await ctl.wake.wait()

    def _on_probe(self, data: bytes, addr: NetworkAddress) -> None:
        try:
            probe = parse_probe_untrusted(data)
        except RemoteProtocolError:
            self.stats.bad_probes += 1
            return
        ctl = self._attempts.get(probe.attempt_id)
        if ctl is None:
            self.stats.stray_probes += 1
            return
        try:
            ctl.attempt.receive_probe_untrusted(probe, (addr[0], addr[1]), trio.current_time())
        except RemoteProtocolError:
            self.stats.bad_probes += 1
            return
        ctl.wake.set()
        if ctl.attempt.confirmed is not None:
            ctl.confirmed.set()

    def _on_initial(self, data: bytes, addr: NetworkAddress, header: QuicHeader) -> None:
        """A QUIC Initial for no connection: accepted only from a peer a server-role attempt heard."""
        source = (addr[0], addr[1])
        for ctl in self._attempts.values():
            if not ctl.attempt.is_client and ctl.conn is None and source in ctl.attempt.heard:
                quic = FlowControlledQuicConnection(
                    configuration=self._configuration(client=False),
                    original_destination_connection_id=header.destination_cid,
                )
                quic.receive_datagram(data, addr, now=trio.current_time())  # before the driver starts
                ctl.conn = self.endpoint.attach(
                    quic, extra_cids=(header.destination_cid,), send_window=self.stream_window
                )
                ctl.accepted.set()
                return
        self.endpoint.stats.initials_refused += 1

    def _on_channel_initial(
        self, channel: bytes, data: bytes, addr: NetworkAddress, header: QuicHeader
    ) -> None:
        """A QUIC Initial through the relay's channel: the server side of an attempt whose GO gave it."""
        for ctl in self._attempts.values():
            if not ctl.attempt.is_client and ctl.channel_conn is None and ctl.go_channel == channel:
                quic = FlowControlledQuicConnection(
                    configuration=self._configuration(client=False, channel=True),
                    original_destination_connection_id=header.destination_cid,
                )
                quic.receive_datagram(data, addr, now=trio.current_time())  # before the driver starts
                ctl.channel_conn = self.endpoint.attach(
                    quic, extra_cids=(header.destination_cid,), send_window=self.stream_window,
                    channel=(channel, addr),
                )  # fmt: skip
                ctl.channel_accepted.set()
                return
        self.endpoint.stats.initials_refused += 1

    def _configuration(self, *, client: bool, channel: bool = False) -> QuicConfiguration:
        """QUIC settings of a punched connection (through a channel: room for the channel header)."""
        idle, window = 3 * self.keepalive_s, self.stream_window
        size = self.max_datagram_size - (CHANNEL_HEADER if channel else 0)
        if client:
            config = client_configuration(idle_timeout=idle, max_datagram_size=size, stream_window=window)
        else:
            if size not in self._server_configs:  # one throwaway certificate per member and size
                self._server_configs[size] = server_configuration(
                    idle_timeout=idle, max_datagram_size=size, stream_window=window
                )
            config = self._server_configs[size]
        config.alpn_protocols = [ALPN]
        return config

    # ------------------------------------------------------------------------------------------ connections

    async def _serve(self, conn: QuicConn, peer_id: str) -> None:
        """Hand the peer's streams to the handler, keep the connection alive; returns when it ends."""
        async with open_nursery() as nursery:
            nursery.start_soon(self._keepalive, conn)
            while True:
                try:
                    stream = await conn.accept_stream()
                except PeerUnavailable:
                    break
                nursery.start_soon(self._incoming, stream, peer_id)
            nursery.cancel_scope.cancel()

    async def _keepalive(self, conn: QuicConn) -> None:
        idle_since: float | None = None
        while conn.alive:
            await trio.sleep(self.keepalive_s)
            now = trio.current_time()
            if conn.stream_count:
                idle_since = None
            elif idle_since is None:
                idle_since = now
            elif now - idle_since >= self.idle_s:
                conn.close(reason="idle")
                return
            conn.ping()

    async def _incoming(self, stream: QuicStream, peer_id: str) -> None:
        try:
            await self.handler(stream, peer_id)
        except (EldricError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info("punched stream from %s failed: %s", peer_id, exc)
            stream.abort()
        finally:
            await stream.aclose()
