"""Hole punching on loopback, in one trio process: a relay and members with their own UDP sockets.

There is no NAT on loopback, so a punch works whenever both members probe; "a peer that never answers" is a
member whose socket drops every probe, as a NAT with a symmetric mapping would make it look.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace

import pytest
import trio
from aioquic.quic.connection import QuicConnection

from eldric_p2p.errors import AuthenticationError, PeerUnavailable
from eldric_p2p.net.connector import Connector
from eldric_p2p.net.discovery import PeerTable
from eldric_p2p.net.identity import Identity
from eldric_p2p.net.links import Link, link_client
from eldric_p2p.net.relay.client import RelayMember
from eldric_p2p.net.relay.punch import PROBE_MAGIC, PUNCH_TIMEOUT_S
from eldric_p2p.net.relay.quic import QuicStream
from eldric_p2p.net.relay.quic_config import client_configuration
from eldric_p2p.net.relay.server import Relay, RelayLimits, run_relay

FAST = RelayLimits(keepalive_s=0.2, dead_after_s=2.0)


async def echo_link(link: Link) -> None:
    while data := await link.receive_some():
        await link.send_all(data)


@asynccontextmanager
async def swarm(n: int, limits: RelayLimits = FAST) -> AsyncIterator[tuple[Relay, list[Connector]]]:
    """A relay and `n` nodes' connectors, each a member with a punch handler, echoing pipeline links."""
    async with trio.open_nursery() as nursery:
        relay: Relay = await nursery.start(
            lambda task_status: run_relay(
                "127.0.0.1", 0, Identity.generate(), limits=limits, task_status=task_status
            )
        )
        assert relay.address is not None
        connectors = []
        for i in range(n):
            ident = Identity.generate()
            table = PeerTable(ident.peer_id)
            conn = Connector(ident, table)
            conn.frames_handler = echo_link
            member = RelayMember(ident, "127.0.0.1", relay.address[1], table, lambda i=i: {"name": f"n{i}"},
                                 conn.handle_relayed, punch_handler=conn.handle_punched,
                                 backoff_initial_s=0.1, backoff_max_s=0.4)  # fmt: skip
            conn.members.append(member)
            await nursery.start(member.run)
            connectors.append(conn)
        with trio.fail_after(5):
            for c in connectors:
                await c.members[0].wait_registered()
        yield relay, connectors
        nursery.cancel_scope.cancel()


async def roundtrip(stream: trio.abc.Stream, payload: bytes) -> bytes:
    await stream.send_all(payload)
    got = bytearray()
    while len(got) < len(payload):
        chunk = await stream.receive_some()
        assert chunk, "stream ended early"
        got += chunk
    return bytes(got)


@pytest.mark.parametrize("tcp", [True, False], ids=["onto-tcp", "quic"])
def test_two_members_punch_on_loopback_and_links_go_both_ways_over_one_connection(tcp: bool) -> None:
    async def main() -> None:
        async with swarm(2) as (relay, (a, b)):
            a_id, b_id = a.identity.peer_id, b.identity.peer_id
            a.tcp_punches.enabled = b.tcp_punches.enabled = tcp
            with trio.fail_after(10):
                link = await a.open_link(b_id)  # no TCP address known: punched, not relayed
                assert link.path == "punched" and link.peer_id == b_id
                payload = b"hello over a punched path" * 100
                assert await roundtrip(link, payload) == payload
                assert a.paths[b_id] == "punched" and a.stats["punched"] == 1 and a.stats["relayed"] == 0
                assert relay.stats.streams_spliced == 0 and relay.punches is not None
                assert relay.punches.brokered == 1
                # the other side has the same connection and opens its link over it without a new punch
                ma, mb = a.members[0], b.members[0]
                assert mb.punched(a_id) is not None and ma.punched(b_id) is not None
                back = await b.open_link(a_id)
                assert back.path == "punched" and back.peer_id == a_id
                assert await roundtrip(back, b"and back") == b"and back"
                assert relay.punches.brokered == 1 and mb.puncher is not None and ma.puncher is not None
                assert ma.puncher.stats.punched == mb.puncher.stats.punched == 1
                took = ma.puncher.stats.last_punch_s
                assert took is not None and took < PUNCH_TIMEOUT_S
                conn = ma.punched(b_id)
                # with TCP: each link moved onto a TCP connection of its own (the QUIC streams that asked for
                # them are closed); without: both links are streams of the one punched QUIC connection
                transport = trio.SocketStream if tcp else QuicStream
                assert isinstance(link.tls.transport_stream, transport)
                assert isinstance(back.tls.transport_stream, transport)
                assert a.stats["tcp_punched"] == b.stats["tcp_punched"] == int(tcp)
                assert conn is not None and conn.stream_count == (0 if tcp else 2)
                await link.aclose()
                await back.aclose()

    trio.run(main)


