"""UDP hole punching, sans-IO: the probe format, one member's `PunchAttempt`, and the relay's `PunchBroker`.

No sockets, no clock: every method takes `now`. The trio side is punching.py (the member) and server.py (the
relay), the messages PUNCH / PUNCH_GO / PUNCH_FAIL protocol.py's.

How a punch goes (like libp2p's DCUtR, with the relay as the coordinator):

1. Member A sends PUNCH {target: B} on its control stream. The relay (`PunchBroker.request`) checks limits
   and sends PUNCH_GO to both: the other's address as the relay sees it (the NAT's mapping of the socket the
   member reaches the relay from) and the other's own socket addresses (for two members behind one NAT), a
   fresh 32-byte `token`, and a `delay_ms` that makes both start at about the same moment (half the
   difference of their round trips to the relay).
2. Both send probes from the socket that reaches the relay (so the NAT mapping the relay saw is the one
   used) to every candidate every `interval`. A probe that gets through opens the receiver's side; the
   receiver answers at once with a probe flagged HEARD. A HEARD probe proves both directions for that
   address: the attempt is `confirmed`.
3. The member whose peer id sorts first is the QUIC client: it connects to the confirmed address; the other
   accepts a QUIC Initial only from an address it heard a valid probe from, during the attempt.
4. When no probe gets through and the PUNCH_GO carried a `channel`, the same two roles run the QUIC
   connection through the relay's forwarding channel instead (channels.py): still one QUIC hop end to end.

Probe (29 bytes, nothing else is a probe):

    magic b"\\x00EPP" | flags u8 (1: HEARD, 2: sender's peer id sorts first) | attempt id (8) | mac (16)

`attempt id` = sha256("eldric-p2p punch id" | token)[:8]; `mac` = HMAC-SHA256(token, magic | flags | id)[:16].
Only the two members (and the relay) know the token, so a stranger cannot forge a probe; the role bit stops a
probe reflected back at its sender. Probes prove nothing about identity: the link handshake over the QUIC
stream authenticates both peer ids, as over a relayed stream.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from eldric_p2p.errors import RemoteProtocolError
from eldric_p2p.net.relay.channels import ChannelTable
from eldric_p2p.net.relay.fields import SocketAddress, format_address
from eldric_p2p.net.relay.protocol import (
    MAX_PUNCH_ADDRESSES,
    NONCE_LEN,
    PunchFail,
    PunchGo,
    RefuseCode,
)

PROBE_MAGIC = b"\x00EPP"  # first byte 0: a QUIC packet always has the fixed bit (0x40) set
PROBE = struct.Struct("!4sB8s16s")  # magic, flags, attempt id, mac
PROBE_SIZE = PROBE.size  # 29
FLAG_HEARD = 1
FLAG_LOW = 2  # the sender's peer id sorts before the receiver's
MAX_HEARD = 8  # distinct addresses we take probes from in one attempt (peer-reflexive candidates)

PROBE_INTERVAL_S = 0.05
PUNCH_TIMEOUT_S = 2.5  # from PUNCH_GO to a working QUIC connection, both sides


def attempt_id_of(token: bytes) -> bytes:
    return hashlib.sha256(b"eldric-p2p punch id\x00" + token).digest()[:8]


def _mac(token: bytes, flags: int, attempt_id: bytes) -> bytes:
    return hmac.new(token, PROBE_MAGIC + bytes([flags]) + attempt_id, hashlib.sha256).digest()[:16]


def is_probe(data: bytes) -> bool:
    """Whether a datagram claims to be a probe (it may still be malformed)."""
    return data[: len(PROBE_MAGIC)] == PROBE_MAGIC


@dataclass(frozen=True)
class Probe:
    flags: int
    attempt_id: bytes
    mac: bytes


def parse_probe_untrusted(data: bytes) -> Probe:
    """A datagram starting with PROBE_MAGIC -> its fields. Raises RemoteProtocolError on any other size or
    unknown flags (the MAC is checked by the attempt the id names)."""
    if len(data) != PROBE_SIZE:
        raise RemoteProtocolError(f"probe of {len(data)} bytes, expected {PROBE_SIZE}")
    magic, flags, attempt_id, mac = PROBE.unpack(data)
    if magic != PROBE_MAGIC:
        raise RemoteProtocolError("not a probe")
    if flags & ~(FLAG_HEARD | FLAG_LOW):
        raise RemoteProtocolError(f"probe with unknown flags {flags:#x}")
    return Probe(flags, attempt_id, mac)


class PunchAttempt:
    """One member's side of one brokered punch.

    Feed probes for `attempt_id` to `receive_probe_untrusted`; send what `datagrams_to_send(now)` returns;
    call it again at `get_timer()` or after a probe arrived. `confirmed` is the peer's address once probes
    got through both ways; `heard` the addresses valid probes came from (a QUIC server accepts an Initial
    only from those). The attempt ends at `deadline`: the caller stops probing then.
    """

    def __init__(
        self,
        own_id: str,
        peer_id: str,
        token: bytes,
        candidates: Sequence[SocketAddress],
        *,
        now: float,
        delay: float = 0.0,
        timeout: float = PUNCH_TIMEOUT_S,
        interval: float = PROBE_INTERVAL_S,
    ) -> None:
        if len(token) != NONCE_LEN or own_id == peer_id:
            raise ValueError("a punch needs a 32-byte token and two different peers")
        self.peer_id = peer_id
        self.token = token
        self.attempt_id = attempt_id_of(token)
        self.low = own_id < peer_id
        self.is_client = self.low  # the QUIC client
        self.candidates = list(dict.fromkeys(candidates))[:MAX_PUNCH_ADDRESSES]
        self.start = now + delay
        self.deadline = now + timeout
        self.interval = interval
        self.heard: list[SocketAddress] = []
        self.confirmed: SocketAddress | None = None
        self.probes_sent = 0
        self.probes_received = 0
        self._next_send = self.start
        self._replies: list[SocketAddress] = []
        self._replied: dict[SocketAddress, float] = {}

    def _probe(self) -> bytes:
        flags = (FLAG_HEARD if self.heard else 0) | (FLAG_LOW if self.low else 0)
        return PROBE.pack(PROBE_MAGIC, flags, self.attempt_id, _mac(self.token, flags, self.attempt_id))

    def receive_probe_untrusted(self, probe: Probe, addr: SocketAddress, now: float) -> None:
        """A parsed probe for our attempt id from `addr`. Raises RemoteProtocolError for a bad MAC or our own
        probe reflected back; a probe from a new address beyond MAX_HEARD is ignored."""
        if not hmac.compare_digest(probe.mac, _mac(self.token, probe.flags, self.attempt_id)):
            raise RemoteProtocolError("probe with a bad MAC")
        if bool(probe.flags & FLAG_LOW) == self.low:
            raise RemoteProtocolError("probe with our own role (reflected?)")
        if addr not in self.heard:
            if len(self.heard) >= MAX_HEARD:
                return
            self.heard.append(addr)
        self.probes_received += 1
        if probe.flags & FLAG_HEARD:
            if self.confirmed is None:
                self.confirmed = addr
        elif now - self._replied.get(addr, -1e9) >= self.interval / 2 and addr not in self._replies:
            self._replies.append(addr)  # answer at once, at most twice per interval per address

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, SocketAddress]]:
        if now >= self.deadline:
            self._replies.clear()
            return []
        targets = self._replies
        self._replies = []
        for addr in targets:
            self._replied[addr] = now
        if now >= self._next_send:
            targets += [a for a in (*self.candidates, *self.heard) if a not in targets]
            self._next_send = max(self._next_send, now) + self.interval
        self.probes_sent += len(targets)
        probe = self._probe()
        return [(probe, addr) for addr in targets]

    def get_timer(self) -> float:
        return min(self._next_send, self.deadline)


# ---------------------------------------------------------------------------------------------- the relay


@dataclass(frozen=True)
class PunchLimits:
    window_s: float = PUNCH_TIMEOUT_S + 0.5  # a brokered punch counts as pending this long
    max_per_member: int = 4  # pending punches one member takes part in
    max_pending: int = 256  # pending punches on the relay
    burst: float = 8.0  # PUNCH requests a member may make at once...
    per_s: float = 1.0  # ...and then per second
    max_delay_ms: int = 500


@dataclass(frozen=True)
class Party:
    """What the relay knows of one member for a punch."""

    peer_id: str
    observed: SocketAddress | None  # the member's address as the relay's socket sees it
    local: tuple[str, ...] = ()  # from its HELLO
    rtt: float | None = None  # seconds, from keepalive PING/PONG
    punches: bool = True  # declared the punch feature
    guest: bool = False
    forwards: bool = False  # declared the forward feature: takes a channel in its PUNCH_GO


@dataclass
class _Pending:
    a: str
    b: str
    expires: float
    go: dict[str, PunchGo]


@dataclass
class PunchBroker:
    """The relay's punch policy: limits, then a PUNCH_GO for both members (or a PUNCH_FAIL for the asker).

    `request(source, target_id, target, now)` (`target` None: not connected) returns the messages to send
    as (recipient peer id, message); call
    `forget(peer_id)` when a member leaves. Bounded: `max_pending` punches, `max_per_member` per member, a
    token bucket per member; a repeated request for a pair already pending gets the same PUNCH_GO again.
    """

    limits: PunchLimits = field(default_factory=PunchLimits)
    token_source: Callable[[int], bytes] = os.urandom
    channels: ChannelTable | None = None  # where both forward: a channel for the pair in their PUNCH_GOs
    brokered: int = 0
    refused: int = 0
    _pending: dict[frozenset[str], _Pending] = field(default_factory=dict)
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)  # peer -> (tokens, at)

    def request(
        self, source: Party, target_id: str, target: Party | None, now: float
    ) -> list[tuple[str, PunchGo | PunchFail]]:
        lim = self.limits
        for key in [k for k, p in self._pending.items() if p.expires <= now]:
            del self._pending[key]

        def fail(code: str, reason: str) -> list[tuple[str, PunchGo | PunchFail]]:
            self.refused += 1
            return [(source.peer_id, PunchFail(target_id, code, reason))]

        if target is None:
            return fail(RefuseCode.UNKNOWN_PEER, "not connected to this relay")
        if target_id == source.peer_id:
            return fail(RefuseCode.SELF, "cannot punch to yourself")
        if source.guest or target.guest:
            return fail(RefuseCode.FORBIDDEN, "guests do not punch")
        if not target.punches or target.observed is None or source.observed is None:
            return fail(RefuseCode.UNSUPPORTED, f"{target.peer_id} does not take part in hole punching")
        tokens, at = self._buckets.get(source.peer_id, (lim.burst, now))
        tokens = min(lim.burst, tokens + (now - at) * lim.per_s)
        if tokens < 1:
            self._buckets[source.peer_id] = (tokens, now)
            return fail(RefuseCode.RATE_LIMITED, f"at most {lim.per_s:g} punches per second")
        self._buckets[source.peer_id] = (tokens - 1, now)
        key = frozenset((source.peer_id, target.peer_id))
        if (pending := self._pending.get(key)) is not None:
            return [(source.peer_id, pending.go[source.peer_id])]
        busy = sum(1 for p in self._pending.values() if source.peer_id in (p.a, p.b)) >= lim.max_per_member
        busy = busy or sum(1 for p in self._pending.values() if target.peer_id in (p.a, p.b)) >= (
            lim.max_per_member
        )
        if busy or len(self._pending) >= lim.max_pending:
            return fail(RefuseCode.BUSY, "too many punches pending")
        token = self.token_source(NONCE_LEN)
        slowest = max(source.rtt or 0.0, target.rtt or 0.0)
        ids = {source.peer_id: b"", target.peer_id: b""}
        if self.channels is not None and source.forwards and target.forwards:
            pair = self.channels.open(source.peer_id, target.peer_id, now)  # None: over a limit, no fallback
            if pair is not None:
                ids = {source.peer_id: pair[0], target.peer_id: pair[1]}
        go = {
            me.peer_id: PunchGo(other.peer_id, token, _candidates(other), self._delay_ms(slowest, me.rtt),
                                ids[me.peer_id])  # fmt: skip
            for me, other in ((source, target), (target, source))
        }
        self._pending[key] = _Pending(source.peer_id, target.peer_id, now + lim.window_s, go)
        self.brokered += 1
        return [(source.peer_id, go[source.peer_id]), (target.peer_id, go[target.peer_id])]

    def _delay_ms(self, slowest: float, rtt: float | None) -> int:
        """Wait half the difference of the round trips, so both start when the slower one hears the GO."""
        return max(0, min(self.limits.max_delay_ms, round((slowest - (rtt or 0.0)) / 2 * 1000)))

    def forget(self, peer_id: str) -> None:
        self._buckets.pop(peer_id, None)
        for key in [k for k in self._pending if peer_id in k]:
            del self._pending[key]

    @property
    def pending(self) -> int:
        return len(self._pending)


def _candidates(party: Party) -> tuple[str, ...]:
    assert party.observed is not None
    out = [format_address(party.observed)]
    out += [a for a in party.local if a not in out]
    return tuple(out[:MAX_PUNCH_ADDRESSES])
