"""Links inside a federation: members link, strangers and other federations' members are refused at the
handshake, a joiner's ticket gives a guest link to its inviter only, and a revoked member's links close."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives import serialization

from eldric_p2p.errors import AuthenticationError
from eldric_p2p.net.federation.certs import Issuer, MembershipError, create_root
from eldric_p2p.net.federation.invites import create_invite
from eldric_p2p.net.federation.service import FederationService
from eldric_p2p.net.federation.store import Membership
from eldric_p2p.net.identity import Identity
from eldric_p2p.net.links import Link, open_tcp_link, serve_tcp_links
from eldric_p2p.tasks import open_nursery


def federation(tmp_path: Path, name: str, n: int) -> list[Identity]:
    """n member identities of a new federation; the first holds the root key (an admin)."""
    key, root = create_root(name)
    root_pem = root.public_bytes(serialization.Encoding.PEM)
    out = []
    for i in range(n):
        ident = Identity.generate()
        m = Membership(tmp_path / f"{name}{i}", ident)
        m.save(root_pem, Issuer(key, root).issue(ident.public_key, ["admin"] if i == 0 else ["member"]),
               root_key=key if i == 0 else None)  # fmt: skip
        out.append(ident.with_membership(m))
    return out


async def echo(link: Link) -> None:
    while data := await link.receive_some():
        await link.send_all(data)


async def serve(nursery: trio.Nursery, identity: Identity) -> int:
    listeners = await nursery.start(serve_tcp_links, identity, "127.0.0.1", 0, echo)
    return listeners[0].socket.getsockname()[1]


def test_members_link_and_each_learns_the_others_membership(tmp_path: Path) -> None:
    admin, member = federation(tmp_path, "lab", 2)

    async def main() -> None:
        async with open_nursery() as nursery:
            port = await serve(nursery, admin)
            link = await open_tcp_link("127.0.0.1", port, member, admin.peer_id)
            assert link.member is not None and link.member.peer_id == admin.peer_id and link.member.is_admin
            await link.send_all(b"hello")
            assert await link.receive_some() == b"hello"
            await link.aclose()
            nursery.cancel_scope.cancel()

    trio.run(main)


@pytest.mark.parametrize("who", ["stranger", "other_federation", "revoked"])
def test_non_members_are_refused_both_ways_and_the_server_keeps_serving(tmp_path: Path, who: str) -> None:
    admin, member, third = federation(tmp_path, "lab", 3)
    if who == "stranger":
        intruder = Identity.generate()
    elif who == "other_federation":
        intruder = federation(tmp_path, "elsewhere", 1)[0]
    else:
        admin.membership.revoke(third.peer_id)
        intruder = third
    expected = {"stranger": "no membership", "other_federation": "federation", "revoked": "revoked"}[who]

    async def main() -> None:
        async with open_nursery() as nursery:
            port = await serve(nursery, admin)
            with pytest.raises(AuthenticationError, match=expected):  # it dials us
                await open_tcp_link("127.0.0.1", port, intruder, admin.peer_id)
            # we dial it: its answer does not prove a membership of our federation
            intruder_port = await serve(nursery, intruder)
            with pytest.raises(AuthenticationError):
                await open_tcp_link("127.0.0.1", intruder_port, admin, intruder.peer_id)
            link = await open_tcp_link("127.0.0.1", port, member, admin.peer_id)  # still serving members
            await link.send_all(b"x")
            assert await link.receive_some() == b"x"
            await link.aclose()
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_ticket_gives_a_guest_link_to_its_inviter_only(tmp_path: Path) -> None:
    admin, member = federation(tmp_path, "lab", 2)
    ticket = create_invite(admin.membership, addresses=["127.0.0.1:1"], relays=[]).ticket.to_text()
    joiner = Identity.generate()

    async def main() -> None:
        from eldric_p2p.net.links import link_client

        async with open_nursery() as nursery:
            port = await serve(nursery, admin)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            link = await link_client(stream, joiner, admin.peer_id, ticket=ticket)
            assert link.peer_id == admin.peer_id
            await link.aclose()
            member_port = await serve(nursery, member)  # the ticket is the admin's, not the member's
            stream = await trio.open_tcp_stream("127.0.0.1", member_port)
            with pytest.raises(AuthenticationError, match="another node"):
                await link_client(stream, joiner, member.peer_id, ticket=ticket)
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_revocation_closes_the_revoked_members_open_links_within_a_second(tmp_path: Path) -> None:
    admin, member = federation(tmp_path, "lab", 2)
    service = FederationService(admin)

    async def main() -> None:
        async with open_nursery() as nursery:
            await nursery.start(service.run)
            port = await serve(nursery, admin)
            link = await open_tcp_link("127.0.0.1", port, member, admin.peer_id)
            await link.send_all(b"x")
            assert await link.receive_some() == b"x"
            t0 = trio.current_time()
            admin.membership.revoke(member.peer_id)
            with trio.fail_after(1):
                try:
                    while await link.receive_some():
                        pass
                except trio.BrokenResourceError:
                    pass  # closed under TLS: no close_notify
            assert trio.current_time() - t0 < 1 and service.stats["links_closed"] >= 1
            with pytest.raises(MembershipError):
                await open_tcp_link("127.0.0.1", port, member, admin.peer_id)
            nursery.cancel_scope.cancel()

    trio.run(main)
