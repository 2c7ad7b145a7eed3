"""A relay that is a member of a federation: only members register and appear in its directory, a joiner with
a ticket is a guest that reaches its inviter only, and a revoked member is dropped at once."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives import serialization
from peer_helpers import wait_for

from eldric_p2p.errors import AuthenticationError, PeerUnavailable, RemoteProtocolError
from eldric_p2p.net.discovery import PeerTable
from eldric_p2p.net.federation import certs, invites
from eldric_p2p.net.federation.certs import MembershipError
from eldric_p2p.net.federation.store import Membership
from eldric_p2p.net.identity import Identity
from eldric_p2p.net.relay import protocol as p
from eldric_p2p.net.relay.client import RelayMember
from eldric_p2p.net.relay.control import (
    REGISTER_CONTEXT,
    MemberControl,
    RelayControl,
    check_credential_untrusted,
    register_message,
)
from eldric_p2p.net.relay.quic import QuicStream
from eldric_p2p.net.relay.server import Relay, RelayLimits, run_relay

FAST = RelayLimits(keepalive_s=0.2, dead_after_s=0.8, handshake_timeout_s=0.5, register_timeout_s=1.0)
ANN = {"name": "n", "http_port": 8080}


class Fed:
    """A federation for tests: its root, and members (each with its own data dir) made on demand."""

    def __init__(self, tmp_path: Path, name: str = "lab") -> None:
        self.tmp = tmp_path / name
        self.key, self.root = certs.create_root(name)
        self.root_pem = self.root.public_bytes(serialization.Encoding.PEM)
        self.issuer = certs.Issuer(self.key, self.root)

    def member(self, name: str, *, admin: bool = False) -> Identity:
        ident = Identity.generate()
        chain = self.issuer.issue(ident.public_key, ("admin",) if admin else ())
        m = Membership(self.tmp / name, ident)
        m.save(self.root_pem, chain, root_key=self.key if admin else None)
        return ident.with_membership(m)


def membership(ident: Identity) -> Membership:
    assert ident.membership is not None and ident.membership.active
    return ident.membership


async def echo(stream: QuicStream, source: str) -> None:
    while data := await stream.receive_some():
        await stream.send_all(data)
    await stream.send_eof()


def make_member(addr: tuple[str, int], ident: Identity, *, ticket: str | None = None) -> RelayMember:
    return RelayMember(
        ident,
        addr[0],
        addr[1],
        PeerTable(ident.peer_id),
        lambda: dict(ANN),
        echo,
        backoff_initial_s=0.1,
        backoff_max_s=0.4,
        open_timeout_s=2.0,
        handshake_timeout_s=2.0,
        ticket=ticket,
    )


async def eventually(cond: Callable[[], bool]) -> None:
    while not cond():  # noqa: ASYNC110
        await trio.sleep(0.02)


async def roundtrip(stream: QuicStream, payload: bytes) -> bytes:
    await stream.send_all(payload)
    got = b""
    while len(got) < len(payload):
        chunk = await stream.receive_some()
        assert chunk, "stream ended early"
        got += chunk
    return got


@asynccontextmanager
async def serving(relay_ident: Identity) -> AsyncIterator[tuple[Relay, trio.Nursery]]:
    """A relay, and a nursery to start members in; everything is cancelled on exit."""
    async with trio.open_nursery() as nursery:
        relay: Relay = await nursery.start(
            lambda task_status: run_relay("127.0.0.1", 0, relay_ident, limits=FAST, task_status=task_status)
        )
        yield relay, nursery
        nursery.cancel_scope.cancel()


async def start(nursery: trio.Nursery, *members: RelayMember) -> None:
    for m in members:
        await nursery.start(m.run)


def _refused_identity(kind: str, fed: Fed, tmp_path: Path) -> Identity:
    if kind == "stranger":
        return Identity.generate()
    if kind == "other_federation":
        return Fed(tmp_path, "elsewhere").member("x")
    ident = fed.member(kind)
    m = membership(ident)  # the relay checks the chain the member sends; here one that no longer holds
    if kind == "expired":
        m.chain = fed.issuer.issue(ident.public_key, ttl_s=60, now=time.time() - 3600)
    else:  # one bit of the leaf's signature flipped
        m.chain = (m.chain[0][:-1] + bytes([m.chain[0][-1] ^ 1]),)
    return ident


@pytest.mark.parametrize(
    ("kind", "why"),
    [
        ("stranger", "presented no membership certificate"),
        ("other_federation", "other_federation"),
        ("expired", "expired: membership certificate expired"),
        ("forged", "forged"),
    ],
)
def test_only_members_register_and_the_relay_keeps_serving_them(
    kind: str, why: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fed = Fed(tmp_path)
    relay_ident = fed.member("relay")
    caplog.set_level(logging.INFO, logger="eldric_p2p.net.relay.server")

    async def main() -> None:
        async with serving(relay_ident) as (relay, nursery):
            assert relay.address is not None
            a, b = make_member(relay.address, fed.member("a")), make_member(relay.address, fed.member("b"))
            refused = make_member(relay.address, _refused_identity(kind, fed, tmp_path))
            await start(nursery, a, b, refused)
            with trio.fail_after(5):
                await wait_for([a.table], lambda: b.identity.peer_id in a.table)
                await eventually(lambda: relay.stats.rejected_not_member >= 3)  # it keeps retrying
            assert refused.connects == 0 and not refused.registered
            assert refused.last_error is not None
            assert "relay refused registration: not a member of federation " + fed_id(relay_ident) in (
                refused.last_error
            )
            assert why in refused.last_error
            rid = refused.identity.peer_id
            assert rid not in relay.members and rid not in a.table and rid not in b.table
            with pytest.raises(PeerUnavailable, match="unknown_peer"):
                await a.open_stream(rid)
            stream = await a.open_stream(b.identity.peer_id)
            assert await roundtrip(stream, b"members only") == b"members only"
            await stream.aclose()
            assert relay.stats.rejected >= relay.stats.rejected_not_member

    trio.run(main)
    refusals = [r for r in caplog.records if r.getMessage().startswith("refused ")]
    assert len(refusals) == 1  # logged once per peer per 10 s, however often it retries


def fed_id(ident: Identity) -> str:
    fid = membership(ident).id
    assert fid is not None
    return fid


def test_register_signature_covers_the_cert_and_credentials_decode_strictly(tmp_path: Path) -> None:
    fed = Fed(tmp_path)
    alice, bob = fed.member("alice"), fed.member("bob")
    relay_m = membership(fed.member("relay"))
    cert = certs.chain_to_text(membership(alice).chain)
    member = MemberControl(alice, dict(ANN), cert=cert)
    relay = RelayControl(Identity.generate())
    member.hello()
    relay.receive_data(member.data_to_send())
    member.receive_data(relay.data_to_send())
    frame = member.data_to_send()
    reg = p.parse_message_untrusted(p.MsgType.REGISTER, frame[p.HEADER.size :])
    assert isinstance(reg, p.Register) and reg.cert == cert and reg.ticket is None
    assert check_credential_untrusted(relay_m, reg).peer_id == alice.peer_id  # type: ignore[union-attr]

    bob_cert = certs.chain_to_text(membership(bob).chain)
    for swapped in (
        p.Register(reg.peer_id, reg.public_key, reg.signature, reg.announcement, bob_cert),
        p.Register(reg.peer_id, reg.public_key, reg.signature, reg.announcement),  # cert stripped
        p.Register(reg.peer_id, reg.public_key, reg.signature, reg.announcement, cert, "x" * 40),
    ):
        fresh = RelayControl(Identity.generate(), nonce_source=lambda n: relay._nonce_r)
        fresh.receive_data(p.encode_message(p.Hello(p.PROTOCOL_VERSION, member._nonce_c)))
        with pytest.raises(AuthenticationError, match="bad signature"):
            fresh.receive_data(p.encode_message(swapped))
    # without credentials a REGISTER signs what it always did, so older members still register
    nr, nc = b"r" * 32, b"c" * 32
    assert (
        register_message(nr, nc, ANN)
        == REGISTER_CONTEXT + nr + nc + hashlib.sha256(p.canonical_announcement(ANN)).digest()
    )

    body = {"peer_id": alice.peer_id, "public_key": "00" * 32, "sig": "00" * 64, "announcement": ANN}
    for bad, error in (
        ({"cert": 5}, "'cert' has the wrong type"),
        ({"cert": ""}, "'cert' is not base64url"),
        ({"ticket": "a b"}, "'ticket' is not base64url"),
        ({"cert": "A" * (p.MAX_CREDENTIAL + 1)}, "limit"),
    ):
        with pytest.raises(RemoteProtocolError, match=error):
            p.parse_message_untrusted(p.MsgType.REGISTER, json.dumps(body | bad).encode())
    for bad, code in (({"cert": "AAAA"}, "malformed"), ({"ticket": "a.b"}, "malformed")):
        reg = p.parse_message_untrusted(p.MsgType.REGISTER, json.dumps(body | bad).encode())
        assert isinstance(reg, p.Register)
        with pytest.raises(MembershipError) as info:
            check_credential_untrusted(relay_m, reg)
        assert info.value.code == code


def test_a_guest_with_a_ticket_reaches_its_inviter_and_nobody_else(tmp_path: Path) -> None:
    fed = Fed(tmp_path)
    relay_ident, inviter, bob = fed.member("relay"), fed.member("inviter", admin=True), fed.member("bob")

    async def main() -> None:
        async with serving(relay_ident) as (relay, nursery):
            assert relay.address is not None
            invite = invites.create_invite(membership(inviter), addresses=[], relays=["127.0.0.1:1"])
            i, b = make_member(relay.address, inviter), make_member(relay.address, bob)
            guest = make_member(relay.address, Identity.generate(), ticket=invite.ticket.to_text())
            guest.announce_interval_s = 0.05
            await start(nursery, i, b, guest)
            with trio.fail_after(5):
                await guest.wait_registered()
                await wait_for([i.table], lambda: bob.peer_id in i.table)
            gid = guest.identity.peer_id
            assert gid in relay.guests and gid not in relay.members and relay.stats.guests == 1
            assert guest.table.peers() == []  # a guest sees no directory
            stream = await guest.open_stream(inviter.peer_id)
            assert await roundtrip(stream, b"join me") == b"join me"
            await stream.aclose()
            with pytest.raises(PeerUnavailable, match="forbidden"):
                await guest.open_stream(bob.peer_id)
            with pytest.raises(PeerUnavailable, match="unknown_peer"):
                await b.open_stream(gid)  # nobody reaches a guest
            guest.announcement_fn = lambda: {"name": "joiner"}  # a guest's ANNOUNCE reaches nobody either
            with trio.fail_after(2):
                await eventually(lambda: relay.guests[gid].announcement == {"name": "joiner"})
            await trio.sleep(FAST.keepalive_s * 2)  # keepalives re-check the ticket: still good
            assert gid not in i.table and gid not in b.table and gid in relay.guests
            assert relay.stats.streams_forbidden == 1

    trio.run(main)


def test_tickets_of_another_federation_or_expired_are_refused_and_a_guest_goes_with_its_ticket(
    tmp_path: Path,
) -> None:
    fed = Fed(tmp_path)
    relay_ident, inviter = fed.member("relay"), fed.member("inviter", admin=True)
    foreign = Fed(tmp_path, "elsewhere").member("admin", admin=True)

    def ticket(admin: Identity, ttl_s: float = invites.DEFAULT_TTL_S, now: float | None = None) -> str:
        invite = invites.create_invite(
            membership(admin), addresses=["127.0.0.1:1"], relays=[], ttl_s=ttl_s, now=now
        )
        return invite.ticket.to_text()

    async def main() -> None:
        async with serving(relay_ident) as (relay, nursery):
            assert relay.address is not None
            i = make_member(relay.address, inviter)
            other = make_member(relay.address, Identity.generate(), ticket=ticket(foreign))
            stale = make_member(
                relay.address, Identity.generate(), ticket=ticket(inviter, ttl_s=10, now=time.time() - 60)
            )
            short = make_member(relay.address, Identity.generate(), ticket=ticket(inviter, ttl_s=2))
            await start(nursery, i, other, stale, short)
            with trio.fail_after(3):
                await short.wait_registered()
                await eventually(lambda: other.last_error is not None and stale.last_error is not None)
            assert other.last_error is not None and "other_federation" in other.last_error
            assert stale.last_error is not None and "expired: join ticket expired" in stale.last_error
            assert other.connects == stale.connects == 0 and not relay.guests.keys() - {
                short.identity.peer_id
            }
            with trio.fail_after(3):  # the ticket expires within 2 s (whole seconds): the guest is dropped
                await eventually(lambda: not relay.guests)
                await eventually(lambda: short.last_error is not None and "expired" in short.last_error)
            assert short.connects == 1

    trio.run(main)


def test_a_revoked_member_is_dropped_at_once_and_refused_after(tmp_path: Path) -> None:
    fed = Fed(tmp_path)
    relay_ident, admin = fed.member("relay"), fed.member("admin", admin=True)
    bob, carol = fed.member("bob"), fed.member("carol")

    async def main() -> None:
        async with serving(relay_ident) as (relay, nursery):
            assert relay.address is not None
            a, b, c = (make_member(relay.address, x) for x in (admin, bob, carol))
            await start(nursery, a, b, c)
            with trio.fail_after(5):
                await wait_for(
                    [a.table], lambda: {bob.peer_id, carol.peer_id} <= {x.peer_id for x in a.table.peers()}
                )
            record = membership(admin).revoke(bob.peer_id)
            membership(relay_ident).add_revocations([record])  # as a pushed revocation reaches the relay
            assert bob.peer_id not in relay.members  # on_revoked dropped it before anything else ran
            with trio.fail_after(1):
                await wait_for([a.table], lambda: bob.peer_id not in a.table)
            assert bob.peer_id not in relay.members and relay.stats.dropped_not_member == 1
            with trio.fail_after(3):
                await eventually(lambda: b.last_error is not None and "revoked" in b.last_error)
            assert b.connects == 1 and bob.peer_id not in relay.members

            # a revocation the relay reads from disk (no callback): the next keepalive's re-check drops carol
            fed_state = membership(relay_ident).federation
            assert fed_state is not None
            fed_state.revoked.add(carol.peer_id)
            with trio.fail_after(1):
                await wait_for([a.table], lambda: carol.peer_id not in a.table)
            assert relay.stats.dropped_not_member == 2 and a.registered

    trio.run(main)


def test_a_relay_outside_any_federation_admits_everyone(tmp_path: Path) -> None:
    fed = Fed(tmp_path)
    ticket = invites.create_invite(membership(fed.member("admin", admin=True)), addresses=["x:1"], relays=[])

    async def main() -> None:
        async with serving(Identity.generate()) as (relay, nursery):
            assert relay.address is not None
            member = make_member(relay.address, fed.member("m"))
            stranger = make_member(relay.address, Identity.generate())
            joiner = make_member(relay.address, Identity.generate(), ticket=ticket.ticket.to_text())
            await start(nursery, member, stranger, joiner)
            with trio.fail_after(5):  # a ticket is ignored there too: the joiner is a member like any other
                ids = {stranger.identity.peer_id, joiner.identity.peer_id}
                await wait_for([member.table], lambda: ids <= {x.peer_id for x in member.table.peers()})
                await stranger.wait_registered()
            stream = await stranger.open_stream(member.identity.peer_id)
            assert await roundtrip(stream, b"open relay") == b"open relay"
            await stream.aclose()
            assert relay.stats.rejected == 0 and not relay.guests

    trio.run(main)
