"""Relay + members in one trio process over loopback UDP: directory, splicing, faults."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from aioquic.quic.connection import QuicConnection
from peer_helpers import eventually, roundtrip, wait_for

from eldric_p2p.errors import PeerUnavailable
from eldric_p2p.net.connector import Connector
from eldric_p2p.net.discovery import PeerTable
from eldric_p2p.net.identity import Identity
from eldric_p2p.net.links import Link
from eldric_p2p.net.relay import protocol as p
from eldric_p2p.net.relay.client import RelayMember
from eldric_p2p.net.relay.quic import QuicStream
from eldric_p2p.net.relay.quic_config import client_configuration
from eldric_p2p.net.relay.server import Relay, RelayLimits, run_relay

FAST = RelayLimits(keepalive_s=0.2, dead_after_s=0.8, handshake_timeout_s=0.5, register_timeout_s=1.0)


async def echo(stream: QuicStream, source: str) -> None:
    while data := await stream.receive_some():
        await stream.send_all(data)
    await stream.send_eof()


def make_member(
    relay_addr: tuple[str, int],
    name: str,
    handler: object = echo,
    *,
    ident: Identity | None = None,
    table: PeerTable | None = None,
) -> RelayMember:
    """A member with fast retries; pass `ident` and `table` to make one node a member of several relays."""
    ident = ident or Identity.generate()
    return RelayMember(
        ident,
        relay_addr[0],
        relay_addr[1],
        table if table is not None else PeerTable(ident.peer_id),
        lambda: {"name": name, "http_port": 8080, "roles": ["worker"]},
        handler,  # type: ignore[arg-type]
        backoff_initial_s=0.1,
        backoff_max_s=0.4,
        open_timeout_s=2.0,
        handshake_timeout_s=2.0,
    )


@asynccontextmanager
async def relay_with(
    members: int, limits: RelayLimits = FAST
) -> AsyncIterator[tuple[Relay, list[RelayMember]]]:
    async with trio.open_nursery() as nursery:
        relay: Relay = await nursery.start(
            lambda task_status: run_relay(
                "127.0.0.1", 0, Identity.generate(), limits=limits, task_status=task_status
            )
        )
        assert relay.address is not None
        ms = [make_member(relay.address, f"m{i}") for i in range(members)]
        for m in ms:
            await nursery.start(m.run)
        with trio.fail_after(5):
            for m in ms:
                await m.wait_registered()
        yield relay, ms
        nursery.cancel_scope.cancel()


def test_directory_push_and_a_spliced_echo_stream() -> None:
    async def main() -> None:
        async with relay_with(2) as (relay, (a, b)):
            with trio.fail_after(3):
                await wait_for(
                    [a.table, b.table],
                    lambda: b.identity.peer_id in a.table and a.identity.peer_id in b.table,
                )
            seen = a.table.get(b.identity.peer_id)
            assert (
                seen is not None and seen.source == "relay" and seen.name == "m1" and seen.http_port == 8080
            )
            assert a.relay_id == relay.identity.peer_id

            stream = await a.open_stream(b.identity.peer_id)
            assert await roundtrip(stream, b"hello") == b"hello"
            payload = os.urandom(300_000)  # more than the relay's stream window: flow control must hold
            assert await roundtrip(stream, payload) == payload
            await stream.send_eof()
            assert await stream.receive_some() == b""  # the far end's EOF crosses the splice
            await stream.aclose()
            assert relay.stats.streams_spliced == 1
            with trio.fail_after(2):
                await eventually(lambda: relay.stats.bytes_spliced >= 2 * len(payload))

    trio.run(main)


def test_unknown_peer_id_is_refused_and_the_relay_keeps_serving() -> None:
    async def main() -> None:
        async with relay_with(2) as (relay, (a, b)):
            with pytest.raises(PeerUnavailable, match="unknown_peer"):
                await a.open_stream(Identity.generate().peer_id)
            with pytest.raises(PeerUnavailable, match="self"):
                await a.open_stream(a.identity.peer_id)
            stream = await a.open_stream(b.identity.peer_id)
            assert await roundtrip(stream, b"still here") == b"still here"
            assert relay.stats.streams_refused == 2

    trio.run(main)


def test_garbage_and_half_open_handshakes_leave_the_relay_serving() -> None:
    async def main() -> None:
        async with relay_with(1) as (relay, (a,)):
            assert relay.address is not None and relay.server is not None
            with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                await sock.bind(("127.0.0.1", 0))
                for size in (0, 1, 7, 50, 1199, 1200, 1500, 9000):
                    await sock.sendto(os.urandom(size), relay.address)
                await sock.sendto(b"\xc0" + os.urandom(1300), relay.address)  # long header, junk inside
                # a client that sends its Initial and then never answers
                half = QuicConnection(configuration=client_configuration())
                half.connect(relay.address, now=trio.current_time())
                for data, addr in half.datagrams_to_send(now=trio.current_time()):
                    await sock.sendto(data, addr)
                await trio.sleep(0.05)
                assert len(relay.server._conns) == 2  # the member and the half-open one
                with trio.fail_after(3):
                    await eventually(lambda: relay.server.stats.half_open_dropped >= 1)
            stats = relay.server.stats
            assert stats.garbage + stats.unroutable + stats.version_negotiations >= 8
            # the relay still takes new members and splices for them
            b = make_member(relay.address, "late")
            async with trio.open_nursery() as nursery:
                await nursery.start(b.run)
                with trio.fail_after(3):
                    await b.wait_registered()
                    await wait_for([a.table], lambda: b.identity.peer_id in a.table)
                stream = await a.open_stream(b.identity.peer_id)
                assert await roundtrip(stream, b"ok") == b"ok"
                nursery.cancel_scope.cancel()

    trio.run(main)


class Cable:
    """A UDP forwarder between one member and the relay that can be cut (the member vanishes: no goodbye)."""

    def __init__(self, relay_addr: tuple[str, int]) -> None:
        self.relay_addr = relay_addr
        self.cut = False
        self.front = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.back = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    async def run(self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
        await self.front.bind(("127.0.0.1", 0))
        await self.back.bind(("127.0.0.1", 0))
        client: list[tuple[str, int]] = []

        async def forward() -> None:
            while True:
                data, addr = await self.front.recvfrom(65536)
                client[:] = [addr]
                if not self.cut:
                    await self.back.sendto(data, self.relay_addr)

        async def backward() -> None:
            while True:
                data, _ = await self.back.recvfrom(65536)
                if not self.cut and client:
                    await self.front.sendto(data, client[0])

        with self.front, self.back:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(forward)
                nursery.start_soon(backward)
                task_status.started(self.front.getsockname())


def test_a_vanished_member_is_dropped_and_the_others_see_it_go() -> None:
    async def main() -> None:
        async with relay_with(1) as (relay, (a,)):
            assert relay.address is not None
            async with trio.open_nursery() as nursery:
                cable = Cable(relay.address)
                front = await nursery.start(cable.run)
                c = make_member(front, "doomed")
                await nursery.start(c.run)
                with trio.fail_after(3):
                    await wait_for([a.table], lambda: c.identity.peer_id in a.table)
                cable.cut = True
                with trio.fail_after(3):  # dead_after 0.8 s plus a keepalive period
                    await wait_for([a.table], lambda: c.identity.peer_id not in a.table)
                assert c.identity.peer_id not in relay.members
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_members_reconnect_after_a_relay_restart() -> None:
    async def main() -> None:
        ident = Identity.generate()
        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()

            async def relay_once(port: int, *, task_status: trio.TaskStatus[Relay]) -> None:
                with scope:
                    await run_relay("127.0.0.1", port, ident, limits=FAST, task_status=task_status)

            relay: Relay = await nursery.start(relay_once, 0)
            assert relay.address is not None
            addr = relay.address
            a, b = make_member(addr, "a"), make_member(addr, "b")
            await nursery.start(a.run)
            await nursery.start(b.run)
            with trio.fail_after(3):
                await a.wait_registered()
                await b.wait_registered()

            scope.cancel()  # the relay dies without closing anything
            with trio.fail_after(4):
                await wait_for([a.table], lambda: b.identity.peer_id not in a.table)
            with trio.fail_after(3):
                await eventually(lambda: not a.registered)
            scope = trio.CancelScope()
            relay = await nursery.start(relay_once, addr[1])
            with trio.fail_after(5):
                await eventually(lambda: a.connects >= 2 and b.connects >= 2)
                await wait_for([a.table], lambda: b.identity.peer_id in a.table)
            stream = await a.open_stream(b.identity.peer_id)
            assert await roundtrip(stream, b"after restart") == b"after restart"
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_member_without_a_handler_refuses_streams() -> None:
    async def main() -> None:
        async with relay_with(1) as (relay, (a,)):
            assert relay.address is not None
            quiet = make_member(relay.address, "quiet", handler=None)
            async with trio.open_nursery() as nursery:
                await nursery.start(quiet.run)
                with trio.fail_after(3):
                    await quiet.wait_registered()
                with pytest.raises(PeerUnavailable, match="no_handler"):
                    await a.open_stream(quiet.identity.peer_id)
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_directories_of_two_relays_fill_one_table_side_by_side() -> None:
    ident = Identity.generate()
    table = PeerTable(ident.peer_id)
    a, b = (make_member(("127.0.0.1", port), "x", ident=ident, table=table) for port in (4433, 4434))
    shared, only_a, only_b = (Identity.generate().peer_id for _ in range(3))

    def listed(peer_id: str, name: str) -> p.Member:
        return p.Member(peer_id, b"", {"name": name, "http_port": 8080})

    a._apply_directory(p.Directory((listed(shared, "s"), listed(only_a, "a"))), now=1.0)
    b._apply_directory(p.Directory((listed(shared, "s"), listed(only_b, "b"))), now=2.0)
    assert {shared, only_a, only_b} == {i.peer_id for i in table.peers()}
    assert table.relays(shared) == ["127.0.0.1:4433", "127.0.0.1:4434"]

    # an update through A (only_a leaves, shared re-announces) leaves B's entries alone
    a._apply_directory(p.DirectoryUpdate(added=(listed(shared, "s2"),), removed=(only_a,)), now=3.0)
    assert only_a not in table and only_b in table and table.relays(shared) == [a.address, b.address]
    assert table.get(shared).name == "s2"  # type: ignore[union-attr]  # the freshest announcement
    b._apply_directory(p.DirectoryUpdate(removed=(shared,)), now=4.0)
    assert table.relays(shared) == [a.address] and only_b in table


async def echo_link(link: Link) -> None:
    while data := await link.receive_some():
        await link.send_all(data)


def test_a_node_in_two_relays_keeps_a_peer_both_list_while_either_is_up() -> None:
    """x and s are members of relays R1 and R2, c only of R1, d only of R2. d leaving R2 and R1 dying each
    take only their own peers from x's table, and x still links to s (through R2) when R1 is gone."""

    async def main() -> None:
        async with trio.open_nursery() as nursery:

            async def relay_in(scope: trio.CancelScope, *, task_status: trio.TaskStatus[Relay]) -> None:
                with scope:
                    await run_relay("127.0.0.1", 0, Identity.generate(), limits=FAST, task_status=task_status)

            r1_scope, d_scope = trio.CancelScope(), trio.CancelScope()
            r1: Relay = await nursery.start(relay_in, r1_scope)
            r2: Relay = await nursery.start(relay_in, trio.CancelScope())
            assert r1.address is not None and r2.address is not None
            x_ident, s_ident = Identity.generate(), Identity.generate()
            x_table = PeerTable(x_ident.peer_id)
            x1 = make_member(r1.address, "x", ident=x_ident, table=x_table)
            x2 = make_member(r2.address, "x", ident=x_ident, table=x_table)
            x_conn = Connector(x_ident, x_table)
            x_conn.members += [x1, x2]
            s_table = PeerTable(s_ident.peer_id)
            s_conn = Connector(s_ident, s_table)
            s_conn.frames_handler = echo_link
            s1 = make_member(r1.address, "s", s_conn.handle_relayed, ident=s_ident, table=s_table)
            s2 = make_member(r2.address, "s", s_conn.handle_relayed, ident=s_ident, table=s_table)
            c, d = make_member(r1.address, "c"), make_member(r2.address, "d")
            for m in (x1, s1, c):
                await nursery.start(m.run)
            with trio.fail_after(5):  # R1 lists s first, so x's table has R1 before R2 for s
                await wait_for([x_table], lambda: x_table.relays(s_ident.peer_id) == [x1.address])
            for m in (x2, s2):
                await nursery.start(m.run)

            async def run_d(*, task_status: trio.TaskStatus[None]) -> None:
                with d_scope:
                    await d.run(task_status=task_status)

            await nursery.start(run_d)
            s_id, c_id, d_id = s_ident.peer_id, c.identity.peer_id, d.identity.peer_id
            with trio.fail_after(5):
                await wait_for(
                    [x_table],
                    lambda: (
                        {s_id, c_id, d_id} <= {i.peer_id for i in x_table.peers()}
                        and len(x_table.relays(s_id)) == 2
                    ),
                )
            assert x_table.relays(c_id) == [x1.address] and x_table.relays(d_id) == [x2.address]

            d_scope.cancel()  # d leaves R2: R2's directory update must not touch R1's entries
            with trio.fail_after(5):
                await wait_for([x_table], lambda: d_id not in x_table)
            assert c_id in x_table and x_table.relays(s_id) == [x1.address, x2.address]

            r1_scope.cancel()  # R1 dies without a goodbye: x's membership there ends after its silence
            with trio.fail_after(5):
                await wait_for([x_table], lambda: c_id not in x_table)
            assert x_table.relays(s_id) == [x2.address]
            info = x_table.get(s_id)
            assert info is not None and info.source == "relay" and info.name == "s"

            with trio.fail_after(5):
                link = await x_conn.open_link(s_id)  # no address announced: relayed, through R2
            assert link.path == "relayed" and x_conn.paths[s_id] == "relayed"
            await link.send_all(b"EF still reachable")
            got = b""
            with trio.fail_after(3):
                while len(got) < 18 and (chunk := await link.receive_some()):
                    got += chunk
            assert got == b"EF still reachable"
            await link.aclose()
            nursery.cancel_scope.cancel()

    trio.run(main)
