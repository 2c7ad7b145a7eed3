"""Hole punching sans-IO: two attempts passing probes in memory through simulated NATs, hostile probes, and
the relay's broker with its limits."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from eldric_p2p.errors import RemoteProtocolError
from eldric_p2p.net.identity import Identity
from eldric_p2p.net.relay import protocol as p
from eldric_p2p.net.relay.punch import (
    FLAG_HEARD,
    FLAG_LOW,
    MAX_HEARD,
    PROBE,
    PROBE_MAGIC,
    PROBE_SIZE,
    Party,
    PunchAttempt,
    PunchBroker,
    PunchLimits,
    attempt_id_of,
    is_probe,
    parse_probe_untrusted,
)

TOKEN = bytes(range(32))
IDS = sorted(Identity.generate().peer_id for _ in range(2))
LOW, HIGH = IDS  # LOW sorts first: the QUIC client
A_PUBLIC, B_PUBLIC = ("10.99.0.101", 40000), ("10.99.0.102", 50000)

Deliver = Callable[[str, tuple[str, int], float], bool]  # (sender, destination, now) -> does it arrive?


def run_pair(deliver: Deliver, *, a_delay: float = 0.0, b_delay: float = 0.0, until: float = 3.0) -> tuple[
    PunchAttempt, PunchAttempt, float | None
]:  # fmt: skip
    """Step both attempts on a 5 ms clock; a probe reaches the other side when `deliver` says so (one tick
    later). Returns both attempts and when both had confirmed (None: never)."""
    a = PunchAttempt(LOW, HIGH, TOKEN, [B_PUBLIC], now=0.0, delay=a_delay)
    b = PunchAttempt(HIGH, LOW, TOKEN, [A_PUBLIC], now=0.0, delay=b_delay)
    sides = {"a": (a, A_PUBLIC), "b": (b, B_PUBLIC)}
    in_flight: list[tuple[str, bytes, tuple[str, int]]] = []
    now = 0.0
    while now < until:
        arriving, in_flight = in_flight, []
        for to, data, source in arriving:
            sides[to][0].receive_probe_untrusted(parse_probe_untrusted(data), source, now)
        for name, (attempt, public) in sides.items():
            for data, dest in attempt.datagrams_to_send(now):
                if deliver(name, dest, now):
                    in_flight.append(("b" if name == "a" else "a", data, public))
        if a.confirmed and b.confirmed:
            return a, b, now
        now = round(now + 0.005, 3)
    return a, b, None


def test_two_attempts_confirm_each_other_and_the_lower_peer_id_is_the_client() -> None:
    a, b, done = run_pair(lambda sender, dest, now: True)
    assert done is not None and done <= 0.02  # probe, heard-probe: two ticks
    assert a.confirmed == B_PUBLIC and b.confirmed == A_PUBLIC
    assert a.heard == [B_PUBLIC] and b.heard == [A_PUBLIC]
    assert a.is_client and not b.is_client
    assert a.attempt_id == b.attempt_id == attempt_id_of(TOKEN)


def test_a_port_restricted_nat_opens_once_its_own_side_has_sent() -> None:
    """Each side's NAT drops the peer's probes until its own first probe went out; a late start on one side
    costs the probes sent before it, not the punch."""
    opened: dict[str, float] = {}

    def deliver(sender: str, dest: tuple[str, int], now: float) -> bool:
        opened.setdefault(sender, now)
        other = "b" if sender == "a" else "a"
        return other in opened and opened[other] < now  # the other's filter is open by now

    a, b, done = run_pair(deliver, b_delay=0.3)
    assert done is not None and 0.3 <= done <= 0.45
    assert a.probes_sent >= 6  # A probed into B's closed NAT while B waited


def test_probes_that_never_arrive_end_at_the_deadline_with_bounded_sending() -> None:
    a, b, done = run_pair(lambda sender, dest, now: False)
    assert done is None and a.confirmed is None and not a.heard
    assert a.datagrams_to_send(a.deadline) == []
    assert 45 <= a.probes_sent <= 52  # one candidate, every 50 ms for 2.5 s


def test_one_way_paths_never_confirm() -> None:
    a, b, done = run_pair(lambda sender, dest, now: sender == "a")
    assert done is None
    assert b.heard == [A_PUBLIC] and b.confirmed is None and a.confirmed is None


def _probe(flags: int, token: bytes = TOKEN, mac: bytes | None = None) -> bytes:
    from eldric_p2p.net.relay.punch import _mac

    aid = attempt_id_of(token)
    return PROBE.pack(PROBE_MAGIC, flags, aid, mac if mac is not None else _mac(token, flags, aid))


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (PROBE_MAGIC + b"\x00" * 10, "expected 29"),
        (_probe(0) + b"\x00", "expected 29"),
        (_probe(0x80), "unknown flags"),
        (b"\x00EPX" + _probe(0)[4:], "not a probe"),
    ],
)
def test_malformed_probes_are_refused(data: bytes, error: str) -> None:
    with pytest.raises(RemoteProtocolError, match=error):
        parse_probe_untrusted(data)


def test_forged_and_reflected_probes_are_refused() -> None:
    b = PunchAttempt(HIGH, LOW, TOKEN, [A_PUBLIC], now=0.0)
    with pytest.raises(RemoteProtocolError, match="bad MAC"):
        b.receive_probe_untrusted(parse_probe_untrusted(_probe(FLAG_LOW, mac=bytes(16))), A_PUBLIC, 0.0)
    other_mac = _probe(0, token=bytes(32 - i for i in range(32)))[-16:]
    forged = PROBE.pack(PROBE_MAGIC, FLAG_LOW | FLAG_HEARD, attempt_id_of(TOKEN), other_mac)
    with pytest.raises(RemoteProtocolError, match="bad MAC"):  # the right id, another token's MAC
        b.receive_probe_untrusted(parse_probe_untrusted(forged), A_PUBLIC, 0.0)
    (own, _), *_ = b.datagrams_to_send(0.0)  # B's own probe, sent back to it
    with pytest.raises(RemoteProtocolError, match="own role"):
        b.receive_probe_untrusted(parse_probe_untrusted(own), B_PUBLIC, 0.0)
    assert b.heard == [] and b.confirmed is None


def test_a_flood_of_probes_gets_bounded_answers_and_bounded_state() -> None:
    b = PunchAttempt(HIGH, LOW, TOKEN, [A_PUBLIC], now=0.0, delay=1.0)  # not probing by itself yet
    probe = parse_probe_untrusted(_probe(FLAG_LOW))
    for _ in range(1000):
        b.receive_probe_untrusted(probe, A_PUBLIC, 0.01)
    assert len(b.datagrams_to_send(0.01)) == 1  # one answer, not a thousand
    for _ in range(1000):
        b.receive_probe_untrusted(probe, A_PUBLIC, 0.02)
    assert b.datagrams_to_send(0.02) == []  # at most two answers per interval to one address
    for port in range(100):
        b.receive_probe_untrusted(probe, ("10.0.0.1", 1000 + port), 0.03)
    assert len(b.heard) == MAX_HEARD
    assert len(b.datagrams_to_send(1.0)) <= 1 + MAX_HEARD  # candidates and heard addresses, once


def test_probes_are_never_quic_and_attempts_need_two_peers() -> None:
    assert is_probe(_probe(0)) and len(_probe(0)) == PROBE_SIZE
    assert not is_probe(bytes([0xC0]) + b"\x00" * 40) and not is_probe(bytes([0x40]) + b"\x00" * 40)
    with pytest.raises(ValueError):
        PunchAttempt(LOW, LOW, TOKEN, [A_PUBLIC], now=0.0)
    with pytest.raises(ValueError):
        PunchAttempt(LOW, HIGH, TOKEN[:16], [A_PUBLIC], now=0.0)


# ---------------------------------------------------------------------------------------------- the broker


def party(peer_id: str, observed: tuple[str, int] = A_PUBLIC, **kw: object) -> Party:
    return Party(peer_id, observed, **kw)  # type: ignore[arg-type]


def ask(broker: PunchBroker, source: Party, target: Party | None, now: float) -> list[tuple[str, object]]:
    """`source` asks for a punch with `target` (None: HIGH, which the relay does not know)."""
    return broker.request(source, target.peer_id if target else HIGH, target, now)  # type: ignore[return-value]


def tokens() -> Callable[[int], bytes]:
    n = iter(range(1, 1000))
    return lambda size: bytes([next(n)]) * size


def test_the_broker_sends_both_members_each_others_addresses_and_a_common_start() -> None:
    broker = PunchBroker(token_source=tokens())
    a = party(LOW, A_PUBLIC, local=("192.168.1.11:40000",), rtt=0.010)
    b = party(HIGH, B_PUBLIC, local=("192.168.2.11:50000", "10.99.0.102:50000"), rtt=0.050)
    out = ask(broker, a, b, 0.0)
    token = bytes([1]) * 32
    assert out == [
        (LOW, p.PunchGo(HIGH, token, ("10.99.0.102:50000", "192.168.2.11:50000"), 20)),  # waits for B
        (HIGH, p.PunchGo(LOW, token, ("10.99.0.101:40000", "192.168.1.11:40000"), 0)),
    ]
    assert broker.pending == 1 and broker.brokered == 1
    # the peer asks too while it is pending: the same GO again, to it only
    assert ask(broker, b, a, 0.1) == [out[1]]
    assert broker.pending == 1
    # expired: a new punch, a new token
    again = ask(broker, a, b, 10.0)
    assert len(again) == 2 and again[0][1].token != token  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("target", "code"),
    [
        (None, p.RefuseCode.UNKNOWN_PEER),
        (party(LOW), p.RefuseCode.SELF),
        (party(HIGH, punches=False), p.RefuseCode.UNSUPPORTED),
        (party(HIGH, observed=None), p.RefuseCode.UNSUPPORTED),  # type: ignore[arg-type]
        (party(HIGH, guest=True), p.RefuseCode.FORBIDDEN),
    ],
)
def test_the_broker_refuses_impossible_punches(target: Party | None, code: str) -> None:
    broker = PunchBroker()
    out = ask(broker, party(LOW), target, 0.0)
    assert len(out) == 1 and out[0][0] == LOW
    assert isinstance(out[0][1], p.PunchFail) and out[0][1].code == code
    assert out[0][1].target == (target.peer_id if target else HIGH)  # always a peer id the member can read
    assert broker.pending == 0 and broker.refused == 1


def test_the_broker_bounds_pending_punches_and_request_rates() -> None:
    broker = PunchBroker(PunchLimits(max_per_member=2, burst=4, per_s=1.0, max_pending=3))
    others = [Identity.generate().peer_id for _ in range(6)]
    asker = party(LOW)
    codes = [
        ask(broker, asker, party(o, B_PUBLIC), 0.0)[0][1] for o in others[:4]
    ]  # 2 brokered, then busy
    assert [type(c).__name__ for c in codes] == ["PunchGo", "PunchGo", "PunchFail", "PunchFail"]
    assert codes[2].code == p.RefuseCode.BUSY  # type: ignore[union-attr]
    # the bucket is empty now: rate limited even where a punch would fit
    out = ask(broker, asker, party(others[4], B_PUBLIC), 0.0)
    assert out[0][1] == p.PunchFail(others[4], p.RefuseCode.RATE_LIMITED, "at most 1 punches per second")
    # the relay-wide bound
    ask(broker, party(others[4]), party(others[5], B_PUBLIC), 0.0)
    out = ask(broker, party(HIGH), party(Identity.generate().peer_id, B_PUBLIC), 0.0)
    assert out[0][1].code == p.RefuseCode.BUSY  # type: ignore[union-attr]
    # a member that leaves takes its pending punches and bucket with it
    broker.forget(LOW)
    assert broker.pending == 1
    assert isinstance(ask(broker, asker, party(others[0], B_PUBLIC), 0.0)[0][1], p.PunchGo)
