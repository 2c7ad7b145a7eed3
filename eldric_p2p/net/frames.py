"""Pipeline frames: sans-IO encoding and decoding of the messages that travel on a link.

A frame is a fixed 56-byte header, an optional JSON object (the extension, for open/close/error messages),
then a raw tensor payload. All integers little-endian:

    off size field
      0    2 magic          b"EF"
      2    1 version        1
      3    1 type           FrameType
      4    2 flags          u16, meaning defined by the pipeline protocol, passed through
      6    1 dtype          DType (0 = no payload)
      7    1 ndim           0..4 (0 exactly when dtype is NONE)
      8    8 session id     u64
     16    4 start          u32, position of the first token
     20    4 n_tokens       u32
     24   16 shape          4 x u32, unused dims 0
     40    4 ext length     u32, bytes of UTF-8 JSON object that follow the header (0 = none)
     44    4 reserved       0
     48    8 payload length u64, == prod(shape) * dtype size
     56      ext, then payload

`FrameDecoder` is fed bytes and returns whole frames (like h11's connection); it never touches a socket.
`send_frame`, `FrameWriter` and `FrameReader` are the thin trio drivers over any `trio.abc.Stream` (a Link).

Backpressure: reading is pull-based. `FrameReader.next()` reads from the link only when asked for a frame
and buffers at most one frame (bounded by `FrameLimits`), so a stage that is slow to consume stops reading;
TLS and TCP flow control then fill the sender's socket buffer and the sender's `send_frame` blocks. No queue
in this module grows without bound. Payload bytes are host (little-endian) order.
"""

from __future__ import annotations

import enum
import json
import math
import struct
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from eldric_p2p.errors import FrameError, LocalProtocolError, PeerUnavailable

if TYPE_CHECKING:
    import torch

assert sys.byteorder == "little", "frame payloads are little-endian host bytes"

MAGIC = b"EF"
VERSION = 1
MAX_NDIM = 4
_HEADER = struct.Struct("<2sBBHBBQII4IIIQ")
HEADER_SIZE = _HEADER.size  # 56
assert HEADER_SIZE == 56


class FrameType(enum.IntEnum):
    OPEN_SESSION = 1  # ext: sampling parameters, stage info
    HIDDEN = 2  # payload: hidden states [n_tokens, hidden], fp16/bf16/fp32
    TOKEN = 3  # payload: sampled token ids [n_tokens] int32, tail -> head
    TRUNCATE = 4  # drop cached positions >= start
    CLOSE_SESSION = 5
    ERROR = 6  # ext: {"message": ..., "stage": ...}
    PING = 7
    PONG = 8


class DType(enum.IntEnum):
    NONE = 0
    F16 = 1
    BF16 = 2
    F32 = 3
    I32 = 4


DTYPE_SIZE = {DType.NONE: 0, DType.F16: 2, DType.BF16: 2, DType.F32: 4, DType.I32: 4}
_FLOATS = frozenset({DType.F16, DType.BF16, DType.F32})
# type -> (allowed dtypes, required ndim or None); control frames carry no tensor.
_TYPE_RULES: dict[FrameType, tuple[frozenset[DType], int | None]] = {
    FrameType.HIDDEN: (_FLOATS, 2),
    FrameType.TOKEN: (frozenset({DType.I32}), 1),
}
_CONTROL_RULE: tuple[frozenset[DType], int | None] = (frozenset({DType.NONE}), 0)


@dataclass(frozen=True)
class FrameLimits:
    max_payload: int = 64 * 1024 * 1024
    max_ext: int = 64 * 1024
    max_dim: int = 1 << 24


DEFAULT_LIMITS = FrameLimits()


@dataclass(frozen=True)
class Frame:
    type: FrameType
    session_id: int = 0
    start: int = 0
    n_tokens: int = 0
    flags: int = 0
    dtype: DType = DType.NONE
    shape: tuple[int, ...] = ()
    ext: dict[str, Any] | None = None
    payload: bytes | bytearray | memoryview = b""


@dataclass(frozen=True)
class FrameHeader:
    type: FrameType
    flags: int
    dtype: DType
    session_id: int
    start: int
    n_tokens: int
    shape: tuple[int, ...]
    ext_len: int
    payload_len: int


# --------------------------------------------------------------------------- validation shared by both ends


