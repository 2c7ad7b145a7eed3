"""The relay control protocol in memory: two state machines passing bytes, and hostile input."""

from __future__ import annotations

import json
import struct

import pytest

from eldric_p2p.errors import AuthenticationError, LocalProtocolError, RemoteProtocolError
from eldric_p2p.net.identity import Identity
from eldric_p2p.net.relay import protocol as p
from eldric_p2p.net.relay.control import MemberControl, RelayControl
from eldric_p2p.net.relay.reader import MessageReader

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
    reader = MessageReader()
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
        MessageReader().feed(frame)


def test_deep_nesting_and_oversized_announcements_are_refused() -> None:
    deep = b"[" * 10000 + b"]" * 10000
    with pytest.raises(RemoteProtocolError):
        MessageReader().feed(p.HEADER.pack(len(deep), p.MsgType.ANNOUNCE) + deep)
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
    assert MessageReader(max_directory=p.MAX_DIRECTORY_MESSAGE).feed(frame) == [p.Directory(members)]
    with pytest.raises(RemoteProtocolError, match="limit"):
        MessageReader().feed(frame)


# ---------------------------------------------------------------------------------------------- hole punching

TOKEN = bytes(range(32))


def punching_pair(*, member_punches: bool = True, relay_punches: bool = True) -> tuple[
    Identity, MemberControl, RelayControl
]:  # fmt: skip
    """A registered member and relay that declared (or not) the punch feature."""
    ident = Identity.generate()
    features = (p.FEATURE_PUNCH,) if member_punches else ()
    member = MemberControl(ident, dict(ANN), features=features, local=("192.168.1.11:40000",))
    relay = RelayControl(Identity.generate())
    member.hello()
    pump(member, relay)
    relay.accept(5.0, (p.FEATURE_PUNCH,) if relay_punches else ())
    pump(member, relay)
    return ident, member, relay


def test_punch_messages_cross_the_control_stream_when_both_sides_declared_the_feature() -> None:
    ident, member, relay = punching_pair()
    assert relay.features == (p.FEATURE_PUNCH,) and relay.local == ("192.168.1.11:40000",)
    assert member.relay_features == (p.FEATURE_PUNCH,) and member.can_punch and relay.punches
    target = Identity.generate().peer_id
    member.punch(target)
    _, got_r = pump(member, relay)
    assert got_r == [p.Punch(target)]
    go = p.PunchGo(target, TOKEN, ("10.99.0.102:5000", "192.168.2.11:5000"), 12)
    relay.send(go)
    relay.send(p.PunchFail(target, p.RefuseCode.BUSY, "too many"))
    got_m, _ = pump(member, relay)
    assert got_m == [go, p.PunchFail(target, "busy", "too many")]


def test_members_and_relays_without_the_feature_keep_the_old_bytes_and_refuse_punch_messages() -> None:
    old_hello = p.encode_message(p.Hello(1, TOKEN))
    assert b"features" not in old_hello and b"local" not in old_hello
    assert b"features" not in p.encode_message(p.Registered(Identity.generate().peer_id, 5.0))
    target = Identity.generate().peer_id
    # a relay that does not broker punches: the member may not ask
    _, member, relay = punching_pair(relay_punches=False)
    assert not member.can_punch
    with pytest.raises(LocalProtocolError):
        member.punch(target)
    with pytest.raises(RemoteProtocolError, match="unexpected Punch"):
        relay.receive_data(p.encode_message(p.Punch(target)))
    # a member that did not declare it: the relay sends it nothing and it takes nothing
    _, member, relay = punching_pair(member_punches=False)
    with pytest.raises(LocalProtocolError):
        relay.send(p.PunchGo(target, TOKEN, ("10.0.0.1:1",), 0))
    with pytest.raises(RemoteProtocolError, match="unexpected PunchGo"):
        member.receive_data(p.encode_message(p.PunchGo(target, TOKEN, ("10.0.0.1:1",), 0)))


def test_punching_oneself_is_a_protocol_error_on_both_sides() -> None:
    ident, member, relay = punching_pair()
    with pytest.raises(RemoteProtocolError, match="oneself"):
        relay.receive_data(p.encode_message(p.Punch(ident.peer_id)))
    with pytest.raises(RemoteProtocolError, match="ourselves"):
        member.receive_data(p.encode_message(p.PunchGo(ident.peer_id, TOKEN, ("10.0.0.1:1",), 0)))


def _go(**fields: object) -> bytes:
    body = {"peer": Identity.generate().peer_id, "token": TOKEN.hex(), "addrs": ["10.0.0.1:4433"]}
    body.update({"delay_ms": 0, **fields})
    return _frame(p.MsgType.PUNCH_GO, json.dumps(body).encode())


def _hello(**fields: object) -> bytes:
    return _frame(p.MsgType.HELLO, json.dumps({"version": 1, "nonce": TOKEN.hex(), **fields}).encode())


@pytest.mark.parametrize(
    ("frame", "error"),
    [
        (_go(addrs=["relay.example.org:4433"]), "not an IP literal"),
        (_go(addrs=["10.0.0.1"]), "no valid port"),
        (_go(addrs=["10.0.0.1:0"]), "no valid port"),
        (_go(addrs=["10.0.0.1:65536"]), "no valid port"),
        (_go(addrs=["::1:4433"]), "without brackets"),
        (_go(addrs=["[::1]:4433"] * 2 + [f"10.0.0.{i}:1" for i in range(5)]), "addresses, limit"),
        (_go(addrs=["1" * 100 + ":1"]), "characters, limit"),
        (_go(addrs=[7]), "not text"),
        (_go(addrs=[]), "without addresses"),
        (_go(delay_ms=p.MAX_PUNCH_DELAY_MS + 1), "delay over the limit"),
        (_go(delay_ms=-1), "out of range"),
        (_go(token="00" * 16), "must be 32 bytes"),
        (_frame(p.MsgType.PUNCH, b'{"target": "somebody"}'), "not a peer id"),
        (_hello(local=[f"10.0.0.{i}:1" for i in range(5)]), "addresses, limit"),
        (_hello(features=["x"] * 9), "at most 8 names"),
        (_hello(features=["x" * 33]), "at most 8 names"),
        (_hello(features="punch"), "wrong type"),
    ],
)
def test_hostile_punch_messages_raise_specific_errors(frame: bytes, error: str) -> None:
    with pytest.raises(RemoteProtocolError, match=error):
        MessageReader().feed(frame)


def test_addresses_are_read_in_canonical_form_and_ambiguous_ones_refused() -> None:
    (go,) = MessageReader().feed(_go(addrs=["[0:0::1]:4433", "10.0.0.1:0080", "[::1]:4433"]))
    assert isinstance(go, p.PunchGo)
    assert go.addrs == ("[::1]:4433", "10.0.0.1:80")  # two spellings of one address are one candidate
    with pytest.raises(RemoteProtocolError, match="not an IP literal"):  # octal or decimal? neither
        MessageReader().feed(_go(addrs=["010.0.0.1:1"]))
