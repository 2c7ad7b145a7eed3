"""QUIC over UDP sockets: `QuicServer` demultiplexes one socket's datagrams to its connections, `connect_quic`
gives a client connection its own socket. Sockets are udp.py's `DatagramSocket`: a burst of datagrams per
wake-up in, a connection's queued datagrams in one batch out.

The server routes datagrams by destination connection id (every id a connection issued), feeds a new
connection its first datagram before its task starts, answers unknown versions with version negotiation,
and drops handshakes that do not finish in time. Each connection is a `QuicConn` (quic.py) in its own task.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio
from aioquic.buffer import Buffer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.packet import QuicPacketType, encode_quic_version_negotiation, pull_quic_header

from eldric_p2p.errors import PeerUnavailable
from eldric_p2p.net.relay.channels import is_channel_datagram
from eldric_p2p.net.relay.quic import FlowControlledQuicConnection, NetworkAddress, QuicConn
from eldric_p2p.net.relay.quic_config import DEFAULT_STREAM_WINDOW
from eldric_p2p.net.relay.udp import DatagramSocket
from eldric_p2p.tasks import open_nursery

# ---------------------------------------------------------------------------------------------- server


@dataclass
class ServerStats:
    garbage: int = 0  # datagrams that are not QUIC
    unroutable: int = 0  # short-header datagrams for no known connection
    refused: int = 0  # new connections over a limit
    version_negotiations: int = 0
    half_open_dropped: int = 0  # handshakes that did not finish in time
    connections: int = 0


class QuicServer:
    """Accepts QUIC connections on one UDP socket and runs `handler(conn)` for each completed handshake."""

    def __init__(
        self,
        sock: DatagramSocket,
        configuration: QuicConfiguration,
        handler: Callable[[QuicConn], Awaitable[None]],
        *,
        max_connections: int = 1024,
        max_half_open: int = 128,
        handshake_timeout: float = 10.0,
        send_window: int = DEFAULT_STREAM_WINDOW,
        max_pending_streams: int = 16,
    ) -> None:
        self.sock = sock
        self.configuration = configuration
        self.handler = handler
        self.max_connections = max_connections
        self.max_half_open = max_half_open
        self.handshake_timeout = handshake_timeout
        self.send_window = send_window
        self.max_pending_streams = max_pending_streams
        self.stats = ServerStats()
        # a relay's channels (channels.py): a channel datagram in -> the datagram to send on, or None
        self.forward: Callable[[bytes, NetworkAddress], tuple[bytes, NetworkAddress] | None] | None = None
        self._routes: dict[bytes, QuicConn] = {}
        self._conns: set[QuicConn] = set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with open_nursery() as nursery:
            task_status.started()
            while True:
                onward: list[tuple[bytes, NetworkAddress]] = []
                for data, addr in await self.sock.receive_batch():
                    if self.forward is not None and is_channel_datagram(data):
                        if (out := self.forward(data, addr)) is not None:
                            onward.append(out)
                    else:
                        self._route(data, addr, nursery)
                if onward:  # a burst through one channel leaves as one GSO send
                    await self.sock.send_batch(onward)

    def _route(self, data: bytes, addr: NetworkAddress, nursery: trio.Nursery) -> None:
        try:
            header = pull_quic_header(
                Buffer(data=data), host_cid_length=self.configuration.connection_id_length
            )
        except ValueError:
            self.stats.garbage += 1
            return
        conn = self._routes.get(header.destination_cid)
        if conn is not None:
            conn.feed_datagram(data, addr)
            return
        if header.packet_type != QuicPacketType.INITIAL or len(data) < 1200:
            self.stats.unroutable += 1
            return
        if header.version not in self.configuration.supported_versions:
            self.stats.version_negotiations += 1
            nursery.start_soon(
                self._send_quietly,
                encode_quic_version_negotiation(
                    source_cid=header.destination_cid,
                    destination_cid=header.source_cid,
                    supported_versions=self.configuration.supported_versions,
                ),
                addr,
            )
            return
        half_open = sum(1 for c in self._conns if not c.handshake_done)
        if len(self._conns) >= self.max_connections or half_open >= self.max_half_open:
            self.stats.refused += 1
            return
        quic = FlowControlledQuicConnection(
            configuration=self.configuration, original_destination_connection_id=header.destination_cid
        )
        cids: set[bytes] = set()

        def on_cid(cid: bytes, issued: bool) -> None:
            if issued:
                cids.add(cid)
                self._routes[cid] = conn
            else:
                cids.discard(cid)
                self._routes.pop(cid, None)

        conn = QuicConn(
            quic,
            self._send_quietly,
            send_window=self.send_window,
            max_pending_streams=self.max_pending_streams,
            on_cid=on_cid,
            send_batch=self.sock.send_batch,
        )
        quic.receive_datagram(data, addr, now=trio.current_time())  # first datagram before the task starts
        on_cid(header.destination_cid, True)
        on_cid(quic.host_cid, True)
        self._conns.add(conn)
        self.stats.connections += 1
        nursery.start_soon(self._serve, conn, cids)

    async def _send_quietly(self, data: bytes, addr: NetworkAddress) -> None:
        await self.sock.send(data, addr)  # what the network refuses is dropped, like a lost datagram

    async def _serve(self, conn: QuicConn, cids: set[bytes]) -> None:
        try:
            async with open_nursery() as nursery:
                await nursery.start(self._drive, conn, nursery.cancel_scope)
                with trio.move_on_after(self.handshake_timeout):
                    await conn.wait_handshake()
                if not conn.handshake_done:
                    if conn.alive:
                        self.stats.half_open_dropped += 1
                    nursery.cancel_scope.cancel()
                    return
                try:
                    await self.handler(conn)
                except* (trio.BrokenResourceError, trio.ClosedResourceError, PeerUnavailable):
                    pass  # this connection failed; the server goes on
                finally:
                    conn.close()
        finally:
            self._conns.discard(conn)
            for cid in list(cids):
                if self._routes.get(cid) is conn:
                    del self._routes[cid]

    @staticmethod
    async def _drive(conn: QuicConn, scope: trio.CancelScope, *, task_status: trio.TaskStatus[None]) -> None:
        try:
            await conn.run(task_status=task_status)
        finally:
            scope.cancel()


async def open_udp_socket(host: str, port: int) -> DatagramSocket:
    """A bound UDP socket (IPv4 or IPv6 by `host`)."""
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    if not infos:
        raise PeerUnavailable(f"cannot resolve {host}")
    family, _, _, _, addr = infos[0]
    return DatagramSocket.bind(family, addr)


# ---------------------------------------------------------------------------------------------- client


@asynccontextmanager
async def connect_quic(
    host: str,
    port: int,
    configuration: QuicConfiguration,
    *,
    handshake_timeout: float = 10.0,
    send_window: int = DEFAULT_STREAM_WINDOW,
) -> AsyncIterator[QuicConn]:
    """Connect to a QUIC server; yields a connected `QuicConn` and closes it on exit.

    Raises PeerUnavailable if the host cannot be resolved or the handshake does not finish in time.
    """
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except OSError as exc:
        raise PeerUnavailable(f"cannot resolve {host}: {exc}") from exc
    family, _, _, _, addr = infos[0]
    with DatagramSocket.open(family) as sock:
        quic = FlowControlledQuicConnection(configuration=configuration)
        quic.connect(addr, now=trio.current_time())
        conn = QuicConn(quic, sock.send, send_window=send_window, send_batch=sock.send_batch)

        async def read() -> None:
            while True:
                for data, src in await sock.receive_batch():
                    conn.feed_datagram(data, src)

        async with open_nursery() as nursery:
            nursery.start_soon(read)
            await nursery.start(conn.run)
            with trio.move_on_after(handshake_timeout):
                await conn.wait_handshake()
            if not conn.handshake_done:
                nursery.cancel_scope.cancel()
                raise PeerUnavailable(f"no QUIC handshake with {host}:{port} within {handshake_timeout:g} s")
            try:
                yield conn
            finally:
                conn.close()
                with trio.move_on_after(1.0):
                    await conn.wait_closed()
                nursery.cancel_scope.cancel()