def _check_tensor_fields(
    ftype: FrameType, dtype: DType, shape: tuple[int, ...], n_tokens: int, limits: FrameLimits
) -> int:
    """Return the payload size these fields imply, or describe what is wrong (str raised by callers)."""
    allowed, ndim = _TYPE_RULES.get(ftype, _CONTROL_RULE)
    if dtype not in allowed:
        raise ValueError(f"{ftype.name} frame cannot carry dtype {dtype.name}")
    if ndim is not None and len(shape) != ndim:
        raise ValueError(f"{ftype.name} frame needs a {ndim}-d tensor, got shape {list(shape)}")
    if len(shape) > MAX_NDIM:
        raise ValueError(f"{len(shape)} dims over the limit of {MAX_NDIM}")
    for d in shape:
        if not 0 <= d <= limits.max_dim:
            raise ValueError(f"dimension {d} outside [0, {limits.max_dim}]")
    if ftype in (FrameType.HIDDEN, FrameType.TOKEN) and shape[0] != n_tokens:
        raise ValueError(f"{ftype.name} frame with n_tokens={n_tokens} but shape {list(shape)}")
    size = math.prod(shape) * DTYPE_SIZE[dtype] if shape else 0
    if size > limits.max_payload:
        raise ValueError(f"payload of {size} bytes over the {limits.max_payload}-byte limit")
    return size


