"""Link transports on loopback, side by side in one run: small-frame round trip and bulk throughput.

    python benchmarks/bench_links.py [--rounds 2000] [--bulk-mb 256] [--no-quic]

Both ends run in one trio process (as DESIGN.md's figures). Compared:
  tcp       plain trio TCP stream (no authentication, no encryption: the floor)
  tls-link  eldric_p2p.net.links over TCP (TLS 1.3 + peer-id handshake): what direct links use
  quic-*    aioquic's QuicConnection driven from trio over UDP, one stream, 1200- and 9000-byte datagrams

Round trip: a 1.8 KB HIDDEN frame ([1, 896] fp16, Qwen2.5-0.5B decode step) sent with send_frame, read back
with FrameReader and echoed. Bulk: 1 MiB writes of raw bytes one way, timed until the receiver has them all;
"frames" is the same with 1 MiB HIDDEN frames through FrameReader (the framing cost on top).
"""

from __future__ import annotations

import argparse
import math
import ssl
import statistics
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import torch
import trio
from aioquic.buffer import Buffer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import HandshakeCompleted, StreamDataReceived
from aioquic.quic.packet import pull_quic_header

from eldric_p2p.net.frames import FrameReader, hidden_frame, send_frame
from eldric_p2p.net.identity import Identity
from eldric_p2p.net.links import _self_signed_certificate, link_client, link_server

CHUNK = 1 << 20
SMALL = hidden_frame(1, 0, torch.randn(1, 896, dtype=torch.float16))  # [1, hidden]: 1,792 bytes
BIG = hidden_frame(1, 0, torch.randn(512, 1024, dtype=torch.float16))  # [512, 1024]: 1 MiB


# --------------------------------------------------------------------------- the measurements


async def round_trips(client: Any, server: Any, rounds: int) -> list[float]:
    async def echo() -> None:
        reader = FrameReader(server)
        for _ in range(rounds + 50):
            frame = await reader.next()
            assert frame is not None
            await send_frame(server, frame)

    times = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(echo)
        reader = FrameReader(client)
        for i in range(rounds + 50):
            t0 = time.perf_counter()
            await send_frame(client, SMALL)
            assert await reader.next() is not None
            if i >= 50:  # warm-up excluded
                times.append(time.perf_counter() - t0)
    return times


async def bulk(client: Any, server: Any, total: int, frames: bool) -> float:
    n = total // CHUNK
    buf = memoryview(bytearray(CHUNK))

    async def sink() -> None:
        if frames:
            reader = FrameReader(server)
            for _ in range(n):
                assert await reader.next() is not None
        else:
            got = 0
            while got < n * CHUNK:
                got += len(await server.receive_some(CHUNK))
        await server.send_all(b"k")

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink)
        for _ in range(n):
            if frames:
                await send_frame(client, BIG)
            else:
                await client.send_all(buf)
        assert await client.receive_some(1) == b"k"
    return n * CHUNK / (time.perf_counter() - t0) / 1e6


# --------------------------------------------------------------------------- transports


@asynccontextmanager
async def tcp_pair(tls: bool) -> AsyncIterator[tuple[Any, Any]]:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    async with listener:
        client_stream = await trio.open_tcp_stream("127.0.0.1", port)
        server_stream = await listener.accept()
    if not tls:
        yield client_stream, server_stream
        await client_stream.aclose()
        await server_stream.aclose()
        return
    alice, bob = Identity.generate(), Identity.generate()
    links: dict[str, Any] = {}

    async def serve() -> None:
        links["s"] = await link_server(server_stream, bob)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        links["c"] = await link_client(client_stream, alice, bob.peer_id)
    yield links["c"], links["s"]
    await links["c"].aclose()
    await links["s"].aclose()


class QuicEnd:
    """One QuicConnection driven from trio: a receive task, a timer task, one bidirectional stream.

    Send side has a watermark (aioquic buffers without bound): send_all waits while more than WINDOW bytes
    are unread by the peer end (both ends live in this process, so the peer's count is read directly).
    """

    WINDOW = 4 << 20

    def __init__(self, sock: trio.socket.SocketType, conn: QuicConnection | None, peer: Any) -> None:
        self.sock, self.conn, self.peer_addr = sock, conn, peer
        self.other: QuicEnd | None = None
        self.rx = bytearray()
        self.sent = self.consumed = 0
        self.readable = trio.Event()
        self.progress = trio.Event()
        self.kick = trio.Event()
        self.connected = trio.Event()
        self.stream_id = 0

    async def flush(self) -> None:
        assert self.conn is not None
        for data, addr in self.conn.datagrams_to_send(now=trio.current_time()):
            await self.sock.sendto(data, addr)
        self.kick.set()

    def _events(self) -> None:
        assert self.conn is not None
        while (ev := self.conn.next_event()) is not None:
            if isinstance(ev, HandshakeCompleted):
                self.connected.set()
            elif isinstance(ev, StreamDataReceived):
                self.stream_id = ev.stream_id
                self.rx += ev.data
                self.readable.set()

    async def receive_loop(self, server_config: QuicConfiguration | None) -> None:
        while True:
            data, addr = await self.sock.recvfrom(65536)
            if self.conn is None:
                assert server_config is not None
                header = pull_quic_header(Buffer(data=data), host_cid_length=8)
                self.conn = QuicConnection(
                    configuration=server_config, original_destination_connection_id=header.destination_cid
                )
                self.connected.set()
            self.conn.receive_datagram(data, addr, now=trio.current_time())
            self._events()
            await self.flush()

    async def timer_loop(self) -> None:
        while True:
            self.kick = trio.Event()
            timer = self.conn.get_timer() if self.conn is not None else None
            with trio.move_on_at(timer if timer is not None else math.inf):
                await self.kick.wait()
                continue
            assert self.conn is not None
            self.conn.handle_timer(now=trio.current_time())
            self._events()
            await self.flush()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        assert self.conn is not None and self.other is not None
        while self.sent - self.other.consumed > self.WINDOW:
            self.other.progress = trio.Event()
            await self.other.progress.wait()
        self.conn.send_stream_data(self.stream_id, bytes(data))
        self.sent += len(data)
        await self.flush()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while not self.rx:
            self.readable = trio.Event()
            await self.readable.wait()
        n = len(self.rx) if max_bytes is None else max_bytes
        out = bytes(self.rx[:n])
        del self.rx[:n]
        self.consumed += len(out)
        self.progress.set()
        return out


