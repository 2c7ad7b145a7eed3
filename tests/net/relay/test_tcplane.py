"""The relay's TCP lane: relayed streams as two members' TCP connections spliced by the relay, its tickets,
its fallbacks to QUIC, and what it does with hostile connections. One trio process, loopback."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace

import pytest
import trio
from peer_helpers import eventually, roundtrip

from eldric_p2p.errors import RemoteProtocolError
from eldric_p2p.net.discovery import PeerTable
from eldric_p2p.net.identity import Identity
from eldric_p2p.net.pacing import congestion_control
from eldric_p2p.net.relay import ksplice
from eldric_p2p.net.relay import protocol as p
from eldric_p2p.net.relay.client import RelayMember
from eldric_p2p.net.relay.quic import QuicStream
from eldric_p2p.net.relay.server import Relay, RelayLimits, run_relay
from eldric_p2p.net.relay.tcplane import MAGIC, TcpLane, TcpLaneLimits

FAST = RelayLimits(
    keepalive_s=0.2, dead_after_s=2.0, open_timeout_s=1.5, tcp=TcpLaneLimits(ticket_timeout_s=0.5)
)
PEER = Identity.generate().peer_id


async def echo(stream: trio.abc.Stream, source: str) -> None:
    while data := await stream.receive_some():
        await stream.send_all(data)
    await stream.send_eof()  # type: ignore[attr-defined]


@asynccontextmanager
async def relay_with(limits: RelayLimits = FAST) -> AsyncIterator[tuple[Relay, RelayMember, RelayMember]]:
    async with trio.open_nursery() as nursery:
        relay: Relay = await nursery.start(
            lambda task_status: run_relay(
                "127.0.0.1", 0, Identity.generate(), limits=limits, task_status=task_status
            )
        )
        assert relay.address is not None
        members = []
        for i in range(2):
            ident = Identity.generate()
            m = RelayMember(ident, "127.0.0.1", relay.address[1], PeerTable(ident.peer_id),
                            lambda i=i: {"name": f"m{i}"}, echo, backoff_initial_s=0.1, backoff_max_s=0.4,
                            open_timeout_s=2.0)  # fmt: skip
            await nursery.start(m.run)
            members.append(m)
        with trio.fail_after(5):
            for m in members:
                await m.wait_registered()
        yield relay, members[0], members[1]
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------------------------- protocol


def test_lane_fields_round_trip_and_absent_ones_keep_the_old_encoding() -> None:
    ticket = os.urandom(p.TICKET_LEN)
    for msg in (
        p.Open(PEER, True),
        p.Incoming(PEER, ticket),
        p.Accept(ticket),
        p.Registered(PEER, 5.0, (), 4433),
    ):
        data = p.encode_message(msg)
        length, mtype = p.HEADER.unpack_from(data)
        assert p.parse_message_untrusted(mtype, data[p.HEADER.size :]) == msg
    # without the lane the messages are what they always were
    assert p.encode_message(p.Accept())[p.HEADER.size :] == b"{}"
    assert p.encode_message(p.Open(PEER))[p.HEADER.size :] == b'{"target":"%s"}' % PEER.encode()


@pytest.mark.parametrize(
    ("mtype", "body", "needle"),
    [
        (p.MsgType.ACCEPT, b'{"ticket":"abcd"}', "must be 16 bytes"),
        (p.MsgType.INCOMING, b'{"source":"%s","ticket":"zz"}' % PEER.encode(), "ticket"),
        (p.MsgType.OPEN, b'{"target":"%s","tcp":1}' % PEER.encode(), "wrong type"),
        (
            p.MsgType.REGISTERED,
            b'{"peer_id":"%s","keepalive_s":5,"tcp_port":70000}' % PEER.encode(),
            "tcp_port",
        ),
        (p.MsgType.REGISTERED, b'{"peer_id":"%s","keepalive_s":5,"tcp_port":-1}' % PEER.encode(), "range"),
    ],
)
def test_hostile_lane_fields_are_refused_by_name(mtype: int, body: bytes, needle: str) -> None:
    with pytest.raises(RemoteProtocolError, match=needle):
        p.parse_message_untrusted(mtype, body)


# ---------------------------------------------------------------------------------------------- the lane


@pytest.mark.parametrize("kernel_threads", [64, 0], ids=["kernel-copy", "loop-copy"])
def test_a_relayed_stream_goes_over_the_tcp_lane_both_ways_with_half_close(kernel_threads: int) -> None:
    async def main() -> None:
        lane_limits = replace(FAST.tcp, kernel_threads=kernel_threads)
        async with relay_with(replace(FAST, tcp=lane_limits)) as (relay, a, b):
            assert relay.lane is not None and relay.tcp_port and a.tcp_lane and b.tcp_lane
            stream = await a.open_stream(b.identity.peer_id)
            assert isinstance(stream, trio.SocketStream)
            assert stream.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1  # idle NAT mappings live
            cc = congestion_control(stream.socket)  # frames leave whole (net/pacing.py)
            assert cc is None or not cc.startswith("bbr")
            payload = os.urandom(2_000_000)
            assert await roundtrip(stream, payload) == payload
            assert relay.lane._unpaired == 0  # a spliced pair holds no slot of the unpaired limit
            await stream.send_eof()
            with trio.fail_after(2):
                assert await stream.receive_some() == b""  # b's EOF came back through the splice
            await stream.aclose()
            assert a.lane_streams == 1 and b.lane_streams == 1
            with trio.fail_after(2):
                await eventually(lambda: relay.stats.bytes_spliced >= 2 * len(payload))
            assert relay.lane.stats.spliced == 1 and relay.stats.streams_spliced == 1
            assert relay.lane.stats.kernel == (1 if kernel_threads and ksplice.available() else 0)
            assert relay.lane.pending == 0 and all(m.streams == 0 for m in relay.members.values())

    trio.run(main)


def test_splices_beyond_the_kernel_threads_and_refused_ones_are_copied_in_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def main() -> None:
        async with relay_with(replace(FAST, tcp=replace(FAST.tcp, kernel_threads=1))) as (relay, a, b):
            assert relay.lane is not None
            first = await a.open_stream(b.identity.peer_id)
            second = await a.open_stream(b.identity.peer_id)  # the one thread is taken: the loop copies
            for stream in (first, second):
                assert isinstance(stream, trio.SocketStream)
                assert await roundtrip(stream, b"k" * 300_000) == b"k" * 300_000
            lane = relay.lane
            assert lane.stats.spliced == 2
            assert lane._kernel_splices == (1 if ksplice.available() else 0)
            await first.aclose()
            await second.aclose()
            with trio.fail_after(2):  # both splices end: the thread's token comes back
                await eventually(lambda: lane.stats.bytes == 4 * 300_000)
            assert lane.stats.kernel == (1 if ksplice.available() else 0)
            assert lane._kernel_splices == 0

            async def refused(*args: object, **kwargs: object) -> None:
                return None  # the kernel would not splice these sockets, nothing read

            monkeypatch.setattr(ksplice, "available", lambda: True)
            monkeypatch.setattr(ksplice, "kernel_splice", refused)
            third = await a.open_stream(b.identity.peer_id)
            assert await roundtrip(third, b"r" * 100_000) == b"r" * 100_000
            assert lane.stats.spliced == 3

    trio.run(main)


def test_a_relay_without_the_lane_splices_quic_streams() -> None:
    async def main() -> None:
        async with relay_with(replace(FAST, tcp=None)) as (relay, a, b):
            assert relay.tcp_port == 0 and not a.tcp_lane
            stream = await a.open_stream(b.identity.peer_id)
            assert isinstance(stream, QuicStream)
            assert await roundtrip(stream, b"q" * 100_000) == b"q" * 100_000
            assert relay.stats.streams_spliced == 1 and a.lane_streams == 0

    trio.run(main)


def test_an_opener_that_cannot_reach_the_lane_falls_back_to_quic_and_stays_there() -> None:
    async def main() -> None:
        async with relay_with() as (relay, a, b):
            closed = trio.socket.socket()
            await closed.bind(("127.0.0.1", 0))
            assert a._control is not None
            a._control.relay_tcp_port = closed.getsockname()[1]  # nothing listens there
            closed.close()
            stream = await a.open_stream(b.identity.peer_id)
            assert isinstance(stream, QuicStream) and not a.tcp_lane
            assert await roundtrip(stream, b"f" * 10_000) == b"f" * 10_000
            # the relay gave up on the unused tickets; b's connection to the lane was closed
            with trio.fail_after(4):
                await eventually(lambda: relay.lane is not None and relay.lane.pending == 0)
            assert relay.lane is not None and relay.lane.stats.spliced == 0 and relay.lane.stats.expired == 1
            stream2 = await a.open_stream(b.identity.peer_id)
            assert isinstance(stream2, QuicStream)  # not tried again for TCP_RETRY_S

    trio.run(main)


def test_a_target_that_cannot_reach_the_lane_refuses_and_the_opener_uses_quic() -> None:
    async def main() -> None:
        async with relay_with() as (relay, a, b):
            closed = trio.socket.socket()
            await closed.bind(("127.0.0.1", 0))
            assert b._control is not None
            b._control.relay_tcp_port = closed.getsockname()[1]
            closed.close()
            stream = await a.open_stream(b.identity.peer_id)
            assert isinstance(stream, QuicStream)
            assert await roundtrip(stream, b"g" * 10_000) == b"g" * 10_000
            assert relay.lane is not None and relay.lane.stats.spliced == 0 and relay.lane.pending == 0

    trio.run(main)


def test_a_member_that_leaves_ends_its_lane_splices() -> None:
    async def main() -> None:
        async with relay_with() as (relay, a, b):
            stream = await a.open_stream(b.identity.peer_id)
            assert isinstance(stream, trio.SocketStream)
            assert await roundtrip(stream, b"h" * 1000) == b"h" * 1000
            relay._drop(relay.members[b.identity.peer_id], "test")
            with trio.fail_after(3):
                try:
                    while await stream.receive_some():
                        pass
                except trio.BrokenResourceError:
                    pass  # a reset is as good as an EOF: the splice is gone either way

    trio.run(main)


@pytest.mark.parametrize("kernel_threads", [64, 0], ids=["kernel-copy", "loop-copy"])
def test_a_cancelled_splice_lets_its_sockets_go_only_once_the_copy_stopped(kernel_threads: int) -> None:
    async def main() -> None:
        lane = TcpLane(TcpLaneLimits(kernel_threads=kernel_threads))
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            port = listeners[0].socket.getsockname()[1]
            nursery.start_soon(trio.serve_listeners, lane.handle, listeners)
            pair = lane.expect()
            assert pair is not None
            a = await trio.open_tcp_stream("127.0.0.1", port)
            b = await trio.open_tcp_stream("127.0.0.1", port)
            await a.send_all(MAGIC + pair.tickets[0])
            await b.send_all(MAGIC + pair.tickets[1])
            with trio.fail_after(3):
                await a.send_all(b"hello")
                assert await b.receive_some() == b"hello"
                assert pair.spliced
                lane.cancel(pair)  # as when a member leaves the relay
                # the side waiting for the splice (and its socket) is not let go before the copy stopped
                assert not pair.done.is_set()
                await pair.done.wait()
                for s in (a, b):  # both connections closed by the relay
                    try:
                        assert await s.receive_some() == b""
                    except trio.BrokenResourceError:
                        pass
            assert lane.stats.kernel == (1 if kernel_threads and ksplice.available() else 0)
            for s in (a, b):
                await s.aclose()
            nursery.cancel_scope.cancel()

    trio.run(main)


# ---------------------------------------------------------------------------------------------- hostile


def test_hostile_lane_connections_are_closed_and_the_lane_keeps_working() -> None:
    async def main() -> None:
        async with relay_with() as (relay, a, b):
            lane = relay.lane
            assert lane is not None
            port = relay.tcp_port

            async def closed_by_relay(data: bytes) -> None:
                s = await trio.open_tcp_stream("127.0.0.1", port)
                if data:
                    await s.send_all(data)
                with trio.fail_after(3):
                    try:
                        assert await s.receive_some() == b""
                    except trio.BrokenResourceError:
                        pass
                await s.aclose()

            await closed_by_relay(b"GET / HTTP/1.1\r\n\r\n")  # wrong magic
            await closed_by_relay(MAGIC + os.urandom(p.TICKET_LEN))  # a ticket nobody was given
            await closed_by_relay(b"")  # silence: closed after ticket_timeout_s
            await closed_by_relay(MAGIC + b"short")  # then silence
            assert lane.stats.bad_ticket == 4 and lane.stats.spliced == 0

            # a used ticket is spent: replaying a real one finds nothing
            pair = lane.expect()
            assert pair is not None
            s1 = await trio.open_tcp_stream("127.0.0.1", port)
            await s1.send_all(MAGIC + pair.tickets[0])
            await closed_by_relay(MAGIC + pair.tickets[0])
            assert lane.stats.bad_ticket == 5
            lane.cancel(pair)
            with trio.fail_after(3):
                assert await s1.receive_some() == b""  # the waiting side is let go when its pair is
            await s1.aclose()
            assert lane.stats.expired == 1 and lane.pending == 0

            stream = await a.open_stream(b.identity.peer_id)  # and the lane still works
            assert isinstance(stream, trio.SocketStream)
            assert await roundtrip(stream, b"ok" * 1000) == b"ok" * 1000

    trio.run(main)


def test_the_lane_bounds_its_pending_pairs_and_unpaired_connections() -> None:
    async def main() -> None:
        limits = replace(FAST, tcp=TcpLaneLimits(max_pending=1, max_unpaired=1, ticket_timeout_s=2.0))
        async with relay_with(limits) as (relay, a, b):
            lane = relay.lane
            assert lane is not None
            first = lane.expect()
            assert first is not None and lane.expect() is None  # max_pending
            # a member asking while the lane is full is told so and gets a QUIC stream instead
            stream = await a.open_stream(b.identity.peer_id)
            assert isinstance(stream, QuicStream) and not a.tcp_lane
            lane.cancel(first)
            idle = await trio.open_tcp_stream("127.0.0.1", relay.tcp_port)  # holds the one unpaired slot
            with trio.fail_after(1):
                await eventually(lambda: lane._unpaired == 1)
            extra = await trio.open_tcp_stream("127.0.0.1", relay.tcp_port)
            with trio.fail_after(1):
                try:
                    assert await extra.receive_some() == b""  # closed at once
                except trio.BrokenResourceError:
                    pass
            assert lane.stats.refused_busy == 1
            await idle.aclose()
            await extra.aclose()

    trio.run(main)
