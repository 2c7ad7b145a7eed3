"""Forwarding channels, sans-IO: the relay passes a QUIC connection's datagrams between two members unopened.

A spliced stream (OPEN/INCOMING) costs the relay a QUIC stack per member: every datagram is decrypted,
acknowledged, reassembled and encrypted again, two QUIC hops where one would do. A channel is the cheap path
for the same members: the two run one QUIC connection end to end, and the relay only swaps a header:

    channel datagram:  0x01 | channel id (8 bytes) | a QUIC packet of the members' own connection

Each member gets its own random id for the pair (in the PUNCH_GO the relay sends it, punch.py). A datagram
that reaches the relay with A's id, from A's address (the one A's relay connection uses now), leaves toward
B's address with B's id; everything else is dropped and counted. The first byte keeps channel datagrams
apart from QUIC packets (fixed bit 0x40) and punch probes (0x00). The relay never holds a datagram: nothing
to buffer, nothing to bound but the table and the rate.

Bounds (`ChannelLimits`): channels per member and in all, a token bucket of bytes per direction, and idle
expiry; a member's channels close when it leaves. The relay sees ciphertext only: the members' QUIC
connection is theirs, and the link handshake inside it authenticates both ends as on any path.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from eldric_p2p.net.relay.protocol import CHANNEL_ID_LEN

CHANNEL_MARK = 0x01
CHANNEL_HEADER = 1 + CHANNEL_ID_LEN
MIN_QUIC_PACKET = 21  # a short header, the smallest payload and its 16-byte tag: anything less is garbage

SocketAddress = Any


def channel_header(channel_id: bytes) -> bytes:
    return bytes((CHANNEL_MARK,)) + channel_id


def is_channel_datagram(data: bytes) -> bool:
    return len(data) > 0 and data[0] == CHANNEL_MARK


@dataclass(frozen=True)
class ChannelLimits:
    max_per_member: int = 16
    max_total: int = 1024
    idle_s: float = 60.0  # without a datagram either way; members keep theirs alive (punching.KEEPALIVE_S)
    rate: float = 64 * 1024 * 1024  # bytes per second per direction...
    burst: float = 4 * 1024 * 1024  # ...after a burst of this many


@dataclass
class ChannelStats:
    opened: int = 0
    refused: int = 0
    expired: int = 0
    forwarded: int = 0  # datagrams
    forwarded_bytes: int = 0
    dropped_unknown: int = 0  # no such channel, or too short
    dropped_source: int = 0  # from an address that is not the member's
    dropped_rate: int = 0


@dataclass(eq=False)
class _End:
    """One member's side of a channel: its datagrams carry `own` and go on to `peer` with `peer_id`."""

    member: str
    own: bytes
    peer: str
    peer_id: bytes
    tokens: float
    at: float


@dataclass(eq=False)
class _Channel:
    a: _End
    b: _End
    last: float


@dataclass
class ChannelTable:
    """The relay's channels. `open(a, b, now)` gives each member its id (the same ids again for a pair that
    has one); `forward_untrusted(data, source, now)` returns the datagram to send on and where, or None;
    `forget(member)` when a member leaves; `expire(now)` now and then.

    `address_of(member)` is where the relay reaches a member now (its relay connection's address), None if it
    is gone."""

    address_of: Callable[[str], SocketAddress | None]
    limits: ChannelLimits = field(default_factory=ChannelLimits)
    id_source: Callable[[int], bytes] = os.urandom
    stats: ChannelStats = field(default_factory=ChannelStats)
    _ends: dict[bytes, _End] = field(default_factory=dict)
    _pairs: dict[frozenset[str], _Channel] = field(default_factory=dict)

    def open(self, a: str, b: str, now: float) -> tuple[bytes, bytes] | None:
        """Ids for `a` and `b` (in that order), or None when a limit refuses a new channel."""
        key = frozenset((a, b))
        chan = self._pairs.get(key)
        if chan is not None:
            chan.last = now
            ends = {chan.a.member: chan.a, chan.b.member: chan.b}
            return ends[a].own, ends[b].own
        lim = self.limits
        count = self.per_member()
        if (
            a == b
            or len(self._pairs) >= lim.max_total
            or count.get(a, 0) >= lim.max_per_member
            or count.get(b, 0) >= lim.max_per_member
        ):
            self.stats.refused += 1
            return None
        id_a, id_b = self._fresh_id(), self._fresh_id()
        end_a = _End(a, id_a, b, id_b, lim.burst, now)
        end_b = _End(b, id_b, a, id_a, lim.burst, now)
        self._ends[id_a], self._ends[id_b] = end_a, end_b
        self._pairs[key] = _Channel(end_a, end_b, now)
        self.stats.opened += 1
        return id_a, id_b

    def _fresh_id(self) -> bytes:
        while True:
            cid = self.id_source(CHANNEL_ID_LEN)
            if cid not in self._ends:
                return cid

    def forward_untrusted(
        self, data: bytes, source: SocketAddress, now: float
    ) -> tuple[bytes, SocketAddress] | None:
        """The datagram for the other member, with its id, and its address; None (counted) to drop it."""
        if len(data) < CHANNEL_HEADER + MIN_QUIC_PACKET or data[0] != CHANNEL_MARK:
            self.stats.dropped_unknown += 1
            return None
        end = self._ends.get(bytes(data[1:CHANNEL_HEADER]))
        if end is None:
            self.stats.dropped_unknown += 1
            return None
        sender = self.address_of(end.member)
        if sender is None or tuple(sender[:2]) != tuple(source[:2]):
            self.stats.dropped_source += 1
            return None
        lim = self.limits
        end.tokens = min(lim.burst, end.tokens + (now - end.at) * lim.rate)
        end.at = now
        if end.tokens < len(data):
            self.stats.dropped_rate += 1
            return None
        target = self.address_of(end.peer)
        if target is None:
            self.stats.dropped_unknown += 1
            return None
        end.tokens -= len(data)
        self._pairs[frozenset((end.member, end.peer))].last = now
        self.stats.forwarded += 1
        self.stats.forwarded_bytes += len(data)
        return channel_header(end.peer_id) + data[CHANNEL_HEADER:], target

    def forget(self, member: str) -> None:
        """A member left: its channels close."""
        for key in [k for k in self._pairs if member in k]:
            self._drop(key)

    def expire(self, now: float) -> None:
        for key in [k for k, c in self._pairs.items() if now - c.last > self.limits.idle_s]:
            self._drop(key)
            self.stats.expired += 1

    def _drop(self, key: frozenset[str]) -> None:
        chan = self._pairs.pop(key)
        self._ends.pop(chan.a.own, None)
        self._ends.pop(chan.b.own, None)

    def per_member(self) -> dict[str, int]:
        count: dict[str, int] = {}
        for chan in self._pairs.values():
            for end in (chan.a, chan.b):
                count[end.member] = count.get(end.member, 0) + 1
        return count

    def __len__(self) -> int:
        return len(self._pairs)
