"""The edge-relay protocol's messages and their encoding, sans-IO: types, limits, `encode_message` and
`parse_message_untrusted`; no sockets, no clock. Reassembling messages from a stream is reader.py's
`MessageReader`; the control stream's state machines and what its signatures cover are control.py's.

Every message is length-prefixed:

    u32 big-endian body length | u8 message type | body (UTF-8 JSON object)

The first stream a member opens on its QUIC connection is the *control stream*:

    member                                   relay
    HELLO {version, nonce_c, [features], [local]}  ->
                                       <-    CHALLENGE {nonce_r, relay_id, relay_key, sig(nonce_c, nonce_r)}
    REGISTER {peer_id, key, sig, ann,  ->    sig = Ed25519 over (context, nonce_r, nonce_c, sha256(ann)
              [cert], [ticket]}                [, sha256(cert, ticket)]); cert/ticket: federation credentials
                                       <-    REGISTERED {peer_id, keepalive_s, [features], [tcp_port]}
                                                                                              (or ERROR)
                                       <-    DIRECTORY {members: [...]}           (full snapshot)
                                       <-    DIRECTORY_UPDATE {added, removed}    (on every change)
    ANNOUNCE {ann}                     ->    (the member's fields changed)
                                       <-    PING {seq}
    PONG {seq}                         ->
    PUNCH {target}                     ->    (only when both sides declared feature "punch")
                                       <-    PUNCH_GO {peer, token, addrs, delay_ms, [channel]}  (to both)
                                       <-    PUNCH_FAIL {target, code, reason}        (to the asker)

PUNCH_GO's `addrs`: the peer's address as the relay observes it, then its HELLO `local` ones. The probes and
the direct QUIC connection that follow are punch.py's and punching.py's. `channel` (when both members and the
relay declared "forward"): the member's id of a forwarding channel to the peer through the relay, the path
their QUIC connection takes when no probe gets through (channels.py).

Every later stream carries one request message and then opaque bytes:

    member A -> relay:  OPEN {target}          relay -> member B:  INCOMING {source}
    member B -> relay:  ACCEPT | REFUSE        relay -> member A:  ACCEPT | REFUSE {code, reason}

after ACCEPT the relay splices the two streams. End-to-end authentication is the link handshake that the two
members run over the spliced bytes; the relay only ever sees ciphertext.

The TCP lane (REGISTERED `tcp_port`: the relay takes TCP connections there; both members declared "tcp"):

    member A -> relay:  OPEN {target, tcp: true}
                                              relay -> member B:  INCOMING {source, ticket: t_B}
    member B -> relay:  (dials TCP, sends t_B) ACCEPT | REFUSE
    relay -> member A:  ACCEPT {ticket: t_A}  (A dials TCP, sends t_A)

and the relay splices the two TCP connections (tcplane.py). The QUIC streams end there; the bytes then go
through the kernel's TCP on both sides instead of a user-space QUIC stack, which is what makes the lane
several times faster. A relay without a TCP port, or a target without "tcp", answers a plain ACCEPT and
splices QUIC streams as above.

Bytes from the other side are hostile: every length is checked against a limit before anything is parsed,
and a violation raises `RemoteProtocolError` naming what was wrong.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass
from typing import Any

from eldric_p2p.errors import LocalProtocolError, RemoteProtocolError
from eldric_p2p.net.identity import is_peer_id
from eldric_p2p.net.relay.fields import MAX_CREDENTIAL as MAX_CREDENTIAL  # re-exported
from eldric_p2p.net.relay.fields import MAX_STRING, addresses, names
from eldric_p2p.net.relay.fields import credential as _credential
from eldric_p2p.net.relay.fields import field as _field
from eldric_p2p.net.relay.fields import hex_bytes as _hex
from eldric_p2p.net.relay.fields import peer_id as _peer_id
from eldric_p2p.net.relay.fields import string as _str
from eldric_p2p.net.relay.fields import uint as _uint

PROTOCOL_VERSION = 1
HEADER = struct.Struct("!IB")  # body length, message type
MAX_MESSAGE = 16 * 1024  # every message except DIRECTORY
MAX_DIRECTORY_MESSAGE = 1024 * 1024  # a snapshot of up to MAX_MEMBERS announcements
MAX_ANNOUNCEMENT = 4096  # canonical JSON bytes of one announcement
MAX_ANNOUNCEMENT_KEYS = 32
MAX_LIST_ITEMS = 64
NONCE_LEN = 32
MAX_FEATURES = 8  # names in HELLO/REGISTERED `features`
MAX_LOCAL_ADDRESSES = 4  # a member's own socket addresses in HELLO `local`
MAX_PUNCH_ADDRESSES = 1 + MAX_LOCAL_ADDRESSES  # PUNCH_GO: the observed address, then the local ones
MAX_PUNCH_DELAY_MS = 2000
FEATURE_PUNCH = "punch"  # HELLO: we take PUNCH_GO; REGISTERED: this relay brokers PUNCH
FEATURE_FORWARD = "forward"  # HELLO: we take channels in PUNCH_GO; REGISTERED: the relay forwards them
FEATURE_TCP = "tcp"  # HELLO: we dial the relay's TCP lane when INCOMING carries a ticket (tcplane.py)
TICKET_LEN = 16  # a TCP-lane ticket: what a member sends first on its TCP connection to the relay
CHANNEL_ID_LEN = 8

Announcement = dict[str, Any]


class MsgType(enum.IntEnum):
    HELLO = 1
    CHALLENGE = 2
    REGISTER = 3
    REGISTERED = 4
    DIRECTORY = 5
    DIRECTORY_UPDATE = 6
    ANNOUNCE = 7
    PING = 8
    PONG = 9
    OPEN = 10
    INCOMING = 11
    ACCEPT = 12
    REFUSE = 13
    ERROR = 14
    PUNCH = 15
    PUNCH_GO = 16
    PUNCH_FAIL = 17


DIRECTORY_TYPES = (MsgType.DIRECTORY, MsgType.DIRECTORY_UPDATE)  # the types allowed MAX_DIRECTORY_MESSAGE


class RefuseCode(enum.StrEnum):
    UNKNOWN_PEER = "unknown_peer"
    SELF = "self"
    TOO_MANY_STREAMS = "too_many_streams"
    NOT_REGISTERED = "not_registered"
    NO_HANDLER = "no_handler"
    TIMEOUT = "timeout"
    FORBIDDEN = "forbidden"  # a guest (a joiner with a ticket) may open streams only to its inviter
    UNSUPPORTED = "unsupported"  # PUNCH_FAIL: the target does not take part in hole punching
    BUSY = "busy"  # PUNCH_FAIL: too many punches pending for one of the two, or for the relay
    RATE_LIMITED = "rate_limited"  # PUNCH_FAIL: the member asked too often
    TCP_FAILED = "tcp_failed"  # the TCP lane could not be set up (ask again without `tcp`)


# ---------------------------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class Hello:
    version: int
    nonce: bytes
    features: tuple[str, ...] = ()  # e.g. FEATURE_PUNCH: this member takes PUNCH_GO
    local: tuple[str, ...] = ()  # "ip:port" of the member's own UDP socket (for peers behind the same NAT)


@dataclass(frozen=True)
class Challenge:
    nonce: bytes
    relay_id: str
    relay_key: bytes
    signature: bytes


@dataclass(frozen=True)
class Register:
    peer_id: str
    public_key: bytes
    signature: bytes
    announcement: Announcement
    cert: str | None = None  # our membership chain (certs.chain_to_text) when we are in a federation
    ticket: str | None = None  # a join ticket (invites.Ticket.to_text): a joiner without a cert yet


@dataclass(frozen=True)
class Registered:
    peer_id: str
    keepalive_s: float
    features: tuple[str, ...] = ()  # e.g. FEATURE_PUNCH: this relay brokers PUNCH
    tcp_port: int = 0  # the relay's TCP lane listens on this port of its address (0: no lane)


@dataclass(frozen=True)
class Member:
    """One directory entry: a registered member and what it announced."""

    peer_id: str
    public_key: bytes
    announcement: Announcement


@dataclass(frozen=True)
class Directory:
    members: tuple[Member, ...]


@dataclass(frozen=True)
class DirectoryUpdate:
    added: tuple[Member, ...] = ()  # new members and members whose announcement changed
    removed: tuple[str, ...] = ()


@dataclass(frozen=True)
class Announce:
    announcement: Announcement


@dataclass(frozen=True)
class Ping:
    seq: int


@dataclass(frozen=True)
class Pong:
    seq: int


@dataclass(frozen=True)
class Open:
    target: str
    tcp: bool = False  # rather the TCP lane (when the relay and the target have it)


@dataclass(frozen=True)
class Incoming:
    source: str
    ticket: bytes = b""  # the TCP lane: dial the relay's TCP port and send this


@dataclass(frozen=True)
class Accept:
    ticket: bytes = b""  # relay -> opener: the TCP lane is set up; dial and send this


@dataclass(frozen=True)
class Refuse:
    code: str
    reason: str = ""


@dataclass(frozen=True)
class Error:
    code: str
    message: str = ""


@dataclass(frozen=True)
class Punch:
    """member -> relay: broker a UDP hole punch between us and `target`."""

    target: str


@dataclass(frozen=True)
class PunchGo:
    """relay -> both members: probe `peer` at `addrs` (the address the relay observed first, then the peer's
    own) from the socket that reaches the relay, `delay_ms` from now; probes are keyed by `token`."""

    peer: str
    token: bytes
    addrs: tuple[str, ...]
    delay_ms: int
    channel: bytes = b""  # our id of a forwarding channel to `peer`: the fallback path (channels.py)


@dataclass(frozen=True)
class PunchFail:
    """relay -> member: no punch with `target` (a RefuseCode)."""

    target: str
    code: str
    reason: str = ""


Message = (
    Hello
    | Challenge
    | Register
    | Registered
    | Directory
    | DirectoryUpdate
    | Announce
    | Ping
    | Pong
    | Open
    | Incoming
    | Accept
    | Refuse
    | Error
    | Punch
    | PunchGo
    | PunchFail
)

# ---------------------------------------------------------------------------------------------- encoding


def canonical_announcement(ann: Announcement) -> bytes:
    """Bytes a REGISTER signature covers (sorted keys, no spaces). Raises LocalProtocolError if too big."""
    data = json.dumps(ann, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    if len(data) > MAX_ANNOUNCEMENT:
        raise LocalProtocolError(f"announcement is {len(data)} bytes, limit {MAX_ANNOUNCEMENT}")
    return data


def _member_json(m: Member) -> dict[str, Any]:
    return {"peer_id": m.peer_id, "public_key": m.public_key.hex(), "announcement": m.announcement}


def _body(msg: Message) -> tuple[MsgType, dict[str, Any]]:
    match msg:
        case Hello(version, nonce, features, local):
            extra = {k: list(v) for k, v in (("features", features), ("local", local)) if v}
            return MsgType.HELLO, {"version": version, "nonce": nonce.hex(), **extra}
        case Challenge(nonce, relay_id, relay_key, sig):
            return MsgType.CHALLENGE, {
                "nonce": nonce.hex(),
                "relay_id": relay_id,
                "relay_key": relay_key.hex(),
                "sig": sig.hex(),
            }
        case Register(peer_id, key, sig, ann, cert, ticket):
            creds = {k: v for k, v in (("cert", cert), ("ticket", ticket)) if v is not None}
            return MsgType.REGISTER, {"peer_id": peer_id, "public_key": key.hex(), "sig": sig.hex(),
                                      "announcement": ann, **creds}  # fmt: skip
        case Registered(peer_id, keepalive_s, features, tcp_port):
            more: dict[str, Any] = {"features": list(features)} if features else {}
            if tcp_port:
                more["tcp_port"] = tcp_port
            return MsgType.REGISTERED, {"peer_id": peer_id, "keepalive_s": keepalive_s, **more}
        case Directory(members):
            return MsgType.DIRECTORY, {"members": [_member_json(m) for m in members]}
        case DirectoryUpdate(added, removed):
            return MsgType.DIRECTORY_UPDATE, {
                "added": [_member_json(m) for m in added],
                "removed": list(removed),
            }
        case Announce(ann):
            return MsgType.ANNOUNCE, {"announcement": ann}
        case Ping(seq):
            return MsgType.PING, {"seq": seq}
        case Pong(seq):
            return MsgType.PONG, {"seq": seq}
        case Open(target, tcp):
            return MsgType.OPEN, {"target": target, **({"tcp": True} if tcp else {})}
        case Incoming(source, ticket):
            return MsgType.INCOMING, {"source": source, **({"ticket": ticket.hex()} if ticket else {})}
        case Accept(ticket):
            return MsgType.ACCEPT, {"ticket": ticket.hex()} if ticket else {}
        case Refuse(code, reason):
            return MsgType.REFUSE, {"code": code, "reason": reason[:MAX_STRING]}
        case Error(code, message):
            return MsgType.ERROR, {"code": code, "message": message[:MAX_STRING]}
        case Punch(target):
            return MsgType.PUNCH, {"target": target}
        case PunchGo(peer, token, addrs, delay_ms, channel):
            body = {"peer": peer, "token": token.hex(), "addrs": list(addrs), "delay_ms": delay_ms}
            return MsgType.PUNCH_GO, {**body, "channel": channel.hex()} if channel else body
        case PunchFail(target, code, reason):
            return MsgType.PUNCH_FAIL, {"target": target, "code": code, "reason": reason[:MAX_STRING]}
    raise LocalProtocolError(f"not a relay message: {msg!r}")


def encode_message(msg: Message) -> bytes:
    """Frame one message. Raises LocalProtocolError if it exceeds the limit its type allows."""
    mtype, body = _body(msg)
    data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    limit = MAX_DIRECTORY_MESSAGE if mtype in DIRECTORY_TYPES else MAX_MESSAGE
    if len(data) > limit:
        raise LocalProtocolError(f"{mtype.name} message is {len(data)} bytes, limit {limit}")
    return HEADER.pack(len(data), mtype) + data


# ---------------------------------------------------------------------------------------------- decoding


def check_announcement_untrusted(value: Any) -> Announcement:
    """An announcement is a flat JSON object: short keys; string, number, bool or short string-list values."""
    if not isinstance(value, dict):
        raise RemoteProtocolError("announcement is not an object")
    if len(value) > MAX_ANNOUNCEMENT_KEYS:
        raise RemoteProtocolError(f"announcement has {len(value)} keys, limit {MAX_ANNOUNCEMENT_KEYS}")
    for k, v in value.items():
        if len(k) > 32:
            raise RemoteProtocolError("announcement key longer than 32 characters")
        if isinstance(v, list):
            if len(v) > MAX_LIST_ITEMS or not all(isinstance(x, str) and len(x) <= MAX_STRING for x in v):
                raise RemoteProtocolError(f"announcement field {k!r} is not a short list of strings")
        elif isinstance(v, str):
            if len(v) > MAX_STRING:
                raise RemoteProtocolError(f"announcement field {k!r} is too long")
        elif not isinstance(v, int | float | bool) and v is not None:
            raise RemoteProtocolError(f"announcement field {k!r} has an unsupported type")
    try:
        canonical_announcement(value)
    except LocalProtocolError as exc:
        raise RemoteProtocolError(str(exc)) from exc
    return value


def _announcement(body: dict[str, Any]) -> Announcement:
    return check_announcement_untrusted(_field(body, "announcement", dict))


def _member(value: Any) -> Member:
    if not isinstance(value, dict):
        raise RemoteProtocolError("directory entry is not an object")
    return Member(
        _peer_id(value, "peer_id"),
        _hex(value, "public_key", 32),
        _announcement(value),
    )


def _members(body: dict[str, Any], key: str) -> tuple[Member, ...]:
    return tuple(_member(v) for v in _field(body, key, list))


def _ticket(body: dict[str, Any]) -> bytes:
    return _hex(body, "ticket", TICKET_LEN) if "ticket" in body else b""


def parse_message_untrusted(mtype: int, data: bytes) -> Message:
    """Decode one message body of type `mtype`. Raises RemoteProtocolError on anything malformed."""
    try:
        kind = MsgType(mtype)
    except ValueError as exc:
        raise RemoteProtocolError(f"unknown relay message type {mtype}") from exc
    try:
        body = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise RemoteProtocolError(f"{kind.name} body is not JSON") from exc
    if not isinstance(body, dict):
        raise RemoteProtocolError(f"{kind.name} body is not an object")
    match kind:
        case MsgType.HELLO:
            return Hello(
                _uint(body, "version"),
                _hex(body, "nonce", NONCE_LEN),
                names(body, "features", MAX_FEATURES),
                addresses(body, "local", MAX_LOCAL_ADDRESSES),
            )
        case MsgType.CHALLENGE:
            return Challenge(
                _hex(body, "nonce", NONCE_LEN),
                _peer_id(body, "relay_id"),
                _hex(body, "relay_key", 32),
                _hex(body, "sig", 64),
            )
        case MsgType.REGISTER:
            return Register(
                _peer_id(body, "peer_id"),
                _hex(body, "public_key", 32),
                _hex(body, "sig", 64),
                _announcement(body),
                _credential(body, "cert"),
                _credential(body, "ticket"),
            )
        case MsgType.REGISTERED:
            keepalive = _field(body, "keepalive_s", int | float)
            if not 0 < keepalive <= 3600:
                raise RemoteProtocolError("keepalive_s out of range")
            features = names(body, "features", MAX_FEATURES)
            tcp_port = _uint(body, "tcp_port") if "tcp_port" in body else 0
            if tcp_port > 65535:
                raise RemoteProtocolError("tcp_port out of range")
            return Registered(_peer_id(body, "peer_id"), float(keepalive), features, tcp_port)
        case MsgType.DIRECTORY:
            return Directory(_members(body, "members"))
        case MsgType.DIRECTORY_UPDATE:
            removed = _field(body, "removed", list)
            for r in removed:
                if not isinstance(r, str) or not is_peer_id(r):
                    raise RemoteProtocolError("directory update removes something that is not a peer id")
            return DirectoryUpdate(_members(body, "added"), tuple(removed))
        case MsgType.ANNOUNCE:
            return Announce(_announcement(body))
        case MsgType.PING:
            return Ping(_uint(body, "seq"))
        case MsgType.PONG:
            return Pong(_uint(body, "seq"))
        case MsgType.OPEN:
            tcp = _field(body, "tcp", bool) if "tcp" in body else False
            return Open(_peer_id(body, "target"), tcp)
        case MsgType.INCOMING:
            return Incoming(_peer_id(body, "source"), _ticket(body))
        case MsgType.ACCEPT:
            return Accept(_ticket(body))
        case MsgType.REFUSE:
            return Refuse(_str(body, "code", 64), _str(body, "reason"))
        case MsgType.ERROR:
            return Error(_str(body, "code", 64), _str(body, "message"))
        case MsgType.PUNCH:
            return Punch(_peer_id(body, "target"))
        case MsgType.PUNCH_GO:
            addrs = addresses(body, "addrs", MAX_PUNCH_ADDRESSES)
            delay_ms = _uint(body, "delay_ms")
            if not addrs or delay_ms > MAX_PUNCH_DELAY_MS:
                raise RemoteProtocolError("PUNCH_GO without addresses or with a delay over the limit")
            channel = _hex(body, "channel", CHANNEL_ID_LEN) if "channel" in body else b""
            return PunchGo(_peer_id(body, "peer"), _hex(body, "token", NONCE_LEN), addrs, delay_ms, channel)
        case MsgType.PUNCH_FAIL:
            return PunchFail(_peer_id(body, "target"), _str(body, "code", 64), _str(body, "reason"))
    raise AssertionError(kind)  # pragma: no cover - the match is exhaustive
