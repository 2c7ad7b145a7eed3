"""The HTTP credential of a federation: every request between members is signed by the caller's identity key.

    X-Eldric-Auth: peer=<peer id>; t=<unix seconds>; n=<32 hex nonce>; sig=<base64url Ed25519 signature>
    X-Eldric-Cert: <the caller's chain, certs.chain_to_text>

    signed = "eldric-p2p http v1\\0" federation id\\nMETHOD\\ntarget\\nhost\\nsha256hex(body)\\nt\\nn

`target` is the raw path plus `?query`, `host` the Host header as sent, so a signed request is good for one
method, URL, node and body only, and within `certs.MAX_SKEW_S` of `t` only; the nonce makes it good once.
Client side: `SignedAuth` (httpx, sync and async) or `auth_headers_for` (the hand-written range client);
both send nothing extra while the node is in no federation.

Server side: `FederationGate`, an ASGI middleware in front of the node's app. Each path has a level
(`level_of`): open (the dashboard page, joining), member (deny by default), admin (deploy, load, revoke,
invite), v1 (the OpenAI API, by `v1_mode`: open, a Bearer API key, or a member's signature). The peer list
is member level: every member's PeerDirectory polls it to find the others.
Checks run cheapest first, and the body is read only for a caller whose chain checked:

    header sizes and syntax (malformed) -> t against our clock (clock_skew) -> nonce unseen (replayed)
    -> chain of X-Eldric-Cert (certs codes: other_federation, expired, revoked, forged, ...)
    -> body, at most MAX_SIGNED_BODY (413) -> signature over the request (bad_signature)
    -> admin role where needed (403 not_admin)

A request that passes reaches the app with `scope["eldric.member"]` = the caller's `MemberCert`; every refusal
is an `http_server.error_response`, counted in `gate.stats` by code and logged at most once per (caller,
code) every LOG_EVERY_S. Header parsers say `untrusted` in their names and bound every length. The nonce
memory (`NonceCache`) is sans-IO; when a flood fills it, it forgets the oldest nonces and from then on refuses
requests signed no later than the newest one it forgot, so a forgotten nonce can never be replayed.
Checked first: `http-message-signatures` (RFC 9421) signs the same parts, but parses structured fields from
hostile peers and has no nonce memory or certificate chain; this fixed, one-encoding format needs neither.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import secrets
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass

import httpx
from cryptography.exceptions import UnsupportedAlgorithm
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from eldric_p2p.errors import AuthenticationError, UsageError
from eldric_p2p.http_server import error_response
from eldric_p2p.net.federation.certs import (
    MAX_SKEW_S,
    MemberCert,
    MembershipError,
    chain_from_text,
    chain_to_text,
    load_der,
    raw_public_key,
)
from eldric_p2p.net.federation.store import Membership
from eldric_p2p.net.identity import Identity, is_peer_id, verify

log = logging.getLogger(__name__)

CONTEXT = b"eldric-p2p http v1\x00"
AUTH_HEADER = "X-Eldric-Auth"
CERT_HEADER = "X-Eldric-Cert"
MAX_HEADER = 8192  # bytes of each header the gate reads
MAX_SIGNED_BODY = 1 << 20  # a signed request's body is buffered to be hashed
NONCE_WINDOW_S = 2 * MAX_SKEW_S
MAX_NONCES = 100_000
LOG_EVERY_S = 10.0
MAX_LOG_KEYS = 1000  # (caller, code) pairs remembered for throttling: at most this many lines per LOG_EVERY_S
V1_MODES = ("open", "api-key", "member")
MEMBER_KEY = "eldric.member"

_ADMIN_PATHS = frozenset(
    [f"/api/v1/pipeline/{verb}" for verb in ("deploy", "undeploy", "rebalance", "load", "unload")]
    + ["/api/v1/federation/revoke", "/api/v1/federation/invite"]
)
_STATIC = re.compile(r"/static/[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}", re.ASCII)  # one asset, never ../
_NONCE = re.compile(r"[0-9a-f]{32}", re.ASCII)
_TIME = re.compile(r"[0-9]{1,12}", re.ASCII)
_SIG = re.compile(r"[A-Za-z0-9_-]{86}", re.ASCII)  # 64 bytes, base64url without padding
_WANTED = {b"x-eldric-auth", b"x-eldric-cert", b"authorization", b"content-length", b"host"}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


# --------------------------------------------------------------------------- what is signed


def signed_message(
    federation_id: str, method: str, target: str, host: str, body: bytes, t: int, nonce: str
) -> bytes:
    """The bytes a request's signature covers (see the module docstring)."""
    digest = hashlib.sha256(body).hexdigest()
    text = "\n".join([federation_id, method.upper(), target, host, digest, str(t), nonce])
    return CONTEXT + text.encode("utf-8")


