from __future__ import annotations

import os
import struct

import pytest
import torch
import trio
import trio.testing

from eldric_p2p.errors import AuthenticationError, PeerUnavailable
from eldric_p2p.net.frames import FrameReader, FrameType, hidden_frame, payload_to_tensor, send_frame
from eldric_p2p.net.handshake import MAGIC, MAX_HANDSHAKE_BODY, MSG_PROOF, ClientHandshake, ServerHandshake
from eldric_p2p.net.identity import Identity
from eldric_p2p.net.links import (
    Link,
    client_ssl_context,
    link_client,
    link_server,
    open_tcp_link,
    serve_tcp_links,
)
from eldric_p2p.tasks import open_nursery

ALICE = Identity.generate()
BOB = Identity.generate()
MALLORY = Identity.generate()
SECRET = b"the plaintext a relay must never see " * 4


# --------------------------------------------------------------------------- sans-IO handshake in memory


def _run_handshake(client: ClientHandshake, server: ServerHandshake) -> None:
    to_client = server.initial_bytes()
    while not (client.done and server.done):
        to_server = client.receive_data(to_client)
        to_client = server.receive_data(to_server) if to_server else b""


def test_handshake_in_memory_learns_the_client_id() -> None:
    client, server = ClientHandshake(ALICE, BOB.peer_id), ServerHandshake(BOB.peer_id)
    _run_handshake(client, server)
    assert server.peer_id == ALICE.peer_id
    assert client.done and client.leftover == b"" and server.leftover == b""


def test_handshake_fed_byte_by_byte_keeps_trailing_application_bytes() -> None:
    client, server = ClientHandshake(ALICE, BOB.peer_id), ServerHandshake(BOB.peer_id)
    challenge = server.initial_bytes()
    proof = b"".join(client.receive_data(challenge[i : i + 1]) for i in range(len(challenge)))
    accept = b"".join(server.receive_data(proof[i : i + 1]) for i in range(len(proof)))
    assert server.peer_id == ALICE.peer_id
    client.receive_data(accept + b"first app bytes")
    assert client.done and client.leftover == b"first app bytes"


def test_proof_cannot_be_replayed_to_another_nonce_or_another_server() -> None:
    nonce = os.urandom(32)
    # Mallory runs a server, collects Alice's proof, and presents it to Bob.
    evil = ServerHandshake(MALLORY.peer_id, nonce)
    proof = ClientHandshake(ALICE, MALLORY.peer_id).receive_data(evil.initial_bytes())
    bob = ServerHandshake(BOB.peer_id, nonce)  # even with the same nonce
    bob.initial_bytes()
    with pytest.raises(AuthenticationError, match="bad signature"):
        bob.receive_data(proof)
    # A proof for Bob under one nonce does not pass under the next.
    first = ServerHandshake(BOB.peer_id)
    proof = ClientHandshake(ALICE, BOB.peer_id).receive_data(first.initial_bytes())
    second = ServerHandshake(BOB.peer_id)
    second.initial_bytes()
    with pytest.raises(AuthenticationError):
        second.receive_data(proof)


def test_handshake_refuses_garbage_and_oversized_messages_at_the_header() -> None:
    for bad, match in [
        (b"GET / HTTP/1.1\r\n", "bad magic"),
        (MAGIC + struct.pack(">BH", MSG_PROOF, 60_000), f"over the {MAX_HANDSHAKE_BODY} limit"),
        (MAGIC + struct.pack(">BH", 9, 0), "expected a client proof"),
        (MAGIC + struct.pack(">BH", MSG_PROOF, 10) + b"x" * 10, "96"),
    ]:
        server = ServerHandshake(BOB.peer_id)
        server.initial_bytes()
        with pytest.raises(AuthenticationError, match=match):
            server.receive_data(bad)


# --------------------------------------------------------------------------- trio drivers


async def _pair(
    client_stream: trio.abc.Stream, server_stream: trio.abc.Stream, expected: str | None
) -> tuple[Link, Link]:
    links: dict[str, Link] = {}

    async def server() -> None:
        links["server"] = await link_server(server_stream, BOB)

    async def client() -> None:
        links["client"] = await link_client(client_stream, ALICE, expected)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server)
        nursery.start_soon(client)
    return links["client"], links["server"]


