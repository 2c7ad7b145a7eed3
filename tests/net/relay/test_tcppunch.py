"""Punched links moving onto TCP (net/tcppunch.py), on loopback: the swarm of test_punching.py.

On loopback both ends' TCP connections form at once; through real NATs, tests/test_natlab_punch.py.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from eldric_p2p.net import tcppunch
from eldric_p2p.net.connector import Connector
from eldric_p2p.net.identity import Identity
from eldric_p2p.net.links import Link, link_client, open_tcp_link, serve_tcp_links
from eldric_p2p.net.relay.quic import QuicStream
from eldric_p2p.net.tcppunch import TCP_TAG

from .test_punching import roundtrip, swarm


def test_a_punched_link_moves_onto_tcp_and_carries_frames_and_http_tags() -> None:
    async def main() -> None:
        async with swarm(2) as (relay, (a, b)):
            b_id = b.identity.peer_id
            with trio.fail_after(10):
                link = await a.open_link(b_id)
                stream = link.tls.transport_stream
                assert isinstance(stream, trio.SocketStream) and link.path == "punched"
                assert link.transport == "tcp"
                # the peer's end of the TCP connection is the address the punched QUIC connection reaches
                conn = a.members[0].punched(b_id)
                assert conn is not None and conn.remote_address is not None
                assert stream.socket.getpeername()[0] == conn.remote_address[0]
                # keepalives hold the NATs' mappings of an idle link
                assert stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                assert stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30
                payload = bytes(range(256)) * 64
                assert await roundtrip(link, payload) == payload
                assert a.stats["tcp_punched"] == 1 and b.tcp_punches.asked == 1
                assert relay.stats.streams_spliced == 0
                await link.aclose()

    trio.run(main)


def test_a_peer_that_declines_leaves_the_link_on_quic_and_is_not_asked_again() -> None:
    async def main() -> None:
        async with swarm(2) as (_, (a, b)):
            b_id = b.identity.peer_id
            b.tcp_punches.enabled = False  # b answers requests with port 0
            with trio.fail_after(10):
                first = await a.open_link(b_id)
                assert isinstance(first.tls.transport_stream, QuicStream) and first.path == "punched"
                assert first.transport == "quic"
                assert await roundtrip(first, b"still punched") == b"still punched"
                assert b.tcp_punches.asked == 1 and a.stats["tcp_punched"] == 0
                assert not a.tcp_punches.worth_trying(b_id)
                second = await a.open_link(b_id)
                assert isinstance(second.tls.transport_stream, QuicStream)
                assert b.tcp_punches.asked == 1  # remembered: no second request
                assert await roundtrip(second, b"again") == b"again"

    trio.run(main)


def test_a_tcp_punch_that_forms_nothing_falls_back_to_quic_in_bounded_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def nothing_gets_through(*args: Any) -> None:  # NATs that drop every SYN
        await trio.sleep_forever()

    monkeypatch.setattr(tcppunch, "_candidates", nothing_gets_through)
    monkeypatch.setattr(tcppunch, "TCP_PUNCH_TIMEOUT_S", 0.5)

    async def main() -> None:
        async with swarm(2) as (_, (a, b)):
            b_id = b.identity.peer_id
            with trio.fail_after(10):
                t0 = time.monotonic()
                link = await a.open_link(b_id)
                took = time.monotonic() - t0
                assert isinstance(link.tls.transport_stream, QuicStream) and link.path == "punched"
                assert await roundtrip(link, b"on quic") == b"on quic"
                assert 0.5 <= took < 5.0, took
                assert a.stats["tcp_punched"] == 0 and not a.tcp_punches.worth_trying(b_id)

    trio.run(main)


def test_malformed_or_unwanted_requests_are_declined_and_the_peer_keeps_serving() -> None:
    async def main() -> None:
        async with swarm(2) as (_, (a, b)):
            b_id = b.identity.peer_id
            a.tcp_punches.enabled = False  # a opens plain punched links; the tests speak for it
            with trio.fail_after(20):
                await a.open_link(b_id)  # the punch
                conn = a.members[0].punched(b_id)
                assert conn is not None

                async def ask(body: bytes) -> bytes:
                    link = await link_client(conn.open_stream(), a.identity, b_id, path="punched")
                    await link.send_all(body)
                    got = bytearray()
                    while len(got) < 2 and (data := await link.receive_some()):
                        got += data
                    await link.aclose()
                    return bytes(got)

                assert await ask(TCP_TAG + struct.pack(">H", 0)) == b"\0\0"  # port 0: declined
                tcppunch.TCP_PUNCH_TIMEOUT_S, saved = 0.3, tcppunch.TCP_PUNCH_TIMEOUT_S
                try:
                    assert await ask(TCP_TAG) == b"\0\0"  # no port within the timeout: declined
                finally:
                    tcppunch.TCP_PUNCH_TIMEOUT_S = saved
                tcppunch.MAX_TRIES_PER_PEER, saved = 0, tcppunch.MAX_TRIES_PER_PEER
                try:  # a peer that already has its share of requests being served
                    assert await ask(TCP_TAG + struct.pack(">H", 40000)) == b"\0\0"
                finally:
                    tcppunch.MAX_TRIES_PER_PEER = saved
                assert b.tcp_punches.asked == 3 and tcppunch._in_flight == {}
                # the peer still serves links, and moves one onto TCP when asked properly
                a.tcp_punches.enabled = True
                link = await a.open_link(b_id)
                assert isinstance(link.tls.transport_stream, trio.SocketStream)
                assert await roundtrip(link, b"fine") == b"fine"

    trio.run(main)


@asynccontextmanager
async def direct_link() -> AsyncIterator[tuple[Connector, Link]]:
    """A member's connector serving direct links on loopback, and a direct link to it from a stranger."""
    async with swarm(1) as (_, (b,)), trio.open_nursery() as nursery:
        listeners = await nursery.start(serve_tcp_links, b.identity, "127.0.0.1", 0, b.dispatch)
        port = listeners[0].socket.getsockname()[1]
        with trio.fail_after(10):
            yield b, await open_tcp_link("127.0.0.1", port, Identity.generate(), b.identity.peer_id)
        nursery.cancel_scope.cancel()


