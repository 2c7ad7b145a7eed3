"""Moving a punched link onto the kernel's TCP: a simultaneous open through both NATs.

A punched link is a stream of a QUIC connection that this process drives in Python: every datagram is
encrypted, acknowledged and parsed by aioquic at both ends, a few hundred microseconds per pipeline frame. A
NAT that a UDP punch got through (endpoint-independent, port-preserving mapping) usually maps TCP the same
way, so once a punched link is up its two ends try to open a TCP connection to each other through it:

    opener -> peer, on the punched link:  "ETCP" | port_a (2 bytes, big endian)
    peer -> opener:                        port_b (2 bytes; 0: declined)
    both:                                  listen on their port and connect from it to the other's public
                                           host : port, both at once (each side's SYN opens its own NAT for
                                           the other's); the first connection that forms is a candidate
    opener:                                the link handshake (TLS client) over the first candidate it has
    peer:                                  the link handshake (TLS server) on every candidate; the one
                                           the opener's handshake arrives on is the link

The other's host is the punched QUIC connection's remote address, never an address the peer names, so a
peer can only have us connect back to itself. Its port is the port it reports, which is its public port only
where its NAT preserves ports. A listener takes a connection from any port of that host: where one side is
public (no NAT) and the other's NAT maps each connection to a port of its own (symmetric), the NATed side's
SYN reaches the public side's listener from a port nobody could predict, and that connection is the link.
Where neither works, or where the NATs do not let TCP through at all, nothing connects within
`TCP_PUNCH_TIMEOUT_S` and the link stays on QUIC (`TcpPunches`: the connector then does not try that peer
again for `TCP_RETRY_FIRST_S`, doubled after each failure in a row up to `TCP_RETRY_S`). The TCP link is
authenticated end to end like any other, and must prove the same peer id as the punched link that asked for
it. Its path stays "punched"; `Connector.stats["tcp_punched"]` counts them. Its connection sends TCP
keepalives every 30 s, so an idle pipeline keeps its NAT mappings.
"""

from __future__ import annotations

import logging
import socket as stdlib_socket
import struct
from collections.abc import Awaitable, Callable

import trio

from eldric_p2p.errors import AuthenticationError, PeerUnavailable
from eldric_p2p.net.identity import Identity
from eldric_p2p.net.links import HANDSHAKE_TIMEOUT_S, Link, keep_alive, link_client, link_server
from eldric_p2p.net.pacing import unpace

log = logging.getLogger(__name__)

TCP_TAG = b"ETCP"
TCP_PUNCH_TIMEOUT_S = 2.5  # for both ends' connections to form (a SYN the other NAT dropped is resent at 1 s)
TCP_RETRY_FIRST_S = 30.0  # after a failed try, links to that peer stay on QUIC this long, doubled after each
TCP_RETRY_S = 600.0  # further failure up to this (a try can fail on a busy machine, not only at the NATs)
RECONNECT_S = 0.2  # between connects from our port while the other side's is not open yet
MAX_TRIES_IN_FLIGHT = 16  # requests served at once; beyond this many they are declined
MAX_CANDIDATES = 8  # connections one try hands on for a handshake; later ones are closed
MAX_TRIES_PER_PEER = 4  # of them from one peer (one peer cannot hold them all)
_PORT = struct.Struct(">H")
_in_flight: dict[str, int] = {}  # peer id -> its requests being served


class TcpPunches:
    """Whom a connector tries a TCP punch to: every peer, except one whose last try failed recently: within
    TCP_RETRY_FIRST_S of a first failure, twice that after a second in a row, and so on up to TCP_RETRY_S
    (`enabled = False`: nobody). A success forgets the failures."""

    def __init__(self) -> None:
        self.enabled = True  # also: answer peers' requests (declined when False)
        self.asked = 0  # requests peers sent us
        self._failed: dict[str, tuple[float, float]] = {}  # peer id -> (when it last failed, wait from then)

    def worth_trying(self, peer_id: str) -> bool:
        last = self._failed.get(peer_id)
        return self.enabled and (last is None or trio.current_time() - last[0] > last[1])

    def failed(self, peer_id: str) -> None:
        if len(self._failed) >= 4096:
            self._failed.clear()
        last = self._failed.get(peer_id)
        wait = TCP_RETRY_FIRST_S if last is None else min(2 * last[1], TCP_RETRY_S)
        self._failed[peer_id] = (trio.current_time(), wait)

    def worked(self, peer_id: str) -> None:
        self._failed.pop(peer_id, None)


def punched_host(link: Link) -> str | None:
    """The public host of the peer at the other end of a punched QUIC link, or None for any other link."""
    stream = link.tls.transport_stream
    addr = getattr(stream, "remote_address", None)  # a QuicStream's; other streams have none
    if getattr(stream, "forwarded", True) or not addr:
        return None
    return str(addr[0])


async def _bound(family: int, port: int) -> trio.socket.SocketType:
    """A TCP socket bound to `port` (0: any) that shares it with our other sockets on that port."""
    sock = trio.socket.socket(family, stdlib_socket.SOCK_STREAM)
    try:
        sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_REUSEADDR, 1)
        sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_REUSEPORT, 1)
        await sock.bind(("::" if family == stdlib_socket.AF_INET6 else "0.0.0.0", port))
    except OSError:
        sock.close()
        raise
    unpace(sock)
    return sock


