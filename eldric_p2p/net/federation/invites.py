"""Invite tokens: one line that lets one node (or `uses` nodes) join, until it expires.

    epi1.<base64url of JSON>
    {"f": federation id, "n": federation name, "i": inviter peer id, "a": ["host:port", ...] inviter HTTP,
     "r": ["host:port", ...] relays, "k": invite id, "s": secret, "e": expiry (unix s),
     "t": ticket}

The joiner proves it holds the secret without sending it: `proof = HMAC-SHA256(secret, CONTEXT || federation
id || joiner peer id)`, so a proof seen on the wire is good for that joiner's key only (and the inviter
issues the certificate to that key). The federation id pins the root key: the joiner checks the root
certificate it gets back against it, so whoever answers cannot make it join another federation.

The *ticket* lets a joiner that has no certificate yet reach the inviter through a relay: the inviter's
signature over (federation id, invite id, inviter, expiry) with the inviter's chain. A relay admits a ticket
holder as a guest that may only open streams to the inviter; the inviter accepts a link from it only for the
join request. The inviter keeps the invite (secret, uses left, expiry) in `invites.json`; `redeem` spends one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from eldric_p2p.errors import UsageError
from eldric_p2p.net.federation.certs import (
    MAX_CHAIN_BYTES,
    MembershipError,
    chain_from_text,
    chain_to_text,
    is_federation_id,
    load_der,
    raw_public_key,
)
from eldric_p2p.net.federation.store import Membership, read_json, write_private
from eldric_p2p.net.identity import is_peer_id
from eldric_p2p.units import parse_duration

PREFIX = "epi1."
PROOF_CONTEXT = b"eldric-p2p join v1\x00"
TICKET_CONTEXT = b"eldric-p2p join ticket v1\x00"
MAX_TOKEN = 8192
MAX_ADDRESSES = 16
DEFAULT_TTL_S = 24 * 3600.0
MAX_TTL_S = 365 * 24 * 3600.0
MAX_USES = 10_000


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _bad(message: str) -> MembershipError:
    return MembershipError("malformed", f"invite token: {message}")


@dataclass(frozen=True)
class Ticket:
    federation_id: str
    invite_id: str
    inviter: str
    expires: float
    signature: bytes
    chain: tuple[bytes, ...]

    def _signed(self) -> bytes:
        body = [self.federation_id, self.invite_id, self.inviter, int(self.expires)]
        return TICKET_CONTEXT + json.dumps(body, separators=(",", ":")).encode()

    def to_text(self) -> str:
        return ".".join([self.federation_id, self.invite_id, self.inviter, str(int(self.expires)),
                         _b64(self.signature), chain_to_text(self.chain)])  # fmt: skip

    @classmethod
    def from_text(cls, text: str) -> Ticket:
        if not isinstance(text, str) or len(text) > 200 + (MAX_CHAIN_BYTES * 4) // 3:
            raise MembershipError("malformed", "join ticket is not text within the size limit")
        parts = text.split(".")
        if len(parts) != 6 or not parts[3].isdigit() or len(parts[3]) > 12:
            raise MembershipError("malformed", "join ticket does not have its six fields")
        fed, invite_id, inviter, expires, sig, chain = parts
        if not is_federation_id(fed) or not is_peer_id(inviter) or not 8 <= len(invite_id) <= 64:
            raise MembershipError("malformed", "join ticket names no valid federation, invite or inviter")
        try:
            signature = _unb64(sig)
        except ValueError as exc:
            raise MembershipError("malformed", "join ticket signature is not base64url") from exc
        return cls(fed, invite_id, inviter, float(int(expires)), signature, chain_from_text(chain))

    def verify(self, membership: Membership, *, now: float | None = None) -> None:
        """Raise `MembershipError` unless a member in good standing of our federation signed it, in time."""
        if membership.federation is None or self.federation_id != membership.federation.id:
            raise MembershipError("other_federation", f"join ticket is for federation {self.federation_id}")
        if (time.time() if now is None else now) > self.expires:
            raise MembershipError("expired", "join ticket expired")
        membership.verify_peer(self.chain, self.inviter)
        try:
            Ed25519PublicKey.from_public_bytes(raw_public_key(load_der(self.chain[0]))).verify(
                self.signature, self._signed()
            )
        except InvalidSignature as exc:
            raise MembershipError("forged", "join ticket has a bad signature") from exc


@dataclass(frozen=True)
class Invite:
    """A parsed invite token."""

    federation_id: str
    name: str
    inviter: str
    addresses: tuple[str, ...]
    relays: tuple[str, ...]
    invite_id: str
    secret: bytes
    expires: float
    ticket: Ticket

    def to_token(self) -> str:
        body = {
            "f": self.federation_id, "n": self.name, "i": self.inviter, "a": list(self.addresses),
            "r": list(self.relays), "k": self.invite_id, "s": _b64(self.secret), "e": int(self.expires),
            "t": self.ticket.to_text(),
        }  # fmt: skip
        return PREFIX + _b64(json.dumps(body, separators=(",", ":")).encode())

    @classmethod
    def from_token(cls, token: str) -> Invite:
        """Parse a token (untrusted). Raises `MembershipError` saying what is wrong with it."""
        token = token.strip()
        if len(token) > MAX_TOKEN:
            raise _bad(f"{len(token)} characters, limit {MAX_TOKEN}")
        if not token.startswith(PREFIX):
            raise _bad(f"does not start with {PREFIX!r}")
        try:
            body = json.loads(_unb64(token[len(PREFIX) :]))
        except (ValueError, UnicodeDecodeError) as exc:
            raise _bad("truncated or not base64url JSON") from exc
        if not isinstance(body, dict):
            raise _bad("not an object")
        fed, inviter, invite_id = body.get("f"), body.get("i"), body.get("k")
        if not isinstance(fed, str) or not is_federation_id(fed):
            raise _bad("no valid federation id")
        if not isinstance(inviter, str) or not is_peer_id(inviter):
            raise _bad("no valid inviter peer id")
        if not isinstance(invite_id, str) or not 8 <= len(invite_id) <= 64:
            raise _bad("no valid invite id")
        lists = []
        for key in ("a", "r"):
            value = body.get(key, [])
            if not isinstance(value, list) or len(value) > MAX_ADDRESSES:
                raise _bad(f"{key!r} is not a list of at most {MAX_ADDRESSES}")
            if not all(isinstance(v, str) and 0 < len(v) <= 300 for v in value):
                raise _bad(f"{key!r} holds something that is not an address")
            lists.append(tuple(value))
        expires, name, secret = body.get("e"), body.get("n", ""), body.get("s")
        if not isinstance(expires, int) or isinstance(expires, bool) or not 0 < expires < 2**40:
            raise _bad("no valid expiry")
        if not isinstance(name, str) or len(name) > 64:
            raise _bad("no valid federation name")
        if not isinstance(secret, str) or len(secret) > 64:
            raise _bad("no valid secret")
        try:
            raw_secret = _unb64(secret)
        except ValueError as exc:
            raise _bad("secret is not base64url") from exc
        if len(raw_secret) < 16:
            raise _bad("secret too short")
        ticket = Ticket.from_text(body.get("t", ""))
        if (ticket.federation_id, ticket.invite_id, ticket.inviter) != (fed, invite_id, inviter):
            raise _bad("ticket does not match the invite")
        if not lists[0] and not lists[1]:
            raise _bad("names no address and no relay to reach the inviter at")
        return cls(fed, name, inviter, lists[0], lists[1], invite_id, raw_secret, float(expires), ticket)

    def proof(self, joiner_peer_id: str) -> str:
        return join_proof(self.secret, self.federation_id, joiner_peer_id)


def join_proof(secret: bytes, federation_id: str, joiner_peer_id: str) -> str:
    msg = PROOF_CONTEXT + federation_id.encode() + b"\x00" + joiner_peer_id.encode()
    return hmac.new(secret, msg, hashlib.sha256).hexdigest()


# --------------------------------------------------------------------------- the inviter's side


def parse_ttl(text: str) -> float:
    """`'24h'`, `'30m'`, `'7d'`, `'90s'` or seconds, 1 s to 365 d. Raises UsageError."""
    return parse_duration(text, max_s=MAX_TTL_S)


def create_invite(
    membership: Membership,
    *,
    addresses: list[str],
    relays: list[str],
    ttl_s: float = DEFAULT_TTL_S,
    uses: int = 1,
    admin: bool = False,
    now: float | None = None,
) -> Invite:
    """A new invite from this member (an admin, or the root holder for `admin=True`), kept in invites.json."""
    issuer = membership.issuer()  # raises UsageError when this node cannot issue certificates
    if admin and not issuer.is_root:
        raise UsageError("only the node holding the federation's root key can invite admins")
    if not 1 <= uses <= MAX_USES:
        raise UsageError(f"--uses must be 1-{MAX_USES}")
    if not addresses and not relays:
        raise UsageError("the invite names no address or relay to reach this node at (start the node first, "
                         "or pass --address / --relay)")  # fmt: skip
    assert membership.federation is not None and membership.cert is not None
    now = time.time() if now is None else now
    invite_id, secret = secrets.token_hex(8), secrets.token_bytes(16)
    expires = float(int(now + ttl_s))
    unsigned = Ticket(
        membership.federation.id, invite_id, membership.identity.peer_id, expires, b"", membership.chain
    )
    ticket = Ticket(**{**unsigned.__dict__, "signature": membership.identity.sign(unsigned._signed())})
    invite = Invite(
        membership.federation.id, membership.federation.name, membership.identity.peer_id,
        tuple(addresses[:MAX_ADDRESSES]), tuple(relays[:MAX_ADDRESSES]), invite_id, secret, expires, ticket,
    )  # fmt: skip
    path = membership.dir / "invites.json"
    invites = _live(read_json(path, {}), now)
    invites[invite_id] = {"secret": _b64(secret), "uses": uses, "expires": expires, "admin": admin}
    write_private(path, json.dumps(invites, indent=1).encode())
    return invite


def _live(invites: Any, now: float) -> dict[str, Any]:
    if not isinstance(invites, dict):
        return {}
    return {
        k: v
        for k, v in invites.items()
        if isinstance(v, dict) and v.get("expires", 0) > now and v.get("uses", 0) > 0
    }


def invite_live(membership: Membership, invite_id: str, *, now: float | None = None) -> bool:
    """Whether this node handed out `invite_id` and it still has uses and time left."""
    invites = _live(read_json(membership.dir / "invites.json", {}), time.time() if now is None else now)
    return invite_id in invites


def redeem(
    membership: Membership, invite_id: str, proof: str, joiner_peer_id: str, *, now: float | None = None
) -> bool:
    """Spend one use of `invite_id` for `joiner_peer_id`. Returns whether it makes an admin.

    Raises `MembershipError`: unknown or used-up invite ("invite_used"), expired ("expired"), wrong proof
    ("forged"). The file is rewritten before the caller issues anything, so a crash never gives a use back.
    """
    assert membership.federation is not None
    now = time.time() if now is None else now
    path = membership.dir / "invites.json"
    all_invites = read_json(path, {})
    rec = all_invites.get(invite_id) if isinstance(all_invites, dict) else None
    if not isinstance(rec, dict) or rec.get("uses", 0) <= 0:
        raise MembershipError("invite_used", "this invite is unknown here or has no uses left")
    if rec.get("expires", 0) <= now:
        raise MembershipError("expired", "this invite expired")
    expected = join_proof(_unb64(rec["secret"]), membership.federation.id, joiner_peer_id)
    if not isinstance(proof, str) or not hmac.compare_digest(expected, proof):
        raise MembershipError("forged", "the join proof does not match the invite's secret")
    rec["uses"] -= 1
    write_private(path, json.dumps(_live(all_invites, now), indent=1).encode())
    return bool(rec.get("admin"))
