"""LAN discovery on loopback: real zeroconf instances in one trio process, and the peer table."""

from __future__ import annotations

import pytest
import trio
from peer_helpers import wait_for
from zeroconf import ServiceInfo

from eldric_p2p.net.discovery import (
    MAX_TXT_TOTAL,
    MAX_TXT_VALUE,
    SERVICE_TYPE,
    Announcement,
    PeerInfo,
    PeerTable,
    peer_info_from_service_untrusted,
    run_discovery,
)
from eldric_p2p.net.identity import Identity

LOOPBACK = ["127.0.0.1"]


def announcement(name: str, port: int, **kw: object) -> Announcement:
    return Announcement(peer_id=Identity.generate().peer_id, name=name, http_port=port, **kw)  # type: ignore[arg-type]


def test_three_nodes_find_each_other_and_a_stopped_one_leaves() -> None:
    async def main() -> None:
        anns = [announcement(f"node{i}", 8000 + i, roles=("worker",), memory_free=i * 10) for i in range(3)]
        tables = [PeerTable() for _ in anns]
        async with trio.open_nursery() as nursery:
            scopes = []
            for ann, table in zip(anns, tables, strict=True):
                scope = trio.CancelScope()
                scopes.append(scope)

                async def node(
                    ann: Announcement = ann,
                    table: PeerTable = table,
                    scope: trio.CancelScope = scope,
                    *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                ) -> None:
                    with scope:
                        await run_discovery(table, lambda: ann, interfaces=LOOPBACK, task_status=task_status)

                nursery.start_soon(node)
            with trio.fail_after(6):  # "within a few seconds", registration probing included
                await wait_for(tables, lambda: all(len(t) == 2 for t in tables))
            seen = tables[0].get(anns[1].peer_id)
            assert seen is not None and seen.source == "mdns"
            assert seen.name == "node1" and seen.http_port == 8001 and "127.0.0.1" in seen.addresses
            assert seen.fields["roles"] == ["worker"] and seen.fields["memory_free"] == 10
            assert anns[0].peer_id not in tables[0]  # a node does not list itself

            scopes[2].cancel()  # node2 stops: goodbye packets
            with trio.fail_after(3):
                await wait_for(tables, lambda: all(anns[2].peer_id not in t for t in tables[:2]))
            assert anns[1].peer_id in tables[0]
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_changed_announcement_reaches_the_others() -> None:
    async def main() -> None:
        a = announcement("a", 8100, memory_free=100)
        b = announcement("b", 8101)
        current = {"a": a}
        table_b = PeerTable()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: run_discovery(
                    PeerTable(), lambda: current["a"], interfaces=LOOPBACK, poll_interval=0.2
                )
            )
            nursery.start_soon(lambda: run_discovery(table_b, lambda: b, interfaces=LOOPBACK))
            with trio.fail_after(6):
                await wait_for([table_b], lambda: a.peer_id in table_b)
            current["a"] = Announcement(**{**a.__dict__, "memory_free": 5, "shards": ("qwen:0-12",)})
            with trio.fail_after(4):
                await wait_for([table_b], lambda: table_b.get(a.peer_id).fields["memory_free"] == 5)  # type: ignore[union-attr]
            peer = table_b.get(a.peer_id)
            assert peer is not None and peer.fields["shards"] == ["qwen:0-12"]
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_txt_record_stays_within_dns_sd_limits() -> None:
    ann = announcement(
        "x" * 1000,
        80,
        models=tuple(f"model-{i:03d}-" + "q" * 40 for i in range(100)),
        shards=tuple(f"s{i}" for i in range(500)),
        roles=("worker", "gateway"),
    )
    props = ann.txt_properties()
    assert all(len(k) + 1 + len(v.encode()) <= 255 for k, v in props.items())
    assert sum(len(k) + 2 + len(v.encode()) for k, v in props.items()) <= MAX_TXT_TOTAL
    assert len(props["name"]) == MAX_TXT_VALUE
    assert props["models_n"] == "100" and 0 < len(props["models"].split(",")) < 100
    assert props["roles"] == "worker,gateway"
    # what a browser parses back
    info = ServiceInfo(
        SERVICE_TYPE,
        f"{ann.peer_id}.{SERVICE_TYPE}",
        port=80,
        properties=props,
        parsed_addresses=["10.0.0.5"],
    )
    peer = peer_info_from_service_untrusted(info, now=1.0)
    assert peer is not None and peer.addresses == ("10.0.0.5",) and peer.fields["models_n"] == 100