async def _candidates(
    listener: trio.socket.SocketType, host: str, port: int, found: Callable[[trio.SocketStream], None]
) -> None:
    """Accept on `listener` and connect from its port to `host:port` (again after a refusal: the other side's
    port was not open yet) until cancelled, handing every connection with `host` (any port: a symmetric NAT
    picks its own) to `found`, at most MAX_CANDIDATES of them."""
    local_port = listener.getsockname()[1]
    taken = 0

    def take(sock: trio.socket.SocketType) -> None:
        nonlocal taken
        taken += 1
        stream = trio.SocketStream(sock)
        keep_alive(stream)  # through NATs: an idle link must keep its mappings
        found(stream)

    async def accept() -> None:
        while True:
            sock, addr = await listener.accept()
            if addr[0] == host and taken < MAX_CANDIDATES:
                take(sock)
            else:
                sock.close()  # anyone else knocking on the port

    async def connect() -> None:
        while not taken:
            sock = await _bound(listener.family, local_port)
            try:
                await sock.connect((host, port))
            except OSError:  # refused or reset (nothing there yet), or the address is taken by an accept
                sock.close()
                await trio.sleep(RECONNECT_S)
                continue
            take(sock)
            return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept)
        nursery.start_soon(connect)


async def _listener(host: str) -> trio.socket.SocketType:
    sock = await _bound(stdlib_socket.AF_INET6 if ":" in host else stdlib_socket.AF_INET, 0)
    sock.listen(4)
    return sock


async def _receive_exactly(link: Link, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        data = await link.receive_some(n - len(out))
        if not data:
            raise PeerUnavailable("the punched link closed during the TCP punch")
        out += data
    return bytes(out)


async def upgrade(
    link: Link,
    identity: Identity,
    *,
    timeout: float | None = None,
    handshake_timeout: float = HANDSHAKE_TIMEOUT_S,
) -> Link | None:
    """The opener's side: a TCP link to `link`'s peer, or None where none formed within `timeout` s (default
    TCP_PUNCH_TIMEOUT_S). Either way `link` (a fresh punched link, nothing sent on it yet) is closed: it
    carried the request."""
    timeout = TCP_PUNCH_TIMEOUT_S if timeout is None else timeout
    host = punched_host(link)
    listener: trio.socket.SocketType | None = None
    try:
        if host is None:
            return None
        listener = await _listener(host)
        with trio.fail_after(timeout):
            await link.send_all(TCP_TAG + _PORT.pack(listener.getsockname()[1]))
            (port,) = _PORT.unpack(await _receive_exactly(link, 2))
            if port == 0:
                return None
            got: list[trio.SocketStream] = []
            formed = trio.Event()

            def found(stream: trio.SocketStream) -> None:
                got.append(stream)
                formed.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(_candidates, listener, host, port, found)
                await formed.wait()
                nursery.cancel_scope.cancel()
        for extra in got[1:]:
            await trio.aclose_forcefully(extra)
        return await link_client(
            got[0], identity, link.peer_id, path="punched", handshake_timeout=handshake_timeout
        )
    except (OSError, trio.TooSlowError, trio.BrokenResourceError, PeerUnavailable, AuthenticationError) as e:
        log.info("no TCP path to %s through the NATs: %s", link.peer_id, e or type(e).__name__)
        return None
    finally:
        if listener is not None:
            listener.close()
        await trio.aclose_forcefully(link)


async def accept_upgrade(
    link: Link,
    identity: Identity,
    dispatch: Callable[[Link], Awaitable[None]],
    *,
    allow: bool = True,
    timeout: float | None = None,
    handshake_timeout: float = HANDSHAKE_TIMEOUT_S,
) -> None:
    """The peer's side, after `dispatch` read TCP_TAG from `link`: answer, take the TCP link the opener's
    handshake arrives on, close `link`, and `dispatch` the TCP link. Declines (port 0) when not `allow`ed,
    and a link that was not punched, a guest's, a request without its port within `timeout` s (default
    TCP_PUNCH_TIMEOUT_S), and requests beyond MAX_TRIES_IN_FLIGHT (MAX_TRIES_PER_PEER from one peer) at
    once."""
    timeout = TCP_PUNCH_TIMEOUT_S if timeout is None else timeout
    port = 0
    with trio.move_on_after(timeout):
        (port,) = _PORT.unpack(await _receive_exactly(link, 2))
    host = punched_host(link)
    busy = sum(_in_flight.values()) >= MAX_TRIES_IN_FLIGHT
    busy = busy or _in_flight.get(link.peer_id, 0) >= MAX_TRIES_PER_PEER
    if not allow or host is None or link.guest or not port or busy:
        await link.send_all(_PORT.pack(0))
        return
    _in_flight[link.peer_id] = _in_flight.get(link.peer_id, 0) + 1
    listener: trio.socket.SocketType | None = None
    won: list[Link] = []
    try:
        listener = await _listener(host)
        await link.send_all(_PORT.pack(listener.getsockname()[1]))
        with trio.move_on_after(timeout + handshake_timeout):
            async with trio.open_nursery() as nursery:

                async def handshake(stream: trio.SocketStream) -> None:
                    try:
                        tcp = await link_server(stream, identity, path="punched", handshake_timeout=timeout)
                    except (AuthenticationError, PeerUnavailable):
                        return  # a candidate the opener did not pick (it closes those), or a stranger
                    if tcp.peer_id != link.peer_id or won:
                        await trio.aclose_forcefully(tcp)
                        return
                    won.append(tcp)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(
                    _candidates, listener, host, port, lambda s: nursery.start_soon(handshake, s)
                )
    except OSError as exc:
        log.info("no TCP path from %s through the NATs: %s", link.peer_id, exc)
    finally:
        if (left := _in_flight.pop(link.peer_id) - 1) > 0:
            _in_flight[link.peer_id] = left
        if listener is not None:
            listener.close()
    if not won:
        return
    await trio.aclose_forcefully(link)
    try:
        await dispatch(won[0])
    finally:
        await trio.aclose_forcefully(won[0])
