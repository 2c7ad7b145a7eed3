"""Peer links: an authenticated, encrypted byte stream to a peer id, over any `trio.abc.Stream`.

A link is TLS 1.3 (stdlib `ssl` through `trio.SSLStream`) over whatever byte stream the caller opened: a TCP
stream for a direct link, a relayed stream for a relayed one. Nothing here assumes TCP below.

Authentication, both ends:

- server -> client: each node's TLS certificate is self-signed and carries the node's own Ed25519 identity
  key. The client validates no CA chain; it checks that the certificate's public key hashes to the expected
  peer id. TLS 1.3's CertificateVerify (always checked, chain or no chain) proves the server holds that key.
- client -> server, inside TLS, a sans-IO exchange (`ServerHandshake`, `ClientHandshake`):

      server: CHALLENGE  nonce[32]
      client: PROOF      public_key[32] signature[64]
                         signature = Ed25519(CONTEXT || nonce || server_peer_id || client_peer_id)
      server: ACCEPT     (or REJECT reason, then close)

  Every handshake message is `b"EPL1" type:u8 length:u16be body`, body at most `MAX_HANDSHAKE_BODY` bytes.
  The signature names the server's id, so a server cannot replay a client's proof to a third node, and the
  nonce makes each proof single-use.

Errors: a peer that fails to prove its id, sends garbage or breaks a limit raises `AuthenticationError`; one
that closes or does not finish the handshake in time raises `PeerUnavailable`. `serve_tcp_links` drops such a
connection and keeps serving. After the handshake a `Link` is an ordinary `trio.abc.Stream` (trio's own
exceptions: `BrokenResourceError`, `ClosedResourceError`); `eldric_p2p.net.frames` converts them for frame users.
"""

from __future__ import annotations

import logging
import os
import ssl
import struct
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

from eldric_p2p.errors import AuthenticationError, EldricError, LocalProtocolError, PeerUnavailable
from eldric_p2p.net.identity import Identity, peer_id_of, verify

log = logging.getLogger(__name__)

LinkPath = Literal["direct", "relayed"]

HANDSHAKE_TIMEOUT_S = 10.0
MAGIC = b"EPL1"
CONTEXT = b"eldric-p2p link v1 client proof\x00"
NONCE_LEN = 32
MAX_HANDSHAKE_BODY = 256
_HDR = struct.Struct(">4sBH")  # magic, type, body length

MSG_CHALLENGE = 1
MSG_PROOF = 2
MSG_ACCEPT = 3
MSG_REJECT = 4


# --------------------------------------------------------------------------- sans-IO handshake


def encode_handshake_message(msg_type: int, body: bytes) -> bytes:
    if len(body) > MAX_HANDSHAKE_BODY:
        raise LocalProtocolError(f"handshake body of {len(body)} bytes over {MAX_HANDSHAKE_BODY}")
    return _HDR.pack(MAGIC, msg_type, len(body)) + body


