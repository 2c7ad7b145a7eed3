"""Peer links: an authenticated, encrypted byte stream to a peer id, over any `trio.abc.Stream`.

A link is TLS 1.3 (stdlib `ssl` through `trio.SSLStream`) over whatever byte stream the caller opened: a TCP
stream for a direct link, a relayed stream for a relayed one. Nothing here assumes TCP below.

Authentication, both ends:

- server -> client: each node's TLS certificate is self-signed and carries the node's own Ed25519 identity
  key. The client validates no CA chain; it checks that the certificate's public key hashes to the expected
  peer id. TLS 1.3's CertificateVerify (always checked, chain or no chain) proves the server holds that key.
- client -> server, inside TLS, a sans-IO exchange (`ServerHandshake`, `ClientHandshake`):

      server: CHALLENGE  nonce[32]
      client: PROOF      public_key[32] signature[64] [credential kind:u8, credential]
                         signature = Ed25519(CONTEXT || nonce || server_peer_id || client_peer_id)
      server: ACCEPT     [server's membership chain]   (or REJECT reason, then close)

  Every handshake message is `b"EPL1" type:u8 length:u16be body`, body at most `MAX_HANDSHAKE_BODY` bytes.
  The signature names the server's id, so a server cannot replay a client's proof to a third node, and the
  nonce makes each proof single-use.

Federation (`identity.membership` active, see `eldric_p2p.net.federation`): the client's credential is its
membership chain (kind 1), and the server refuses a client without a valid, unexpired, unrevoked chain of
its own federation bound to the id the client just proved; the server's ACCEPT carries its own chain, which
the client checks the same way. One exception: a joiner with no certificate yet presents the join ticket of
an invite this server handed out (kind 2); such a *guest* link may carry only the join request
(`Link.guest`). Each refusal is logged once per peer and reason, not per attempt. A node in no federation
sends and checks no credential, as before.

Errors: a peer that fails to prove its id, sends garbage or breaks a limit raises `AuthenticationError`; one
that closes or does not finish the handshake in time raises `PeerUnavailable`. `serve_tcp_links` drops such a
connection and keeps serving. After the handshake a `Link` is an ordinary `trio.abc.Stream` (trio's own
exceptions: `BrokenResourceError`, `ClosedResourceError`); `eldric_p2p.net.frames` converts them for frames.
"""

from __future__ import annotations

import logging
import os
import socket as stdlib_socket
import ssl
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import NameOID

from eldric_p2p.errors import AuthenticationError, EldricError, PeerUnavailable
from eldric_p2p.net.federation.certs import MemberCert, MembershipError
from eldric_p2p.net.handshake import HANDSHAKE_TIMEOUT_S, ClientHandshake, ServerHandshake
from eldric_p2p.net.identity import Identity, peer_id_of
from eldric_p2p.net.pacing import unpaced
from eldric_p2p.tasks import open_nursery

log = logging.getLogger(__name__)

LinkPath = Literal["direct", "punched", "relayed"]  # punched: a hole-punched QUIC connection
SPLICE_CHUNK = 64 * 1024


# --------------------------------------------------------------------------- certificates and TLS contexts

_server_contexts: dict[bytes, ssl.SSLContext] = {}
_client_context: ssl.SSLContext | None = None


def _self_signed_certificate(identity: Identity) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.peer_id)])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(identity.private_key.public_key())
        .serial_number(x509.random_serial_number())
        # Validity is not checked by peers (the key is the identity); a fixed wide window avoids clock skew.
        .not_valid_before(datetime(2020, 1, 1, tzinfo=UTC))
        .not_valid_after(datetime(2120, 1, 1, tzinfo=UTC))
        .sign(identity.private_key, None)
    )


