"""The control stream's two state machines, sans-IO: `MemberControl` (a member registering) and `RelayControl`
(the relay's side of one member), and what CHALLENGE and REGISTER sign.

The messages and their order are drawn in protocol.py's docstring. The relay proves its key by signing
(CHALLENGE_CONTEXT, nonce_c, nonce_r); the member proves its peer id by signing `register_message`: the
relay's fresh nonce, its own, and the hash of its canonical announcement (and of its federation credentials,
so nobody can swap them), so a recorded REGISTER is useless on another connection.

In a federation a relay admits a REGISTER only with a credential (`check_credential_untrusted`): a `cert`
chain for the peer id it proved (a member), or a join `ticket` and no cert (a guest: out of the directory,
streams only to its inviter).
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from eldric_p2p.errors import AuthenticationError, LocalProtocolError, RemoteProtocolError
from eldric_p2p.net.federation.certs import MemberCert, MembershipError, chain_from_text
from eldric_p2p.net.federation.invites import Ticket
from eldric_p2p.net.federation.store import Membership
from eldric_p2p.net.identity import Identity, verify
from eldric_p2p.net.relay.protocol import (
    FEATURE_FORWARD,
    FEATURE_PUNCH,
    FEATURE_TCP,
    MAX_DIRECTORY_MESSAGE,
    NONCE_LEN,
    PROTOCOL_VERSION,
    Announce,
    Announcement,
    Challenge,
    Directory,
    DirectoryUpdate,
    Error,
    Hello,
    Message,
    Ping,
    Pong,
    Punch,
    PunchFail,
    PunchGo,
    Register,
    Registered,
    canonical_announcement,
    encode_message,
)
from eldric_p2p.net.relay.reader import MessageReader, drain

REGISTER_CONTEXT = b"eldric-p2p relay register v1\x00"
CHALLENGE_CONTEXT = b"eldric-p2p relay challenge v1\x00"


def register_message(
    nonce_r: bytes, nonce_c: bytes, ann: Announcement, cert: str | None = None, ticket: str | None = None
) -> bytes:
    """The bytes a REGISTER signature covers. Raises LocalProtocolError if `ann` is too big."""
    msg = REGISTER_CONTEXT + nonce_r + nonce_c + hashlib.sha256(canonical_announcement(ann)).digest()
    if cert is not None or ticket is not None:  # without credentials: the bytes members always signed
        msg += hashlib.sha256(json.dumps([cert, ticket]).encode()).digest()
    return msg


Credential = MemberCert | Ticket


def check_credential_untrusted(membership: Membership, register: Register) -> Credential:
    """What a federated relay admits `register` as: a member (its verified `MemberCert`) or a guest (the
    verified `Ticket`, when it has no cert). Raises MembershipError saying which rule failed."""
    if membership.federation is not None and register.peer_id in membership.federation.revoked:
        raise MembershipError("revoked", f"{register.peer_id} was revoked from federation {membership.id}")
    if register.cert is not None:
        return membership.verify_peer(chain_from_text(register.cert), register.peer_id)
    if register.ticket is not None:
        ticket = Ticket.from_text(register.ticket)
        ticket.verify(membership)
        return ticket
    raise MembershipError("not_member", f"{register.peer_id} presented no membership certificate or ticket")


def recheck_credential(membership: Membership, credential: Credential | None, peer_id: str) -> None:
    """Raise MembershipError once an admitted credential expired or its holder (or inviter) was revoked."""
    if isinstance(credential, Ticket):
        credential.verify(membership)
    elif credential is None:
        raise MembershipError("not_member", f"{peer_id} registered before this relay joined a federation")
    else:
        membership.verify_peer(credential.chain, peer_id)


class _State(enum.Enum):
    START = "start"
    HELLO_SENT = "hello_sent"
    AWAIT_HELLO = "await_hello"
    AWAIT_REGISTER = "await_register"
    REGISTERED = "registered"
    CLOSED = "closed"


def _unexpected(msg: Message, sender: str, state: _State) -> RemoteProtocolError:
    return RemoteProtocolError(f"unexpected {type(msg).__name__} from {sender} in state {state.value}")


@dataclass
class MemberControl:
    """Member side of the control stream.

    Call `hello()` and send `data_to_send()`; feed received bytes to `receive_data`, which returns the
    messages the caller acts on (`Registered`, `Directory`, `DirectoryUpdate`, `Ping` for liveness) and
    answers
    the challenge and pings by itself. Raises AuthenticationError if the relay's proof fails (or it is not
    `expected_relay_id`), MembershipError when a federated relay refuses our `cert` or `ticket` (code
    not_member), RemoteProtocolError on a protocol violation or another ERROR from the relay.

    Hole punching: with FEATURE_PUNCH in `features` (and our socket's addresses in `local`), `punch(target)`
    asks a relay that declared it too, and `receive_data` returns its `PunchGo` / `PunchFail` answers.
    """

    identity: Identity
    announcement: Announcement
    expected_relay_id: str | None = None
    cert: str | None = None  # our membership chain as text, sent in REGISTER (see protocol.Register)
    ticket: str | None = None
    features: tuple[str, ...] = ()
    local: tuple[str, ...] = ()  # "ip:port" of our UDP socket, sent in HELLO
    nonce_source: Callable[[int], bytes] = os.urandom
    relay_id: str | None = None
    relay_features: tuple[str, ...] = ()
    relay_tcp_port: int = 0  # REGISTERED `tcp_port`: the relay's TCP lane (0: none)
    _state: _State = _State.START
    _nonce_c: bytes = b""
    _out: bytearray = field(default_factory=bytearray)
    _reader: MessageReader = field(default_factory=lambda: MessageReader(max_directory=MAX_DIRECTORY_MESSAGE))

    def hello(self) -> None:
        if self._state is not _State.START:
            raise LocalProtocolError("hello() called twice")
        canonical_announcement(self.announcement)
        self._nonce_c = self.nonce_source(NONCE_LEN)
        self._out += encode_message(Hello(PROTOCOL_VERSION, self._nonce_c, self.features, self.local))
        self._state = _State.HELLO_SENT

    @property
    def can_punch(self) -> bool:
        """Registered with a relay that brokers punches, and we take part ourselves."""
        return self.registered and FEATURE_PUNCH in self.features and FEATURE_PUNCH in self.relay_features

    @property
    def tcp_port(self) -> int | None:
        """The relay's TCP-lane port when it has one and we declared FEATURE_TCP, else None."""
        ok = self.registered and FEATURE_TCP in self.features and self.relay_tcp_port
        return self.relay_tcp_port if ok else None

    def punch(self, target: str) -> None:
        """Queue a PUNCH for `target`. Raises LocalProtocolError unless `can_punch`."""
        if not self.can_punch:
            raise LocalProtocolError("punch() without a relay that brokers punches")
        self._out += encode_message(Punch(target))

    def announce(self, announcement: Announcement) -> None:
        """Queue an ANNOUNCE with new fields (sent right away once registered)."""
        canonical_announcement(announcement)
        self.announcement = announcement
        if self._state is _State.REGISTERED:
            self._out += encode_message(Announce(announcement))

    def data_to_send(self) -> bytes:
        return drain(self._out)

    @property
    def registered(self) -> bool:
        return self._state is _State.REGISTERED

    def receive_data(self, data: bytes) -> list[Message]:
        events: list[Message] = []
        for msg in self._reader.feed(data):
            if isinstance(msg, Error):
                registering, self._state = self._state is _State.HELLO_SENT, _State.CLOSED
                if registering and msg.code == "not_member":
                    raise MembershipError("not_member", f"relay refused registration: {msg.message}")
                raise RemoteProtocolError(f"relay error {msg.code}: {msg.message}")
            if self._state is _State.HELLO_SENT and isinstance(msg, Challenge):
                self._on_challenge(msg)
            elif self._state is _State.HELLO_SENT and isinstance(msg, Registered):
                if msg.peer_id != self.identity.peer_id:
                    raise RemoteProtocolError(f"relay registered us as {msg.peer_id}")
                self._state = _State.REGISTERED
                self.relay_features, self.relay_tcp_port = msg.features, msg.tcp_port
                events.append(msg)
            elif self._state is _State.REGISTERED and isinstance(msg, Directory | DirectoryUpdate):
                events.append(msg)
            elif self.can_punch and isinstance(msg, PunchGo | PunchFail):
                if isinstance(msg, PunchGo) and msg.peer == self.identity.peer_id:
                    raise RemoteProtocolError("relay asked us to punch to ourselves")
                events.append(msg)
            elif self._state is _State.REGISTERED and isinstance(msg, Ping):
                self._out += encode_message(Pong(msg.seq))
                events.append(msg)
            else:
                raise _unexpected(msg, "relay", self._state)
        return events

    def _on_challenge(self, msg: Challenge) -> None:
        if self.relay_id is not None:
            raise RemoteProtocolError("relay sent a second CHALLENGE")
        verify(
            msg.relay_key,
            msg.signature,
            CHALLENGE_CONTEXT + self._nonce_c + msg.nonce,
            claimed_peer_id=msg.relay_id,
        )
        if self.expected_relay_id is not None and msg.relay_id != self.expected_relay_id:
            raise AuthenticationError(f"relay is {msg.relay_id}, expected {self.expected_relay_id}")
        self.relay_id = msg.relay_id
        ann, cert, ticket = self.announcement, self.cert, self.ticket
        sig = self.identity.sign(register_message(msg.nonce, self._nonce_c, ann, cert, ticket))
        self._out += encode_message(
            Register(self.identity.peer_id, self.identity.public_key, sig, ann, cert, ticket)
        )


@dataclass
class RelayControl:
    """Relay side of one member's control stream.

    Feed received bytes to `receive_data`; it answers HELLO with a CHALLENGE by itself and returns the
    messages
    the relay acts on: `Register` once the member proved its peer id (then call `accept(keepalive_s)`),
    `Announce`, `Pong`, and `Punch` from a member that declared FEATURE_PUNCH (`features`) when `accept` was
    told we broker them. Raises AuthenticationError for a bad proof, RemoteProtocolError for a violation
    (the caller should then `error(...)`, flush, and close the connection).
    """

    identity: Identity
    nonce_source: Callable[[int], bytes] = os.urandom
    peer_id: str | None = None
    features: tuple[str, ...] = ()  # what the member declared in HELLO
    local: tuple[str, ...] = ()  # the member's own socket addresses, from HELLO
    relay_features: tuple[str, ...] = ()  # what accept() declared
    tcp_port: int = 0  # what accept() declared: our TCP lane's port (0: none)
    _state: _State = _State.AWAIT_HELLO
    _nonce_r: bytes = b""
    _nonce_c: bytes = b""
    _out: bytearray = field(default_factory=bytearray)
    _reader: MessageReader = field(default_factory=MessageReader)
    _seq: int = 0

    def data_to_send(self) -> bytes:
        return drain(self._out)

    def receive_data(self, data: bytes) -> list[Message]:
        events: list[Message] = []
        for msg in self._reader.feed(data):
            if self._state is _State.AWAIT_HELLO and isinstance(msg, Hello):
                if msg.version != PROTOCOL_VERSION:
                    raise RemoteProtocolError(f"relay protocol version {msg.version} not supported")
                self._nonce_c = msg.nonce
                self.features, self.local = msg.features, msg.local
                self._nonce_r = self.nonce_source(NONCE_LEN)
                sig = self.identity.sign(CHALLENGE_CONTEXT + self._nonce_c + self._nonce_r)
                self._out += encode_message(
                    Challenge(self._nonce_r, self.identity.peer_id, self.identity.public_key, sig)
                )
                self._state = _State.AWAIT_REGISTER
            elif self._state is _State.AWAIT_REGISTER and isinstance(msg, Register):
                verify(
                    msg.public_key,
                    msg.signature,
                    register_message(self._nonce_r, self._nonce_c, msg.announcement, msg.cert, msg.ticket),
                    claimed_peer_id=msg.peer_id,
                )
                self.peer_id = msg.peer_id
                self._state = _State.REGISTERED
                events.append(msg)
            elif self._state is _State.REGISTERED and isinstance(msg, Announce | Pong):
                events.append(msg)
            elif self.punches and isinstance(msg, Punch):
                if msg.target == self.peer_id:
                    raise RemoteProtocolError("PUNCH to oneself")
                events.append(msg)
            else:
                raise _unexpected(msg, "member", self._state)
        return events

    def accept(self, keepalive_s: float, features: tuple[str, ...] = (), tcp_port: int = 0) -> None:
        """Admit the member; `features` are what this relay offers it (FEATURE_PUNCH: we broker punches),
        `tcp_port` where its TCP lane listens (0: no lane)."""
        if self._state is not _State.REGISTERED or self.peer_id is None:
            raise LocalProtocolError("accept() before a valid REGISTER")
        self.relay_features, self.tcp_port = features, tcp_port
        self._out += encode_message(Registered(self.peer_id, keepalive_s, features, tcp_port))

    @property
    def tcp(self) -> bool:
        """We offered a TCP lane and the member dials it: its INCOMING may carry a ticket."""
        return bool(self.tcp_port) and FEATURE_TCP in self.features

    @property
    def forwards(self) -> bool:
        """We forward channels and the member takes them: its PUNCH_GOs may carry one (channels.py)."""
        return FEATURE_FORWARD in self.features and FEATURE_FORWARD in self.relay_features

    @property
    def punches(self) -> bool:
        """Registered, we broker punches, and the member takes part: PUNCH and PUNCH_GO may pass."""
        registered = self._state is _State.REGISTERED
        return registered and FEATURE_PUNCH in self.features and FEATURE_PUNCH in self.relay_features

    def send(self, msg: Directory | DirectoryUpdate | PunchGo | PunchFail) -> None:
        if self._state is not _State.REGISTERED:
            raise LocalProtocolError("directory sent to an unregistered member")
        if isinstance(msg, PunchGo | PunchFail) and not self.punches:
            raise LocalProtocolError("punch message to a member that does not take part in punching")
        self._out += encode_message(msg)

    def ping(self) -> int:
        self._seq += 1
        self._out += encode_message(Ping(self._seq))
        return self._seq

    def error(self, code: str, message: str = "") -> None:
        self._out += encode_message(Error(code, message))
        self._state = _State.CLOSED