class _MessageBuffer:
    """Accumulates peer bytes and cuts one handshake message at a time, checking magic and length first."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data
        # Refuse an oversized or foreign message as soon as its header is here, not after its body.
        if len(self._buf) >= _HDR.size:
            self._check_header()

    def _check_header(self) -> tuple[int, int]:
        magic, msg_type, length = _HDR.unpack_from(self._buf)
        if magic != MAGIC:
            raise AuthenticationError("peer did not speak the eldric-p2p link handshake (bad magic)")
        if length > MAX_HANDSHAKE_BODY:
            raise AuthenticationError(
                f"handshake message of {length} bytes over the {MAX_HANDSHAKE_BODY} limit"
            )
        return msg_type, length

    def next_message_untrusted(self) -> tuple[int, bytes] | None:
        if len(self._buf) < _HDR.size:
            return None
        msg_type, length = self._check_header()
        if len(self._buf) < _HDR.size + length:
            return None
        body = bytes(self._buf[_HDR.size : _HDR.size + length])
        del self._buf[: _HDR.size + length]
        return msg_type, body

    def take_rest(self) -> bytes:
        rest = bytes(self._buf)
        self._buf.clear()
        return rest


def _proof_message(nonce: bytes, server_peer_id: str, client_peer_id: str) -> bytes:
    return CONTEXT + nonce + server_peer_id.encode("ascii") + client_peer_id.encode("ascii")


class ServerHandshake:
    """Server side of the in-TLS client proof. Feed peer bytes with `receive_data`; send what it returns.

    `initial_bytes()` is the challenge to send first. When `peer_id` is set the client is authenticated and
    `leftover` holds any bytes the client sent after its proof (application data for the link).
    """

    def __init__(self, server_peer_id: str, nonce: bytes | None = None) -> None:
        self.server_peer_id = server_peer_id
        self.nonce = nonce if nonce is not None else os.urandom(NONCE_LEN)
        if len(self.nonce) != NONCE_LEN:
            raise LocalProtocolError("nonce must be 32 bytes")
        self.peer_id: str | None = None
        self.leftover = b""
        self._buf = _MessageBuffer()
        self._challenged = False

    def initial_bytes(self) -> bytes:
        if self._challenged:
            raise LocalProtocolError("challenge already sent")
        self._challenged = True
        return encode_handshake_message(MSG_CHALLENGE, self.nonce)

    @property
    def done(self) -> bool:
        return self.peer_id is not None

    def receive_data(self, data: bytes) -> bytes:
        """Feed bytes from the client; return bytes to send. Raises `AuthenticationError` on a bad proof."""
        if not self._challenged or self.done:
            raise LocalProtocolError("receive_data before the challenge or after the handshake")
        if not data:
            raise PeerUnavailable("client closed the link during the handshake")
        self._buf.feed(data)
        msg = self._buf.next_message_untrusted()
        if msg is None:
            return b""
        msg_type, body = msg
        if msg_type != MSG_PROOF:
            raise AuthenticationError(f"expected a client proof, got handshake message type {msg_type}")
        if len(body) != 32 + 64:
            raise AuthenticationError(f"client proof of {len(body)} bytes, expected 96")
        public_key, signature = body[:32], body[32:]
        client_id = peer_id_of(public_key)
        verify(public_key, signature, _proof_message(self.nonce, self.server_peer_id, client_id))
        self.peer_id = client_id
        self.leftover = self._buf.take_rest()
        return encode_handshake_message(MSG_ACCEPT, b"")

    @staticmethod
    def reject_bytes(reason: str) -> bytes:
        return encode_handshake_message(MSG_REJECT, reason.encode("utf-8")[:MAX_HANDSHAKE_BODY])


class ClientHandshake:
    """Client side of the in-TLS proof: answers the server's challenge, then waits for ACCEPT.

    `server_peer_id` is the id already proven by the TLS certificate. When `done`, `leftover` holds any
    application bytes the server sent right after ACCEPT.
    """

    def __init__(self, identity: Identity, server_peer_id: str) -> None:
        self.identity = identity
        self.server_peer_id = server_peer_id
        self.done = False
        self.leftover = b""
        self._buf = _MessageBuffer()
        self._proved = False

    def receive_data(self, data: bytes) -> bytes:
        """Feed bytes from the server; return bytes to send. Raises AuthenticationError, PeerUnavailable."""
        if self.done:
            raise LocalProtocolError("receive_data after the handshake")
        if not data:
            raise PeerUnavailable("server closed the link during the handshake")
        self._buf.feed(data)
        out = b""
        while (msg := self._buf.next_message_untrusted()) is not None:
            msg_type, body = msg
            if msg_type == MSG_REJECT:
                reason = body.decode("utf-8", "replace")
                raise AuthenticationError(f"server {self.server_peer_id} rejected us: {reason}")
            if not self._proved:
                if msg_type != MSG_CHALLENGE or len(body) != NONCE_LEN:
                    raise AuthenticationError("expected a 32-byte challenge from the server")
                signed = _proof_message(body, self.server_peer_id, self.identity.peer_id)
                out += encode_handshake_message(
                    MSG_PROOF, self.identity.public_key + self.identity.sign(signed)
                )
                self._proved = True
                continue
            if msg_type != MSG_ACCEPT or body:
                raise AuthenticationError(f"expected ACCEPT from the server, got message type {msg_type}")
            self.done = True
            self.leftover = self._buf.take_rest()
            break
        return out


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
        await self.tls.aclose()


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
) -> Link:
    """Open a link over `stream` to the server that must prove `expected_peer_id` (None: any id, returned).

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
            hs = ClientHandshake(identity, server_id)
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
    return Link(tls, server_id, identity.peer_id, path, bytearray(hs.leftover))


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
            hs = ServerHandshake(identity.peer_id)
            await _send_handshake_bytes(tls, hs.initial_bytes(), "client")
            while not hs.done:
                data = await _receive_handshake_bytes(tls, "client")
                try:
                    out = hs.receive_data(data)
                except AuthenticationError as exc:
                    with trio.move_on_after(1):
                        await tls.send_all(ServerHandshake.reject_bytes(str(exc)))
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
    return Link(tls, hs.peer_id, identity.peer_id, path, bytearray(hs.leftover))


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
            stream = await trio.open_tcp_stream(host, port)
    except (OSError, trio.TooSlowError) as exc:
        raise PeerUnavailable(f"cannot connect to {host}:{port}: {exc}") from exc
    return await link_client(
        stream, identity, expected_peer_id, path="direct", handshake_timeout=handshake_timeout
    )


LinkHandler = Callable[[Link], Awaitable[Any]]


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
        log.info("refused a link: %s", exc)
        return
    try:
        await handler(link)
    except (EldricError, trio.BrokenResourceError) as exc:
        log.info("link from %s ended: %s", link.peer_id, exc)
    finally:
        await trio.aclose_forcefully(link)


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
