"""Revocation records: "peer P is out of federation F", signed by the root key or by an admin.

A record is self-authenticating, so it may travel any way (pushed peer to peer, through a relay, pulled on
start-up) and be checked on arrival:

    {"federation": F, "peer_id": P, "at": unix seconds, "by": admin peer id or F,
     "sig": base64url Ed25519 over CONTEXT || canonical JSON of the four fields,
     "chain": [base64url DER, ...]}          # the admin's chain; empty when the root signed

Revoking is by peer id, not by certificate serial: every certificate of that node, renewed or not, is out.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from eldric_p2p.net.federation.certs import (
    MAX_CERT_DER,
    MAX_CHAIN,
    Federation,
    MembershipError,
    load_der,
    raw_public_key,
)
from eldric_p2p.net.identity import is_peer_id

CONTEXT = b"eldric-p2p revocation v1\x00"
MAX_RECORD_JSON = 8192
MAX_RECORDS = 10_000  # in one push or one list


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: Any, what: str, limit: int) -> bytes:
    if not isinstance(text, str) or len(text) > (limit * 4) // 3 + 4:
        raise MembershipError("malformed", f"revocation {what} is not base64url text within {limit} bytes")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError) as exc:
        raise MembershipError("malformed", f"revocation {what} is not base64url") from exc


@dataclass(frozen=True)
class Revocation:
    federation_id: str
    peer_id: str
    at: float
    by: str
    signature: bytes
    chain: tuple[bytes, ...] = ()

    def _signed(self) -> bytes:
        body = {"federation": self.federation_id, "peer_id": self.peer_id, "at": int(self.at), "by": self.by}
        return CONTEXT + json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")

    @classmethod
    def make(
        cls,
        federation_id: str,
        peer_id: str,
        key: Ed25519PrivateKey,
        by: str,
        chain: Sequence[bytes] = (),
        *,
        now: float | None = None,
    ) -> Revocation:
        unsigned = cls(
            federation_id, peer_id, int(time.time() if now is None else now), by, b"", tuple(chain)
        )
        return cls(**{**unsigned.__dict__, "signature": key.sign(unsigned._signed())})

    def verify(self, federation: Federation) -> None:
        """Raise `MembershipError` unless the root, or an admin in good standing, signed this record."""
        if self.federation_id != federation.id:
            raise MembershipError("other_federation", f"revocation is for federation {self.federation_id}")
        if self.by == federation.id:
            if self.chain:
                raise MembershipError("malformed", "a root-signed revocation carries no chain")
            key = federation.root_key
        else:
            admin = federation.verify(self.chain, peer_id=self.by)
            if not admin.is_admin:
                raise MembershipError("role", f"{self.by} is not an admin and cannot revoke")
            key = raw_public_key(load_der(self.chain[0]))
        try:
            Ed25519PublicKey.from_public_bytes(key).verify(self.signature, self._signed())
        except InvalidSignature as exc:
            raise MembershipError("forged", f"revocation of {self.peer_id} has a bad signature") from exc

    def to_json(self) -> dict[str, Any]:
        return {
            "federation": self.federation_id,
            "peer_id": self.peer_id,
            "at": int(self.at),
            "by": self.by,
            "sig": _b64(self.signature),
            "chain": [_b64(c) for c in self.chain],
        }

    @classmethod
    def from_json(cls, body: Any) -> Revocation:
        """Parse one record (untrusted). Raises `MembershipError("malformed", ...)`; call `verify` next."""
        if not isinstance(body, dict):
            raise MembershipError("malformed", "revocation is not an object")
        if len(json.dumps(body, default=str)) > MAX_RECORD_JSON:
            raise MembershipError("malformed", f"revocation over {MAX_RECORD_JSON} bytes")
        fed, pid, at, by = body.get("federation"), body.get("peer_id"), body.get("at"), body.get("by")
        if not isinstance(fed, str) or not isinstance(by, str) or len(fed) > 64 or len(by) > 64:
            raise MembershipError("malformed", "revocation lacks federation or by")
        if not isinstance(pid, str) or not is_peer_id(pid):
            raise MembershipError("malformed", "revocation names no valid peer id")
        if not isinstance(at, int) or isinstance(at, bool) or not 0 <= at < 2**40:
            raise MembershipError("malformed", "revocation time is not a unix time")
        chain = body.get("chain", [])
        if not isinstance(chain, list) or len(chain) > MAX_CHAIN:
            raise MembershipError("malformed", f"revocation chain is not a list of at most {MAX_CHAIN}")
        return cls(
            fed,
            pid,
            at,
            by,
            _unb64(body.get("sig"), "signature", 64),
            tuple(_unb64(c, "certificate", MAX_CERT_DER) for c in chain),
        )


def parse_records(body: Any) -> list[Revocation]:
    """A JSON list of records (untrusted), each parsed; the list is bounded by `MAX_RECORDS`."""
    if not isinstance(body, list) or len(body) > MAX_RECORDS:
        raise MembershipError("malformed", f"revocations must be a list of at most {MAX_RECORDS}")
    return [Revocation.from_json(r) for r in body]
