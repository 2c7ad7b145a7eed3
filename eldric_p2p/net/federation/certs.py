"""Membership certificates: X.509 with Ed25519 keys, issued by the federation's root or one of its admins.

    root       CN=<federation id>, O=<name>        self-signed, CA, path length 1; key kept by the first admin
    admin      CN=<peer id>, OU=admin, OU=member   issued by the root; a CA of path length 0 (issues members)
    member     CN=<peer id>, OU=member             issued by the root or an admin, not a CA

federation id = "ef" + base32(sha256(raw root public key))[:26], so a token naming the id pins the root key.
A certificate binds the node's own identity key (its subject public key hashes to the peer id in CN) to the
federation (issuer chain up to the root), roles (OU values), expiry (notAfter) and serial. A node presents its
*chain*: its certificate, then its issuer's when that is an admin (the root is known to every member).

`Federation.verify(chain, peer_id=...)` checks all of it and raises `MembershipError` with a `code` that says
which rule failed: malformed, other_federation, forged, expired, not_yet_valid, revoked, wrong_peer, role.
Clock skew: validity is checked with `MAX_SKEW_S` of slack on both ends.
"""

from __future__ import annotations

import base64
import hashlib
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID

from eldric_p2p.errors import AuthenticationError, UsageError
from eldric_p2p.net.identity import Identity, peer_id_of

FEDERATION_ID_PREFIX = "ef"
MAX_SKEW_S = 120.0  # seconds a peer's clock may be ahead or behind ours
DEFAULT_CERT_TTL_S = 7 * 24 * 3600.0
ROOT_TTL_S = 20 * 365 * 24 * 3600.0
MAX_CERT_DER = 2048  # one certificate; ours are ~400 bytes
MAX_CHAIN = 2  # leaf, and its admin issuer
MAX_CHAIN_BYTES = 2 + MAX_CHAIN * (2 + MAX_CERT_DER)
ROLE_MEMBER = "member"
ROLE_ADMIN = "admin"
ROLES = (ROLE_MEMBER, ROLE_ADMIN)
_NAME_MAX = 64


MEMBERSHIP_CODES = frozenset(
    {"malformed", "other_federation", "forged", "expired", "not_yet_valid", "revoked", "wrong_peer", "role",
     "not_member", "invite_used"}
)  # fmt: skip


