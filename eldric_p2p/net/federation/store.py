"""A node's membership, kept in its data dir and shared by every part of the node that checks peers.

    DIR/federation/root.crt     the federation's root certificate (PEM): its id and public key
    DIR/federation/root.key     the root key (PEM, 0600), only on the node that ran `federation init`
    DIR/federation/member.pem   this node's chain (PEM, leaf first)
    DIR/federation/revoked.json signed revocation records
    DIR/federation/invites.json invites this admin handed out (secret hashes, uses left, expiry), 0600
    DIR/federation/issued.json  certificates this admin issued: the members it knows of

`Membership(data_dir, identity)` reads them (`reload()` again whenever the files change: the CLI writes
them while a node runs). A node whose dir has no federation is `active == False` and checks nobody, which
is the behaviour of a node that was never put into a federation. Writes go through a temporary file and
a rename, so a node never reads half a file.
"""

from __future__ import annotations

import json
import logging
import os
import time
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from eldric_p2p.errors import UsageError
from eldric_p2p.net.federation.certs import (
    Federation,
    Issuer,
    MemberCert,
    MembershipError,
    load_der,
)
from eldric_p2p.net.federation.revocation import Revocation, parse_records
from eldric_p2p.net.identity import Identity

log = logging.getLogger(__name__)

DIRNAME = "federation"


