"""Reading and writing single relay messages on a stream (the I/O glue around `protocol`)."""

from __future__ import annotations

import trio

from eldric_p2p.errors import PeerUnavailable, RemoteProtocolError
from eldric_p2p.net.relay import protocol as p
from eldric_p2p.net.relay.quic import QuicStream
from eldric_p2p.tasks import open_nursery


async def read_message(stream: QuicStream, *, max_size: int = p.MAX_MESSAGE) -> p.Message:
    """Read exactly one message (never a byte more, so spliced bytes after it stay in the stream).

    Raises RemoteProtocolError for a malformed or oversized message, PeerUnavailable if the stream ends.
    """
    try:
        header = await stream.receive_exactly(p.HEADER.size)
        length, mtype = p.HEADER.unpack(header)
        if length > max_size:
            raise RemoteProtocolError(f"relay message of {length} bytes, limit {max_size}")
        body = await stream.receive_exactly(length)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise PeerUnavailable(f"stream closed while reading a relay message: {exc}") from exc
    return p.parse_message_untrusted(mtype, body)


async def write_message(stream: QuicStream, msg: p.Message) -> None:
    """Send one message; raises PeerUnavailable if the stream is gone."""
    try:
        await stream.send_all(p.encode_message(msg))
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise PeerUnavailable(f"stream closed while writing a relay message: {exc}") from exc


async def splice(a: QuicStream, b: QuicStream, chunk: int) -> int:
    """Copy bytes both ways until both directions end; a broken side aborts the other. Returns bytes moved."""
    moved = 0

    async def copy(src: QuicStream, dst: QuicStream) -> None:
        nonlocal moved
        while data := await src.receive_some(chunk):
            await dst.send_all(data)
            moved += len(data)
        await dst.send_eof()

    try:
        async with open_nursery() as nursery:
            nursery.start_soon(copy, a, b)
            nursery.start_soon(copy, b, a)
    except* (trio.BrokenResourceError, trio.ClosedResourceError):
        a.abort()
        b.abort()
    return moved