async def _exchange(a: Link, b: Link) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.send_all, SECRET)
        got = b""
        while len(got) < len(SECRET):
            got += await b.receive_some()
    assert got == SECRET
    await b.send_all(b"pong")
    assert await a.receive_some() == b"pong"


def test_memory_stream_link_learns_both_ids_and_carries_bytes() -> None:
    async def main() -> None:
        c, s = trio.testing.memory_stream_pair()
        client, server = await _pair(c, s, BOB.peer_id)
        assert client.peer_id == BOB.peer_id and server.peer_id == ALICE.peer_id
        assert client.path == "direct"
        await _exchange(client, server)
        await client.aclose()
        assert await server.receive_some() == b""

    trio.run(main)


def test_an_aborted_link_closes_quietly_and_its_peer_sees_it_end() -> None:
    """`abort` (a revoked peer) cuts the stream below TLS; an HTTP pool that later closes the link calls
    `aclose`, which must not raise (it once took a coordinator's heartbeat, and the node, down)."""

    async def main() -> None:
        c, s = trio.testing.memory_stream_pair()
        client, server = await _pair(c, s, BOB.peer_id)
        await _exchange(client, server)
        await client.abort()
        await client.aclose()
        await client.aclose()  # and again: idempotent
        with pytest.raises(trio.BrokenResourceError):  # the far side: cut off, no TLS goodbye
            await server.receive_some()

    trio.run(main)


def test_wrong_expected_id_is_refused() -> None:
    async def main() -> None:
        c, s = trio.testing.memory_stream_pair()
        with pytest.raises(AuthenticationError, match=f"expected peer {MALLORY.peer_id}"):
            async with open_nursery() as nursery:  # a lone error as itself

                async def server() -> None:
                    with pytest.raises(PeerUnavailable):
                        await link_server(s, BOB)

                nursery.start_soon(server)
                await link_client(c, ALICE, MALLORY.peer_id)

    trio.run(main)


def test_handshake_timeout_on_a_silent_peer() -> None:
    async def main() -> None:
        c, s = trio.testing.memory_stream_pair()
        with pytest.raises(PeerUnavailable, match="within 0.2 s"):
            await link_server(s, BOB, handshake_timeout=0.2)
        with pytest.raises(PeerUnavailable, match="within 0.2 s"):
            await link_client(trio.testing.memory_stream_pair()[0], ALICE, BOB.peer_id, handshake_timeout=0.2)

    trio.run(main)


async def _relay(left: trio.abc.Stream, right: trio.abc.Stream, seen: bytearray) -> None:
    async def pump(src: trio.abc.Stream, dst: trio.abc.Stream) -> None:
        try:
            while data := await src.receive_some():
                seen.extend(data)
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the other direction already shut the relay down
        await dst.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump, left, right)
        nursery.start_soon(pump, right, left)


def test_relay_in_the_middle_sees_no_plaintext_and_cannot_impersonate() -> None:
    async def main() -> None:
        seen = bytearray()
        c, relay_left = trio.testing.memory_stream_pair()
        relay_right, s = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_relay, relay_left, relay_right, seen)
            links: dict[str, Link] = {}

            async def server() -> None:
                links["s"] = await link_server(s, BOB, path="relayed")

            async with trio.open_nursery() as inner:
                inner.start_soon(server)
                links["c"] = await link_client(c, ALICE, BOB.peer_id, path="relayed")
            assert links["c"].path == "relayed" and links["s"].peer_id == ALICE.peer_id
            await _exchange(links["c"], links["s"])
            await links["c"].aclose()
            await links["s"].aclose()
        assert len(seen) > len(SECRET)
        assert SECRET[:16] not in seen and b"pong" not in seen

        # The relay answers in Bob's place with its own key: Alice refuses it.
        c, m = trio.testing.memory_stream_pair()
        with pytest.raises(AuthenticationError, match=f"the server is {MALLORY.peer_id}"):
            async with open_nursery() as nursery:  # a lone error as itself

                async def impostor() -> None:
                    with pytest.raises(PeerUnavailable):
                        await link_server(m, MALLORY)

                nursery.start_soon(impostor)
                await link_client(c, ALICE, BOB.peer_id)

    trio.run(main)


