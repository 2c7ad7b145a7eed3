from __future__ import annotations

import random
import struct

import pytest
import torch
import trio
import trio.testing

from eldric_p2p.errors import FrameError, LocalProtocolError, PeerUnavailable
from eldric_p2p.net.frames import (
    DEFAULT_LIMITS,
    HEADER_SIZE,
    DType,
    Frame,
    FrameDecoder,
    FrameLimits,
    FrameReader,
    FrameType,
    FrameWriter,
    encode_frame,
    hidden_frame,
    parse_frame_header_untrusted,
    payload_to_tensor,
    send_frame,
    token_frame,
)


def _decode_all(data: bytes, limits: FrameLimits = DEFAULT_LIMITS, chunk: int | None = None) -> list[Frame]:
    dec = FrameDecoder(limits)
    frames: list[Frame] = []
    step = chunk or max(1, len(data))
    for i in range(0, len(data), step):
        dec.receive_data(data[i : i + step])
        while (f := dec.next_frame()) is not None:
            frames.append(f)
    dec.receive_data(b"")
    assert dec.next_frame() is None
    assert dec.at_eof
    return frames


def _every_type() -> list[Frame]:
    hidden = torch.randn(3, 896, dtype=torch.float16)  # [T, hidden]
    return [
        Frame(FrameType.OPEN_SESSION, 7, ext={"temperature": 0.7, "top_p": 0.9, "seed": 1, "stages": ["a"]}),
        hidden_frame(7, 0, hidden, flags=1),
        hidden_frame(7, 3, torch.randn(1, 16, dtype=torch.bfloat16)),
        hidden_frame(7, 4, torch.randn(2, 8, dtype=torch.float32)),
        token_frame(7, 3, [151643]),
        Frame(FrameType.TRUNCATE, 7, start=2),
        Frame(FrameType.CLOSE_SESSION, 7),
        Frame(FrameType.ERROR, 7, ext={"message": "stage 2 failed: out of memory", "stage": 2}),
        Frame(FrameType.PING, 0, ext={"t": 1.5}),
        Frame(FrameType.PONG, 0, ext={"t": 1.5}),
        Frame(FrameType.HIDDEN, 2**64 - 1, 2**32 - 1, 0, 0xFFFF, DType.F16, (0, 896)),
    ]


def _same(a: Frame, b: Frame) -> None:
    assert (a.type, a.session_id, a.start, a.n_tokens, a.flags, a.dtype, a.shape, a.ext) == (
        b.type,
        b.session_id,
        b.start,
        b.n_tokens,
        b.flags,
        b.dtype,
        b.shape,
        b.ext,
    )
    assert bytes(memoryview(a.payload).cast("B")) == bytes(memoryview(b.payload).cast("B"))


@pytest.mark.parametrize("chunk", [None, 1, 7, 4096])
def test_every_type_round_trips_whole_and_in_pieces(chunk: int | None) -> None:
    frames = _every_type()
    wire = b"".join(encode_frame(f) for f in frames)
    got = _decode_all(wire, chunk=chunk)
    assert len(got) == len(frames)
    for a, b in zip(frames, got, strict=True):
        _same(a, b)


def test_hidden_states_come_back_bit_exact_as_tensors() -> None:
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        hidden = torch.randn(5, 896).to(dtype)  # [T, hidden]
        (frame,) = _decode_all(encode_frame(hidden_frame(1, 10, hidden)))
        out = payload_to_tensor(frame)
        assert out.dtype == dtype and out.shape == (5, 896)
        assert torch.equal(out, hidden)
        assert frame.start == 10 and frame.n_tokens == 5
    (tok,) = _decode_all(encode_frame(token_frame(1, 15, [1, 2, 151643])))
    assert payload_to_tensor(tok).tolist() == [1, 2, 151643]


def test_decoded_payload_is_wrapped_without_a_copy() -> None:
    (frame,) = _decode_all(encode_frame(hidden_frame(1, 0, torch.ones(2, 4))))
    t = payload_to_tensor(frame)
    assert isinstance(frame.payload, bytearray)
    frame.payload[0:4] = struct.pack("<f", 5.0)
    assert t[0, 0].item() == 5.0