def parse_frame_header_untrusted(
    data: bytes | bytearray | memoryview, limits: FrameLimits = DEFAULT_LIMITS
) -> FrameHeader:
    """Parse and check the first `HEADER_SIZE` bytes of a frame from a peer. Raises `FrameError`."""
    if len(data) < HEADER_SIZE:
        raise FrameError(f"truncated frame header: {len(data)} of {HEADER_SIZE} bytes")
    fields = _HEADER.unpack_from(data)
    magic, version, ftype, flags, dtype, ndim, session_id, start, n_tokens = fields[:9]
    d0, d1, d2, d3, ext_len, reserved, payload_len = fields[9:]
    if magic != MAGIC:
        raise FrameError(f"bad frame magic {bytes(magic)!r}")
    if version != VERSION:
        raise FrameError(f"unsupported frame version {version}")
    try:
        ftype = FrameType(ftype)
    except ValueError:
        raise FrameError(f"unknown frame type {ftype}") from None
    try:
        dtype = DType(dtype)
    except ValueError:
        raise FrameError(f"unknown dtype code {dtype}") from None
    if reserved != 0:
        raise FrameError("reserved header field is not zero")
    if ndim > MAX_NDIM:
        raise FrameError(f"{ndim} dims over the limit of {MAX_NDIM}")
    dims = (d0, d1, d2, d3)
    if any(dims[ndim:]):
        raise FrameError("unused shape dimensions are not zero")
    if (ndim == 0) != (dtype == DType.NONE):
        raise FrameError(f"dtype {dtype.name} with {ndim} dims")
    if ext_len > limits.max_ext:
        raise FrameError(f"extension of {ext_len} bytes over the {limits.max_ext}-byte limit")
    if payload_len > limits.max_payload:
        raise FrameError(f"payload of {payload_len} bytes over the {limits.max_payload}-byte limit")
    shape = dims[:ndim]
    try:
        expected = _check_tensor_fields(ftype, dtype, shape, n_tokens, limits)
    except ValueError as exc:
        raise FrameError(str(exc)) from None
    if expected != payload_len:
        raise FrameError(
            f"shape {list(shape)} of {dtype.name} needs {expected} bytes, payload length {payload_len}"
        )
    return FrameHeader(ftype, flags, dtype, session_id, start, n_tokens, shape, ext_len, payload_len)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def parse_ext_untrusted(data: bytes | bytearray) -> dict[str, Any]:
    """Decode a frame extension: a UTF-8 JSON object. Raises `FrameError`."""
    try:
        value = json.loads(bytes(data).decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FrameError(f"frame extension is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise FrameError("frame extension is not a JSON object")
    return value


# --------------------------------------------------------------------------- encoding


def encode_frame_parts(frame: Frame, limits: FrameLimits = DEFAULT_LIMITS) -> tuple[bytes, memoryview]:
    """Header + extension bytes, and the payload as a memoryview (not copied). Raises `LocalProtocolError`."""
    try:
        ftype = FrameType(frame.type)
        dtype = DType(frame.dtype)
        shape = tuple(int(d) for d in frame.shape)
        expected = _check_tensor_fields(ftype, dtype, shape, frame.n_tokens, limits)
    except ValueError as exc:
        raise LocalProtocolError(f"cannot encode frame: {exc}") from None
    payload = memoryview(frame.payload).cast("B")
    if payload.nbytes != expected:
        raise LocalProtocolError(
            f"shape {list(shape)} of {dtype.name} needs {expected} bytes, got {payload.nbytes}"
        )
    ext = b"" if frame.ext is None else json.dumps(frame.ext, separators=(",", ":"), allow_nan=False).encode()
    if len(ext) > limits.max_ext:
        raise LocalProtocolError(f"extension of {len(ext)} bytes over the {limits.max_ext}-byte limit")
    if not (0 <= frame.session_id < 1 << 64 and 0 <= frame.start < 1 << 32 and 0 <= frame.n_tokens < 1 << 32):
        raise LocalProtocolError("session id, start or n_tokens out of range")
    if not 0 <= frame.flags < 1 << 16:
        raise LocalProtocolError("flags out of range")
    dims = shape + (0,) * (MAX_NDIM - len(shape))
    header = _HEADER.pack(
        MAGIC, VERSION, ftype, frame.flags, dtype, len(shape), frame.session_id, frame.start, frame.n_tokens,
        *dims, len(ext), 0, payload.nbytes,
    )  # fmt: skip
    return header + ext, payload


def encode_frame(frame: Frame, limits: FrameLimits = DEFAULT_LIMITS) -> bytes:
    """The whole frame as one bytes object (copies the payload once). Raises `LocalProtocolError`."""
    head, payload = encode_frame_parts(frame, limits)
    return head + payload


# --------------------------------------------------------------------------- decoding


class FrameDecoder:
    """Feed peer bytes with `receive_data` (b"" = end of stream); take frames with `next_frame()`.

    Buffers at most one frame. A payload is assembled in its own bytearray, so `payload_to_tensor` can wrap
    it without another copy. Raises `FrameError` on anything malformed, over a limit or cut short; after
    that the stream is out of sync and must be closed.
    """

    def __init__(self, limits: FrameLimits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self._buf = bytearray()
        self._header: FrameHeader | None = None
        self._ext: dict[str, Any] | None = None
        self._payload: bytearray | None = None
        self._filled = 0
        self._eof = False

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof:
            raise LocalProtocolError("receive_data after end of stream")
        if not data:
            self._eof = True
            return
        if self._payload is not None and not self._buf:
            # Mid-payload with nothing queued: copy straight into the payload buffer (one copy, not two).
            view = memoryview(data).cast("B")
            take = min(len(self._payload) - self._filled, len(view))
            self._payload[self._filled : self._filled + take] = view[:take]
            self._filled += take
            view = view[take:]
            if not view:
                return
            data = view
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes held that are not yet part of a returned frame."""
        return len(self._buf) + self._filled

    def next_frame(self) -> Frame | None:
        """The next whole frame, or None when more bytes are needed (or at a clean end of stream)."""
        if self._header is None:
            if len(self._buf) < HEADER_SIZE:
                self._check_not_cut()
                return None
            self._header = parse_frame_header_untrusted(self._buf[:HEADER_SIZE], self.limits)
            del self._buf[:HEADER_SIZE]
            self._ext = None
            self._payload = None
            self._filled = 0
        h = self._header
        if h.ext_len and self._ext is None:
            if len(self._buf) < h.ext_len:
                self._check_not_cut()
                return None
            self._ext = parse_ext_untrusted(self._buf[: h.ext_len])
            del self._buf[: h.ext_len]
        if self._payload is None:
            self._payload = bytearray(h.payload_len)
        take = min(h.payload_len - self._filled, len(self._buf))
        if take:
            with memoryview(self._buf) as view:
                self._payload[self._filled : self._filled + take] = view[:take]
            del self._buf[:take]
            self._filled += take
        if self._filled < h.payload_len:
            self._check_not_cut()
            return None
        frame = Frame(
            h.type, h.session_id, h.start, h.n_tokens, h.flags, h.dtype, h.shape, self._ext, self._payload
        )
        self._header, self._ext, self._payload, self._filled = None, None, None, 0
        return frame

    def _check_not_cut(self) -> None:
        if self._eof and (self._buf or self._header is not None):
            raise FrameError(f"stream ended inside a frame ({self.buffered} bytes pending)")

    @property
    def at_eof(self) -> bool:
        """True once the end of stream was fed and every whole frame was taken."""
        return self._eof and not self._buf and self._header is None


# --------------------------------------------------------------------------- torch payloads

_TORCH_DTYPES: dict[DType, str] = {DType.F16: "float16", DType.BF16: "bfloat16", DType.F32: "float32",
                                   DType.I32: "int32"}  # fmt: skip


def dtype_of_tensor(t: torch.Tensor) -> DType:
    for code, name in _TORCH_DTYPES.items():
        if str(t.dtype) == f"torch.{name}":
            return code
    raise LocalProtocolError(f"no frame dtype for {t.dtype}")


def tensor_to_payload(t: torch.Tensor) -> tuple[DType, tuple[int, ...], memoryview]:
    """(dtype, shape, bytes view) of a tensor; no copy when it is already contiguous on the CPU."""
    import torch

    dtype = dtype_of_tensor(t)
    t = t.detach().to("cpu").contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy()  # shares memory; the array keeps the tensor alive
    return dtype, tuple(t.shape), raw.data


def payload_to_tensor(frame: Frame) -> torch.Tensor:
    """The frame's payload as a CPU tensor of its shape; wraps the decoder's bytearray without a copy."""
    import torch

    if frame.dtype == DType.NONE:
        raise LocalProtocolError(f"{frame.type.name} frame carries no tensor")
    tdtype = getattr(torch, _TORCH_DTYPES[frame.dtype])
    payload = frame.payload
    if len(memoryview(payload)) == 0:
        return torch.empty(frame.shape, dtype=tdtype)
    if isinstance(payload, bytes) or (isinstance(payload, memoryview) and payload.readonly):
        payload = bytearray(payload)  # torch.frombuffer wants a writable buffer
    return torch.frombuffer(payload, dtype=tdtype).view(frame.shape)


def hidden_frame(session_id: int, start: int, hidden: torch.Tensor, *, flags: int = 0) -> Frame:
    """HIDDEN frame for hidden states [T, hidden] at positions [start, start+T)."""
    dtype, shape, payload = tensor_to_payload(hidden)
    if len(shape) != 2:
        raise LocalProtocolError(f"hidden states must be [T, hidden], got {list(shape)}")
    return Frame(FrameType.HIDDEN, session_id, start, shape[0], flags, dtype, shape, None, payload)


def token_frame(session_id: int, start: int, token_ids: torch.Tensor | list[int], *, flags: int = 0) -> Frame:
    """TOKEN frame for sampled ids [T] (int32) at positions [start, start+T)."""
    import torch

    ids = torch.as_tensor(token_ids, dtype=torch.int32).reshape(-1)  # [T]
    dtype, shape, payload = tensor_to_payload(ids)
    return Frame(FrameType.TOKEN, session_id, start, shape[0], flags, dtype, shape, None, payload)


# --------------------------------------------------------------------------- trio drivers

_INLINE_PAYLOAD = 64 * 1024  # below this, one send_all of header+payload beats two writes


async def send_frame(stream: trio.abc.SendStream, frame: Frame, limits: FrameLimits = DEFAULT_LIMITS) -> None:
    """Encode and send one frame. One task sends on a stream at a time (use `FrameWriter` to share it).

    Blocks while the peer is not reading (flow control). Raises `PeerUnavailable` when the link is broken.
    """
    head, payload = encode_frame_parts(frame, limits)
    try:
        if payload.nbytes <= _INLINE_PAYLOAD:
            await stream.send_all(head + payload)
        else:
            await stream.send_all(head)
            await stream.send_all(payload)
    except trio.BrokenResourceError as exc:
        raise PeerUnavailable(f"link broke while sending a {frame.type.name} frame") from exc
    except trio.ClosedResourceError as exc:  # closed on this side by another task (e.g. a session teardown)
        raise PeerUnavailable(f"link closed while sending a {frame.type.name} frame") from exc


class FrameWriter:
    """Send frames from several tasks on one stream, whole frame by whole frame (FIFO lock)."""

    def __init__(self, stream: trio.abc.SendStream, limits: FrameLimits = DEFAULT_LIMITS) -> None:
        self.stream = stream
        self.limits = limits
        self._lock = trio.Lock()

    async def send(self, frame: Frame) -> None:
        try:  # uncontended (the usual case): no yield to the scheduler here, send_all yields anyway
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()
        try:
            await send_frame(self.stream, frame, self.limits)
        finally:
            self._lock.release()


class FrameReader:
    """Pull frames from a stream: `await reader.next()` (None at a clean end), or `async for frame in it`."""

    def __init__(
        self,
        stream: trio.abc.ReceiveStream,
        limits: FrameLimits = DEFAULT_LIMITS,
        read_size: int = 256 * 1024,
    ) -> None:
        self.stream = stream
        self.read_size = read_size
        self._decoder = FrameDecoder(limits)

    async def next(self) -> Frame | None:
        """The next frame; None when the peer closed cleanly between frames.

        Raises `FrameError` (malformed, over a limit, cut short) or `PeerUnavailable` (link broken).
        """
        while True:
            frame = self._decoder.next_frame()
            if frame is not None or self._decoder.at_eof:
                return frame
            try:
                data = await self.stream.receive_some(self.read_size)
            except trio.BrokenResourceError as exc:
                raise PeerUnavailable("link broke while reading a frame") from exc
            except trio.ClosedResourceError as exc:
                raise PeerUnavailable("link closed while reading a frame") from exc
            self._decoder.receive_data(data)

    def __aiter__(self) -> AsyncIterator[Frame]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Frame]:
        while (frame := await self.next()) is not None:
            yield frame