def test_a_peer_that_never_answers_probes_falls_back_to_relayed_in_bounded_time() -> None:
    """With a relay that forwards no channels: the spliced stream (the fallback of older relays)."""

    async def main() -> None:
        async with swarm(2, replace(FAST, channels=None)) as (relay, (a, b)):
            b_member = b.members[0]
            assert b_member.endpoint is not None
            b_member.endpoint.on_probe = lambda data, addr: None  # b's "NAT" eats every probe
            start = trio.current_time()
            with trio.fail_after(10):
                link = await a.open_link(b.identity.peer_id)
            took = trio.current_time() - start
            assert link.path == "relayed" and link.peer_id == b.identity.peer_id
            assert took < PUNCH_TIMEOUT_S + 1.5, took  # the punch timeout, then the relayed stream
            assert await roundtrip(link, b"x" * 5000) == b"x" * 5000
            assert a.stats["punch_failed"] == 1 and relay.stats.streams_spliced == 1
            puncher = a.members[0].puncher
            assert puncher is not None and puncher.stats.failed == 1 and puncher.stats.punched == 0
            # remembered: the next link goes relayed at once, with no new punch
            start = trio.current_time()
            with trio.fail_after(3):
                again = await a.open_link(b.identity.peer_id)
            assert again.path == "relayed" and trio.current_time() - start < 1.0
            assert puncher.stats.attempts == 1
            # b took part in the failed attempt: its own link to a skips punching too
            start = trio.current_time()
            with trio.fail_after(3):
                back = await b.open_link(a.identity.peer_id)
            assert back.path == "relayed" and trio.current_time() - start < 1.0
            b_puncher = b.members[0].puncher
            assert b_puncher is not None and b_puncher.stats.attempts == 1 and b_puncher.stats.failed == 1

    trio.run(main)


def test_a_peer_that_never_answers_probes_gets_one_quic_hop_through_the_relays_channel() -> None:
    async def main() -> None:
        async with swarm(2, replace(FAST, tcp=None)) as (relay, (a, b)):  # a relay without a TCP lane
            assert relay.channels is not None
            b_member = b.members[0]
            assert b_member.endpoint is not None
            b_member.endpoint.on_probe = lambda data, addr: None  # b's "NAT" eats every probe
            start = trio.current_time()
            with trio.fail_after(10):
                link = await a.open_link(b.identity.peer_id)
            took = trio.current_time() - start
            assert link.path == "relayed" and link.peer_id == b.identity.peer_id
            assert took < PUNCH_TIMEOUT_S + 1.5, took  # the punch timeout, then the channel's handshake
            assert await roundtrip(link, b"x" * 50_000) == b"x" * 50_000
            # one QUIC connection end to end: the relay spliced nothing and forwarded datagrams unopened
            assert relay.stats.streams_spliced == 0 and relay.channels.stats.forwarded > 40
            assert a.stats["forwarded"] == 1 and a.stats["relayed"] == 1
            puncher = a.members[0].puncher
            assert puncher is not None and puncher.stats.forwarded == 1 and puncher.stats.punched == 0
            conn = puncher.live(b.identity.peer_id)
            assert conn is not None and conn.forwarded
            # the channel connection is kept: the next links, both ways, use it at once
            start = trio.current_time()
            with trio.fail_after(3):
                again = await a.open_link(b.identity.peer_id)
                back = await b.open_link(a.identity.peer_id)
            assert again.path == back.path == "relayed" and trio.current_time() - start < 1.0
            assert await roundtrip(back, b"y" * 3000) == b"y" * 3000
            assert puncher.stats.attempts == 1 and relay.stats.streams_spliced == 0
            # b leaves the relay: its channels close there, and datagrams for them are dropped
            (chan_a,) = [end.own for end in relay.channels._ends.values() if end.member == a.identity.peer_id]
            relay._drop(relay.members[b.identity.peer_id], "test")
            assert len(relay.channels) == 0
            a_addr = ("127.0.0.1", a.members[0].endpoint.port)  # type: ignore[union-attr]
            assert relay.channels.forward_untrusted(b"\x01" + chan_a + b"q" * 40, a_addr,
                                                    trio.current_time()) is None  # fmt: skip

    trio.run(main)


