"""The TCP lane's kernel copy (net/relay/ksplice.py, _ksplice.c): two TCP connections on loopback spliced by
`kernel_splice`, as the relay splices two members' lane connections."""

from __future__ import annotations

import os
import socket
import struct
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from eldric_p2p.net.relay import ksplice

pytestmark = pytest.mark.skipif(not ksplice.available(), reason="no splice(2) pump on this platform")


def test_the_pump_is_built_on_linux() -> None:
    if sys.platform.startswith("linux"):
        assert ksplice.available()


@asynccontextmanager
async def spliced(
    limiter: trio.CapacityLimiter | None = None,
) -> AsyncIterator[tuple[trio.SocketStream, trio.SocketStream, dict[str, object]]]:
    """Two client connections (`left`, `right`) whose server ends are spliced by `kernel_splice` in a task;
    the dict gets `moved` when the splice returns."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    limiter = limiter or trio.CapacityLimiter(4)
    out: dict[str, object] = {"done": trio.Event()}
    async with trio.open_nursery() as nursery:
        left = await trio.open_tcp_stream("127.0.0.1", port)
        server_left = await listeners[0].accept()
        right = await trio.open_tcp_stream("127.0.0.1", port)
        server_right = await listeners[0].accept()

        async def run() -> None:
            try:
                out["moved"] = await ksplice.kernel_splice(server_left, server_right, chunk=64 * 1024,
                                                           limiter=limiter)  # fmt: skip
            finally:
                out["done"].set()  # type: ignore[attr-defined]
                await server_left.aclose()
                await server_right.aclose()

        nursery.start_soon(run)
        try:
            yield left, right, out
        finally:
            nursery.cancel_scope.cancel()
    for s in (left, right, listeners[0]):
        await s.aclose()


async def read_all(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        chunk = await stream.receive_some()
        assert chunk, "ended early"
        got.extend(chunk)
    return bytes(got)


def test_bytes_cross_both_ways_at_once_and_each_eof_is_passed_on() -> None:
    async def main() -> None:
        async with spliced() as (left, right, out):
            there, back = os.urandom(3_000_000), os.urandom(2_000_000)
            got: dict[str, bytes] = {}

            async def side(name: str, s: trio.SocketStream, data: bytes, expect: int) -> None:
                async with trio.open_nursery() as n:

                    async def send() -> None:
                        await s.send_all(data)
                        await s.send_eof()

                    n.start_soon(send)
                    got[name] = await read_all(s, expect)
                    assert await s.receive_some() == b""  # the other side's EOF, passed on

            with trio.fail_after(20):
                async with trio.open_nursery() as n:
                    n.start_soon(side, "right", right, back, len(there))
                    n.start_soon(side, "left", left, there, len(back))
                await out["done"].wait()  # type: ignore[attr-defined]
            assert got["right"] == there and got["left"] == back
            assert out["moved"] == len(there) + len(back)

    trio.run(main)


def test_a_half_closed_side_still_receives() -> None:
    async def main() -> None:
        async with spliced() as (left, right, out):
            with trio.fail_after(5):
                await left.send_all(b"question")
                await left.send_eof()
                assert await read_all(right, 8) == b"question"
                assert await right.receive_some() == b""
                await right.send_all(b"a long answer" * 1000)  # the other way keeps going
                assert await read_all(left, 13_000) == b"a long answer" * 1000
                assert not out["done"].is_set()  # type: ignore[attr-defined]
                await right.send_eof()
                assert await left.receive_some() == b""
                await out["done"].wait()  # type: ignore[attr-defined]
            assert out["moved"] == 8 + 13_000

    trio.run(main)


def test_a_reset_side_ends_the_splice() -> None:
    async def main() -> None:
        async with spliced() as (left, right, out):
            with trio.fail_after(5):
                await left.send_all(b"x" * 100)
                assert await read_all(right, 100) == b"x" * 100
                left.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                await left.aclose()  # RST
                await out["done"].wait()  # type: ignore[attr-defined]
                try:
                    while await right.receive_some():
                        pass
                except trio.BrokenResourceError:
                    pass  # the relay's side closed: right sees the splice is gone either way

    trio.run(main)


def test_cancelling_stops_the_thread_at_once_and_gives_its_token_back() -> None:
    async def main() -> None:
        limiter = trio.CapacityLimiter(1)
        with trio.fail_after(5):
            async with spliced(limiter) as (left, right, out):
                await left.send_all(b"ping")
                assert await read_all(right, 4) == b"ping"
                assert limiter.borrowed_tokens == 1  # the splice holds a thread, idle in poll
            # leaving cancelled the splice while both sides were silent and open
            assert out["done"].is_set()  # type: ignore[attr-defined]
            assert limiter.borrowed_tokens == 0

    trio.run(main)
