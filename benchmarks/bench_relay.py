"""Relayed vs direct byte streams, in one process on loopback, in one run.

    python benchmarks/bench_relay.py [--rounds 300] [--bulk-mb 8] [--datagram 1350]

Measures a 1.8 KB frame round trip (one decode step's hidden state for a 896-dim model in fp16) and one-way
bulk MB/s over: plain TCP, one QUIC hop (member -> relay-sized server), and three relayed paths from member
A to member B: spliced streams (A -> relay -> B, two QUIC hops, the relay decrypting and re-encrypting), a
forwarding channel (one QUIC connection A <-> B whose datagrams the relay passes on unopened), and the
relay's TCP lane (A's and B's TCP connections to the relay, spliced: what members get when a hole punch
fails and the relay has the lane), with a punched connection (direct, one QUIC hop between the members' own
sockets) beside them. The lane carries no encryption of its own, so it is measured twice: bare, and with
the link handshake's TLS over it, as every relayed link runs. Prints a table with ratios against TCP.

Then the relay's TCP lane once more with the relay in a process of its own, as it runs when deployed: its
copy done by the kernel (splice(2) in a thread, the default on Linux) and by its event loop
(`TcpLaneLimits.kernel_threads=0`), alternated, with the relay process's CPU time per frame passing it.

The last line is the ceiling of any QUIC path here: two aioquic connections handing each other datagrams in
memory, no sockets, no event loop, no relay; bulk MB/s and the CPU time per 1350-byte datagram, both ends
together. A relayed or punched path cannot beat it on one core.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from aioquic.buffer import Buffer
from aioquic.quic import events
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import pull_quic_header

from eldric_p2p.net.connector import Connector
from eldric_p2p.net.discovery import PeerTable
from eldric_p2p.net.identity import Identity
from eldric_p2p.net.links import Link, link_client, serve_link_stream
from eldric_p2p.net.relay.client import RelayMember
from eldric_p2p.net.relay.punch import PunchLimits
from eldric_p2p.net.relay.quic import FlowControlledQuicConnection, QuicConn
from eldric_p2p.net.relay.quic_config import client_configuration, server_configuration
from eldric_p2p.net.relay.quic_udp import QuicServer, connect_quic, open_udp_socket
from eldric_p2p.net.relay.server import RelayLimits, run_relay
from eldric_p2p.net.relay.tcplane import MAGIC, TcpLaneLimits

# a relay's TCP lane alone, in its own process: one pair of tickets, served until that pair's splice ends
LANE_PROCESS = r"""
import sys, trio
from eldric_p2p.net.relay.tcplane import TcpLane, TcpLaneLimits

async def main(kernel_threads):
    lane = TcpLane(TcpLaneLimits(kernel_threads=kernel_threads))
    pair = lane.expect()
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    print(listeners[0].socket.getsockname()[1], pair.tickets[0].hex(), pair.tickets[1].hex(), flush=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, lane.handle, listeners)
        await pair.done.wait()
        print(lane.stats.kernel, flush=True)
        nursery.cancel_scope.cancel()

trio.run(main, int(sys.argv[1]))
"""

FRAME = 1800


async def serve(stream: trio.abc.Stream) -> None:
    """First byte picks the mode: b"E" echoes; b"S" and an 8-byte length swallow that many bytes and answer
    one byte (a TLS link has no half-close to mark the end)."""
    mode = await stream.receive_some(1)
    if mode == b"E":
        while data := await stream.receive_some():
            await stream.send_all(data)
    elif mode == b"S":
        head = b""
        while len(head) < 8:
            if not (data := await stream.receive_some(8 - len(head))):
                return
            head += data
        left = int.from_bytes(head, "big")
        while left > 0 and (data := await stream.receive_some()):
            left -= len(data)
        await stream.send_all(b"!")
    await stream.aclose()


async def round_trip(s: trio.abc.Stream, frame: bytes) -> float:
    """Seconds to send `frame` to an echoing peer and read it all back."""
    t = time.perf_counter()
    await s.send_all(frame)
    got = 0
    while got < len(frame):
        got += len(await s.receive_some())
    return time.perf_counter() - t


async def measure(
    open_stream: Callable[[], Awaitable[trio.abc.Stream]], rounds: int, bulk: int
) -> tuple[float, float]:
    """(median round-trip ms for one FRAME, bulk MB/s one way)."""
    s = await open_stream()
    await s.send_all(b"E")
    frame = b"\x01" * FRAME
    times = []
    for _ in range(rounds):
        times.append(await round_trip(s, frame))
    await s.aclose()
    times.sort()

    s = await open_stream()
    chunk = b"\x02" * 65536
    t = time.perf_counter()
    await s.send_all(b"S" + (-(-bulk // len(chunk)) * len(chunk)).to_bytes(8, "big"))
    sent = 0
    while sent < bulk:
        await s.send_all(chunk)
        sent += len(chunk)
    assert await s.receive_some() == b"!"
    elapsed = time.perf_counter() - t
    await s.aclose()
    return times[len(times) // 2] * 1000, sent / elapsed / 1e6


def _cpu_s(pid: int) -> float:
    """CPU seconds of process `pid`'s live threads, to the nanosecond (schedstat; /proc/PID/stat counts in
    10 ms ticks, too coarse for a few hundred frames)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except FileNotFoundError:
            pass  # a thread that just ended
    return total / 1e9


