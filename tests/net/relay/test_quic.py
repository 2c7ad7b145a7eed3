"""The trio driver for aioquic: a reader that does not read must stop the sender (bounded buffers)."""

from __future__ import annotations

import trio

from eldric_p2p.net.relay.quic import QuicConn, QuicStream
from eldric_p2p.net.relay.quic_config import client_configuration, server_configuration
from eldric_p2p.net.relay.quic_udp import QuicServer, connect_quic, open_udp_socket

WINDOW = 64 * 1024


def test_a_stalled_reader_bounds_what_both_ends_buffer() -> None:
    async def main() -> None:
        accepted: list[QuicStream] = []

        async def handler(conn: QuicConn) -> None:
            accepted.append(await conn.accept_stream())
            await trio.sleep_forever()  # never reads

        sock = await open_udp_socket("127.0.0.1", 0)
        server = QuicServer(sock, server_configuration(stream_window=WINDOW), handler, send_window=WINDOW)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            config = client_configuration(stream_window=WINDOW)
            async with connect_quic("127.0.0.1", sock.getsockname()[1], config, send_window=WINDOW) as conn:
                stream = conn.open_stream()
                sent = 0
                with trio.move_on_after(1.5):
                    while True:
                        await stream.send_all(b"\x00" * 16384)
                        sent += 16384
                # the sender is blocked: it got at most the peer's window plus its own send window out
                assert sent <= 2 * WINDOW + 16384, sent
                assert accepted and len(accepted[0]._recv) <= WINDOW
                # reading frees credit and the stream moves again
                drained = 0
                while drained < len(accepted[0]._recv) or drained < WINDOW:
                    drained += len(await accepted[0].receive_some())
                with trio.fail_after(2):
                    await stream.send_all(b"\x01" * 16384)
            nursery.cancel_scope.cancel()

    trio.run(main)
