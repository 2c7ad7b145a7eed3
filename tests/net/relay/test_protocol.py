"""The relay control protocol in memory: two state machines passing bytes, and hostile input."""

from __future__ import annotations

import json
import struct

import pytest

from eldric_p2p.errors import AuthenticationError, LocalProtocolError, RemoteProtocolError
from eldric_p2p.net.identity import Identity
from eldric_p2p.net.relay import protocol as p
from eldric_p2p.net.relay.control import MemberControl, RelayControl

ANN = {"name": "laptop", "http_port": 8080, "roles": ["worker"], "memory_free": 123}


def pump(member: MemberControl, relay: RelayControl) -> tuple[list[p.Message], list[p.Message]]:
    """Move bytes both ways until neither side has anything to say."""
    got_m: list[p.Message] = []
    got_r: list[p.Message] = []
    while True:
        to_relay = member.data_to_send()
        to_member = relay.data_to_send()
        if not to_relay and not to_member:
            return got_m, got_r
        got_r += relay.receive_data(to_relay)
        got_m += member.receive_data(to_member)


def registered_pair() -> tuple[Identity, MemberControl, RelayControl]:
    ident = Identity.generate()
    member = MemberControl(ident, dict(ANN))
    relay = RelayControl(Identity.generate())
    member.hello()
    _, got_r = pump(member, relay)
    assert got_r == [p.Register(ident.peer_id, ident.public_key, got_r[0].signature, ANN)]
    relay.accept(keepalive_s=5.0)
    got_m, _ = pump(member, relay)
    assert got_m == [p.Registered(ident.peer_id, 5.0)]
    return ident, member, relay


def test_register_proves_peer_id_and_directory_flows() -> None:
    ident, member, relay = registered_pair()
    assert member.registered and relay.peer_id == ident.peer_id
    other = Identity.generate()
    entry = p.Member(other.peer_id, other.public_key, {"name": "gpu-box"})
    relay.send(p.Directory((entry,)))
    relay.send(p.DirectoryUpdate(removed=(other.peer_id,)))
    got_m, _ = pump(member, relay)
    assert got_m == [p.Directory((entry,)), p.DirectoryUpdate((), (other.peer_id,))]
    # pings are answered by the member machine itself
    seq = relay.ping()
    got_m, got_r = pump(member, relay)
    assert got_m == [p.Ping(seq)] and got_r == [p.Pong(seq)]
    member.announce({**ANN, "memory_free": 7})
    _, got_r = pump(member, relay)
    assert got_r == [p.Announce({**ANN, "memory_free": 7})]


def test_register_with_someone_elses_peer_id_is_refused() -> None:
    ident = Identity.generate()
    victim = Identity.generate()
    member = MemberControl(ident, ANN)
    relay = RelayControl(Identity.generate())
    member.hello()
    relay.receive_data(member.data_to_send())
    member.receive_data(relay.data_to_send())
    reg = p.parse_message_untrusted(p.MsgType.REGISTER, member.data_to_send()[p.HEADER.size :])
    assert isinstance(reg, p.Register)
    forged = p.Register(victim.peer_id, reg.public_key, reg.signature, reg.announcement)
    with pytest.raises(AuthenticationError, match="not " + victim.peer_id):
        relay.receive_data(p.encode_message(forged))
    # the victim's key with our signature fails too
    relay2 = RelayControl(Identity.generate())
    member2 = MemberControl(ident, ANN)
    member2.hello()
    relay2.receive_data(member2.data_to_send())
    member2.receive_data(relay2.data_to_send())
    reg2 = p.parse_message_untrusted(p.MsgType.REGISTER, member2.data_to_send()[p.HEADER.size :])
    assert isinstance(reg2, p.Register)
    stolen = p.Register(victim.peer_id, victim.public_key, reg2.signature, reg2.announcement)
    with pytest.raises(AuthenticationError, match="bad signature"):
        relay2.receive_data(p.encode_message(stolen))


def test_replayed_register_fails_against_a_new_challenge() -> None:
    ident = Identity.generate()
    member = MemberControl(ident, ANN)
    relay = RelayControl(Identity.generate())
    member.hello()
    relay.receive_data(member.data_to_send())
    member.receive_data(relay.data_to_send())
    hello_bytes = p.encode_message(p.Hello(p.PROTOCOL_VERSION, member._nonce_c))
    register_bytes = member.data_to_send()
    fresh = RelayControl(Identity.generate())
    fresh.receive_data(hello_bytes)
    with pytest.raises(AuthenticationError):
        fresh.receive_data(register_bytes)


