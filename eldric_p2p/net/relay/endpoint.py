"""A member's UDP socket, shared by its QUIC connection to the relay, punch probes and punched connections.

Hole punching needs the probes and the direct QUIC connection to leave from the very socket the relay saw
(that is the NAT mapping the relay told the peer about), so a member keeps one `UdpEndpoint` for as long as
it runs and demultiplexes what arrives:

- a datagram that starts with the probe magic (punch.py; a QUIC packet never does) goes to `on_probe`;
- a QUIC packet goes to the connection that issued its destination connection id (the relay connection,
  punched connections, client or server alike);
- a QUIC Initial for no known connection goes to `on_initial`, which creates a server connection only for
  an address a punch in progress has heard a valid probe from; anything else is counted and dropped;
- a channel datagram (channels.py: a QUIC packet the relay forwards between two members) is taken only from
  the relay for one of our open channels; its QUIC packet is then routed like any other, a new Initial to
  `on_channel_initial`. `channel_sender` gives a connection on a channel its send functions.

Connections are quic.py's `QuicConn`; `connect` is quic_udp.connect_quic on this shared socket.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio
from aioquic.buffer import Buffer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.packet import QuicHeader, QuicPacketType, pull_quic_header

from eldric_p2p.errors import PeerUnavailable
from eldric_p2p.net.relay.channels import CHANNEL_HEADER, channel_header, is_channel_datagram
from eldric_p2p.net.relay.punch import is_probe
from eldric_p2p.net.relay.quic import FlowControlledQuicConnection, NetworkAddress, QuicConn
from eldric_p2p.net.relay.quic_config import DEFAULT_STREAM_WINDOW
from eldric_p2p.net.relay.udp import DatagramSocket
from eldric_p2p.tasks import open_nursery

CID_LENGTH = 8  # aioquic's default connection_id_length, which every configuration here keeps


@dataclass
class EndpointStats:
    garbage: int = 0  # neither a probe nor QUIC
    channel_dropped: int = 0  # channel datagrams for no channel of ours, or not from its relay
    unroutable: int = 0  # QUIC for no connection of ours
    initials_refused: int = 0  # a QUIC Initial that no punch in progress expects


class UdpEndpoint:
    """One UDP socket and the QUIC connections on it. Start `run`; set `on_probe` / `on_initial` to punch."""

    def __init__(self, sock: DatagramSocket) -> None:
        self.sock = sock
        self.stats = EndpointStats()
        self.on_probe: Callable[[bytes, NetworkAddress], None] | None = None
        self.on_initial: Callable[[bytes, NetworkAddress, QuicHeader], None] | None = None
        self.on_channel_initial: Callable[[bytes, bytes, NetworkAddress, QuicHeader], None] | None = None
        self._channels: dict[bytes, NetworkAddress] = {}  # our channel ids -> the relay that forwards them
        self._routes: dict[bytes, QuicConn] = {}
        self._cids: dict[QuicConn, set[bytes]] = {}

    @classmethod
    async def open(cls, family: int) -> UdpEndpoint:
        """A new endpoint on an ephemeral port of every address of `family` (AF_INET or AF_INET6)."""
        await trio.lowlevel.checkpoint()
        return cls(DatagramSocket.open(family))

    @property
    def port(self) -> int:
        return self.sock.port

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read the socket until cancelled, routing every datagram; the socket is closed on the way out."""
        with self.sock:
            task_status.started()
            while True:
                for data, addr in await self.sock.receive_batch():
                    self._route(data, addr)

    def _route(self, data: bytes, addr: NetworkAddress) -> None:
        if is_probe(data):
            if self.on_probe is not None:
                self.on_probe(data, addr)
            return
        if is_channel_datagram(data):
            self._route_channel(data, addr)
            return
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=CID_LENGTH)
        except ValueError:
            self.stats.garbage += 1
            return
        conn = self._routes.get(header.destination_cid)
        if conn is not None:
            conn.feed_datagram(data, addr)
        elif header.packet_type == QuicPacketType.INITIAL and len(data) >= 1200 and self.on_initial:
            self.on_initial(data, addr, header)
        else:
            self.stats.unroutable += 1

    def _route_channel(self, data: bytes, addr: NetworkAddress) -> None:
        channel = bytes(data[1:CHANNEL_HEADER])
        relay = self._channels.get(channel)
        if relay is None or tuple(relay[:2]) != tuple(addr[:2]):
            self.stats.channel_dropped += 1
            return
        packet = data[CHANNEL_HEADER:]
        try:
            header = pull_quic_header(Buffer(data=packet), host_cid_length=CID_LENGTH)
        except ValueError:
            self.stats.garbage += 1
            return
        conn = self._routes.get(header.destination_cid)
        if conn is not None:
            conn.feed_datagram(packet, addr)
        elif header.packet_type == QuicPacketType.INITIAL and len(packet) >= 1200 and self.on_channel_initial:
            self.on_channel_initial(channel, packet, addr, header)
        else:
            self.stats.unroutable += 1

    def open_channel(self, channel: bytes, relay: NetworkAddress) -> None:
        """Take channel datagrams with our id `channel` from `relay` (until `close_channel`)."""
        self._channels[channel] = relay

    def close_channel(self, channel: bytes) -> None:
        self._channels.pop(channel, None)

    def channel_sender(self, channel: bytes, relay: NetworkAddress) -> tuple[
        Callable[[bytes, NetworkAddress], Awaitable[None]],
        Callable[[list[tuple[bytes, NetworkAddress]]], Awaitable[None]],
    ]:  # fmt: skip
        """(send, send_batch) for a connection on `channel`: each datagram goes to the relay behind our id."""
        head = channel_header(channel)

        async def send(data: bytes, _addr: NetworkAddress) -> None:
            await self.sock.send(head + data, relay)

        async def send_batch(datagrams: list[tuple[bytes, NetworkAddress]]) -> None:
            await self.sock.send_batch([(head + data, relay) for data, _ in datagrams])

        return send, send_batch

    async def send(self, data: bytes, addr: NetworkAddress) -> None:
        """Send one datagram; an unreachable address is not an error for UDP (it shows up as silence)."""
        await self.sock.send(data, addr)

    # ------------------------------------------------------------------------------------------ connections

    def attach(
        self,
        quic: FlowControlledQuicConnection,
        *,
        extra_cids: tuple[bytes, ...] = (),
        send_window: int = DEFAULT_STREAM_WINDOW,
        max_pending_streams: int = 16,
        channel: tuple[bytes, NetworkAddress] | None = None,
    ) -> QuicConn:
        """A `QuicConn` for `quic` on this socket, routed by every connection id it issues (and `extra_cids`:
        a server's original destination id). Run it, then `detach` it when it has ended. `channel` (our
        channel id, the relay): its datagrams go through that relay's forwarding channel."""
        cids: set[bytes] = set()

        def on_cid(cid: bytes, issued: bool) -> None:
            if issued:
                cids.add(cid)
                self._routes[cid] = conn
            else:
                cids.discard(cid)
                if self._routes.get(cid) is conn:
                    del self._routes[cid]

        send, send_batch = self.channel_sender(*channel) if channel else (self.send, self.sock.send_batch)
        conn = QuicConn(
            quic,
            send,
            send_window=send_window,
            max_pending_streams=max_pending_streams,
            on_cid=on_cid,
            send_batch=send_batch,
        )
        conn.forwarded = channel is not None
        self._cids[conn] = cids
        for cid in (*extra_cids, quic.host_cid):
            on_cid(cid, True)
        return conn

    def detach(self, conn: QuicConn) -> None:
        for cid in self._cids.pop(conn, set()):
            if self._routes.get(cid) is conn:
                del self._routes[cid]

    @property
    def connections(self) -> int:
        return len(self._cids)

    @asynccontextmanager
    async def connect(
        self,
        addr: NetworkAddress,
        configuration: QuicConfiguration,
        *,
        handshake_timeout: float = 10.0,
        send_window: int = DEFAULT_STREAM_WINDOW,
    ) -> AsyncIterator[QuicConn]:
        """A client connection to `addr` from this socket; yields it connected and closes it on exit.

        Raises PeerUnavailable if the handshake does not finish within `handshake_timeout`.
        """
        quic = FlowControlledQuicConnection(configuration=configuration)
        quic.connect(addr, now=trio.current_time())
        conn = self.attach(quic, send_window=send_window)
        try:
            async with open_nursery() as nursery:
                await nursery.start(conn.run)
                with trio.move_on_after(handshake_timeout):
                    await conn.wait_handshake()
                if not conn.handshake_done:
                    nursery.cancel_scope.cancel()
                    raise PeerUnavailable(f"no QUIC handshake with {addr} within {handshake_timeout:g} s")
                try:
                    yield conn
                finally:
                    conn.close()
                    with trio.move_on_after(1.0):
                        await conn.wait_closed()
                    nursery.cancel_scope.cancel()
        finally:
            self.detach(conn)


async def resolve_udp(host: str, port: int) -> tuple[int, NetworkAddress]:
    """(address family, socket address) of `host:port`. Raises PeerUnavailable if it cannot be resolved."""
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except OSError as exc:
        raise PeerUnavailable(f"cannot resolve {host}: {exc}") from exc
    if not infos:
        raise PeerUnavailable(f"cannot resolve {host}")
    family, _, _, _, addr = infos[0]
    return int(family), addr


def local_address(family: int, toward: NetworkAddress, port: int) -> tuple[str, int] | None:
    """The address this host uses to reach `toward`, with `port`: what a peer behind the same NAT would
    probe. Sends nothing (a connected UDP socket only picks a route); None if there is no route."""
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(toward)
            host = probe.getsockname()[0]
        except OSError:
            return None
    return (str(host), port)