class MembershipError(AuthenticationError):
    """A certificate, chain, token or signed record that does not prove membership. `code` names the rule."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def federation_id_of(root_public_key: bytes) -> str:
    digest = hashlib.sha256(b"eldric-p2p federation\x00" + root_public_key).digest()
    return FEDERATION_ID_PREFIX + base64.b32encode(digest).decode("ascii").lower()[:26]


def is_federation_id(text: str) -> bool:
    return (
        len(text) == len(FEDERATION_ID_PREFIX) + 26
        and text.startswith(FEDERATION_ID_PREFIX)
        and all(c in "abcdefghijklmnopqrstuvwxyz234567" for c in text[len(FEDERATION_ID_PREFIX) :])
    )


def raw_public_key(cert: x509.Certificate) -> bytes:
    key = cert.public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise MembershipError("malformed", f"certificate key is {type(key).__name__}, not Ed25519")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


def _cn(name: x509.Name) -> str:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(attrs) != 1 or not isinstance(attrs[0].value, str):
        raise MembershipError("malformed", "certificate name has no single common name")
    return attrs[0].value


def _roles(cert: x509.Certificate) -> frozenset[str]:
    values = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
    return frozenset(v for v in values if isinstance(v, str) and v in ROLES)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


# --------------------------------------------------------------------------- chains on the wire


def encode_chain(chain: Sequence[bytes]) -> bytes:
    """`count:u16be` then `length:u16be der` per certificate, leaf first."""
    if not 1 <= len(chain) <= MAX_CHAIN or any(len(c) > MAX_CERT_DER for c in chain):
        raise UsageError(f"a chain holds 1-{MAX_CHAIN} certificates of at most {MAX_CERT_DER} bytes")
    return struct.pack(">H", len(chain)) + b"".join(struct.pack(">H", len(c)) + c for c in chain)


def decode_chain(data: bytes) -> tuple[bytes, ...]:
    """Inverse of `encode_chain`; checks every length against the data and the limits before slicing."""
    if len(data) > MAX_CHAIN_BYTES:
        raise MembershipError("malformed", f"certificate chain of {len(data)} bytes over {MAX_CHAIN_BYTES}")
    if len(data) < 2:
        raise MembershipError("malformed", "certificate chain truncated")
    (count,) = struct.unpack_from(">H", data)
    if not 1 <= count <= MAX_CHAIN:
        raise MembershipError(
            "malformed", f"certificate chain of {count} certificates, expected 1-{MAX_CHAIN}"
        )
    out, pos = [], 2
    for _ in range(count):
        if pos + 2 > len(data):
            raise MembershipError("malformed", "certificate chain truncated")
        (n,) = struct.unpack_from(">H", data, pos)
        pos += 2
        if n > MAX_CERT_DER or pos + n > len(data):
            raise MembershipError("malformed", "certificate chain truncated or over the size limit")
        out.append(data[pos : pos + n])
        pos += n
    if pos != len(data):
        raise MembershipError("malformed", f"{len(data) - pos} stray bytes after the certificate chain")
    return tuple(out)


def chain_to_text(chain: Sequence[bytes]) -> str:
    return base64.urlsafe_b64encode(encode_chain(chain)).decode("ascii").rstrip("=")


def chain_from_text(text: str) -> tuple[bytes, ...]:
    if len(text) > (MAX_CHAIN_BYTES * 4) // 3 + 4:
        raise MembershipError("malformed", "certificate chain text over the size limit")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError) as exc:
        raise MembershipError("malformed", "certificate chain is not base64url") from exc
    return decode_chain(raw)


def load_der(der: bytes) -> x509.Certificate:
    if len(der) > MAX_CERT_DER:
        raise MembershipError("malformed", f"certificate of {len(der)} bytes over {MAX_CERT_DER}")
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise MembershipError("malformed", f"not an X.509 certificate: {exc}") from exc


# --------------------------------------------------------------------------- what a verified chain says


@dataclass(frozen=True)
class MemberCert:
    """A verified membership: who, which federation, which roles, until when, and who issued it."""

    peer_id: str
    federation_id: str
    roles: frozenset[str]
    not_before: float
    not_after: float
    serial: int
    issuer: str  # the admin's peer id, or the federation id when the root signed
    chain: tuple[bytes, ...]

    @property
    def is_admin(self) -> bool:
        return ROLE_ADMIN in self.roles

    def to_json(self) -> dict[str, object]:
        return {
            "peer_id": self.peer_id,
            "roles": sorted(self.roles),
            "not_before": int(self.not_before),
            "not_after": int(self.not_after),
            "serial": str(self.serial),
            "issuer": self.issuer,
        }


@dataclass
class Federation:
    """The public state of one federation: its root certificate and the peers revoked so far."""

    root: x509.Certificate
    revoked: set[str] = field(default_factory=set)
    _cache: dict[bytes, MemberCert] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.root_key = raw_public_key(self.root)
        self.id = federation_id_of(self.root_key)
        if _cn(self.root.subject) != self.id:
            raise MembershipError("malformed", "root certificate does not name its own federation id")
        try:
            self.root.verify_directly_issued_by(self.root)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise MembershipError("forged", "root certificate is not self-signed") from exc
        orgs = self.root.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        self.name = str(orgs[0].value) if orgs else ""

    @classmethod
    def from_pem(cls, pem: bytes) -> Federation:
        try:
            return cls(x509.load_pem_x509_certificate(pem))
        except ValueError as exc:
            raise MembershipError("malformed", f"not a PEM root certificate: {exc}") from exc

    def root_pem(self) -> bytes:
        return self.root.public_bytes(serialization.Encoding.PEM)

    def _check_time(self, cert: x509.Certificate, what: str, now: float) -> None:
        if now + MAX_SKEW_S < cert.not_valid_before_utc.timestamp():
            raise MembershipError(
                "not_yet_valid", f"{what} is not valid until {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
            )
        if now - MAX_SKEW_S > cert.not_valid_after_utc.timestamp():
            raise MembershipError(
                "expired", f"{what} expired at {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
            )

    def _check_issued(self, cert: x509.Certificate, issuer: x509.Certificate, what: str) -> None:
        try:
            cert.verify_directly_issued_by(issuer)
        except ValueError as exc:
            raise MembershipError("forged", f"{what} does not name its issuer: {exc}") from exc
        except (InvalidSignature, TypeError) as exc:
            raise MembershipError("forged", f"{what} has a bad signature") from exc

    def verify(
        self, chain: Sequence[bytes], *, peer_id: str | None = None, now: float | None = None
    ) -> MemberCert:
        """Check `chain` (leaf first) against this federation; `peer_id` is the id the peer proved by key.

        Raises `MembershipError`. Cached by chain bytes; time and revocation are checked on every call.
        """
        now = time.time() if now is None else now
        key = hashlib.sha256(b"".join(struct.pack(">H", len(c)) + c for c in chain)).digest()
        member = self._cache.get(key)
        if member is None:
            try:
                member = self._verify_uncached(tuple(chain))
            except ValueError as exc:  # cryptography parses lazily: a bad field raises when it is read
                raise MembershipError("malformed", f"certificate does not parse: {exc}") from exc
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[key] = member
        if peer_id is not None and member.peer_id != peer_id:
            raise MembershipError(
                "wrong_peer", f"certificate is for {member.peer_id}, the peer proved {peer_id}"
            )
        for i, der in enumerate(member.chain):
            cert = load_der(der)
            self._check_time(cert, "membership certificate" if i == 0 else "issuing admin's certificate", now)
        if member.peer_id in self.revoked:
            raise MembershipError("revoked", f"{member.peer_id} was revoked from federation {self.id}")
        if member.issuer in self.revoked:
            raise MembershipError(
                "revoked", f"the admin {member.issuer} that issued this certificate was revoked"
            )
        return member

    def _verify_uncached(self, chain: tuple[bytes, ...]) -> MemberCert:
        if not 1 <= len(chain) <= MAX_CHAIN:
            raise MembershipError("malformed", f"certificate chain of {len(chain)}, expected 1-{MAX_CHAIN}")
        certs = [load_der(d) for d in chain]
        leaf = certs[0]
        top = certs[-1]
        top_issuer = _cn(top.issuer)
        if top_issuer != self.id:
            raise MembershipError(
                "other_federation",
                f"certificate belongs to federation {top_issuer[:40]!r}, this node is in {self.id}",
            )
        issuer_id = self.id
        if len(certs) == 2:
            admin = certs[1]
            self._check_issued(admin, self.root, "issuing admin's certificate")
            if not _is_ca(admin) or ROLE_ADMIN not in _roles(admin):
                raise MembershipError("role", "certificate was issued by a member that is not an admin")
            issuer_id = _cn(admin.subject)
            if peer_id_of(raw_public_key(admin)) != issuer_id:
                raise MembershipError("malformed", "admin certificate's key does not match its peer id")
            self._check_issued(leaf, admin, "membership certificate")
        else:
            self._check_issued(leaf, self.root, "membership certificate")
        subject = _cn(leaf.subject)
        if peer_id_of(raw_public_key(leaf)) != subject:
            raise MembershipError("malformed", "certificate's key does not match the peer id it names")
        roles = _roles(leaf)
        if ROLE_MEMBER not in roles:
            raise MembershipError("role", "certificate grants no membership")
        if ROLE_ADMIN in roles and (len(certs) != 1 or not _is_ca(leaf)):
            roles = roles - {ROLE_ADMIN}  # only the root makes admins
        return MemberCert(
            peer_id=subject,
            federation_id=self.id,
            roles=frozenset(roles),
            not_before=leaf.not_valid_before_utc.timestamp(),
            not_after=leaf.not_valid_after_utc.timestamp(),
            serial=leaf.serial_number,
            issuer=issuer_id,
            chain=chain,
        )


# --------------------------------------------------------------------------- issuing


def _check_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > _NAME_MAX or not name.isprintable():
        raise UsageError(f"federation name must be 1-{_NAME_MAX} printable characters")
    return name


def create_root(name: str, *, now: float | None = None) -> tuple[Ed25519PrivateKey, x509.Certificate]:
    """A new federation: its root key and self-signed root certificate."""
    now = time.time() if now is None else now
    key = Ed25519PrivateKey.generate()
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, federation_id_of(raw)),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _check_name(name)),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_utc(now - 3600))
        .not_valid_after(_utc(now + ROOT_TTL_S))
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .sign(key, None)
    )
    return key, cert


@dataclass(frozen=True)
class Issuer:
    """What signs certificates: the root key, or an admin's identity with its own (admin) certificate."""

    key: Ed25519PrivateKey
    cert: x509.Certificate  # the root certificate, or the admin's

    @property
    def is_root(self) -> bool:
        return _is_ca(self.cert) and _cn(self.cert.issuer) == _cn(self.cert.subject)

    @classmethod
    def for_admin(cls, identity: Identity, admin_chain: Sequence[bytes]) -> Issuer:
        cert = load_der(admin_chain[0])
        if len(admin_chain) != 1 or not _is_ca(cert) or ROLE_ADMIN not in _roles(cert):
            raise UsageError("only an admin (a certificate issued by the root) can issue certificates")
        return cls(identity.private_key, cert)

    def issue(
        self,
        public_key: bytes,
        roles: Iterable[str] = (ROLE_MEMBER,),
        *,
        ttl_s: float = DEFAULT_CERT_TTL_S,
        now: float | None = None,
    ) -> tuple[bytes, ...]:
        """The chain (leaf first) for the node with raw Ed25519 `public_key`."""
        now = time.time() if now is None else now
        roles = sorted(set(roles) | {ROLE_MEMBER})
        if bad := [r for r in roles if r not in ROLES]:
            raise UsageError(f"unknown role {bad[0]!r}; roles are {', '.join(ROLES)}")
        admin = ROLE_ADMIN in roles
        if admin and not self.is_root:
            raise UsageError("only the federation's root key can make admins")
        peer_id = peer_id_of(public_key)
        subject = x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, peer_id)]
            + [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, r) for r in roles]
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(Ed25519PublicKey.from_public_bytes(public_key))
            .serial_number(x509.random_serial_number())
            .not_valid_before(_utc(now - 60))
            .not_valid_after(min(_utc(now + ttl_s), self.cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=admin, path_length=0 if admin else None), critical=True)
        )
        leaf = builder.sign(self.key, None).public_bytes(serialization.Encoding.DER)
        if self.is_root:
            return (leaf,)
        return (leaf, self.cert.public_bytes(serialization.Encoding.DER))


def expiry_text(ts: float) -> str:
    return _utc(ts).strftime("%Y-%m-%d %H:%M UTC")


def ttl_left(member: MemberCert, now: float | None = None) -> timedelta:
    return timedelta(seconds=member.not_after - (time.time() if now is None else now))