def test_a_relay_that_brokers_no_punches_leaves_links_relayed_without_a_wait() -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            relay: Relay = await nursery.start(
                lambda task_status: run_relay("127.0.0.1", 0, Identity.generate(),
                                              limits=RelayLimits(punch=None), task_status=task_status)
            )  # fmt: skip
            assert relay.address is not None
            nodes = []
            for _ in range(2):
                ident = Identity.generate()
                c = Connector(ident, PeerTable(ident.peer_id))
                c.frames_handler = echo_link
                m = RelayMember(ident, "127.0.0.1", relay.address[1], c.table, dict, c.handle_relayed,
                                punch_handler=c.handle_punched)  # fmt: skip
                c.members.append(m)
                await nursery.start(m.run)
                await m.wait_registered()
                nodes.append(c)
            a, b = nodes
            assert not a.members[0].can_punch
            with trio.fail_after(2):
                link = await a.open_link(b.identity.peer_id)
            assert link.path == "relayed"
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_strangers_probes_and_quic_initials_reach_nothing() -> None:
    async def main() -> None:
        async with swarm(2) as (relay, (a, b)):
            member = b.members[0]
            assert member.endpoint is not None and member.puncher is not None
            port = member.endpoint.port
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(PROBE_MAGIC + b"\x00" * 25, ("127.0.0.1", port))  # a well-formed probe, no attempt
                s.sendto(PROBE_MAGIC + b"\x00" * 5, ("127.0.0.1", port))  # malformed
                s.sendto(b"\x00garbage", ("127.0.0.1", port))
                # a QUIC client that simply connects: no punch in progress expects it
                quic = QuicConnection(configuration=client_configuration())
                quic.connect(("127.0.0.1", port), now=0.0)
                for data, _ in quic.datagrams_to_send(now=0.0):
                    s.sendto(data, ("127.0.0.1", port))
            with trio.fail_after(3):
                while member.endpoint.stats.initials_refused < 1:  # noqa: ASYNC110
                    await trio.sleep(0.02)
            stats = member.puncher.stats
            assert stats.stray_probes == 1 and stats.bad_probes == 1
            assert member.endpoint.connections == 1  # the relay connection only
            # and the member still punches and serves
            with trio.fail_after(10):
                link = await a.open_link(b.identity.peer_id)
            assert link.path == "punched" and await roundtrip(link, b"ok") == b"ok"

    trio.run(main)


@pytest.mark.parametrize("n", [3])
def test_concurrent_links_to_one_peer_share_one_punch(n: int) -> None:
    async def main() -> None:
        async with swarm(2) as (relay, (a, b)):
            links: list[Link] = []

            async def one() -> None:
                links.append(await a.open_link(b.identity.peer_id))

            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    for _ in range(n):
                        nursery.start_soon(one)
            assert [link.path for link in links] == ["punched"] * n
            puncher = a.members[0].puncher
            assert puncher is not None and puncher.stats.attempts == 1
            assert relay.punches is not None and relay.punches.brokered == 1

    trio.run(main)


def test_the_link_over_a_punched_stream_still_authenticates_the_peer() -> None:
    async def main() -> None:
        async with swarm(2) as (relay, (a, b)):
            member = a.members[0]
            with trio.fail_after(10):
                conn = await member.punch(b.identity.peer_id)
            impostor = Identity.generate()
            stream: QuicStream = conn.open_stream()
            with pytest.raises(AuthenticationError, match="expected peer"):
                await link_client(stream, a.identity, impostor.peer_id, path="punched")
            # the same connection still carries a proper link
            good = await link_client(conn.open_stream(), a.identity, b.identity.peer_id, path="punched")
            assert good.peer_id == b.identity.peer_id

    trio.run(main)


def test_punch_raises_peer_unavailable_for_a_peer_the_relay_does_not_know() -> None:
    async def main() -> None:
        async with swarm(1) as (relay, (a,)):
            with trio.fail_after(5), pytest.raises(PeerUnavailable, match="unknown_peer"):
                await a.members[0].punch(Identity.generate().peer_id)

    trio.run(main)


def test_with_a_tcp_lane_a_failed_punch_relays_over_tcp_instead_of_the_channel() -> None:
    async def main() -> None:
        async with swarm(2) as (relay, (a, b)):
            assert relay.lane is not None and relay.tcp_port
            b_member = b.members[0]
            assert b_member.endpoint is not None
            b_member.endpoint.on_probe = lambda data, addr: None  # the punch fails, the channel would work
            with trio.fail_after(10):
                link = await a.open_link(b.identity.peer_id)
            assert link.path == "relayed" and link.peer_id == b.identity.peer_id
            assert await roundtrip(link, b"x" * 200_000) == b"x" * 200_000
            assert a.stats["lane"] == 1 and a.stats["forwarded"] == 0 and a.stats["punch_failed"] == 0
            assert relay.lane.stats.spliced == 1 and a.members[0].lane_streams == 1
            assert b.members[0].lane_streams == 1
            # the bytes went through the lane, not the channel (that carried the punch's handshake only)
            assert relay.channels is not None and relay.channels.stats.forwarded < 40
            # the way back takes the lane too, without punching again
            with trio.fail_after(3):
                back = await b.open_link(a.identity.peer_id)
            assert back.path == "relayed" and await roundtrip(back, b"y" * 3000) == b"y" * 3000
            assert relay.lane.stats.spliced == 2 and b.stats["lane"] == 1

    trio.run(main)