def test_member_checks_the_relay_identity() -> None:
    relay_ident = Identity.generate()
    member = MemberControl(Identity.generate(), ANN, expected_relay_id=Identity.generate().peer_id)
    relay = RelayControl(relay_ident)
    member.hello()
    relay.receive_data(member.data_to_send())
    with pytest.raises(AuthenticationError, match="expected"):
        member.receive_data(relay.data_to_send())


def test_messages_out_of_order_are_protocol_errors() -> None:
    relay = RelayControl(Identity.generate())
    with pytest.raises(RemoteProtocolError, match="unexpected Announce"):
        relay.receive_data(p.encode_message(p.Announce(ANN)))
    member = MemberControl(Identity.generate(), ANN)
    member.hello()
    with pytest.raises(RemoteProtocolError, match="unexpected Directory"):
        member.receive_data(p.encode_message(p.Directory(())))
    member2 = MemberControl(Identity.generate(), ANN)
    member2.hello()
    with pytest.raises(RemoteProtocolError, match="relay error full: too many members"):
        member2.receive_data(p.encode_message(p.Error("full", "too many members")))


def test_reader_reassembles_split_messages_and_keeps_the_rest() -> None:
    data = p.encode_message(p.Open(Identity.generate().peer_id)) + b"opaque link bytes"
    reader = p.MessageReader()
    out: list[p.Message] = []
    for i in range(len(data)):
        out += reader.feed(data[i : i + 1], limit=1 - len(out))
    assert len(out) == 1 and isinstance(out[0], p.Open)
    assert reader.rest() == b"opaque link bytes"


def _frame(mtype: int, body: bytes) -> bytes:
    return p.HEADER.pack(len(body), mtype) + body


@pytest.mark.parametrize(
    ("frame", "error"),
    [
        (struct.pack("!IB", 1 << 30, p.MsgType.OPEN), "limit"),
        (struct.pack("!IB", 2, 99) + b"{}", "unknown relay message type 99"),
        (struct.pack("!IB", 3, p.MsgType.OPEN) + b"\xff\xfe\x00", "not JSON"),
        (struct.pack("!IB", 2, p.MsgType.OPEN) + b"[]", "not an object"),
        (_frame(p.MsgType.OPEN, b"{}"), "lacks field 'target'"),
        (_frame(p.MsgType.OPEN, b'{"target":"x"}'), "not a peer id"),
        (_frame(p.MsgType.PING, b'{"seq":-1}'), "out of range"),
        (_frame(p.MsgType.PING, b'{"seq":true}'), "wrong type"),
    ],
)
def test_hostile_frames_raise_specific_errors(frame: bytes, error: str) -> None:
    with pytest.raises(RemoteProtocolError, match=error):
        p.MessageReader().feed(frame)


def test_deep_nesting_and_oversized_announcements_are_refused() -> None:
    deep = b"[" * 10000 + b"]" * 10000
    with pytest.raises(RemoteProtocolError):
        p.MessageReader().feed(p.HEADER.pack(len(deep), p.MsgType.ANNOUNCE) + deep)
    big = {"announcement": {f"k{i}": "v" * 500 for i in range(20)}}
    body = json.dumps(big).encode()
    with pytest.raises(RemoteProtocolError, match="limit"):
        p.parse_message_untrusted(p.MsgType.ANNOUNCE, body)
    with pytest.raises(RemoteProtocolError, match="unsupported type"):
        p.parse_message_untrusted(p.MsgType.ANNOUNCE, b'{"announcement": {"x": {"nested": 1}}}')
    with pytest.raises(LocalProtocolError):
        MemberControl(Identity.generate(), big["announcement"]).hello()


def test_directory_may_be_larger_than_control_messages_only_for_members() -> None:
    members = tuple(
        p.Member(i.peer_id, i.public_key, {"name": "n" * 400, "models": ["m" * 100] * 10})
        for i in (Identity.generate() for _ in range(20))
    )
    frame = p.encode_message(p.Directory(members))
    assert len(frame) > p.MAX_MESSAGE
    assert p.MessageReader(max_directory=p.MAX_DIRECTORY_MESSAGE).feed(frame) == [p.Directory(members)]
    with pytest.raises(RemoteProtocolError, match="limit"):
        p.MessageReader().feed(frame)
