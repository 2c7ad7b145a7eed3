"""Membership certificates, revocation records and invite tokens: what checks, and each way one fails."""

from __future__ import annotations

import base64
import json
import random
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from eldric_p2p.errors import EldricError, UsageError
from eldric_p2p.net.federation.certs import (
    MAX_SKEW_S,
    Federation,
    Issuer,
    MembershipError,
    chain_from_text,
    chain_to_text,
    create_root,
    decode_chain,
    encode_chain,
)
from eldric_p2p.net.federation.invites import Invite, Ticket, create_invite, join_proof, parse_ttl, redeem
from eldric_p2p.net.federation.revocation import Revocation, parse_records
from eldric_p2p.net.federation.store import Membership
from eldric_p2p.net.identity import Identity


def make_federation(tmp_path: Path, name: str = "lab"):  # type: ignore[no-untyped-def]
    """(root key, root cert, admin identity with its Membership saved under tmp_path/name)."""
    key, root = create_root(name)
    admin = Identity.generate()
    m = Membership(tmp_path / name, admin)
    chain = Issuer(key, root).issue(admin.public_key, ["admin"])
    m.save(root.public_bytes(serialization.Encoding.PEM), chain, root_key=key)
    return key, root, admin.with_membership(m)


def code_of(exc_info: pytest.ExceptionInfo[MembershipError]) -> str:
    return exc_info.value.code


def test_member_chain_verifies_and_binds_peer_id_roles_and_issuer(tmp_path: Path) -> None:
    key, root, admin = make_federation(tmp_path)
    fed = Federation(root)
    member = Identity.generate()
    # issued by the root directly
    direct = fed.verify(Issuer(key, root).issue(member.public_key), peer_id=member.peer_id)
    assert direct.roles == {"member"} and direct.issuer == fed.id and not direct.is_admin
    # issued by an admin: two certificates, the admin's id as issuer
    chain = Issuer.for_admin(admin, admin.membership.chain).issue(member.public_key)
    got = fed.verify(chain, peer_id=member.peer_id)
    assert len(chain) == 2 and got.issuer == admin.peer_id and got.roles == {"member"}
    assert 7 * 86400 - 120 < got.not_after - time.time() <= 7 * 86400
    # an admin cannot make admins; the root can
    with pytest.raises(UsageError, match="root key"):
        Issuer.for_admin(admin, admin.membership.chain).issue(member.public_key, ["admin"])
    assert fed.verify(Issuer(key, root).issue(member.public_key, ["admin"])).is_admin


def test_each_bad_certificate_is_refused_with_its_own_code(tmp_path: Path) -> None:
    key, root, admin = make_federation(tmp_path)
    fed = Federation(root)
    member, other = Identity.generate(), Identity.generate()
    good = Issuer(key, root).issue(member.public_key)

    with pytest.raises(MembershipError) as e:  # bound to another peer id than the one proven
        fed.verify(good, peer_id=other.peer_id)
    assert code_of(e) == "wrong_peer"
    okey, oroot = create_root("elsewhere")
    with pytest.raises(MembershipError) as e:  # another federation's certificate
        fed.verify(Issuer(okey, oroot).issue(member.public_key), peer_id=member.peer_id)
    assert code_of(e) == "other_federation"
    forged = bytearray(good[0])
    forged[-5] ^= 0x40  # inside the signature
    with pytest.raises(MembershipError) as e:
        fed.verify([bytes(forged)], peer_id=member.peer_id)
    assert code_of(e) in ("forged", "malformed")
    # the same subject signed by a key that is not the root, under the root's name
    impostor = Issuer(okey, root)
    with pytest.raises(MembershipError) as e:
        fed.verify(impostor.issue(member.public_key), peer_id=member.peer_id)
    assert code_of(e) == "forged"
    with pytest.raises(MembershipError) as e:  # truncated DER
        fed.verify([good[0][:100]], peer_id=member.peer_id)
    assert code_of(e) == "malformed"
    # a member (not admin) cannot issue: its chain as issuer is refused
    member_issuer = Issuer(member.private_key, x509.load_der_x509_certificate(good[0]))
    with pytest.raises(MembershipError) as e:
        fed.verify(member_issuer.issue(other.public_key), peer_id=other.peer_id)
    assert code_of(e) in ("role", "forged")