def sign_headers(
    identity: Identity,
    chain: Sequence[bytes],
    federation_id: str,
    method: str,
    target: str,
    host: str,
    body: bytes,
    *,
    now: float | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    """X-Eldric-Auth (and X-Eldric-Cert, when `chain` is not empty) for one request. `now`/`nonce`: tests."""
    t = int(time.time() if now is None else now)
    n = secrets.token_hex(16) if nonce is None else nonce
    sig = identity.sign(signed_message(federation_id, method, target, host, body, t, n))
    headers = {AUTH_HEADER: f"peer={identity.peer_id}; t={t}; n={n}; sig={_b64(sig)}"}
    if chain:
        headers[CERT_HEADER] = chain_to_text(chain)
    return headers


def auth_headers_for(
    identity: Identity, method: str, target: str, host: str, body: bytes = b""
) -> list[tuple[str, str]]:
    """The credential headers for a hand-written client (`target`: raw path and query; `host`: the Host header
    it sends). [] while `identity` is in no federation."""
    membership = identity.membership
    if membership is None or not membership.active or membership.id is None:
        return []
    return list(sign_headers(identity, membership.chain, membership.id, method, target, host, body).items())


class SignedAuth(httpx.Auth):
    """httpx auth (Client and AsyncClient) that signs each request as `identity` while it is in a federation.

    Reads `identity.membership` at every request, so a renewed certificate is used at once."""

    requires_request_body = True

    def __init__(self, identity: Identity) -> None:
        self.identity = identity

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        target = request.url.raw_path.decode("latin-1")
        host = request.headers.get("host", "")
        for name, value in auth_headers_for(self.identity, request.method, target, host, request.content):
            request.headers[name] = value
        yield request


# --------------------------------------------------------------------------- reading a credential


@dataclass(frozen=True)
class Credential:
    peer_id: str  # claimed: proven only once the signature checks against the chain's leaf key
    t: int
    nonce: str
    signature: bytes


def _malformed(message: str) -> MembershipError:
    return MembershipError("malformed", f"{AUTH_HEADER}: {message}")


def parse_auth_untrusted(value: str) -> Credential:
    """Parse `peer=..; t=..; n=..; sig=..` (exactly these fields, in this order: one encoding per credential).

    Raises MembershipError("malformed") naming the field that is wrong."""
    if len(value) > MAX_HEADER:
        raise _malformed(f"{len(value)} bytes, over {MAX_HEADER}")
    parts = value.split("; ")
    names = [p.partition("=")[0] for p in parts]
    if names != ["peer", "t", "n", "sig"]:
        raise _malformed("must be 'peer=<peer id>; t=<unix seconds>; n=<32 hex>; sig=<base64url>'")
    peer, t, n, sig = (p.partition("=")[2] for p in parts)
    if not is_peer_id(peer):
        raise _malformed("peer is not a peer id")
    if not _TIME.fullmatch(t):
        raise _malformed("t is not unix seconds")
    if not _NONCE.fullmatch(n):
        raise _malformed("n is not 32 lower-case hex characters")
    if not _SIG.fullmatch(sig):
        raise _malformed("sig is not 86 base64url characters")
    signature = base64.urlsafe_b64decode(sig + "==")
    if _b64(signature) != sig:
        raise _malformed("sig is not canonical base64url")
    return Credential(peer, int(t), n, signature)


def parse_chain_untrusted(text: str) -> tuple[bytes, ...]:
    """The chain of an X-Eldric-Cert header, in its one canonical encoding. Raises MembershipError."""
    chain = chain_from_text(text)
    if chain_to_text(chain) != text:
        raise MembershipError("malformed", f"{CERT_HEADER} is not canonical base64url")
    return chain


def _headers_untrusted(scope: Scope) -> dict[bytes, str]:
    """The few headers the gate reads, each at most MAX_HEADER bytes and at most once."""
    out: dict[bytes, str] = {}
    for name, value in scope.get("headers") or ():
        name = bytes(name).lower()
        if name not in _WANTED:
            continue
        if name in out:
            raise MembershipError("malformed", f"more than one {name.decode()} header")
        if len(value) > MAX_HEADER:
            raise MembershipError("malformed", f"{name.decode()} header over {MAX_HEADER} bytes")
        out[name] = bytes(value).decode("latin-1")
    return out


def _target(scope: Scope) -> str:
    raw = scope.get("raw_path") or scope.get("path", "").encode("utf-8")
    query = scope.get("query_string") or b""
    return (bytes(raw) + (b"?" + bytes(query) if query else b"")).decode("latin-1")


def level_of(method: str, path: str) -> str:
    """What a request must show: "open" (nothing), "member", "admin" or "v1" (by `v1_mode`). Unknown paths
    are "member": deny by default. HEAD is GET; trailing slashes do not change the level."""
    method = "GET" if method.upper() == "HEAD" else method.upper()
    path = path.rstrip("/") or "/"
    if path in _ADMIN_PATHS:
        return "admin"
    if method == "GET" and (path == "/" or _STATIC.fullmatch(path)):
        return "open"
    if method == "POST" and path == "/api/v1/federation/join":
        return "open"
    if path == "/v1" or path.startswith("/v1/"):
        return "v1"
    return "member"


# --------------------------------------------------------------------------- replay memory (sans-IO)


class NonceCache:
    """Nonces of accepted requests, per peer, kept `window_s` after they were seen; at most `max_entries`."""

    def __init__(self, window_s: float = NONCE_WINDOW_S, max_entries: int = MAX_NONCES) -> None:
        self.window_s = window_s
        self.max_entries = max_entries
        self._seen: OrderedDict[tuple[str, str], tuple[float, int]] = OrderedDict()  # -> (forget at, t)
        self.horizon = -1  # requests signed at t <= horizon can no longer be told from replays
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._seen)

    def replay_reason(self, peer_id: str, nonce: str, t: int) -> str | None:
        """Why this (peer, nonce, t) must be refused as a replay, or None."""
        if (peer_id, nonce) in self._seen:
            return f"{peer_id} already sent a request with nonce {nonce}"
        if t <= self.horizon:
            return (
                f"request signed at t={t}, no later than t={self.horizon}, which this node's replay memory "
                f"({self.max_entries} nonces) had to forget; sign it again"
            )
        return None

    def remember(self, peer_id: str, nonce: str, t: int, now: float) -> str | None:
        """Keep an accepted request's nonce; returns the replay reason instead when it was seen already."""
        self._expire(now)
        reason = self.replay_reason(peer_id, nonce, t)
        if reason is not None:
            return reason
        self._seen[(peer_id, nonce)] = (now + self.window_s, t)
        while len(self._seen) > self.max_entries:
            _, (_, old_t) = self._seen.popitem(last=False)
            self.horizon = max(self.horizon, old_t)
            self.evicted += 1
        return None

    def _expire(self, now: float) -> None:
        while self._seen:
            forget_at, _ = next(iter(self._seen.values()))
            if forget_at > now:
                return
            self._seen.popitem(last=False)