async def lane_in_process(kernel_threads: int, rounds: int) -> tuple[float, float, bool]:
    """A frame's round trip through a relay process's TCP lane (A -> relay -> B echoes -> relay -> A):
    (median ms, the relay's CPU µs per frame passing through it, whether the kernel copied)."""
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-c", LANE_PROCESS, str(kernel_threads)], stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    out = b""

    async def line() -> str:
        nonlocal out
        while b"\n" not in out:
            assert proc.stdout is not None
            data = await proc.stdout.receive_some()
            assert data, "the relay process ended"
            out += data
        first, out = out.split(b"\n", 1)
        return first.decode()

    try:
        port_s, ticket_a, ticket_b = (await line()).split()
        a = await trio.open_tcp_stream("127.0.0.1", int(port_s))
        b = await trio.open_tcp_stream("127.0.0.1", int(port_s))
        await a.send_all(MAGIC + bytes.fromhex(ticket_a))
        await b.send_all(MAGIC + bytes.fromhex(ticket_b))
        frame = b"\x01" * FRAME
        times = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve, b)
            await a.send_all(b"E")
            for i in range(rounds + 20):
                if i == 20:  # warmed up
                    cpu0 = _cpu_s(proc.pid)
                times.append(await round_trip(a, frame))
            cpu = _cpu_s(proc.pid) - cpu0
            await a.aclose()
        kernel = (await line()).strip() == "1"
    finally:
        proc.kill()
        await proc.wait()
    times = sorted(times[20:])
    return times[len(times) // 2] * 1000, cpu / (2 * rounds) * 1e6, kernel


async def _connector_members(
    nursery: trio.Nursery, relay: tuple[str, int], datagram: int
) -> tuple[Connector, Connector]:
    """Two nodes' connectors, members of the relay, whose incoming links `serve`."""
    out = []
    for _ in range(2):
        ident = Identity.generate()
        table = PeerTable(ident.peer_id)
        conn = Connector(ident, table)
        conn.frames_handler = serve
        member = RelayMember(ident, *relay, table, lambda: {"name": "bench"}, conn.handle_relayed,
                             max_datagram_size=datagram, punch_handler=conn.handle_punched)  # fmt: skip
        conn.members.append(member)
        await nursery.start(member.run)
        await member.wait_registered()
        out.append(conn)
    with trio.fail_after(10):
        while out[1].identity.peer_id not in out[0].members[0].table:  # noqa: ASYNC110
            await trio.sleep(0.05)
    return out[0], out[1]


def aioquic_in_memory(datagram: int, total: int) -> tuple[float, float]:
    """(MB/s, µs per data datagram): a stream's bytes between two aioquic connections passed in memory."""
    client = FlowControlledQuicConnection(configuration=client_configuration(max_datagram_size=datagram))
    now = 0.0
    client.connect(("192.0.2.1", 4433), now=now)
    first = client.datagrams_to_send(now=now)
    header = pull_quic_header(Buffer(data=first[0][0]), host_cid_length=8)
    server = FlowControlledQuicConnection(
        configuration=server_configuration(max_datagram_size=datagram),
        original_destination_connection_id=header.destination_cid,
    )
    for data, _ in first:
        server.receive_datagram(data, ("192.0.2.2", 50000), now=now)

    def pump(a: QuicConnection, b: QuicConnection, src: tuple[str, int]) -> int:
        out = a.datagrams_to_send(now=now)
        for data, _ in out:
            b.receive_datagram(data, src, now=now)
        return len(out)

    for _ in range(10):  # the handshake
        pump(client, server, ("192.0.2.2", 50000))
        pump(server, client, ("192.0.2.1", 4433))
    sid = client.get_next_available_stream_id()
    chunk, sent, got, datagrams = b"\x03" * 65536, 0, 0, 0
    t = time.perf_counter()
    while got < total:
        if sent < total and _buffered(client, sid) < 256 * 1024:
            client.send_stream_data(sid, chunk)
            sent += len(chunk)
        now += 0.0002
        datagrams += pump(client, server, ("192.0.2.2", 50000))
        while (event := server.next_event()) is not None:
            if isinstance(event, events.StreamDataReceived):
                got += len(event.data)
                server.consume(sid, len(event.data))
        for conn in (client, server):
            if (timer := conn.get_timer()) is not None and timer <= now:
                conn.handle_timer(now)
        pump(server, client, ("192.0.2.1", 4433))
        while client.next_event() is not None:
            pass
    elapsed = time.perf_counter() - t
    return got / elapsed / 1e6, elapsed / datagrams * 1e6


class _SmallSegments(trio.abc.SocketFactory):
    """New TCP sockets get TCP_MAXSEG `mss`: the kernel segments (and receives) WAN-sized packets."""

    def __init__(self, mss: int) -> None:
        self.mss = mss

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM, proto: int = 0) -> Any:
        sock = trio.socket.from_stdlib_socket(socket.socket(family, type, proto))
        if type == socket.SOCK_STREAM:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, self.mss)
        return sock


