"""The link handshake, sans-IO: the client's proof of its peer id inside TLS, and in a federation both
ends' membership. `eldric_p2p.net.links` runs it over a TLS stream; the wire format is described there.

`ServerHandshake` and `ClientHandshake` take peer bytes (`receive_data`) and return bytes to send; they raise
`AuthenticationError` (a `MembershipError` for a membership that does not check) or `PeerUnavailable`.
"""

from __future__ import annotations

import os
import struct

from eldric_p2p.errors import AuthenticationError, LocalProtocolError, PeerUnavailable
from eldric_p2p.net.federation.certs import (
    MEMBERSHIP_CODES,
    MemberCert,
    MembershipError,
    decode_chain,
    encode_chain,
)
from eldric_p2p.net.identity import Identity, peer_id_of, verify

HANDSHAKE_TIMEOUT_S = 10.0
MAGIC = b"EPL1"
CONTEXT = b"eldric-p2p link v1 client proof\x00"
NONCE_LEN = 32
MAX_HANDSHAKE_BODY = 8192  # a proof with a two-certificate chain is ~900 bytes
CRED_CHAIN = 1
CRED_TICKET = 2
MAX_REJECT_REASON = 512
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

    def __init__(
        self, server_peer_id: str, nonce: bytes | None = None, *, identity: Identity | None = None
    ) -> None:
        self.server_peer_id = server_peer_id
        self.nonce = nonce if nonce is not None else os.urandom(NONCE_LEN)
        if len(self.nonce) != NONCE_LEN:
            raise LocalProtocolError("nonce must be 32 bytes")
        self.identity = identity  # ours: when federated, the client must be a member too
        self.peer_id: str | None = None
        self.member: MemberCert | None = None
        self.guest = False
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
        if len(body) < 32 + 64:
            raise AuthenticationError(f"client proof of {len(body)} bytes, expected 96 and a credential")
        public_key, signature, credential = body[:32], body[32:96], body[96:]
        client_id = peer_id_of(public_key)
        verify(public_key, signature, _proof_message(self.nonce, self.server_peer_id, client_id))
        reply = b""
        if self.identity is not None and self.identity.federated:
            assert self.identity.membership is not None
            self._admit(client_id, credential)
            reply = encode_chain(self.identity.membership.chain)
        self.peer_id = client_id
        self.leftover = self._buf.take_rest()
        return encode_handshake_message(MSG_ACCEPT, reply)

    def _admit(self, client_id: str, credential: bytes) -> None:
        """Check the client's credential against our federation. Raises MembershipError."""
        from eldric_p2p.net.federation.invites import Ticket, invite_live

        membership = self.identity.membership  # type: ignore[union-attr]
        assert membership is not None
        kind, data = (credential[0], credential[1:]) if credential else (0, b"")
        if kind == CRED_CHAIN:
            self.member = membership.verify_peer(decode_chain(data), client_id)
        elif kind == CRED_TICKET:
            try:
                ticket = Ticket.from_text(data.decode("ascii"))
            except UnicodeDecodeError as exc:
                raise MembershipError("malformed", "join ticket is not ASCII") from exc
            if ticket.inviter != self.server_peer_id:
                raise MembershipError("not_member", "join ticket was issued by another node")
            ticket.verify(membership)
            if not invite_live(membership, ticket.invite_id):
                raise MembershipError("invite_used", "the invite of this ticket has no uses or time left")
            self.guest = True
        else:
            raise MembershipError(
                "not_member", f"{client_id} presented no membership certificate of federation {membership.id}"
            )

    @staticmethod
    def reject_bytes(reason: str) -> bytes:
        return encode_handshake_message(MSG_REJECT, reason.encode("utf-8")[:MAX_REJECT_REASON])


class ClientHandshake:
    """Client side of the in-TLS proof: answers the server's challenge, then waits for ACCEPT.

    `server_peer_id` is the id already proven by the TLS certificate. When `done`, `leftover` holds any
    application bytes the server sent right after ACCEPT.
    """

    def __init__(self, identity: Identity, server_peer_id: str, *, ticket: str | None = None) -> None:
        self.identity = identity
        self.server_peer_id = server_peer_id
        self.ticket = ticket  # a joiner's credential: the join ticket of its invite
        self.member: MemberCert | None = None  # the server's membership, checked when we are federated
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
                code, sep, rest = reason.partition(": ")
                if sep and code in MEMBERSHIP_CODES:
                    raise MembershipError(code, f"server {self.server_peer_id} refused us: {rest}")
                raise AuthenticationError(f"server {self.server_peer_id} rejected us: {reason}")
            if not self._proved:
                if msg_type != MSG_CHALLENGE or len(body) != NONCE_LEN:
                    raise AuthenticationError("expected a 32-byte challenge from the server")
                signed = _proof_message(body, self.server_peer_id, self.identity.peer_id)
                out += encode_handshake_message(
                    MSG_PROOF, self.identity.public_key + self.identity.sign(signed) + self._credential()
                )
                self._proved = True
                continue
            if msg_type != MSG_ACCEPT:
                raise AuthenticationError(f"expected ACCEPT from the server, got message type {msg_type}")
            if self.identity.federated:
                assert self.identity.membership is not None
                if not body:
                    raise MembershipError(
                        "not_member",
                        f"{self.server_peer_id} is not a member of federation {self.identity.membership.id}",
                    )
                self.member = self.identity.membership.verify_peer(decode_chain(body), self.server_peer_id)
            self.done = True
            self.leftover = self._buf.take_rest()
            break
        return out

    def _credential(self) -> bytes:
        if self.identity.federated:
            assert self.identity.membership is not None
            return bytes([CRED_CHAIN]) + encode_chain(self.identity.membership.chain)
        if self.ticket is not None:
            return bytes([CRED_TICKET]) + self.ticket.encode("ascii")
        return b""