def write_private(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Write `data` to `path` atomically with `mode` (never readable by others, even for an instant)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default
    except ValueError as exc:
        raise UsageError(f"{path}: not valid JSON ({exc})") from exc


def chain_pem(chain: Iterable[bytes]) -> bytes:
    return b"".join(load_der(c).public_bytes(serialization.Encoding.PEM) for c in chain)


class Membership:
    """This node's place in a federation (or none). Cheap to query; `reload()` picks up file changes."""

    def __init__(self, data_dir: str | os.PathLike[str], identity: Identity) -> None:
        self.dir = Path(data_dir) / DIRNAME
        self.identity = identity
        self.federation: Federation | None = None
        self.chain: tuple[bytes, ...] = ()
        self.cert: MemberCert | None = None
        self.revocations: dict[str, Revocation] = {}
        self.links: weakref.WeakSet[Any] = weakref.WeakSet()  # open links, closed when their peer is revoked
        self.on_revoked: list[Callable[[str], None]] = []
        self._stamp: tuple[float, ...] = ()
        self.reload()

    # ---- reading ------------------------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        return self.cert is not None

    @property
    def id(self) -> str | None:
        return self.federation.id if self.federation else None

    @property
    def is_admin(self) -> bool:
        return self.cert is not None and self.cert.is_admin

    def _files(self) -> list[Path]:
        return [self.dir / n for n in ("root.crt", "member.pem", "revoked.json", "root.key")]

    def _mtimes(self) -> tuple[float, ...]:
        return tuple(p.stat().st_mtime_ns if p.exists() else -1 for p in self._files())

    def changed(self) -> bool:
        return self._mtimes() != self._stamp

    def reload(self) -> bool:
        """Read the files again if they changed. Returns whether anything did. Raises UsageError for a
        corrupt file (a node should not start on one)."""
        stamp = self._mtimes()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        root_path = self.dir / "root.crt"
        if not root_path.exists():
            self.federation, self.chain, self.cert = None, (), None
            return True
        try:
            federation = Federation.from_pem(root_path.read_bytes())
        except MembershipError as exc:
            raise UsageError(f"{root_path}: {exc}") from exc
        if self.federation is None or self.federation.id != federation.id:
            self.federation = federation
            self.revocations = {}
        self._load_revocations()
        member_path = self.dir / "member.pem"
        self.chain, self.cert = (), None
        if member_path.exists():
            try:
                certs = x509.load_pem_x509_certificates(member_path.read_bytes())
                chain = tuple(c.public_bytes(serialization.Encoding.DER) for c in certs)
                self.cert = self.federation.verify(chain, peer_id=self.identity.peer_id, now=time.time())
                self.chain = chain
            except (ValueError, MembershipError) as exc:
                log.warning("%s: this node's membership is not valid: %s", member_path, exc)
        return True

    def _load_revocations(self) -> None:
        assert self.federation is not None
        path = self.dir / "revoked.json"
        try:
            records = parse_records(read_json(path, []))
        except MembershipError as exc:
            raise UsageError(f"{path}: {exc}") from exc
        for r in records:
            if r.peer_id not in self.revocations:
                try:
                    r.verify(self.federation)
                except MembershipError as exc:
                    log.warning("%s: ignoring a revocation of %s: %s", path, r.peer_id, exc)
                    continue
                self.revocations[r.peer_id] = r
                self.federation.revoked.add(r.peer_id)
                self._tell(r)

    def _tell(self, r: Revocation) -> None:
        log.warning("peer %s was revoked from federation %s (by %s)", r.peer_id, r.federation_id, r.by)
        for cb in list(self.on_revoked):
            cb(r.peer_id)

    # ---- checking peers -----------------------------------------------------------------------------------

    def verify_peer(self, chain: Iterable[bytes], peer_id: str) -> MemberCert:
        """The peer's membership, or `MembershipError`. Only meaningful when `active`."""
        if self.federation is None:
            raise MembershipError("not_member", "this node is in no federation")
        chain = tuple(chain)
        if not chain:
            raise MembershipError("not_member", f"{peer_id} presented no membership certificate")
        return self.federation.verify(chain, peer_id=peer_id)

    # ---- admin --------------------------------------------------------------------------------------------

    def root_key(self) -> Ed25519PrivateKey | None:
        path = self.dir / "root.key"
        if not path.exists():
            return None
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise UsageError(f"{path}: not an Ed25519 key")
        return key

    def issuer(self) -> Issuer:
        """What this node signs certificates with. Raises UsageError when it is no admin."""
        if self.federation is None or self.cert is None:
            raise UsageError(
                f"{self.dir.parent} is in no federation: run `eldric-p2p federation init` or `join`"
            )
        key = self.root_key()
        if key is not None:
            return Issuer(key, self.federation.root)
        if not self.cert.is_admin:
            raise UsageError(f"this node ({self.identity.peer_id}) is a member, not an admin")
        return Issuer.for_admin(self.identity, self.chain)

    def revoke(self, peer_id: str, *, now: float | None = None) -> Revocation:
        """Sign a revocation of `peer_id` as this admin (or root) and keep it. Raises UsageError."""
        if peer_id == self.identity.peer_id:
            raise UsageError("a node cannot revoke itself")
        issuer = self.issuer()
        assert self.federation is not None
        if issuer.is_root:
            record = Revocation.make(self.federation.id, peer_id, issuer.key, self.federation.id, now=now)
        else:
            record = Revocation.make(
                self.federation.id, peer_id, issuer.key, self.identity.peer_id, self.chain, now=now
            )
        self.add_revocations([record])
        return record

    def add_revocations(self, records: Iterable[Revocation]) -> list[str]:
        """Verify and keep records; return the peer ids newly revoked (and tell `on_revoked`)."""
        if self.federation is None:
            return []
        new: list[Revocation] = []
        for r in records:
            if r.peer_id in self.revocations or r.peer_id == self.identity.peer_id and r.by == r.peer_id:
                continue
            try:
                r.verify(self.federation)
            except MembershipError as exc:
                log.info("ignoring a revocation of %s: %s", r.peer_id, exc)
                continue
            new.append(r)
            self.revocations[r.peer_id] = r
            self.federation.revoked.add(r.peer_id)
        if new:
            path = self.dir / "revoked.json"
            write_private(
                path,
                json.dumps([r.to_json() for r in self.revocations.values()], indent=1).encode(),
                mode=0o644,
            )
            self._stamp = self._mtimes()
            for r in new:
                self._tell(r)
        return [r.peer_id for r in new]

    # ---- writing ------------------------------------------------------------------------------------------

    def save(
        self, root_pem: bytes, chain: Iterable[bytes], *, root_key: Ed25519PrivateKey | None = None
    ) -> None:
        """Keep a new membership (after `init`, `join` or a renewal) and load it."""
        chain = tuple(chain)
        federation = Federation.from_pem(root_pem)
        federation.verify(chain, peer_id=self.identity.peer_id)  # never write a chain that does not check
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        if root_key is not None:
            write_private(
                self.dir / "root.key",
                root_key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ),
            )
        write_private(self.dir / "root.crt", root_pem, mode=0o644)
        write_private(self.dir / "member.pem", chain_pem(chain), mode=0o644)
        self._stamp = ()
        self.reload()

    def record_issued(self, cert: MemberCert, name: str = "") -> None:
        """Note a certificate this admin issued (for `federation status`)."""
        path = self.dir / "issued.json"
        issued = read_json(path, {})
        issued[cert.peer_id] = {**cert.to_json(), "name": name[:64], "issued_at": int(time.time())}
        write_private(path, json.dumps(issued, indent=1).encode())

    def issued(self) -> dict[str, Any]:
        return read_json(self.dir / "issued.json", {})

    def status(self) -> dict[str, Any]:
        """What `federation status --json` prints."""
        if self.federation is None:
            return {"federation": None, "peer_id": self.identity.peer_id}
        return {
            "federation": self.federation.id,
            "name": self.federation.name,
            "peer_id": self.identity.peer_id,
            "member": self.cert.to_json() if self.cert else None,
            "admin": self.is_admin,
            "root_key": (self.dir / "root.key").exists(),
            "members": self.issued(),
            "revoked": sorted(self.revocations),
        }
