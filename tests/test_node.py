from __future__ import annotations

import argparse
from pathlib import Path

import httpx
import pytest
import trio

from eldric_p2p.commands.node import add_parser, config_from_args
from eldric_p2p.errors import UsageError
from eldric_p2p.identity import Identity
from eldric_p2p.node import Node, NodeConfig, parse_host_port
from eldric_p2p.synthetic import write_synthetic_gguf


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


@pytest.mark.parametrize("argv", [["--memory", "lots"], ["--device", "tpu"], ["--listen", "h:99999"],
                                  ["--relay", "nohostport"]])  # fmt: skip
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
