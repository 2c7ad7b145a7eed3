"""A thin trio driver for aioquic's sans-IO `QuicConnection` (never its asyncio layer): one connection and its
streams. Sockets are quic_udp.py's, settings and certificates quic_config.py's.

One task owns each connection (`QuicConn.run`): it sends what aioquic has queued first, then sleeps until
aioquic's timer or the next input (a datagram, or a poke from a stream that queued data).

aioquic buffers without bound in both directions, so this module adds its own watermarks:
- send: `QuicStream.send_all` waits while the stream holds more than `send_window` unacknowledged bytes;
- receive: `FlowControlledQuicConnection` grants the peer stream credit as the *application* consumes bytes
  (aioquic grants it as bytes arrive), so a stream never buffers more than `stream_window` unread bytes.

Streams are `trio.abc.HalfCloseableStream`s carrying opaque bytes.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio
from aioquic import tls
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicFrameType

from eldric_p2p.errors import PeerUnavailable
from eldric_p2p.net.relay.quic_config import DEFAULT_STREAM_WINDOW

INBOX_SIZE = 512  # datagrams queued for one connection before we drop (like a full socket buffer)
RECEIVE_CHUNK = 64 * 1024

NetworkAddress = Any


class FlowControlledQuicConnection(QuicConnection):
    """A QuicConnection that grants stream credit as the application consumes bytes, not as they arrive.

    aioquic doubles a stream's MAX_STREAM_DATA whenever half of it has *arrived*, so a fast sender behind a
    slow reader fills memory. This overrides that one decision (the frame written is aioquic's own); the
    override touches aioquic's private `_write_stream_limits`, pinned by the aioquic version in the tests.
    """

    def __init__(self, *, configuration: QuicConfiguration, **kwargs: Any) -> None:
        super().__init__(configuration=configuration, **kwargs)
        self.stream_window = configuration.max_stream_data
        self._consumed: dict[int, int] = {}

    def consume(self, stream_id: int, nbytes: int) -> bool:
        """Record that the application read `nbytes` of a stream; True when new credit is worth sending."""
        total = self._consumed.get(stream_id, 0) + nbytes
        self._consumed[stream_id] = total
        stream = self._streams.get(stream_id)
        return stream is not None and total + self.stream_window - stream.max_stream_data_local >= (
            self.stream_window // 2
        )

    def forget(self, stream_id: int) -> None:
        self._consumed.pop(stream_id, None)

    def ack_now(self, now: float) -> None:
        """Let the next packet carry the pending ACK instead of waiting out the ACK delay: called when data is
        about to go out anyway, so the ACK rides on it rather than costing a packet of its own later."""
        space = self._spaces.get(tls.Epoch.ONE_RTT)
        if space is not None and space.ack_at is not None and space.ack_at > now:
            space.ack_at = now

    def _write_stream_limits(self, builder: Any, space: Any, stream: Any) -> None:
        target = self._consumed.get(stream.stream_id, 0) + self.stream_window
        if stream.max_stream_data_local and target - stream.max_stream_data_local >= self.stream_window // 2:
            stream.max_stream_data_local = target
        if stream.max_stream_data_local_sent != stream.max_stream_data_local:
            buf = builder.start_frame(
                QuicFrameType.MAX_STREAM_DATA,
                capacity=17,
                handler=self._on_max_stream_data_delivery,
                handler_args=(stream,),
            )
            buf.push_uint_var(stream.stream_id)
            buf.push_uint_var(stream.max_stream_data_local)
            stream.max_stream_data_local_sent = stream.max_stream_data_local


def _unacked_bytes(quic: QuicConnection, stream_id: int) -> int:
    """Bytes a stream holds for sending or awaiting acknowledgement (aioquic keeps them in its sender)."""
    stream = quic._streams.get(stream_id)
    if stream is None:
        return 0
    sender = stream.sender
    return int(sender._buffer_stop - sender._buffer_start)


# ---------------------------------------------------------------------------------------------- streams


class QuicStream(trio.abc.HalfCloseableStream):
    """One bidirectional QUIC stream as a trio stream of opaque bytes."""

    def __init__(self, conn: QuicConn, stream_id: int) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self._recv = bytearray()
        self._recv_eof = False
        self._recv_changed = trio.Event()
        self._broken: str | None = None
        self._send_eof = False
        self._closed = False

    @property
    def forwarded(self) -> bool:
        """The stream's connection runs through a relay's forwarding channel (channels.py)."""
        return self._conn.forwarded

    @property
    def remote_address(self) -> NetworkAddress | None:
        """Where the stream's connection sends its datagrams: the peer's public address when punched."""
        return self._conn.remote_address

    # -- called by the driver
    def _feed(self, data: bytes, end_stream: bool) -> None:
        self._recv += data
        self._recv_eof = self._recv_eof or end_stream
        self._recv_changed.set()

    def _break(self, why: str) -> None:
        if self._broken is None:
            self._broken = why
        self._recv_changed.set()

    # -- trio.abc.Stream
    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError("stream is closed")
        while not self._recv and not self._recv_eof:
            if self._broken is not None:
                raise trio.BrokenResourceError(self._broken)
            self._recv_changed = trio.Event()
            await self._recv_changed.wait()
            if self._closed:
                raise trio.ClosedResourceError("stream is closed")
        n = min(len(self._recv), max_bytes or RECEIVE_CHUNK)
        data = bytes(self._recv[:n])
        del self._recv[:n]
        if n:
            self._conn._consumed(self.stream_id, n)
        return data

    async def receive_exactly(self, nbytes: int) -> bytes:
        """Read exactly `nbytes`; raises PeerUnavailable if the stream ends first."""
        out = bytearray()
        while len(out) < nbytes:
            chunk = await self.receive_some(nbytes - len(out))
            if not chunk:
                raise PeerUnavailable(f"stream ended after {len(out)} of {nbytes} bytes")
            out += chunk
        return bytes(out)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        window = self._conn.send_window
        while True:
            self._check_send()
            await self._conn._wait_send_room(self.stream_id, window)
            self._check_send()
            chunk, view = view[:window], view[window:]
            self._conn._send(self.stream_id, bytes(chunk), end_stream=False)
            if not view:
                break
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        self._check_send()
        await self._conn._wait_send_room(self.stream_id, self._conn.send_window)

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise trio.ClosedResourceError("stream is closed")
        if not self._send_eof and self._broken is None:
            self._send_eof = True
            self._conn._send(self.stream_id, b"", end_stream=True)

    async def aclose(self) -> None:
        if not self._closed:
            if self._broken is None and self._conn.alive:
                if not self._send_eof:
                    self._send_eof = True
                    self._conn._send(self.stream_id, b"", end_stream=True)
                if not self._recv_eof:
                    self._conn._stop(self.stream_id)
            self._closed = True
            self._recv_changed.set()
            self._conn._forget(self.stream_id)
        await trio.lowlevel.checkpoint()

    def abort(self) -> None:
        """Reset both directions (the peer sees a broken stream)."""
        if not self._closed and self._broken is None and self._conn.alive:
            self._conn._reset(self.stream_id)
        self._closed = True
        self._recv_changed.set()
        self._conn._forget(self.stream_id)

    def _check_send(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stream is closed")
        if self._send_eof:
            raise trio.ClosedResourceError("send side already closed")
        if self._broken is not None:
            raise trio.BrokenResourceError(self._broken)


# ---------------------------------------------------------------------------------------------- connections


@dataclass
class QuicStats:
    datagrams_dropped: int = 0  # inbox full
    streams_refused: int = 0  # accept queue full


class QuicConn:
    """A QUIC connection driven by one trio task (`run`). Open streams with `open_stream`, take the peer's
    with `accept_stream`; `close()` then wait for `run` to return."""

    def __init__(
        self,
        quic: FlowControlledQuicConnection,
        send_datagram: Callable[[bytes, NetworkAddress], Awaitable[Any]],
        *,
        send_window: int = DEFAULT_STREAM_WINDOW,
        max_pending_streams: int = 16,
        on_cid: Callable[[bytes, bool], None] | None = None,
        send_batch: Callable[[list[tuple[bytes, NetworkAddress]]], Awaitable[Any]] | None = None,
    ) -> None:
        self.quic = quic
        self.send_window = send_window
        self.stats = QuicStats()
        self._send_datagram = send_datagram
        self._send_batch = send_batch  # all of a wake-up's datagrams at once (udp.DatagramSocket.send_batch)
        self._on_cid = on_cid
        self._inbox_send, self._inbox = trio.open_memory_channel[tuple[bytes, NetworkAddress] | None](
            INBOX_SIZE
        )
        self._accept_send, self._accept = trio.open_memory_channel[QuicStream](max_pending_streams)
        self._streams: dict[int, QuicStream] = {}
        self._finished: set[int] = set()
        self._poked = False
        self._acked = trio.Event()
        self._connected = trio.Event()
        self._terminated = trio.Event()
        self.close_reason = ""
        self.handshake_done = False
        self.forwarded = False  # its datagrams go through a relay's forwarding channel (channels.py)
        self._is_client = quic.configuration.is_client

    @property
    def alive(self) -> bool:
        return not self._terminated.is_set()

    @property
    def remote_address(self) -> NetworkAddress | None:
        return self.quic.get_peer_address()

    # -- inputs
    def feed_datagram(self, data: bytes, addr: NetworkAddress) -> None:
        """Queue an inbound datagram for the driver; dropped (and counted) when the inbox is full."""
        try:
            self._inbox_send.send_nowait((data, addr))
        except trio.WouldBlock:
            self.stats.datagrams_dropped += 1
        except trio.ClosedResourceError:
            pass

    def _poke(self) -> None:
        if not self._poked:
            self._poked = True
            try:
                self._inbox_send.send_nowait(None)
            except (trio.WouldBlock, trio.ClosedResourceError):
                pass  # a full inbox wakes the driver anyway

    # -- driver
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Drive the connection until it terminates; every stream is broken afterwards."""
        task_status.started()
        try:
            while True:
                self._process_events()
                poked, self._poked = self._poked, False
                await self._transmit(piggyback=poked)
                if self._terminated.is_set():
                    break
                timer = self.quic.get_timer()
                got: tuple[bytes, NetworkAddress] | None = None
                woke = False
                with trio.move_on_at(timer if timer is not None else math.inf):
                    got = await self._inbox.receive()
                    woke = True
                now = trio.current_time()
                if woke:
                    self._handle(got, now)
                    while True:
                        try:
                            self._handle(self._inbox.receive_nowait(), now)
                        except trio.WouldBlock:
                            break
                if timer is not None and now >= timer:
                    self.quic.handle_timer(now)
        finally:
            self._teardown("connection closed" + (f": {self.close_reason}" if self.close_reason else ""))

    def _handle(self, item: tuple[bytes, NetworkAddress] | None, now: float) -> None:
        if item is not None:
            self.quic.receive_datagram(item[0], item[1], now)
            self._wake_senders()

    async def _transmit(self, *, piggyback: bool = False) -> None:
        now = trio.current_time()
        if piggyback:  # a stream queued data (or credit): its packet carries our pending ACK
            self.quic.ack_now(now)
        datagrams = self.quic.datagrams_to_send(now=now)
        if self._send_batch is not None and datagrams:
            await self._send_batch(datagrams)  # drops what the network refuses, like a lost datagram
            return
        for data, addr in datagrams:
            try:
                await self._send_datagram(data, addr)
            except OSError:
                pass  # an unreachable peer shows up as a QUIC timeout, like a lost datagram

    def _process_events(self) -> None:
        while (event := self.quic.next_event()) is not None:
            if isinstance(event, events.StreamDataReceived):
                stream = self._streams.get(event.stream_id)
                if stream is None:
                    stream = self._new_peer_stream(event.stream_id)
                if stream is not None:
                    stream._feed(event.data, event.end_stream)
            elif isinstance(event, events.StreamReset | events.StopSendingReceived):
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    stream._break(f"peer reset stream {event.stream_id} (code {event.error_code})")
            elif isinstance(event, events.HandshakeCompleted):
                self.handshake_done = True
                self._connected.set()
            elif isinstance(event, events.ConnectionIdIssued) and self._on_cid is not None:
                self._on_cid(event.connection_id, True)
            elif isinstance(event, events.ConnectionIdRetired) and self._on_cid is not None:
                self._on_cid(event.connection_id, False)
            elif isinstance(event, events.ConnectionTerminated):
                self.close_reason = event.reason_phrase or f"error {event.error_code}"
                self._terminated.set()

    def _new_peer_stream(self, stream_id: int) -> QuicStream | None:
        peer_initiated = bool(stream_id & 1) == self._is_client
        if stream_id in self._finished or not peer_initiated or stream_id & 2:
            return None
        stream = QuicStream(self, stream_id)
        try:
            self._accept_send.send_nowait(stream)
        except (trio.WouldBlock, trio.ClosedResourceError):
            self.stats.streams_refused += 1
            self.quic.reset_stream(stream_id, 1)
            self.quic.stop_stream(stream_id, 1)
            self._finished.add(stream_id)
            return None
        self._streams[stream_id] = stream
        return stream

    def _teardown(self, why: str) -> None:
        self._terminated.set()
        self._connected.set()
        self._wake_senders()
        for stream in self._streams.values():
            stream._break(why)
        self._accept_send.close()
        self._inbox_send.close()

    def _wake_senders(self) -> None:
        self._acked.set()
        self._acked = trio.Event()

    # -- used by streams
    async def _wait_send_room(self, stream_id: int, window: int) -> None:
        while self.alive and _unacked_bytes(self.quic, stream_id) >= window:
            await self._acked.wait()
        if not self.alive:
            raise trio.BrokenResourceError(f"connection closed: {self.close_reason}")

    def _send(self, stream_id: int, data: bytes, *, end_stream: bool) -> None:
        try:
            self.quic.send_stream_data(stream_id, data, end_stream=end_stream)
        except (ValueError, AssertionError) as exc:  # aioquic: stream reset or already finished
            raise trio.BrokenResourceError(f"stream {stream_id}: {exc}") from exc
        self._poke()

    def _consumed(self, stream_id: int, nbytes: int) -> None:
        if self.quic.consume(stream_id, nbytes):
            self._poke()

    def _stop(self, stream_id: int) -> None:
        try:
            self.quic.stop_stream(stream_id, 0)
        except (ValueError, AssertionError):
            pass
        self._poke()

    def _reset(self, stream_id: int) -> None:
        try:
            self.quic.reset_stream(stream_id, 1)
            self.quic.stop_stream(stream_id, 1)
        except (ValueError, AssertionError):
            pass
        self._poke()

    def _forget(self, stream_id: int) -> None:
        if self._streams.pop(stream_id, None) is not None:
            self._finished.add(stream_id)
        self.quic.forget(stream_id)

    # -- public
    async def wait_handshake(self) -> bool:
        """Wait until the handshake completes or the connection ends; True if it completed."""
        await self._connected.wait()
        return self.handshake_done

    async def wait_closed(self) -> None:
        await self._terminated.wait()

    def open_stream(self) -> QuicStream:
        """A new bidirectional stream (the peer learns of it with the first bytes sent)."""
        if not self.alive:
            raise PeerUnavailable(f"connection closed: {self.close_reason}")
        stream_id = self.quic.get_next_available_stream_id()
        self.quic.send_stream_data(stream_id, b"")  # takes the id now: a second open_stream gets the next one
        stream = QuicStream(self, stream_id)
        self._streams[stream_id] = stream
        return stream

    async def accept_stream(self) -> QuicStream:
        """The next stream the peer opened; raises PeerUnavailable once the connection is closed."""
        try:
            return await self._accept.receive()
        except trio.EndOfChannel as exc:
            raise PeerUnavailable(f"connection closed: {self.close_reason}") from exc

    def close(self, error_code: int = 0, reason: str = "") -> None:
        """Start closing (CONNECTION_CLOSE); `run` returns once aioquic has finished draining."""
        if self.alive:
            self.close_reason = self.close_reason or reason
            self.quic.close(error_code=error_code, reason_phrase=reason)
            self._poke()

    @property
    def stream_count(self) -> int:
        """Streams open on this connection, ours and the peer's."""
        return len(self._streams)

    def ping(self) -> None:
        """Queue a PING: keeps a NAT binding and the peer's idle timer fresh."""
        if self.alive:
            self.quic.send_ping(0)
            self._poke()