def test_a_direct_link_that_starts_with_the_tag_is_frames_not_a_request() -> None:
    """Only punched links may ask: on a direct (or relayed) link the bytes go to the frames handler."""

    async def main() -> None:
        async with direct_link() as (b, link):
            body = TCP_TAG + b"\x12\x34 and more"
            assert await roundtrip(link, body) == body  # echoed by the frames handler
            assert b.tcp_punches.asked == 0

    trio.run(main)


def test_one_try_hands_on_at_most_max_candidates_connections() -> None:
    """A peer flooding the listener with connections gets MAX_CANDIDATES handshakes, no more."""

    async def main() -> None:
        listener = await tcppunch._listener("127.0.0.1")
        # the other side's port: a listener nothing accepts from, so the connect from `listener`'s port
        # forms too (in its backlog) and counts
        other = await tcppunch._listener("127.0.0.1")
        found: list[trio.SocketStream] = []
        clients: list[trio.SocketStream] = []
        try:
            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    port = listener.getsockname()[1]
                    nursery.start_soon(tcppunch._candidates, listener, "127.0.0.1", other.getsockname()[1],
                                       found.append)  # fmt: skip
                    for _ in range(tcppunch.MAX_CANDIDATES + 4):
                        clients.append(await trio.open_tcp_stream("127.0.0.1", port))
                    while len(found) < tcppunch.MAX_CANDIDATES:  # noqa: ASYNC110
                        await trio.sleep(0.01)
                    await trio.sleep(0.2)  # the rest were accepted and closed
                    assert len(found) == tcppunch.MAX_CANDIDATES
                    nursery.cancel_scope.cancel()
        finally:
            listener.close()
            other.close()
            for stream in found:
                await trio.aclose_forcefully(stream)
            for c in clients:
                await trio.aclose_forcefully(c)

    trio.run(main)


def test_upgrade_of_a_link_that_was_not_punched_returns_none_and_closes_it() -> None:
    async def main() -> None:
        async with direct_link() as (b, link):
            assert await tcppunch.upgrade(link, Identity.generate()) is None
            with pytest.raises(trio.ClosedResourceError):
                await link.send_all(b"x")
            assert b.tcp_punches.asked == 0

    trio.run(main)


def test_a_failed_peer_is_tried_again_after_a_wait_that_doubles_up_to_the_limit() -> None:
    async def main() -> None:
        punches = tcppunch.TcpPunches()
        assert punches.worth_trying("p")
        waits = []
        for _ in range(7):
            punches.failed("p")
            t0 = trio.current_time()
            for _ in range(1000):  # look once a second (the clock jumps)
                if punches.worth_trying("p"):
                    break
                await trio.sleep(1.0)
            waits.append(round(trio.current_time() - t0))
        # 30 s, doubled after each failure, at most TCP_RETRY_S (+ the 1 s step)
        assert waits == [31, 61, 121, 241, 481, 601, 601]
        punches.failed("p")
        punches.worked("p")  # a TCP link formed: the failures are forgotten
        assert punches.worth_trying("p")
        punches.failed("p")
        assert not punches.worth_trying("p") and punches.worth_trying("q")
        punches.enabled = False
        assert not punches.worth_trying("q")

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
