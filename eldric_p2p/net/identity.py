"""Node identity: an Ed25519 key pair kept in the data dir, and the peer id derived from its public key.

peer id = "ep" + base32(sha256(raw public key))[:26], lower case: short enough to read aloud, 130 bits of
the hash.
Anyone holding the public key can check that it matches a claimed peer id (`peer_id_of`), and a signature
made with the private key proves possession (`verify`).
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from eldric_p2p.errors import AuthenticationError, UsageError

if TYPE_CHECKING:
    from eldric_p2p.net.federation.store import Membership

KEY_FILE = "identity.key"
PEER_ID_PREFIX = "ep"
PEER_ID_LEN = len(PEER_ID_PREFIX) + 26


def peer_id_of(public_key: bytes) -> str:
    """Peer id of a raw 32-byte Ed25519 public key."""
    if len(public_key) != 32:
        raise AuthenticationError(f"Ed25519 public key must be 32 bytes, got {len(public_key)}")
    digest = hashlib.sha256(public_key).digest()
    return PEER_ID_PREFIX + base64.b32encode(digest).decode("ascii").lower()[:26]


def is_peer_id(text: str) -> bool:
    return (
        len(text) == PEER_ID_LEN
        and text.startswith(PEER_ID_PREFIX)
        and all(c in "abcdefghijklmnopqrstuvwxyz234567" for c in text[len(PEER_ID_PREFIX) :])
    )


def verify(public_key: bytes, signature: bytes, message: bytes, *, claimed_peer_id: str | None = None) -> str:
    """Check `signature` over `message` by `public_key` (and that the key matches `claimed_peer_id`).

    Returns the peer id. Raises `AuthenticationError`.
    """
    peer_id = peer_id_of(public_key)
    if claimed_peer_id is not None and claimed_peer_id != peer_id:
        raise AuthenticationError(f"public key belongs to {peer_id}, not {claimed_peer_id}")
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError) as exc:
        raise AuthenticationError(f"bad signature from {peer_id}") from exc
    return peer_id


@dataclass(frozen=True)
class Identity:
    """This node's key, and (once the node is in a federation) its `membership`, which every check of a peer
    reads: links, relay registration, signed HTTP requests. `membership is None` or not active: no checks."""

    private_key: Ed25519PrivateKey
    membership: Membership | None = field(default=None, compare=False, repr=False)

    def with_membership(self, membership: Membership) -> Identity:
        return replace(self, membership=membership)

    @property
    def federated(self) -> bool:
        return self.membership is not None and self.membership.active

    @property
    def public_key(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def peer_id(self) -> str:
        return peer_id_of(self.public_key)

    def sign(self, message: bytes) -> bytes:
        return self.private_key.sign(message)

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, data_dir: str | os.PathLike[str]) -> Identity:
        """Load `identity.key` from `data_dir`, creating it (mode 0600) on first start."""
        path = Path(data_dir) / KEY_FILE
        if path.exists():
            if path.stat().st_mode & 0o077:
                os.chmod(path, 0o600)
            try:
                key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            except ValueError as exc:
                raise UsageError(f"{path}: not a readable identity key") from exc
            if not isinstance(key, Ed25519PrivateKey):
                raise UsageError(f"{path}: not an Ed25519 key")
            return cls(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        ident = cls.generate()
        pem = ident.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        return ident