def test_tensor_to_frame_does_not_copy_contiguous_cpu_tensor() -> None:
    hidden = torch.zeros(1, 8)
    frame = hidden_frame(1, 0, hidden)
    hidden[0, 0] = 3.0
    assert struct.unpack_from("<f", frame.payload)[0] == 3.0


def _patch(wire: bytes, offset: int, fmt: str, value: int) -> bytes:
    b = bytearray(wire)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


GOOD = encode_frame(hidden_frame(1, 0, torch.zeros(2, 4, dtype=torch.float16)))  # payload 16 bytes


@pytest.mark.parametrize(
    ("offset", "fmt", "value", "message"),
    [
        (0, "<H", 0x4242, "magic"),
        (2, "<B", 9, "version"),
        (3, "<B", 99, "unknown frame type"),
        (6, "<B", 42, "unknown dtype"),
        (6, "<B", int(DType.I32), "cannot carry dtype"),
        (7, "<B", 5, "dims over the limit"),
        (7, "<B", 3, "needs a 2-d tensor"),
        (24, "<I", 3, "n_tokens"),
        (28, "<I", 5, "needs 20 bytes"),
        (32, "<I", 1, "unused shape"),
        (40, "<I", 10_000_000, "extension of"),
        (44, "<I", 1, "reserved"),
        (48, "<Q", 2**63, "over the"),
        (48, "<Q", 17, "payload length 17"),
    ],
)
def test_bad_headers_are_refused_specifically(offset: int, fmt: str, value: int, message: str) -> None:
    with pytest.raises(FrameError, match=message):
        _decode_all(_patch(GOOD, offset, fmt, value))


def test_truncated_header_and_truncated_payload() -> None:
    with pytest.raises(FrameError, match="truncated"):
        parse_frame_header_untrusted(GOOD[:20])
    for cut in (1, 20, HEADER_SIZE, len(GOOD) - 1):
        with pytest.raises(FrameError, match="ended inside a frame"):
            _decode_all(GOOD[:cut])


def test_huge_shape_is_refused_before_any_payload_arrives() -> None:
    limits = FrameLimits(max_payload=1 << 20)
    big = _patch(_patch(_patch(GOOD, 20, "<I", 1 << 20), 24, "<I", 1 << 20), 48, "<Q", (1 << 21) * 4)
    dec = FrameDecoder(limits)
    dec.receive_data(big[:HEADER_SIZE])
    with pytest.raises(FrameError, match="over the"):
        dec.next_frame()
    # the default limit refuses a shape whose product overflows any 64-bit size too
    huge = _patch(_patch(GOOD, 20, "<I", 1 << 24), 24, "<I", 1 << 24)
    with pytest.raises(FrameError):
        parse_frame_header_untrusted(_patch(huge, 28, "<I", 1 << 24))


def test_extension_must_be_a_json_object_within_limits() -> None:
    def with_ext(ext: bytes) -> bytes:
        head = bytearray(encode_frame(Frame(FrameType.ERROR, 1, ext={})))
        struct.pack_into("<I", head, 40, len(ext))
        return bytes(head[:HEADER_SIZE]) + ext

    assert _decode_all(with_ext(b'{"message": "x"}'))[0].ext == {"message": "x"}
    for bad in (b"[1, 2]", b"\xff\xfe", b"{", b'{"a": NaN}', b"[" * 60_000 + b"]" * 60_000):
        with pytest.raises(FrameError):
            _decode_all(with_ext(bad))
    with pytest.raises(FrameError, match="extension of"):
        _decode_all(with_ext(b'{"a": "' + b"x" * 100 + b'"}'), FrameLimits(max_ext=64))