def test_frames_travel_over_a_link() -> None:
    async def main() -> None:
        c, s = trio.testing.memory_stream_pair()
        client, server = await _pair(c, s, BOB.peer_id)
        hidden = torch.randn(1, 896, dtype=torch.float16)  # [1, hidden]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_frame, client, hidden_frame(9, 4, hidden))
            frame = await FrameReader(server).next()
        assert frame is not None and frame.type == FrameType.HIDDEN and frame.start == 4
        assert torch.equal(payload_to_tensor(frame), hidden)

    trio.run(main)


# --------------------------------------------------------------------------- real loopback TCP


async def _tls_then(port: int, payload: bytes) -> bytes:
    """Complete TLS properly, then send `payload` instead of a proof; return what the server answers."""
    stream = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), client_ssl_context())
    out = b""
    try:
        await stream.do_handshake()
        await stream.receive_some()  # the challenge
        await stream.send_all(payload)
        with trio.fail_after(3):  # the server answers and hangs up
            while data := await stream.receive_some():
                out += data
    except trio.BrokenResourceError:
        pass
    finally:
        await trio.aclose_forcefully(stream)
    return out


def test_tcp_server_refuses_bad_clients_and_keeps_serving() -> None:
    async def main() -> None:
        served: list[str] = []

        async def handler(link: Link) -> None:
            served.append(link.peer_id)
            await link.send_all(b"welcome " + link.peer_id.encode())

        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(serve_tcp_links, BOB, "127.0.0.1", 0, handler)
            port = listeners[0].socket.getsockname()[1]

            # a client that connects and says nothing is cut off at the handshake timeout
            silent = await trio.open_tcp_stream("127.0.0.1", port)
            # garbage instead of TLS
            junk = await trio.open_tcp_stream("127.0.0.1", port)
            await junk.send_all(os.urandom(2000))
            with trio.fail_after(3):  # the server hangs up on it
                try:
                    while await junk.receive_some():
                        pass
                except trio.BrokenResourceError:
                    pass
            await junk.aclose()
            # valid TLS, then an oversized handshake message (refused at its header), then a forged proof
            oversized = await _tls_then(port, MAGIC + struct.pack(">BH", MSG_PROOF, 65_000))
            assert f"over the {MAX_HANDSHAKE_BODY} limit".encode() in oversized
            forged = MAGIC + struct.pack(">BH", MSG_PROOF, 96) + ALICE.public_key + b"\x00" * 64
            assert b"bad signature" in await _tls_then(port, forged)

            # while the silent client still hangs, a good client is served at once
            with trio.fail_after(3):
                link = await open_tcp_link("127.0.0.1", port, ALICE, BOB.peer_id)
                assert link.peer_id == BOB.peer_id
                assert await link.receive_some() == b"welcome " + ALICE.peer_id.encode()
                await link.aclose()
                # bootstrap by address: no expected id, learn it
                link = await open_tcp_link("127.0.0.1", port, MALLORY)
                assert link.peer_id == BOB.peer_id
                await link.aclose()
            # the wrong expected id is refused over TCP too
            with pytest.raises(AuthenticationError):
                await open_tcp_link("127.0.0.1", port, ALICE, MALLORY.peer_id)
            await silent.aclose()
            nursery.cancel_scope.cancel()
        assert served[:2] == [ALICE.peer_id, MALLORY.peer_id]

    trio.run(main)


def test_open_tcp_link_to_a_closed_port_is_peer_unavailable() -> None:
    async def main() -> None:
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        port = listener.socket.getsockname()[1]
        await listener.aclose()
        with pytest.raises(PeerUnavailable):
            await open_tcp_link("127.0.0.1", port, ALICE, BOB.peer_id)

    trio.run(main)
