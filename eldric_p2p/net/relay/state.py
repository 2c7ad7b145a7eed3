"""The relay's books: its limits and counters, and what it keeps of one registered member (server.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

from eldric_p2p.net.relay import protocol as p
from eldric_p2p.net.relay.channels import ChannelLimits
from eldric_p2p.net.relay.control import Credential, RelayControl
from eldric_p2p.net.relay.punch import Party, PunchLimits
from eldric_p2p.net.relay.quic import QuicConn
from eldric_p2p.net.relay.tcplane import TcpLaneLimits


@dataclass(frozen=True)
class RelayLimits:
    max_members: int = 256
    max_guests: int = 32  # joiners registered with a ticket (federated relays only)
    max_streams_per_member: int = 16
    stream_window: int = 128 * 1024
    keepalive_s: float = 5.0
    dead_after_s: float = 15.0
    handshake_timeout_s: float = 10.0
    register_timeout_s: float = 10.0
    open_timeout_s: float = 10.0
    max_datagram_size: int = 1350
    outbox: int = 64  # control messages queued for one member before it counts as too slow
    punch: PunchLimits | None = field(default_factory=PunchLimits)  # None: broker no hole punches
    channels: ChannelLimits | None = field(default_factory=ChannelLimits)  # None: forward no channels
    tcp: TcpLaneLimits | None = field(default_factory=TcpLaneLimits)  # None: no TCP lane (tcplane.py)


@dataclass
class RelayStats:
    registered: int = 0
    rejected: int = 0  # failed REGISTER (bad proof, protocol error, timeout, relay full, not a member)
    rejected_not_member: int = 0  # federated relay: no valid certificate or ticket
    guests: int = 0  # joiners admitted with a ticket
    dropped_not_member: int = 0  # revoked, or its certificate or ticket expired, while registered
    dropped_dead: int = 0  # missed keepalives
    dropped_slow: int = 0  # control outbox overflowed
    streams_spliced: int = 0
    streams_refused: int = 0
    streams_forbidden: int = 0  # a guest's OPEN to someone other than its inviter (also in streams_refused)
    bytes_spliced: int = 0


@dataclass(eq=False)
class MemberState:
    peer_id: str
    public_key: bytes
    announcement: p.Announcement
    conn: QuicConn
    control: RelayControl
    outbox: trio.MemorySendChannel[bytes]
    last_heard: float
    streams: int = 0
    kill: trio.CancelScope = field(default_factory=trio.CancelScope)
    credential: Credential | None = None  # what a federated relay admitted it with
    guest_of: str | None = None  # a guest's inviter: the one peer it may open streams to
    rtt: float | None = None  # from the last answered keepalive
    ping: tuple[int, float] = (-1, 0.0)  # the last PING's seq and when it went

    def entry(self) -> p.Member:
        return p.Member(self.peer_id, self.public_key, self.announcement)

    def party(self) -> Party:
        addr = self.conn.remote_address
        return Party(self.peer_id, (str(addr[0]), int(addr[1])) if addr else None, self.control.local,
                     self.rtt, self.control.punches, self.guest_of is not None,
                     self.control.forwards)  # fmt: skip