def test_validity_has_a_documented_skew_bound(tmp_path: Path) -> None:
    key, root, _ = make_federation(tmp_path)
    fed = Federation(root)
    member = Identity.generate()
    now = time.time()
    chain = Issuer(key, root).issue(member.public_key, ttl_s=3600, now=now)
    fed.verify(chain, peer_id=member.peer_id, now=now + 3600 + MAX_SKEW_S - 5)  # late clock, within bound
    with pytest.raises(MembershipError) as e:
        fed.verify(chain, peer_id=member.peer_id, now=now + 3600 + MAX_SKEW_S + 5)
    assert code_of(e) == "expired"
    fed.verify(chain, peer_id=member.peer_id, now=now - 60 - MAX_SKEW_S + 5)  # early clock, within bound
    with pytest.raises(MembershipError) as e:
        fed.verify(chain, peer_id=member.peer_id, now=now - 60 - MAX_SKEW_S - 5)
    assert code_of(e) == "not_yet_valid"


def test_chain_encoding_round_trips_and_refuses_every_truncation() -> None:
    chain = (b"a" * 300, b"b" * 400)
    assert decode_chain(encode_chain(chain)) == chain
    assert chain_from_text(chain_to_text(chain)) == chain
    data = encode_chain(chain)
    for cut in range(len(data)):
        with pytest.raises(MembershipError):
            decode_chain(data[:cut])
    with pytest.raises(MembershipError):
        decode_chain(data + b"x")
    with pytest.raises(MembershipError):
        decode_chain(b"\x00\x05" + b"\x00" * 20)  # five certificates


def test_revocations_verify_persist_and_refuse_forgeries(tmp_path: Path) -> None:
    key, root, admin = make_federation(tmp_path)
    m = admin.membership
    member = Identity.generate()
    chain = Issuer(key, root).issue(member.public_key)
    told: list[str] = []
    m.on_revoked.append(told.append)
    record = m.revoke(member.peer_id)
    assert told == [member.peer_id] and record.by == m.id  # the root holder signs as the root
    with pytest.raises(MembershipError) as e:
        m.verify_peer(chain, member.peer_id)
    assert code_of(e) == "revoked"
    # a fresh Membership reads it back from revoked.json
    again = Membership(tmp_path / "lab", admin)
    assert member.peer_id in again.revocations
    # a record round-trips through JSON and still verifies; a tampered or stranger-signed one does not
    parsed = parse_records(json.loads(json.dumps([record.to_json()])))[0]
    parsed.verify(m.federation)
    tampered = Revocation(parsed.federation_id, admin.peer_id, parsed.at, parsed.by, parsed.signature)
    with pytest.raises(MembershipError) as e:
        tampered.verify(m.federation)
    assert code_of(e) == "forged"
    stranger = Identity.generate()
    by_member = Revocation.make(m.id, admin.peer_id, stranger.private_key, stranger.peer_id,
                                Issuer(key, root).issue(stranger.public_key))  # fmt: skip
    with pytest.raises(MembershipError) as e:
        by_member.verify(m.federation)
    assert code_of(e) == "role"
    assert m.add_revocations([by_member]) == []  # ignored, not kept
    with pytest.raises(UsageError):
        m.revoke(admin.peer_id)  # not oneself