# --------------------------------------------------------------------------- the gate


class Refused(Exception):
    """A request the gate answers itself: status, code, message; `peer` when the caller's chain checked."""

    def __init__(self, status: int, code: str, message: str, peer: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.peer = status, code, message, peer


class _Disconnected(Exception):
    """The client went away while the gate read the body."""


_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 413: "invalid_request_error"}


def _replaying(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands the app the body the gate read, then defers to the server's."""
    done = False

    async def replay() -> Message:
        nonlocal done
        if done:
            return await receive()
        done = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


async def _read_body(receive: Receive, headers: dict[bytes, str], peer: str) -> bytes:
    declared = headers.get(b"content-length", "")
    if declared.isdigit() and len(declared) < 20 and int(declared) > MAX_SIGNED_BODY:
        raise Refused(413, "body_too_large", _too_large(int(declared)), peer)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_SIGNED_BODY:
            raise Refused(413, "body_too_large", _too_large(size), peer)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _skew_message(t: int, now: float) -> str:
    return (
        f"request signed at t={t} but this node's clock reads t={int(now)} ({t - now:+.0f} s); clocks may "
        f"differ by at most {MAX_SKEW_S:.0f} s: check both clocks (NTP)"
    )


def _too_large(size: int) -> str:
    return f"signed request body of {size} bytes or more, over the {MAX_SIGNED_BODY} bytes a node checks"


class FederationGate:
    """ASGI middleware: lets a request reach `app` only with the credential its path's level needs.

    A node in no federation (`identity.membership` None or not active) passes everything through.
    `v1_mode`: "open", "api-key" (Bearer key, or a member's signature) or "member" (a member's signature, or a
    Bearer key when `api_keys` are given); a request that carries X-Eldric-Auth is judged by it alone.
    Raises UsageError for an unknown mode or "api-key" without keys."""

    def __init__(
        self,
        app: ASGIApp,
        identity: Identity,
        *,
        v1_mode: str = "member",
        api_keys: Sequence[str] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        if v1_mode not in V1_MODES:
            raise UsageError(f"unknown /v1 auth mode {v1_mode!r}; one of {', '.join(V1_MODES)}")
        if v1_mode == "api-key" and not api_keys:
            raise UsageError("/v1 auth mode 'api-key' needs at least one API key (--api-key)")
        self.app = app
        self.identity = identity
        self.v1_mode = v1_mode
        self._keys = tuple(k.encode("utf-8") for k in api_keys)
        self.clock = clock
        self.nonces = NonceCache()
        self.stats: Counter[str] = Counter()  # refusals by code
        self._logged: dict[tuple[str, str], float] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        membership = self.identity.membership
        if scope["type"] != "http" or membership is None or not membership.active:
            await self.app(scope, receive, send)
            return
        try:
            member, receive = await self._admit(scope, receive, membership)
        except _Disconnected:
            return
        except (Refused, MembershipError) as exc:
            refusal = exc if isinstance(exc, Refused) else Refused(401, exc.code, str(exc))
            self._note(scope, refusal)
            response = error_response(
                refusal.status, refusal.message, _ERROR_TYPES[refusal.status], refusal.code
            )
            await response(scope, receive, send)
            return
        scope = {k: v for k, v in scope.items() if k != MEMBER_KEY}
        if member is not None:
            scope[MEMBER_KEY] = member
        await self.app(scope, receive, send)

    async def _admit(
        self, scope: Scope, receive: Receive, membership: Membership
    ) -> tuple[MemberCert | None, Receive]:
        """The verified caller (None where none is needed) and the `receive` to hand on. Raises Refused,
        MembershipError, _Disconnected."""
        method, path = scope.get("method", "GET"), scope.get("path", "")
        level = level_of(method, path)
        if level == "open" or level == "v1" and self.v1_mode == "open":
            return None, receive
        headers = _headers_untrusted(scope)
        if b"x-eldric-auth" not in headers:
            if level == "v1" and self._keys:
                self._check_bearer(headers, method, path)
                return None, receive
            raise Refused(401, "missing_credential", self._missing(method, path, level, membership))
        return await self._check_signed(scope, receive, headers, level, membership)

    def _check_bearer(self, headers: dict[bytes, str], method: str, path: str) -> None:
        scheme, _, token = headers.get(b"authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            message = (
                f"{method} {path} needs 'Authorization: Bearer KEY' (a key given to the node with --api-key) "
                "or a member's signed request (X-Eldric-Auth)"
            )
            raise Refused(401, "missing_credential", message)
        given = token.strip().encode("latin-1")
        ok = False
        for key in self._keys:  # every key, always: the time taken does not say which prefix matched
            ok |= hmac.compare_digest(given, key)
        if not ok:
            raise Refused(401, "invalid_api_key", f"invalid API key for {method} {path}")

    def _missing(self, method: str, path: str, level: str, membership: Membership) -> str:
        who, node = ("an admin's", "an admin") if level == "admin" else ("a member's", "a member")
        also = " or 'Authorization: Bearer KEY'" if level == "v1" and self._keys else ""
        return (
            f"{method} {path} needs {who} signed request (X-Eldric-Auth){also}: this node is in federation "
            f"{membership.id}; run the CLI with --data-dir of {node} node"
        )

    async def _check_signed(
        self, scope: Scope, receive: Receive, headers: dict[bytes, str], level: str, membership: Membership
    ) -> tuple[MemberCert, Receive]:
        method, path = scope.get("method", "GET"), scope.get("path", "")
        cred = parse_auth_untrusted(headers[b"x-eldric-auth"])
        now = self.clock()
        if abs(cred.t - now) > MAX_SKEW_S:
            raise Refused(401, "clock_skew", _skew_message(cred.t, now))
        if (reason := self.nonces.replay_reason(cred.peer_id, cred.nonce, cred.t)) is not None:
            raise Refused(401, "replayed", reason)
        member = _verify_chain(membership, headers.get(b"x-eldric-cert"), cred.peer_id)
        body = await _read_body(receive, headers, member.peer_id)
        message = signed_message(
            membership.id or "", method, _target(scope), headers.get(b"host", ""), body, cred.t, cred.nonce
        )
        key = raw_public_key(load_der(member.chain[0]))
        try:
            verify(key, cred.signature, message, claimed_peer_id=member.peer_id)
        except AuthenticationError as exc:
            text = f"{member.peer_id}'s signature does not match this method, target, host, body, t and nonce"
            raise Refused(401, "bad_signature", text, member.peer_id) from exc
        if (reason := self.nonces.remember(cred.peer_id, cred.nonce, cred.t, now)) is not None:
            raise Refused(401, "replayed", reason, member.peer_id)
        if level == "admin" and not member.is_admin:
            text = (
                f"{member.peer_id} is a member, not an admin: {method} {path} needs an admin's signed request"
            )
            raise Refused(403, "not_admin", text, member.peer_id)
        return member, _replaying(body, receive)

    def _note(self, scope: Scope, refusal: Refused) -> None:
        """Count a refusal; log it unless this caller got this code logged in the last LOG_EVERY_S."""
        self.stats[refusal.code] += 1
        client = scope.get("client") or ("?", 0)
        who = refusal.peer or str(client[0])
        now = time.monotonic()
        last = self._logged.get((who, refusal.code))
        if last is not None and now - last < LOG_EVERY_S:
            return
        if len(self._logged) >= MAX_LOG_KEYS:
            self._logged = {k: v for k, v in self._logged.items() if now - v < LOG_EVERY_S}
            if len(self._logged) >= MAX_LOG_KEYS:
                return
        self._logged[(who, refusal.code)] = now
        method, path = scope.get("method"), scope.get("path")
        log.info("refused %s %s from %s: %s (%s)", method, path, who, refusal.code, refusal.message)


def _verify_chain(membership: Membership, text: str | None, peer_id: str) -> MemberCert:
    """The caller's membership from its X-Eldric-Cert. Raises MembershipError with the rule that failed."""
    chain = parse_chain_untrusted(text) if text is not None else ()
    try:
        return membership.verify_peer(chain, peer_id)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:  # a certificate cryptography cannot read
        raise MembershipError("malformed", f"{CERT_HEADER}: unreadable certificate ({exc})") from exc
