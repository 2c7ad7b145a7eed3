"""Reassembling relay messages (protocol.py) from the bytes of a stream, sans-IO."""

from __future__ import annotations

from eldric_p2p.errors import RemoteProtocolError
from eldric_p2p.net.relay.protocol import (
    DIRECTORY_TYPES,
    HEADER,
    MAX_MESSAGE,
    Message,
    parse_message_untrusted,
)


def drain(buf: bytearray) -> bytes:
    """What `buf` held; `buf` is left empty."""
    data = bytes(buf)
    buf.clear()
    return data


class MessageReader:
    """Reassembles length-prefixed messages from a byte stream.

    `feed(data)` returns the complete messages so far; `rest()` hands back bytes after the last message (the
    start of a spliced stream). Raises RemoteProtocolError on an oversized or malformed message.
    """

    def __init__(self, max_message: int = MAX_MESSAGE, max_directory: int | None = None) -> None:
        self._buf = bytearray()
        self._max = max_message
        self._max_directory = max_directory or max_message

    def feed(self, data: bytes, *, limit: int | None = None) -> list[Message]:
        self._buf += data
        out: list[Message] = []
        while limit is None or len(out) < limit:
            if len(self._buf) < HEADER.size:
                break
            length, mtype = HEADER.unpack_from(self._buf)
            max_len = self._max_directory if mtype in DIRECTORY_TYPES else self._max
            if length > max_len:
                raise RemoteProtocolError(f"relay message of {length} bytes (type {mtype}), limit {max_len}")
            if len(self._buf) < HEADER.size + length:
                break
            body = bytes(self._buf[HEADER.size : HEADER.size + length])
            del self._buf[: HEADER.size + length]
            out.append(parse_message_untrusted(mtype, body))
        return out

    def rest(self) -> bytes:
        return drain(self._buf)

    @property
    def buffered(self) -> int:
        return len(self._buf)