def test_invite_token_round_trip_redeem_once_and_expiry(tmp_path: Path) -> None:
    _, _, admin = make_federation(tmp_path)
    m = admin.membership
    invite = create_invite(m, addresses=["127.0.0.1:8470"], relays=["10.0.0.1:4433"], ttl_s=3600, uses=1)
    token = invite.to_token()
    assert "\n" not in token and token.startswith("epi1.")
    back = Invite.from_token(token)
    assert back == invite
    back.ticket.verify(m)
    joiner = Identity.generate()
    with pytest.raises(MembershipError) as e:  # a proof made for another key
        redeem(m, back.invite_id, back.proof(Identity.generate().peer_id), joiner.peer_id)
    assert code_of(e) == "forged"
    assert redeem(m, back.invite_id, back.proof(joiner.peer_id), joiner.peer_id) is False
    with pytest.raises(MembershipError) as e:  # used up
        redeem(m, back.invite_id, back.proof(joiner.peer_id), joiner.peer_id)
    assert code_of(e) == "invite_used"
    late = create_invite(m, addresses=["127.0.0.1:1"], relays=[], ttl_s=60, now=time.time() - 120)
    with pytest.raises(MembershipError) as e:
        redeem(m, late.invite_id, late.proof(joiner.peer_id), joiner.peer_id)
    assert code_of(e) in ("expired", "invite_used")
    with pytest.raises(MembershipError) as e:
        late.ticket.verify(m)
    assert code_of(e) == "expired"
    with pytest.raises(UsageError):
        create_invite(m, addresses=[], relays=[])
    assert parse_ttl("24h") == 86400 and parse_ttl("30m") == 1800 and parse_ttl("90") == 90
    for bad in ("", "x", "-1h", "400d"):
        with pytest.raises(UsageError):
            parse_ttl(bad)
    assert join_proof(b"s" * 16, m.id, "a") != join_proof(b"s" * 16, m.id, "b")


def test_a_member_that_is_no_admin_cannot_invite(tmp_path: Path) -> None:
    key, root, admin = make_federation(tmp_path)
    member = Identity.generate()
    mm = Membership(tmp_path / "member", member)
    mm.save(admin.membership.federation.root_pem(), Issuer(key, root).issue(member.public_key))
    with pytest.raises(UsageError, match="not an admin"):
        create_invite(mm, addresses=["127.0.0.1:1"], relays=[])
    admin2 = Identity.generate()
    am = Membership(tmp_path / "admin2", admin2)
    am.save(admin.membership.federation.root_pem(), Issuer(key, root).issue(admin2.public_key, ["admin"]))
    with pytest.raises(UsageError, match="root key"):  # an admin without the root key cannot invite admins
        create_invite(am, addresses=["127.0.0.1:1"], relays=[], admin=True)
    create_invite(am, addresses=["127.0.0.1:1"], relays=[])


def test_tokens_tickets_and_records_fuzzed_never_crash(tmp_path: Path) -> None:
    """Truncations, byte flips and random JSON: each parse ends in a specific error or a value, never
    anything else."""
    _, _, admin = make_federation(tmp_path)
    m = admin.membership
    invite = create_invite(m, addresses=["127.0.0.1:8470"], relays=["10.0.0.1:4433"])
    token = invite.to_token()
    ticket = invite.ticket.to_text()
    record = m.revoke(Identity.generate().peer_id).to_json()
    rng = random.Random(11)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.="

    def mutate(text: str) -> str:
        chars = list(text)
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            i = rng.randrange(len(chars)) if chars else 0
            if op < 0.3 and chars:
                chars[i] = rng.choice(alphabet)
            elif op < 0.6:
                chars = chars[: rng.randrange(len(chars) + 1)]
            else:
                chars.insert(i, rng.choice(alphabet))
        return "".join(chars)

    outcomes = {"ok": 0, "refused": 0}
    for _ in range(1500):
        for parse in (
            lambda t: Invite.from_token(mutate(token)),
            lambda t: Ticket.from_text(mutate(ticket)).verify(m),
        ):
            try:
                parse(None)
                outcomes["ok"] += 1
            except MembershipError:
                outcomes["refused"] += 1
    for _ in range(500):
        body = dict(record)
        key = rng.choice(list(body))
        body[key] = rng.choice([None, 1, -1, "x" * rng.randint(0, 20000), [], {}, True, 2**70])
        try:
            parse_records([body])[0].verify(m.federation)
            outcomes["ok"] += 1
        except EldricError:
            outcomes["refused"] += 1
    raw = base64.urlsafe_b64encode(json.dumps({"f": 1}).encode()).decode()
    with pytest.raises(MembershipError):
        Invite.from_token("epi1." + raw)
    assert outcomes["refused"] > 1000