def _buffered(conn: QuicConnection, stream_id: int) -> int:
    stream = conn._streams.get(stream_id)
    return 0 if stream is None else int(stream.sender._buffer_stop - stream.sender._buffer_start)


async def main(args: argparse.Namespace) -> None:
    bulk = int(args.bulk_mb * 1e6)
    results: dict[str, tuple[float, float]] = {}
    async with trio.open_nursery() as nursery:
        # TCP
        listeners = await nursery.start(
            lambda task_status: trio.serve_tcp(serve, 0, host="127.0.0.1", task_status=task_status)  # noqa: ASYNC105
        )
        port = listeners[0].socket.getsockname()[1]

        async def open_tcp() -> trio.abc.Stream:
            return await trio.open_tcp_stream("127.0.0.1", port)

        results["TCP (direct)"] = await measure(open_tcp, args.rounds, bulk)

        # one QUIC hop
        async def quic_handler(conn: QuicConn) -> None:
            async with trio.open_nursery() as n:
                while True:
                    n.start_soon(serve, await conn.accept_stream())

        sock = await open_udp_socket("127.0.0.1", 0)
        server = QuicServer(sock, server_configuration(max_datagram_size=args.datagram), quic_handler)
        await nursery.start(server.run)
        async with connect_quic(
            "127.0.0.1", sock.getsockname()[1], client_configuration(max_datagram_size=args.datagram)
        ) as conn:

            async def open_quic() -> trio.abc.Stream:
                return conn.open_stream()

            results["QUIC, one hop"] = await measure(open_quic, args.rounds, bulk)

        # relayed: A -> relay -> B
        # the lane copied by this process's event loop: with everything in one process a kernel-copy thread
        # only adds two cross-CPU wake-ups per pass (the section after the table has the relay in a process
        # of its own, as deployed, with both copies)
        limits = RelayLimits(max_datagram_size=args.datagram, tcp=TcpLaneLimits(kernel_threads=0))
        relay = await nursery.start(
            lambda task_status: run_relay(
                "127.0.0.1", 0, Identity.generate(), limits=limits, task_status=task_status
            )
        )
        members = []
        tls_ident = Identity.generate()

        async def serve_link(link: Link) -> None:
            await serve(link)

        async def lane_handler(stream: trio.abc.Stream, source: str) -> None:
            await serve_link_stream(stream, tls_ident, serve_link)

        for handler, ident in ((None, None), (lambda stream, source: serve(stream), None),
                               (lane_handler, tls_ident)):  # fmt: skip
            ident = ident or Identity.generate()
            m = RelayMember(
                ident,
                *relay.address,
                PeerTable(ident.peer_id),
                lambda: {"name": "bench"},
                handler,
                max_datagram_size=args.datagram,
                punch_handler=lambda stream, source: serve(stream),
            )
            await nursery.start(m.run)
            await m.wait_registered()
            members.append(m)
        a, b, c = members
        results["relayed, spliced (2 QUIC hops)"] = await measure(
            lambda: a.open_stream(b.identity.peer_id, tcp=False), args.rounds, bulk
        )
        assert a.tcp_lane, "the relay has no TCP lane"
        results["relayed, TCP lane"] = await measure(
            lambda: a.open_stream(b.identity.peer_id), args.rounds, bulk
        )

        async def open_lane_link() -> trio.abc.Stream:
            stream = await a.open_stream(c.identity.peer_id)
            return await link_client(stream, a.identity, c.identity.peer_id, path="relayed")

        results["relayed, TCP lane + link TLS"] = await measure(open_lane_link, args.rounds, bulk)
        # loopback's TCP segments are 64 KB; a WAN's are ~1.4 KB: the same with WAN-sized segments
        trio.socket.set_custom_socket_factory(_SmallSegments(args.datagram))
        try:
            results[f"  ... with {args.datagram}-byte TCP segments"] = await measure(
                open_lane_link, args.rounds, bulk
            )
        finally:
            trio.socket.set_custom_socket_factory(None)
        assert a.lane_streams == 3 * 2, "a stream missed the lane"
        punched = await a.punch(b.identity.peer_id)  # loopback has no NAT: probes get through

        async def open_punched_stream() -> trio.abc.Stream:
            return punched.open_stream()

        results["punched (1 QUIC hop, direct)"] = await measure(open_punched_stream, args.rounds, bulk)
        # what a node's punched links are: the link handshake's TLS over that QUIC hop, or moved onto TCP
        ca, cb = await _connector_members(nursery, relay.address, args.datagram)
        paths = ((False, "punched link, QUIC + link TLS"), (True, "punched link, onto TCP + link TLS"))
        for tcp, name in paths:
            ca.tcp_punches.enabled = tcp

            async def open_punched_link() -> trio.abc.Stream:
                return await ca.open_link(cb.identity.peer_id)

            results[name] = await measure(open_punched_link, args.rounds, bulk)
        assert ca.stats["tcp_punched"] == 2, "a punched link stayed on QUIC"
        punched.close()
        await punched.wait_closed()
        await trio.sleep(PunchLimits().window_s)  # the relay repeats a pending punch's GO to the asker alone
        assert b.endpoint is not None
        b.endpoint.on_probe = lambda data, addr: None  # no punch gets through: the channel takes over
        channel = await a.punch(b.identity.peer_id)
        assert channel.forwarded, "the relay forwarded no channel"

        async def open_channel_stream() -> trio.abc.Stream:
            return channel.open_stream()

        results["relayed, channel (1 QUIC hop)"] = await measure(open_channel_stream, args.rounds, bulk)
        nursery.cancel_scope.cancel()

    base_rt, base_bw = results["TCP (direct)"]
    print(
        f"loopback, one process; {FRAME}-byte frames x {args.rounds}; bulk {args.bulk_mb:g} MB; "
        f"QUIC datagrams {args.datagram} bytes"
    )
    print(f"{'path':34} {'RTT ms (median)':>16} {'x TCP':>7} {'bulk MB/s':>10} {'/ TCP':>7}")
    for name, (rt, bw) in results.items():
        print(f"{name:34} {rt:16.3f} {rt / base_rt:7.1f} {bw:10.1f} {bw / base_bw:7.3f}")
    mb_s, us = aioquic_in_memory(args.datagram, bulk)
    print(
        f"{'aioquic alone, in memory':34} {'':>16} {'':>7} {mb_s:10.1f} {mb_s / base_bw:7.3f}   "
        f"({us:.0f} µs of CPU per data datagram, both ends)"
    )
    q_rt, q_bw = results["QUIC, one hop"]
    for name in (
        "relayed, spliced (2 QUIC hops)",
        "relayed, channel (1 QUIC hop)",
        "relayed, TCP lane + link TLS",
        "punched link, onto TCP + link TLS",
    ):
        r_rt, r_bw = results[name]
        print(f"{name} vs one QUIC hop: RTT x{r_rt / q_rt:.2f}, bulk x{r_bw / q_bw:.2f}")

    print(f"the relay's TCP lane, relay in its own process: {FRAME}-byte frame round trip, median of "
          f"{args.rounds} (best of {args.lane_repeat}); the relay's CPU per frame passing it")
    best: dict[str, list[tuple[float, float]]] = {"kernel copy": [], "event-loop copy": []}
    for _ in range(args.lane_repeat):
        for name, threads in (("kernel copy", 64), ("event-loop copy", 0)):
            rt, cpu_us, kernel = await lane_in_process(threads, args.rounds)
            assert kernel == (threads > 0), f"{name}: the kernel copied: {kernel}"
            best[name].append((rt, cpu_us))
    for name, runs in best.items():
        rt = min(r for r, _ in runs)
        cpu_us = min(c for _, c in runs)
        print(f"  {name:16} RTT {rt:.3f} ms   relay CPU {cpu_us:.1f} µs per frame")
    (k_rt, k_cpu), (l_rt, l_cpu) = ((min(x[0] for x in r), min(x[1] for x in r)) for r in best.values())
    print(f"  kernel / loop: RTT x{k_rt / l_rt:.2f}, relay CPU x{k_cpu / l_cpu:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--bulk-mb", type=float, default=8.0)
    parser.add_argument(
        "--datagram", type=int, default=1350, help="QUIC max datagram size (1350 fits the WAN)"
    )
    parser.add_argument("--lane-repeat", type=int, default=3, help="runs of each lane copy, alternated")
    trio.run(main, parser.parse_args())