def test_records_that_lie_about_their_peer_id_are_ignored() -> None:
    ann = announcement("liar", 80)
    other = Identity.generate().peer_id
    info = ServiceInfo(SERVICE_TYPE, f"{other}.{SERVICE_TYPE}", port=80, properties=ann.txt_properties())
    assert peer_info_from_service_untrusted(info, now=0.0) is None
    bad = ServiceInfo(SERVICE_TYPE, f"{other}.{SERVICE_TYPE}", port=80, properties={"id": "not-a-peer-id"})
    assert peer_info_from_service_untrusted(bad, now=0.0) is None


def test_peer_table_prefers_direct_sources_and_removes_per_source() -> None:
    table = PeerTable(own_peer_id="ep" + "a" * 26)
    pid = "ep" + "b" * 26
    table.upsert(PeerInfo(pid, name="via-relay", source="relay"))
    table.upsert(PeerInfo(pid, name="on-lan", source="mdns"))
    table.upsert(PeerInfo("ep" + "a" * 26, source="mdns"))  # ourselves: ignored
    assert len(table) == 1 and table.get(pid).name == "on-lan"  # type: ignore[union-attr]
    assert table.sources(pid) == ["mdns", "relay"]
    assert table.remove(pid, "mdns")
    assert table.get(pid).name == "via-relay"  # type: ignore[union-attr]
    table.replace_source("relay", [])
    assert pid not in table
    with pytest.raises(ValueError):
        table.upsert(PeerInfo(pid, source="carrier-pigeon"))


R1, R2 = "relay-a.example.org:4433", "[2001:db8::1]:4433"


def relayed(peer_id: str, name: str, now: float = 0.0) -> PeerInfo:
    return PeerInfo(peer_id, name=name, source="relay", last_seen=now)


def test_each_relay_keeps_its_own_peers_through_updates_and_disconnects() -> None:
    table = PeerTable(own_peer_id="ep" + "a" * 26)
    shared, only1, only2, late = ("ep" + c * 26 for c in "bcde")
    table.replace_source("relay", [relayed(shared, "s"), relayed(only1, "c")], via=R1)
    table.replace_source("relay", [relayed(shared, "s"), relayed(only2, "d")], via=R2)  # R1's stay
    assert {p.peer_id for p in table.peers()} == {shared, only1, only2}
    assert table.relays(shared) == [R1, R2] and table.relays(only1) == [R1] and table.relays(only2) == [R2]
    assert table.sources(shared) == ["relay"]  # the kind, once, however many relays list it
    assert len(table.peers("relay")) == 4  # an entry per relay that lists a peer
    assert {p.peer_id for p in table.peers("relay", via=R2)} == {shared, only2}
    assert all(p.source == "relay" for p in table.peers("relay"))

    # a new snapshot from R1 (only1 left it, late joined) touches none of R2's entries
    table.replace_source("relay", [relayed(shared, "s"), relayed(late, "e")], via=R1)
    assert only1 not in table and late in table and only2 in table and table.relays(shared) == [R1, R2]

    # R1 goes away: what only R1 listed goes, the peer R2 lists too stays, now through R2 alone
    table.replace_source("relay", [], via=R1)
    assert late not in table and only2 in table and table.relays(shared) == [R2]
    assert table.get(shared).via == R2  # type: ignore[union-attr]
    table.replace_source("relay", [], via=R2)
    assert len(table) == 0


def test_removing_a_peer_from_one_relay_leaves_the_others_entry() -> None:
    table = PeerTable()
    pid = "ep" + "f" * 26
    table.upsert(PeerInfo(pid, name="old", source="relay", last_seen=1.0, via=R1))
    table.upsert(PeerInfo(pid, name="new", source="relay", last_seen=2.0, via=R2))
    assert table.get(pid).name == "new"  # type: ignore[union-attr]  # the freshest announcement wins
    table.upsert(PeerInfo(pid, name="lan", source="mdns", last_seen=0.5))
    assert table.get(pid).name == "lan"  # type: ignore[union-attr]  # a direct source still beats any relay
    assert [i.name for i in table.entries(pid)] == ["lan", "old", "new"]
    assert table.remove(pid, "relay", via=R2) and not table.remove(pid, "relay", via=R2)
    assert table.relays(pid) == [R1] and table.sources(pid) == ["mdns", "relay"]
    table.upsert(PeerInfo(pid, name="back", source="relay", via=R2))
    assert table.remove(pid, "relay")  # no via: every relay's entry
    assert table.relays(pid) == [] and table.get(pid).name == "lan"  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="through a relay"):
        table.upsert(PeerInfo(pid, source="mdns", via=R1))
    with pytest.raises(ValueError, match="unknown peer source"):
        table.replace_source("carrier-pigeon", [], via=R1)
