"""Links' TCP sockets do not pace (net/pacing.py): cubic where the default is bbr, set before connect."""

from __future__ import annotations

import socket

import pytest
import trio

from eldric_p2p.net.identity import Identity
from eldric_p2p.net.links import open_tcp_link, serve_tcp_links
from eldric_p2p.net.pacing import TCP_CONGESTION, congestion_control, unpace, unpaced

pytestmark = pytest.mark.skipif(TCP_CONGESTION is None, reason="TCP_CONGESTION is Linux's")


def can_set(sock: socket.socket, name: bytes) -> bool:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_CONGESTION, name)
    except OSError:
        return False
    return True


def system_default() -> str | None:
    with socket.socket() as s:
        return congestion_control(s)


def test_unpace_switches_bbr_to_cubic_and_leaves_others() -> None:
    with socket.socket() as s:
        if not can_set(s, b"bbr"):
            pytest.skip("bbr is not available to this user")
        assert congestion_control(s) == "bbr"
        assert unpace(s) in ("cubic", "reno") and congestion_control(s) in ("cubic", "reno")
    with socket.socket() as s:
        assert can_set(s, b"reno")
        assert unpace(s) == "reno" and congestion_control(s) == "reno"  # not a pacing one: kept


def test_only_sockets_made_inside_the_block_are_unpaced() -> None:
    default = system_default()

    async def main() -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        with unpaced():
            inside = await trio.open_tcp_stream("127.0.0.1", port)
        outside = await trio.open_tcp_stream("127.0.0.1", port)
        cc_in, cc_out = congestion_control(inside.socket), congestion_control(outside.socket)
        assert cc_out == default
        if default is not None and default.startswith("bbr"):
            assert cc_in in ("cubic", "reno")
        else:
            assert cc_in == default
        for s in (inside, outside, *listeners):
            await s.aclose()

    trio.run(main)


def test_a_link_socket_does_not_pace() -> None:
    """open_tcp_link (what a stage opens to its next hop) gets an unpaced socket."""

    async def main() -> None:
        server = Identity.generate()

        async def handler(link: object) -> None:
            await trio.sleep_forever()

        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(serve_tcp_links, server, "127.0.0.1", 0, handler)
            port = listeners[0].socket.getsockname()[1]
            link = await open_tcp_link("127.0.0.1", port, Identity.generate(), server.peer_id)
            cc = congestion_control(link.tls.transport_stream.socket)
            assert cc is not None and not cc.startswith("bbr")
            await link.aclose()
            nursery.cancel_scope.cancel()

    trio.run(main)
