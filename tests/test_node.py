from __future__ import annotations

import argparse
from pathlib import Path

import httpx
import pytest
import trio

from eldric_p2p.commands.node import add_parser, config_from_args
from eldric_p2p.engine.synthetic import write_synthetic_gguf
from eldric_p2p.errors import UsageError
from eldric_p2p.net.identity import Identity
from eldric_p2p.node import Node, NodeConfig, parse_host_port


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["node", *argv])


def test_every_cli_flag_lands_in_config(tmp_path: Path) -> None:
    cfg = config_from_args(parse([
        "--name", "lab1", "--data-dir", str(tmp_path), "--listen", "0.0.0.0:9000", "--models", "a.gguf", "dir",
        "--memory", "1.5GiB", "--device", "cuda:1", "--no-worker", "--peer", "10.0.0.2:8470", "--peer", "h",
        "--no-mdns", "--relay", "relay.example:4433", "--relay-listen", "[::]:4433",
    ]))  # fmt: skip
    assert cfg.name == "lab1" and cfg.data_dir == tmp_path
    assert (cfg.listen_host, cfg.listen_port) == ("0.0.0.0", 9000)
    assert cfg.models == [Path("a.gguf"), Path("dir")]
    assert cfg.memory == 1610612736 and cfg.device == "cuda:1"
    assert not cfg.worker and not cfg.mdns
    assert cfg.peers == [("10.0.0.2", 8470), ("h", 8470)]
    assert cfg.relays == [("relay.example", 4433)] and cfg.relay_listen == ("::", 4433)
    assert cfg.roles == ["gateway", "data-peer", "relay"]
    assert cfg.keep_warm is None  # the default: engine/warm.py decides
    assert config_from_args(parse(["--keep-warm", "0"])).keep_warm == 0
    assert config_from_args(parse(["--keep-warm", "2.5"])).keep_warm == 2.5
    assert cfg.punch and cfg.tcp_punch  # the defaults
    no_tcp = config_from_args(parse(["--no-tcp-punch", "--data-dir", str(tmp_path)]))
    assert no_tcp.punch and not no_tcp.tcp_punch
    assert not Node(no_tcp).connector.tcp_punches.enabled and Node(cfg).connector.tcp_punches.enabled


@pytest.mark.parametrize("argv", [["--memory", "lots"], ["--device", "tpu"], ["--listen", "h:99999"],
                                  ["--relay", "nohostport"], ["--keep-warm", "-1"],
                                  ["--keep-warm", "nan"]])  # fmt: skip
def test_bad_flags_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(UsageError):
        config_from_args(parse(argv))


def test_parse_host_port() -> None:
    assert parse_host_port("[::1]:80") == ("::1", 80)
    assert parse_host_port(":80") == ("0.0.0.0", 80)
    assert parse_host_port("example.org", default_port=5) == ("example.org", 5)


def test_node_serves_info_and_models(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    write_synthetic_gguf(tmp_path / "m" / "tiny.gguf")
    cfg = NodeConfig(name="n1", data_dir=tmp_path / "data", listen_port=0, models=[tmp_path / "m"], mdns=False)

    async def main() -> None:
        node = Node(cfg)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(node.run)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
                info = (await c.get("/api/v1/node")).json()
                assert info["name"] == "n1"
                assert info["peer_id"] == Identity.load_or_create(tmp_path / "data").peer_id
                assert info["roles"] == ["gateway", "data-peer", "worker"] and info["models"] == ["tiny"]
                reg = (await c.get("/api/v1/models/registry")).json()
                assert [m["id"] for m in reg["models"]] == ["tiny"]
                r = await c.get("/no/such/path")
                assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
            nursery.cancel_scope.cancel()

    trio.run(main)


@pytest.mark.slow  # about 6 s: zeroconf probes and announces each name before it is up
def test_three_nodes_find_each_other_by_mdns_and_a_stopped_one_leaves(tmp_path: Path) -> None:
    """No --peer flags: mDNS on loopback only. (Other nodes on this host may show up too: only ours count.)"""

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nodes, scopes = [], []
            for i in range(3):
                node = Node(NodeConfig(name=f"m{i}", data_dir=tmp_path / f"m{i}", listen_port=0, worker=False))

                async def run(node: Node = node, *, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
                    with trio.CancelScope() as scope:
                        async with trio.open_nursery() as inner:
                            await inner.start(node.run)
                            task_status.started(scope)

                scopes.append(await nursery.start(run))
                nodes.append(node)
            ids = {n.identity.peer_id for n in nodes}

            def sees(node: Node) -> set[str]:
                return {p.peer_id for p in node.peers.table.peers("mdns")} & ids

            t0 = trio.current_time()
            with trio.fail_after(10):
                while not all(sees(n) == ids - {n.identity.peer_id} for n in nodes):  # noqa: ASYNC110
                    await trio.sleep(0.1)
            found_s = trio.current_time() - t0
            # what a peer found by mDNS offers: its HTTP port, reachable at the announced address
            p1 = nodes[0].peers.table.get(nodes[1].identity.peer_id)
            assert p1 is not None and p1.http_port == nodes[1].port and "127.0.0.1" in p1.addresses
            async with httpx.AsyncClient() as c:
                listing = (await c.get(f"{nodes[0].url}/api/v1/peers")).json()["peers"]
            assert {p["name"] for p in listing if p["source"] == "mdns"} >= {"m1", "m2"}
            scopes[2].cancel()  # m2 stops: its goodbye removes it
            with trio.fail_after(10):
                while nodes[2].identity.peer_id in sees(nodes[0]) | sees(nodes[1]):  # noqa: ASYNC110
                    await trio.sleep(0.1)
            print(f"found in {found_s:.1f} s; gone in {trio.current_time() - t0 - found_s:.1f} s")
            nursery.cancel_scope.cancel()

    trio.run(main)