def server_ssl_context(identity: Identity) -> ssl.SSLContext:
    """TLS 1.3 server context presenting `identity`'s self-signed Ed25519 certificate (cached per key)."""
    key = identity.public_key
    ctx = _server_contexts.get(key)
    if ctx is not None:
        return ctx
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    cert_pem = _self_signed_certificate(identity).public_bytes(serialization.Encoding.PEM)
    # ssl can only load a key from a file: write it encrypted under a one-time password, never in the clear.
    password = os.urandom(32).hex().encode("ascii")
    key_pem = identity.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(password),
    )
    with tempfile.TemporaryDirectory(prefix="eldric-tls-") as tmp:
        cert_path, key_path = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        cert_path.write_bytes(cert_pem)
        key_path.write_bytes(key_pem)
        ctx.load_cert_chain(cert_path, key_path, password=password)
    _server_contexts[key] = ctx
    return ctx


def client_ssl_context() -> ssl.SSLContext:
    """TLS 1.3 client context that accepts any certificate: the caller checks its key against the peer id."""
    global _client_context
    if _client_context is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        _client_context = ctx
    return _client_context


def _peer_id_from_certificate(der: bytes | None) -> str:
    if not der:
        raise AuthenticationError("server presented no certificate")
    try:
        public = x509.load_der_x509_certificate(der).public_key()
    except ValueError as exc:
        raise AuthenticationError("server certificate is not valid X.509") from exc
    if not isinstance(public, Ed25519PublicKey):
        raise AuthenticationError(f"server certificate key is {type(public).__name__}, not Ed25519")
    return peer_id_of(public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


# --------------------------------------------------------------------------- the link and its trio drivers


@dataclass(eq=False)
class Link(trio.abc.Stream):
    """An authenticated, encrypted byte stream to `peer_id`. `path` says how the stream below was opened.

    One task may send and one task may receive at a time (trio's usual Stream rule).
    """

    tls: trio.SSLStream
    peer_id: str
    local_peer_id: str
    path: LinkPath = "direct"
    _leftover: bytearray = field(default_factory=bytearray, repr=False)
    member: MemberCert | None = None  # the peer's verified membership, when we are in a federation
    guest: bool = False  # a joiner with a ticket: only its join request may pass

    @property
    def transport(self) -> str:
        """What carries the link's TLS: "tcp" (a TCP connection: direct, punched onto TCP, or the relay's TCP
        lane) or "quic" (a stream of a QUIC connection: punched, or through a relay)."""
        return "tcp" if isinstance(self.tls.transport_stream, trio.SocketStream) else "quic"

    async def abort(self) -> None:
        """Close the stream below TLS at once (a revoked peer): any task using the link sees it closed."""
        await trio.aclose_forcefully(self.tls.transport_stream)

    def unread(self, data: bytes | bytearray) -> None:
        """Put bytes already received back in front of the stream: the next `receive_some` returns them."""
        self._leftover[:0] = data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.tls.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.tls.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._leftover:
            await trio.lowlevel.checkpoint()
            n = len(self._leftover) if max_bytes is None else max_bytes
            out = bytes(self._leftover[:n])
            del self._leftover[:n]
            return out
        return await self.tls.receive_some(max_bytes)

    async def aclose(self) -> None:
        """Close TLS, then the stream below. Idempotent, and quiet after `abort` (the stream below is gone, so
        TLS cannot say goodbye): an HTTP client closing a pooled link of a revoked peer must not fail."""
        try:
            await self.tls.aclose()
        except trio.ClosedResourceError:
            await trio.aclose_forcefully(self.tls.transport_stream)


def _tls_failure(exc: BaseException, who: str) -> EldricError:
    """Convert a failure of the TLS layer during the handshake into our error tree."""
    if isinstance(exc.__cause__, ssl.SSLError):
        return AuthenticationError(f"TLS handshake with {who} failed: {exc.__cause__}")
    return PeerUnavailable(f"{who} closed the link during the handshake")


async def _receive_handshake_bytes(tls: trio.SSLStream, who: str) -> bytes:
    try:
        return await tls.receive_some(4096)
    except trio.BrokenResourceError as exc:
        raise _tls_failure(exc, who) from exc


async def _send_handshake_bytes(tls: trio.SSLStream, data: bytes, who: str) -> None:
    try:
        await tls.send_all(data)
    except trio.BrokenResourceError as exc:
        raise _tls_failure(exc, who) from exc


async def link_client(
    stream: trio.abc.Stream,
    identity: Identity,
    expected_peer_id: str | None,
    *,
    path: LinkPath = "direct",
    handshake_timeout: float = HANDSHAKE_TIMEOUT_S,
    ticket: str | None = None,
) -> Link:
    """Open a link over `stream` to the server that must prove `expected_peer_id` (None: any id, returned).

    `ticket`: the join ticket a node without a membership certificate presents to its inviter.

    Takes ownership of `stream` (closed on failure). Raises `AuthenticationError` (wrong id, failed proof,
    garbage) or `PeerUnavailable` (closed, or no handshake within `handshake_timeout` s).
    """
    tls = trio.SSLStream(stream, client_ssl_context(), server_hostname=None)
    who = expected_peer_id or "server"
    try:
        with trio.fail_after(handshake_timeout):
            try:
                await tls.do_handshake()
            except trio.BrokenResourceError as exc:
                raise _tls_failure(exc, who) from exc
            server_id = _peer_id_from_certificate(tls.getpeercert(binary_form=True))
            if expected_peer_id is not None and server_id != expected_peer_id:
                raise AuthenticationError(f"expected peer {expected_peer_id}, the server is {server_id}")
            hs = ClientHandshake(identity, server_id, ticket=ticket)
            while not hs.done:
                out = hs.receive_data(await _receive_handshake_bytes(tls, server_id))
                if out:
                    await _send_handshake_bytes(tls, out, server_id)
    except trio.TooSlowError as exc:
        await trio.aclose_forcefully(stream)
        raise PeerUnavailable(
            f"link handshake with {who} did not finish within {handshake_timeout} s"
        ) from exc
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return _registered(
        identity, Link(tls, server_id, identity.peer_id, path, bytearray(hs.leftover), hs.member)
    )


def _registered(identity: Identity, link: Link) -> Link:
    if identity.membership is not None:
        identity.membership.links.add(link)  # closed if its peer is revoked
    return link


async def link_server(
    stream: trio.abc.Stream,
    identity: Identity,
    *,
    path: LinkPath = "direct",
    handshake_timeout: float = HANDSHAKE_TIMEOUT_S,
) -> Link:
    """Accept a link over `stream`: prove our id by TLS, make the client prove its own; return the Link.

    Takes ownership of `stream` (closed on failure). Raises `AuthenticationError` or `PeerUnavailable`.
    """
    tls = trio.SSLStream(stream, server_ssl_context(identity), server_side=True)
    try:
        with trio.fail_after(handshake_timeout):
            try:
                await tls.do_handshake()
            except trio.BrokenResourceError as exc:
                raise _tls_failure(exc, "client") from exc
            hs = ServerHandshake(identity.peer_id, identity=identity)
            await _send_handshake_bytes(tls, hs.initial_bytes(), "client")
            while not hs.done:
                data = await _receive_handshake_bytes(tls, "client")
                try:
                    out = hs.receive_data(data)
                except AuthenticationError as exc:
                    with trio.move_on_after(1):
                        await tls.send_all(
                            ServerHandshake.reject_bytes(
                                f"{exc.code}: {exc}" if isinstance(exc, MembershipError) else str(exc)
                            )
                        )
                    raise
                if out:
                    await _send_handshake_bytes(tls, out, "client")
    except trio.TooSlowError as exc:
        await trio.aclose_forcefully(stream)
        raise PeerUnavailable(
            f"client did not finish the link handshake within {handshake_timeout} s"
        ) from exc
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    assert hs.peer_id is not None
    link = Link(tls, hs.peer_id, identity.peer_id, path, bytearray(hs.leftover), hs.member, hs.guest)
    return _registered(identity, link)


async def open_tcp_link(
    host: str,
    port: int,
    identity: Identity,
    expected_peer_id: str | None = None,
    *,
    handshake_timeout: float = HANDSHAKE_TIMEOUT_S,
) -> Link:
    """Connect to `host:port` and open a direct link; `expected_peer_id=None` accepts (and returns) any id.

    Raises `PeerUnavailable` when the address does not answer, `AuthenticationError` as `link_client`.
    """
    try:
        with trio.fail_after(handshake_timeout):
            stream = await open_link_stream(host, port)
    except (OSError, trio.TooSlowError) as exc:
        raise PeerUnavailable(f"cannot connect to {host}:{port}: {exc}") from exc
    return await link_client(
        stream, identity, expected_peer_id, path="direct", handshake_timeout=handshake_timeout
    )


LinkHandler = Callable[[Link], Awaitable[Any]]

REFUSAL_LOG_EVERY_S = 60.0
_refusals_logged: dict[str, float] = {}


def _log_refusal(exc: Exception) -> None:
    """Log a refused link once per reason a minute: a stranger retrying must not flood the log."""
    reason = str(exc)
    now = trio.current_time()
    if now - _refusals_logged.get(reason, -REFUSAL_LOG_EVERY_S) >= REFUSAL_LOG_EVERY_S:
        if len(_refusals_logged) > 1024:
            _refusals_logged.clear()
        _refusals_logged[reason] = now
        log.info("refused a link: %s", reason)


async def serve_link_stream(
    stream: trio.abc.Stream,
    identity: Identity,
    handler: LinkHandler,
    *,
    path: LinkPath = "direct",
    handshake_timeout: float = HANDSHAKE_TIMEOUT_S,
) -> None:
    """Authenticate one incoming stream and run `handler(link)`; a failed handshake is logged and dropped.

    A handler that ends with a peer's fault (bad frames, closed link) is logged too; other errors propagate.
    """
    try:
        link = await link_server(stream, identity, path=path, handshake_timeout=handshake_timeout)
    except (AuthenticationError, PeerUnavailable) as exc:
        _log_refusal(exc)
        return
    try:
        await handler(link)
    except (EldricError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        log.info("link from %s ended: %s", link.peer_id, exc)
    finally:
        await trio.aclose_forcefully(link)


async def open_link_stream(host: str, port: int) -> trio.SocketStream:
    """A TCP connection for a link, its socket switched to a congestion control that does not pace, so each
    frame leaves whole (net/pacing.py). Raises OSError."""
    with unpaced():
        return await trio.open_tcp_stream(host, port)


KEEPALIVE_S = 30  # TCP keepalive idle time and interval where a link's connection crosses NATs


def keep_alive(stream: trio.SocketStream, seconds: int = KEEPALIVE_S) -> None:
    """TCP keepalives every `seconds` on a connection through NATs: an idle link keeps its NAT mapping (home
    routers drop silent TCP mappings after minutes to hours), and a peer that vanished without a FIN is
    noticed after 4 unanswered probes."""
    stream.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", seconds), ("TCP_KEEPINTVL", seconds), ("TCP_KEEPCNT", 4)):
        if hasattr(stdlib_socket, option):  # Linux names; other systems keep their defaults
            stream.setsockopt(stdlib_socket.IPPROTO_TCP, getattr(stdlib_socket, option), value)


async def serve_tcp_links(
    identity: Identity,
    host: str | None,
    port: int,
    handler: LinkHandler,
    *,
    handshake_timeout: float = HANDSHAKE_TIMEOUT_S,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept direct links on `host:port` forever, each in its own task (`await nursery.start(...)`).

    `task_status.started` gets the listeners (port 0 picks a free port: read `listeners[0].socket`).
    """
    server_ssl_context(identity)  # build the certificate before the first client waits for it

    async def one(stream: trio.SocketStream) -> None:
        await serve_link_stream(stream, identity, handler, path="direct", handshake_timeout=handshake_timeout)

    await trio.serve_tcp(one, port, host=host, task_status=task_status)


async def splice(a: trio.abc.Stream, b: trio.abc.Stream) -> None:
    """Copy bytes both ways until either side closes (then both directions stop)."""

    async def copy(src: trio.abc.Stream, dst: trio.abc.Stream, scope: trio.CancelScope) -> None:
        try:
            while data := await src.receive_some(SPLICE_CHUNK):
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, EldricError):
            pass
        scope.cancel()

    async with open_nursery() as nursery:
        nursery.start_soon(copy, a, b, nursery.cancel_scope)
        nursery.start_soon(copy, b, a, nursery.cancel_scope)