@asynccontextmanager
async def quic_pair(datagram: int) -> AsyncIterator[tuple[Any, Any]]:
    ident = Identity.generate()
    server_cfg = QuicConfiguration(is_client=False, alpn_protocols=["bench"], max_datagram_size=datagram)
    server_cfg.certificate = _self_signed_certificate(ident)
    server_cfg.private_key = ident.private_key
    client_cfg = QuicConfiguration(
        is_client=True, alpn_protocols=["bench"], max_datagram_size=datagram, verify_mode=ssl.CERT_NONE
    )
    ssock, csock = (
        trio.socket.socket(type=trio.socket.SOCK_DGRAM),
        trio.socket.socket(type=trio.socket.SOCK_DGRAM),
    )
    for s in (ssock, csock):
        s.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4 << 20)
        s.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_SNDBUF, 4 << 20)
    await ssock.bind(("127.0.0.1", 0))
    await csock.bind(("127.0.0.1", 0))
    server_addr = ssock.getsockname()
    client = QuicEnd(csock, QuicConnection(configuration=client_cfg), server_addr)
    server = QuicEnd(ssock, None, None)
    client.other, server.other = server, client
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.receive_loop, server_cfg)
        nursery.start_soon(server.timer_loop)
        nursery.start_soon(client.receive_loop, None)
        nursery.start_soon(client.timer_loop)
        assert client.conn is not None
        client.conn.connect(server_addr, now=trio.current_time())
        await client.flush()
        with trio.fail_after(10):
            await client.connected.wait()
        client.stream_id = client.conn.get_next_available_stream_id()
        yield client, server
        nursery.cancel_scope.cancel()
    ssock.close()
    csock.close()


# --------------------------------------------------------------------------- the table


async def measure(name: str, pair: Callable[[], Any], rounds: int, total: int) -> dict[str, Any]:
    async with pair() as (c, s):
        rtt = await round_trips(c, s, rounds)
    async with pair() as (c, s):
        raw = await bulk(c, s, total, frames=False)
    async with pair() as (c, s):
        framed = await bulk(c, s, total, frames=True)
    return {
        "name": name,
        "rtt_ms": statistics.median(rtt) * 1e3,
        "rtt_p99_ms": sorted(rtt)[int(len(rtt) * 0.99)] * 1e3,
        "bulk": raw,
        "frames": framed,
    }


async def main(args: argparse.Namespace) -> None:
    total = args.bulk_mb << 20
    rows = [
        await measure("tcp", lambda: tcp_pair(False), args.rounds, total),
        await measure("tls-link", lambda: tcp_pair(True), args.rounds, total),
    ]
    if not args.no_quic:
        quic_total = min(total, args.quic_bulk_mb << 20)
        for dg in (1200, 9000):
            rows.append(
                await measure(f"quic-{dg}", lambda dg=dg: quic_pair(dg), args.rounds // 4, quic_total)
            )
    base = rows[1]
    print(
        f"{'transport':<10} {'rtt p50 ms':>10} {'rtt p99 ms':>10} {'bulk MB/s':>10} {'frames MB/s':>11}"
        "  vs tls-link"
    )
    for r in rows:
        print(
            f"{r['name']:<10} {r['rtt_ms']:>10.3f} {r['rtt_p99_ms']:>10.3f}"
            f" {r['bulk']:>10.1f} {r['frames']:>11.1f}"
            f"  rtt x{r['rtt_ms'] / base['rtt_ms']:.2f}, bulk x{r['bulk'] / base['bulk']:.2f}"
        )


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2000)
    p.add_argument("--bulk-mb", type=int, default=256)
    p.add_argument(
        "--quic-bulk-mb", type=int, default=32, help="QUIC is slow: a smaller bulk keeps the run short"
    )
    p.add_argument("--no-quic", action="store_true")
    trio.run(main, p.parse_args())