def test_encoding_our_own_bad_frame_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        encode_frame(Frame(FrameType.HIDDEN, 1, 0, 2, 0, DType.F16, (2, 4), None, b"\x00" * 15))
    with pytest.raises(LocalProtocolError):
        encode_frame(Frame(FrameType.PING, 1, 0, 0, 0, DType.F16, (1,), None, b"\x00\x00"))
    with pytest.raises(LocalProtocolError):
        encode_frame(Frame(FrameType.ERROR, 1, ext={"big": "x" * 100}), FrameLimits(max_ext=64))


def test_random_bytes_only_ever_raise_frame_error() -> None:
    rng = random.Random(1234)
    valid = [encode_frame(f) for f in _every_type()]
    for i in range(3000):
        if i % 2:
            data = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 300)))
        else:  # mutate a valid stream so the fuzz reaches past the magic
            data = bytearray(b"".join(rng.sample(valid, 3)))
            for _ in range(rng.randrange(1, 6)):
                data[rng.randrange(len(data))] = rng.getrandbits(8)
            data = bytes(data[: rng.randrange(len(data) + 1)])
        try:
            for frame in _decode_all(data, FrameLimits(max_payload=1 << 20), chunk=rng.randrange(1, 64)):
                if frame.dtype != DType.NONE:
                    payload_to_tensor(frame)
        except FrameError:
            pass


def test_trio_drivers_over_a_stream_and_backpressure() -> None:
    async def main() -> None:
        a, b = trio.testing.memory_stream_pair()
        hidden = torch.randn(64, 896, dtype=torch.float16)  # [T, hidden], 114 KB: sent as header + payload
        writer = FrameWriter(a)
        async with trio.open_nursery() as nursery:
            for sid in range(4):  # several tasks share one writer without interleaving frames
                nursery.start_soon(writer.send, hidden_frame(sid, 0, hidden))
            reader = FrameReader(b)
            got = [await reader.next() for _ in range(4)]
        assert sorted(f.session_id for f in got if f) == [0, 1, 2, 3]
        assert all(f is not None and torch.equal(payload_to_tensor(f), hidden) for f in got)
        await send_frame(a, Frame(FrameType.CLOSE_SESSION, 1))
        await a.aclose()
        frames = [f async for f in reader]
        assert [f.type for f in frames] == [FrameType.CLOSE_SESSION]

    trio.run(main)


def test_a_reader_that_does_not_read_blocks_the_writer() -> None:
    async def main() -> None:
        # lockstep pair: send_all only returns as data is received, like a full TCP window
        a, b = trio.testing.lockstep_stream_pair()
        frame = hidden_frame(1, 0, torch.zeros(1, 896, dtype=torch.float16))
        with trio.move_on_after(0.2) as scope:
            await send_frame(a, frame)
        assert scope.cancelled_caught  # nobody reads: the writer waits instead of buffering
        a2, b2 = trio.testing.lockstep_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_frame, a2, frame)
            assert (await FrameReader(b2).next()) is not None

    trio.run(main)


def test_broken_link_and_cut_frame_are_reported() -> None:
    async def main() -> None:
        a, b = trio.testing.memory_stream_pair()
        await a.send_all(GOOD[:30])
        await a.aclose()
        with pytest.raises(FrameError, match="ended inside a frame"):
            await FrameReader(b).next()

        class Broken(trio.abc.ReceiveStream):
            async def receive_some(self, max_bytes: int | None = None) -> bytes:
                raise trio.BrokenResourceError

            async def aclose(self) -> None:
                pass

        with pytest.raises(PeerUnavailable):
            await FrameReader(Broken()).next()

    trio.run(main)


def test_a_link_closed_on_this_side_is_peer_unavailable_not_a_crash() -> None:
    import trio.testing

    from eldric_p2p.errors import PeerUnavailable
    from eldric_p2p.net.frames import Frame, FrameReader, FrameType, send_frame

    async def main() -> None:
        a, b = trio.testing.memory_stream_pair()
        await a.aclose()
        with pytest.raises(PeerUnavailable, match="closed while sending"):
            await send_frame(a, Frame(FrameType.PING, session_id=0))
        with pytest.raises(PeerUnavailable, match="closed while reading"):
            await FrameReader(a).next()

    trio.run(main)
