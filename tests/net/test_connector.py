"""Links by peer id: direct where an address answers, relayed otherwise; HTTP to a node behind NAT.

In one trio process on loopback: an edge relay, a data peer and three workers, all members of the relay and
found only through its directory (no `--peer`, no mDNS). "Site A" (w0, w1) and "site B" (w2) cannot reach each
other directly, and the data peer (which coordinates) cannot reach any worker directly: their connectors are
told so (`no_direct`), as a NAT would. A user notices: the deploy works, the cross-site links say `relayed`,
and greedy chat through the data peer equals one process token for token.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from eldric_p2p.commands.deploy import print_plan
from eldric_p2p.engine.generate import LocalModel, prompt_token_ids
from eldric_p2p.engine.sampling import SamplingParams
from eldric_p2p.engine.synthetic import write_synthetic_gguf
from eldric_p2p.errors import PeerUnavailable
from eldric_p2p.net.connector import Connector, PeerTransport, peer_url
from eldric_p2p.net.discovery import PeerInfo, PeerTable
from eldric_p2p.net.identity import Identity
from eldric_p2p.net.links import Link, serve_tcp_links
from eldric_p2p.node import Node, NodeConfig

MODEL = "tiny"
MiB = 1 << 20
FAST_RELAY = {"backoff_initial_s": 0.1, "backoff_max_s": 0.5, "announce_interval_s": 0.2}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("models")
    write_synthetic_gguf(d / f"{MODEL}.gguf", arch="qwen2", n_layers=8, hidden=64, ffn=128, seed=5)
    return d


@asynccontextmanager
async def federation(tmp: Path, model_dir: Path) -> AsyncIterator[dict[str, Node]]:
    fast: dict[str, Any] = {"listen_port": 0, "mdns": False, "peer_interval": 0.2}
    async with trio.open_nursery() as nursery:
        relay = Node(NodeConfig(name="relay", data_dir=tmp / "relay", worker=False,
                                relay_listen=("127.0.0.1", 0), **fast))  # fmt: skip
        await nursery.start(relay.run)
        assert relay.relay is not None and relay.relay.address is not None
        at = [("127.0.0.1", relay.relay.address[1])]
        nodes = {"relay": relay}
        for name in ("data", "w0", "w1", "w2"):
            cfg = NodeConfig(name=name, data_dir=tmp / name, relays=at, relay_options=FAST_RELAY,
                             memory=300 * MiB, worker=name != "data",
                             models=[model_dir] if name == "data" else [], **fast)  # fmt: skip
            nodes[name] = Node(cfg)
        ids = {n: node.identity.peer_id for n, node in nodes.items()}
        site = {"w0": "A", "w1": "A", "w2": "B", "data": "public"}
        for a in site:
            for b in site:
                if a != b and site[a] != site[b] and not (site[b] == "public"):
                    nodes[a].connector.no_direct.add(ids[b])  # sites take no inbound connections
        for name in site:
            await nursery.start(nodes[name].run)
        with trio.fail_after(10):
            while not all(len(nodes[n].peers.table) >= 3 for n in site):  # noqa: ASYNC110 (via the relay)
                await trio.sleep(0.05)
        try:
            yield nodes
        finally:
            nursery.cancel_scope.cancel()


def test_deploy_across_sites_links_relayed_and_chat_equals_one_process(
    tmp_path: Path, model_dir: Path
) -> None:
    local = LocalModel(model_dir / f"{MODEL}.gguf", max_ctx=256)
    params = SamplingParams.greedy(max_tokens=16)
    ids = prompt_token_ids(local.tokenizer, local.metadata, "Hello world the cat", raw=True)
    want = local.generate(ids, params)

    async def main() -> None:
        async with federation(tmp_path, model_dir) as nodes, httpx.AsyncClient(timeout=60) as c:
            data = nodes["data"]
            assert data.url is not None
            peers = {p["name"]: p for p in (await c.get(f"{data.url}/api/v1/peers")).json()["peers"]}
            assert peers["w2"]["source"] == "relay"
            (relay_status,) = (await c.get(f"{data.url}/api/v1/node")).json()["relays"]
            assert relay_status["registered"] and relay_status["peers"] == 3  # w0, w1, w2 in its directory
            assert peers["w2"]["url"] == peer_url(nodes["w2"].identity.peer_id, nodes["w2"].port or 0)
            body = {"model": MODEL, "workers": ["w0", "w1", "w2"], "max_ctx": 256}
            r = await c.post(f"{data.url}/api/v1/pipeline/deploy", json=body)
            assert r.status_code == 200, r.text
            # the coordinator reached every worker (load, status) through the relay only
            assert data.connector.stats["direct"] == 0 and data.connector.stats["relayed"] >= 3
            with trio.fail_after(10):
                while True:
                    st = (await c.get(f"{data.url}/api/v1/pipeline/status")).json()
                    links = [(s["worker"], s["link"]) for s in st["deployments"][0]["stages"]]
                    if all(link for _, link in links):
                        break
                    await trio.sleep(0.1)
            # w0 -> w1 inside site A; w1 -> w2 and w2 -> w0 (the tail's tokens) cross sites
            assert links == [("w0", "direct"), ("w1", "relayed"), ("w2", "relayed")]
            carriers = [s["link_transport"] for s in st["deployments"][0]["stages"]]
            assert carriers == ["tcp", "tcp", "tcp"], carriers  # a direct TCP link, then the relay's lane
            out = io.StringIO()
            print_plan(st["deployments"][0], out)
            assert out.getvalue().count("link relayed over tcp") == 2, out.getvalue()
            body = {"model": MODEL, "prompt": "Hello world the cat", "max_tokens": 16, "temperature": 0}
            with trio.fail_after(20):
                while True:  # the head's announcement reaches the data peer through the relay
                    r = await c.post(f"{data.url}/v1/completions", json=body)
                    if r.status_code != 404:
                        break
                    await trio.sleep(0.1)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == want.text
            assert data.connector.paths[nodes["w0"].identity.peer_id] == "relayed"  # the head, by HTTP
            assert nodes["w0"].connector.stats["http_served"] >= 2  # load, status, generate: HTTP over links
            # the workers fetched their ranges straight from the public data peer, not through the relay
            assert st["deployments"][0]["data_peers"] == [data.url]
            assert all(s["bytes_fetched"] > 0 for s in st["deployments"][0]["stages"])

    trio.run(main)


def test_direct_race_skips_a_dead_address_and_remembers_the_good_one(tmp_path: Path) -> None:
    server, me = Identity.generate(), Identity.generate()

    async def serve(link: Link) -> None:
        await link.send_all(b"hi " + link.peer_id.encode())

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(serve_tcp_links, server, "127.0.0.1", 0, serve)
            port = listeners[0].socket.getsockname()[1]
            table = PeerTable(me.peer_id)
            # 10.255.255.1 is not on this machine: its attempt hangs until the good one wins and cancels it
            table.upsert(PeerInfo(server.peer_id, "s", ("10.255.255.1", "127.0.0.1"), None, {}, "relay", 0.0))
            conn = Connector(me, table, direct_timeout=5.0)
            t0 = trio.current_time()
            link = await conn.open_link(server.peer_id, port=port)
            assert trio.current_time() - t0 < 2.0 and link.path == "direct"
            assert await link.receive_some() == b"hi " + me.peer_id.encode()
            await link.aclose()
            assert conn.paths[server.peer_id] == "direct"
            assert conn._candidates(server.peer_id, port, (), "link")[0] == ("127.0.0.1", port)
            conn.no_direct.add(server.peer_id)  # no relay configured: a clear error, not a hang
            with pytest.raises(Exception, match="no relay is configured"):
                await conn.open_link(server.peer_id, port=port)
            nursery.cancel_scope.cancel()

    trio.run(main)


class RefusingRelay:
    """Stands in for a RelayMember: records which relay a stream was asked of, and refuses it."""

    def __init__(self, address: str, tried: list[str], registered: bool = True) -> None:
        self.host, _, port = address.rpartition(":")
        self.port = int(port)
        self.address = address
        self.registered = registered
        self.tried = tried
        self.can_punch = False  # a relay that brokers no hole punches

    def punched(self, peer_id: str) -> None:
        return None

    async def open_stream(self, peer_id: str) -> Any:
        self.tried.append(self.address)
        raise PeerUnavailable(f"relay {self.address} refused a stream to {peer_id}")


def test_relayed_links_go_first_through_the_relays_that_list_the_peer() -> None:
    me, peer = Identity.generate(), Identity.generate().peer_id
    table = PeerTable(me.peer_id)
    for via in ("r3:1", "r2:1"):  # the peer is in the directories of r2 and r3, not of r1 or r4
        table.upsert(PeerInfo(peer, "s", (), 8080, {}, "relay", 0.0, via))
    tried: list[str] = []
    conn = Connector(me, table)
    relays = [RefusingRelay(a, tried, registered=a != "r3:1") for a in ("r1:1", "r2:1", "r3:1", "r4:1")]
    conn.members += relays  # type: ignore[arg-type]

    async def main() -> None:
        with pytest.raises(PeerUnavailable) as caught:
            await conn.open_link(peer)
        assert tried == ["r2:1", "r1:1", "r4:1"]  # listing relays first, each group in configured order
        assert "relay r3:1: not connected" in str(caught.value)

    trio.run(main)


def test_a_public_relay_that_is_also_the_data_peer_is_in_its_own_directory_and_deploy_works_behind_nat(
    tmp_path: Path, model_dir: Path
) -> None:
    """The common host layout: central IT runs relay + data peer on one public machine; the workers sit
    behind two NATs and know only the relay. A deploy asked of a worker behind NAT finds the data peer."""
    local = LocalModel(model_dir / f"{MODEL}.gguf", max_ctx=256)
    ids = prompt_token_ids(local.tokenizer, local.metadata, "the cat sat", raw=True)
    want = local.generate(ids, SamplingParams.greedy(max_tokens=12))
    fast: dict[str, Any] = {"listen_port": 0, "mdns": False, "peer_interval": 0.2}

    async def main() -> None:
        async with trio.open_nursery() as nursery, httpx.AsyncClient(timeout=60) as c:
            hub = Node(NodeConfig(name="hub", data_dir=tmp_path / "hub", worker=False,
                                  models=[model_dir], relay_listen=("127.0.0.1", 0), **fast))  # fmt: skip
            await nursery.start(hub.run)
            assert hub.relay is not None and hub.relay.address is not None
            at = [("127.0.0.1", hub.relay.address[1])]
            w = {
                name: Node(NodeConfig(name=name, data_dir=tmp_path / name, relays=at,
                                      relay_options=FAST_RELAY, memory=300 * MiB, **fast))  # fmt: skip
                for name in ("w0", "w1")
            }
            w["w0"].connector.no_direct.add(w["w1"].identity.peer_id)  # two NATs: no way in at either site
            w["w1"].connector.no_direct.add(w["w0"].identity.peer_id)
            for node in w.values():
                hub.connector.no_direct.add(node.identity.peer_id)
                await nursery.start(node.run)
            with trio.fail_after(10):
                while hub.identity.peer_id not in w["w0"].peers.table:  # noqa: ASYNC110 (the relay lists it)
                    await trio.sleep(0.05)
            assert w["w0"].peers.table.relays(hub.identity.peer_id) == [f"127.0.0.1:{hub.relay.address[1]}"]
            url = w["w0"].url
            body = {"model": MODEL, "workers": ["w0", "w1"], "max_ctx": 256}
            with trio.fail_after(20):
                while True:  # w1's announcement reaches w0 through the relay too
                    r = await c.post(f"{url}/api/v1/pipeline/deploy", json=body)
                    if r.status_code != 409 or "w1" not in r.text:
                        break
                    await trio.sleep(0.1)
            assert r.status_code == 200, r.text
            assert [s["worker"] for s in r.json()["stages"]] == ["w0", "w1"]
            ask = {"model": MODEL, "prompt": "the cat sat", "max_tokens": 12, "temperature": 0}
            r = await c.post(f"{url}/v1/completions", json=ask)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == want.text
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_http_clients_for_peer_urls_share_one_tls_context() -> None:
    """A coordinator makes a client per heartbeat: each must not load the CA store again (25 ms of CPU, taken
    from whatever the node computes at that moment)."""
    connector = Connector(Identity.generate(), PeerTable())
    first, second = PeerTransport(connector), PeerTransport(connector)
    assert first._pool._ssl_context is second._pool._ssl_context is not None
