"""The relay's TCP lane: two members' outbound TCP connections to the relay, paired by tickets and spliced.

A relayed QUIC stream costs each end a user-space QUIC stack per 1350-byte datagram (aioquic: tens of
microseconds of Python each), which caps a relayed stream at roughly 10-20 MB/s. The lane moves the bytes
onto the kernel's TCP instead: the members still ask over their authenticated QUIC control connection
(OPEN with `tcp`, protocol.py), the relay answers each side with a single-use ticket, both dial the relay's
TCP port (outbound, so NAT is no obstacle) and send

    MAGIC (4 bytes) | ticket (16 bytes)

and the relay copies bytes between the two connections until either ends: on Linux in the kernel, with
splice(2) in a worker thread per pair (ksplice.py, at most `kernel_threads` at once), else (or beyond that)
in the event loop. What the lane carries is the members' link handshake and then TLS records, end to end,
exactly as on a spliced QUIC stream: the relay sees only ciphertext, and a ticket is worth nothing without
the other member's link identity.

Relay side: `TcpLane.expect` makes a `Pair` of tickets; `TcpLane.handle` is the listener's handler. Bounded:
at most `max_pending` pairs wait for their connections, `max_unpaired` connections may be reading their
ticket at once (each for at most `ticket_timeout_s`), and a splice holds at most `chunk` bytes per
direction. Member side: `dial`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import trio

from eldric_p2p.net.links import keep_alive, open_link_stream
from eldric_p2p.net.relay import ksplice
from eldric_p2p.net.relay.protocol import TICKET_LEN
from eldric_p2p.tasks import open_nursery

log = logging.getLogger(__name__)

MAGIC = b"ETL1"
KEEPALIVE_S = 30  # TCP keepalive idle time and interval on a member's lane connection


@dataclass(frozen=True)
class TcpLaneLimits:
    max_pending: int = 256  # pairs whose tickets are out and not both used
    max_unpaired: int = 256  # connections reading their ticket or waiting for the other side
    ticket_timeout_s: float = 5.0  # to send MAGIC + ticket after connecting
    chunk: int = 64 * 1024  # bytes read per receive, per direction
    kernel_threads: int = 64  # splices copied by the kernel at once, a thread each (0: all in the loop)


@dataclass
class TcpLaneStats:
    spliced: int = 0  # pairs whose both connections arrived
    bytes: int = 0  # bytes copied, both directions, finished splices
    bad_ticket: int = 0  # a connection with a wrong magic, unknown or used ticket, or none in time
    refused_busy: int = 0  # connections closed at once: `max_unpaired` reached
    expired: int = 0  # pairs given up on before both connections arrived
    kernel: int = 0  # splices the kernel copies or copied (ksplice.py); the others, the event loop


@dataclass(eq=False)
class Pair:
    """Two tickets for one relayed stream: `tickets[0]` for the opener, `[1]` for the target."""

    tickets: tuple[bytes, bytes]
    streams: list[trio.SocketStream] = field(default_factory=list)
    spliced: bool = False  # both connections arrived and the splice started
    settled: trio.Event = field(default_factory=trio.Event)  # spliced, or cancelled
    done: trio.Event = field(default_factory=trio.Event)  # the splice ended (or the pair was cancelled)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    moved: int = 0


class TcpLane:
    def __init__(self, limits: TcpLaneLimits | None = None) -> None:
        self.limits = limits or TcpLaneLimits()
        self.stats = TcpLaneStats()
        self._tickets: dict[bytes, Pair] = {}
        self._pairs: set[Pair] = set()
        self._unpaired = 0
        self._kernel_splices = 0  # running in a thread each (ksplice.py)

    @property
    def pending(self) -> int:
        return len(self._pairs)

    def expect(self) -> Pair | None:
        """A new pair of tickets, or None when `max_pending` pairs already wait."""
        if len(self._pairs) >= self.limits.max_pending:
            return None
        pair = Pair((os.urandom(TICKET_LEN), os.urandom(TICKET_LEN)))
        self._pairs.add(pair)
        for t in pair.tickets:
            self._tickets[t] = pair
        return pair

    def cancel(self, pair: Pair) -> None:
        """Give up on `pair` (its opener's request ended): forget its tickets and stop its splice."""
        if pair in self._pairs:
            self._pairs.discard(pair)
            if not pair.spliced:
                self.stats.expired += 1
        for t in pair.tickets:
            if self._tickets.get(t) is pair:
                del self._tickets[t]
        pair.scope.cancel()
        pair.settled.set()
        if not pair.spliced:
            pair.done.set()
        # else the splice's task sets `done` once the copy has stopped: until then the waiting side must not
        # close its socket, whose descriptor a kernel-copy thread may still be using (ksplice.py)

    async def handle(self, stream: trio.SocketStream) -> None:
        """The TCP listener's handler: read the ticket, then wait for the other side or splice to it."""
        if self._unpaired >= self.limits.max_unpaired:
            self.stats.refused_busy += 1
            return
        self._unpaired += 1
        try:
            pair = await self._read_ticket(stream)
            if pair is None:
                self.stats.bad_ticket += 1
                return
            pair.streams.append(stream)
            first = len(pair.streams) == 1
            if first:  # wait for the other side (or the pair's end) before it stops counting as unpaired
                await pair.settled.wait()
        finally:
            self._unpaired -= 1
        if first:  # hold the connection until the splice (run by the other side's task) ends
            await pair.done.wait()
            return
        pair.spliced = True
        pair.settled.set()
        self.stats.spliced += 1
        self._pairs.discard(pair)
        try:
            with pair.scope:
                await self._splice(pair, *pair.streams)
        finally:
            self.stats.bytes += pair.moved
            pair.done.set()

    async def _read_ticket(self, stream: trio.SocketStream) -> Pair | None:
        want = len(MAGIC) + TICKET_LEN
        head = b""
        with trio.move_on_after(self.limits.ticket_timeout_s):
            try:
                while len(head) < want:
                    data = await stream.receive_some(want - len(head))
                    if not data:
                        return None
                    head += data
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return None
        if len(head) < want or head[: len(MAGIC)] != MAGIC:
            return None
        return self._tickets.pop(head[len(MAGIC) :], None)  # single use

    async def _splice(self, pair: Pair, a: trio.SocketStream, b: trio.SocketStream) -> None:
        """Copy both ways; an EOF is passed on (half-close), a broken side ends both directions."""
        chunk = self.limits.chunk
        if self._kernel_splices < self.limits.kernel_threads and ksplice.available():
            self._kernel_splices += 1  # counted before the first checkpoint: no race for the last thread
            self.stats.kernel += 1
            try:
                moved = await ksplice.kernel_splice(a, b, chunk=chunk)
            finally:
                self._kernel_splices -= 1
            if moved is not None:
                pair.moved += moved
                return
            self.stats.kernel -= 1  # refused before any byte: the loop copies it

        async def copy(src: trio.SocketStream, dst: trio.SocketStream, scope: trio.CancelScope) -> None:
            try:
                while data := await src.receive_some(chunk):
                    await dst.send_all(data)
                    pair.moved += len(data)
                await dst.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                scope.cancel()

        async with open_nursery() as nursery:
            nursery.start_soon(copy, a, b, nursery.cancel_scope)
            nursery.start_soon(copy, b, a, nursery.cancel_scope)


async def dial(host: str, port: int, ticket: bytes) -> trio.SocketStream:
    """Member side: a TCP connection to the relay's lane, the ticket sent. Raises OSError on failure.

    TCP keepalives every KEEPALIVE_S keep an idle link's NAT mapping (home routers drop silent TCP mappings
    after minutes to hours) and notice a relay that vanished without a FIN."""
    stream = await open_link_stream(host, port)
    keep_alive(stream, KEEPALIVE_S)
    try:
        await stream.send_all(MAGIC + ticket)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        await trio.aclose_forcefully(stream)
        raise OSError(f"the relay's TCP lane closed: {exc}") from exc
    return stream
