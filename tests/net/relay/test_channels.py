"""The relay's forwarding channels in memory (channels.py): who may send on a channel, and its bounds."""

from __future__ import annotations

import itertools

import pytest

from eldric_p2p.errors import RemoteProtocolError
from eldric_p2p.net.identity import Identity
from eldric_p2p.net.relay import protocol as p
from eldric_p2p.net.relay.channels import CHANNEL_HEADER, ChannelLimits, ChannelTable, channel_header
from eldric_p2p.net.relay.punch import Party, PunchBroker

A, B, C = "a" * 52, "b" * 52, "c" * 52  # member names (the table does not parse peer ids)
ADDR = {A: ("203.0.113.1", 4000), B: ("198.51.100.7", 5000), C: ("192.0.2.9", 6000)}
PACKET = b"\x40" + b"q" * 60  # a short-header QUIC packet, as far as the relay can tell


def table(**limits: float) -> ChannelTable:
    ids = (i.to_bytes(8, "big") for i in itertools.count(1))
    return ChannelTable(ADDR.get, ChannelLimits(**limits), id_source=lambda n: next(ids))  # type: ignore[arg-type]


def test_a_datagram_goes_to_the_other_member_with_its_id_and_back() -> None:
    t = table()
    ids = t.open(A, B, now=0.0)
    assert ids is not None
    id_a, id_b = ids
    out = t.forward_untrusted(channel_header(id_a) + PACKET, ADDR[A], now=0.1)
    assert out == (channel_header(id_b) + PACKET, ADDR[B])
    back = t.forward_untrusted(channel_header(id_b) + PACKET, ADDR[B], now=0.2)
    assert back == (channel_header(id_a) + PACKET, ADDR[A])
    assert t.open(B, A, now=0.3) == (id_b, id_a)  # the pair's channel again, not a new one
    assert t.stats.forwarded == 2 and t.stats.opened == 1


def test_hostile_datagrams_are_dropped_and_counted() -> None:
    t = table()
    ids = t.open(A, B, now=0.0)
    assert ids is not None
    id_a, _ = ids
    assert t.forward_untrusted(channel_header(id_a) + PACKET, ADDR[C], now=0.1) is None  # not A's address
    assert t.stats.dropped_source == 1
    assert t.forward_untrusted(channel_header(b"\x00" * 8) + PACKET, ADDR[A], now=0.1) is None  # no channel
    assert t.forward_untrusted(channel_header(id_a) + b"\x40", ADDR[A], now=0.1) is None  # too short
    assert t.forward_untrusted(b"\x02" + id_a + PACKET, ADDR[A], now=0.1) is None  # not a channel datagram
    assert t.stats.dropped_unknown == 3 and t.stats.forwarded == 0


def test_a_member_that_left_takes_its_channels_with_it() -> None:
    t = table()
    ids = t.open(A, B, now=0.0)
    assert ids is not None and t.open(A, C, now=0.0) is not None
    t.forget(B)
    assert len(t) == 1
    assert t.forward_untrusted(channel_header(ids[0]) + PACKET, ADDR[A], now=0.1) is None


def test_gone_peer_address_drops_without_forwarding() -> None:
    gone = {A: ADDR[A]}
    t = ChannelTable(gone.get)
    ids = t.open(A, B, now=0.0)
    assert ids is not None
    assert t.forward_untrusted(channel_header(ids[0]) + PACKET, ADDR[A], now=0.1) is None


def test_limits_per_member_in_all_and_self() -> None:
    t = table(max_per_member=1, max_total=2)
    assert t.open(A, A, now=0.0) is None
    assert t.open(A, B, now=0.0) is not None
    assert t.open(A, C, now=0.0) is None  # A has its one channel
    assert t.open(C, "d" * 52, now=0.0) is not None
    assert t.open("e" * 52, "f" * 52, now=0.0) is None  # the relay has its two
    assert t.stats.refused == 3


def test_rate_limit_per_direction_then_refill() -> None:
    size = CHANNEL_HEADER + len(PACKET)
    t = table(rate=size * 10, burst=size * 2)  # two datagrams at once, then ten per second
    ids = t.open(A, B, now=0.0)
    assert ids is not None
    sent = [t.forward_untrusted(channel_header(ids[0]) + PACKET, ADDR[A], now=0.0) for _ in range(3)]
    assert [s is not None for s in sent] == [True, True, False] and t.stats.dropped_rate == 1
    assert t.forward_untrusted(channel_header(ids[1]) + PACKET, ADDR[B], now=0.0) is not None  # other way
    assert t.forward_untrusted(channel_header(ids[0]) + PACKET, ADDR[A], now=0.1) is not None  # refilled


def test_idle_channels_expire() -> None:
    t = table(idle_s=10)
    ids = t.open(A, B, now=0.0)
    assert ids is not None
    t.forward_untrusted(channel_header(ids[0]) + PACKET, ADDR[A], now=8.0)
    t.expire(now=15.0)  # 7 s since the last datagram
    assert len(t) == 1
    t.expire(now=18.5)
    assert len(t) == 0 and t.stats.expired == 1


def test_punch_go_carries_a_channel_only_when_given_and_checks_its_length() -> None:
    peer = Identity.generate().peer_id
    go = p.PunchGo(peer, b"t" * 32, ("198.51.100.7:5000",), 10)
    assert b"channel" not in p.encode_message(go)
    with_channel = p.PunchGo(peer, b"t" * 32, ("198.51.100.7:5000",), 10, b"\x01" * 8)
    frame = p.encode_message(with_channel)
    assert p.parse_message_untrusted(p.MsgType.PUNCH_GO, frame[p.HEADER.size :]) == with_channel
    bad = frame[p.HEADER.size :].replace(b'"channel":"0101010101010101"', b'"channel":"0101"')
    with pytest.raises(RemoteProtocolError):
        p.parse_message_untrusted(p.MsgType.PUNCH_GO, bad)


def test_the_broker_gives_a_channel_only_when_both_members_take_channels() -> None:
    a, b, c = (Identity.generate().peer_id for _ in range(3))
    addrs = {a: ("203.0.113.1", 4000), b: ("198.51.100.7", 5000), c: ("192.0.2.9", 6000)}
    channels = ChannelTable(addrs.get)
    broker = PunchBroker(channels=channels)
    party = {x: Party(x, addrs[x], forwards=x != c) for x in (a, b, c)}
    replies = dict(broker.request(party[a], b, party[b], now=0.0))
    go_a, go_b = replies[a], replies[b]
    assert isinstance(go_a, p.PunchGo) and isinstance(go_b, p.PunchGo)
    assert len(go_a.channel) == len(go_b.channel) == 8 and go_a.channel != go_b.channel
    out = channels.forward_untrusted(channel_header(go_a.channel) + PACKET, addrs[a], now=0.1)
    assert out == (channel_header(go_b.channel) + PACKET, addrs[b])
    replies = dict(broker.request(party[a], c, party[c], now=0.0))  # c takes no channels
    assert isinstance(replies[a], p.PunchGo) and replies[a].channel == b"" and len(channels) == 1
