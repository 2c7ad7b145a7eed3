"""`eldric-p2p node`: run a node with the roles its flags enable, until Ctrl-C."""

from __future__ import annotations

import argparse
from pathlib import Path

import trio

from eldric_p2p.node import DEFAULT_PORT, Node, NodeConfig, parse_host_port
from eldric_p2p.paths import default_data_dir
from eldric_p2p.tasks import open_nursery
from eldric_p2p.units import format_size, parse_size


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("node", help="run a node: gateway, data peer, worker, coordinator, relay")
    p.add_argument("--name", default="", help="name shown to other peers (default: from the peer id)")
    p.add_argument(
        "--data-dir", type=Path, default=None, help=f"identity, caches, models (default {default_data_dir()})"
    )
    p.add_argument("--listen", default=f"127.0.0.1:{DEFAULT_PORT}",
                   help=f"HOST:PORT of the HTTP API (default 127.0.0.1:{DEFAULT_PORT}; port 0 picks one)")  # fmt: skip
    p.add_argument("--models", nargs="+", action="extend", default=[], type=Path, metavar="PATH",
                   help="GGUF files or directories to serve as a data peer")  # fmt: skip
    p.add_argument("--memory", default=None, help="memory the worker offers, e.g. 1.5GiB, 800MiB, 2G")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--no-worker", action="store_true", help="do not offer this machine as a worker")
    p.add_argument(
        "--peer", action="append", default=[], metavar="HOST:PORT", help="bootstrap peer (repeatable)"
    )
    p.add_argument("--no-mdns", action="store_true", help="do not announce or browse on the LAN")
    p.add_argument(
        "--relay", action="append", default=[], metavar="HOST:PORT", help="edge relay to join (repeatable)"
    )
    p.add_argument(
        "--relay-listen", default=None, metavar="HOST:PORT", help="run an edge relay on this UDP address"
    )
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1 (repeatable)")  # fmt: skip
    p.add_argument("--v1-auth", choices=["open", "api-key", "member"], default=None,
                   help="who may use /v1 on a federated node: anyone, --api-key holders, or members (signed "
                        "requests; also --api-key holders if keys are given). Default: api-key if --api-key is "
                        "given, else member. A node in no federation checks only --api-key")  # fmt: skip
    p.add_argument("--upstream", action="append", default=[], metavar="NAME=URL",
                   help="offer model NAME served by an OpenAI-compatible server (vLLM, llama-server, Ollama)")  # fmt: skip


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    """NodeConfig from parsed flags. Raises UsageError for a bad size, address or device."""
    from eldric_p2p.api.backends.upstream import parse_upstream_spec
    from eldric_p2p.errors import UsageError

    device = args.device
    if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
        raise UsageError(f"--device {device!r}: use auto, cpu, cuda or cuda:N")
    if args.v1_auth == "api-key" and not args.api_key:
        raise UsageError("--v1-auth api-key needs at least one --api-key KEY")
    host, port = parse_host_port(args.listen, default_port=DEFAULT_PORT)
    return NodeConfig(
        name=args.name,
        data_dir=args.data_dir or default_data_dir(),
        listen_host=host,
        listen_port=port,
        models=list(args.models),
        memory=parse_size(args.memory) if args.memory else None,
        device=device,
        worker=not args.no_worker,
        peers=[parse_host_port(p, default_port=DEFAULT_PORT) for p in args.peer],
        mdns=not args.no_mdns,
        relays=[parse_host_port(r) for r in args.relay],
        relay_listen=parse_host_port(args.relay_listen) if args.relay_listen else None,
        api_keys=list(args.api_key),
        v1_auth=args.v1_auth,
        upstreams=[parse_upstream_spec(u) for u in args.upstream],
    )


def main(args: argparse.Namespace) -> int:
    config = config_from_args(args)

    async def run() -> None:
        node = Node(config)
        async with open_nursery() as nursery:
            port = await nursery.start(node.run)
            host = config.listen_host if config.listen_host not in ("0.0.0.0", "::") else "127.0.0.1"
            shown = f"[{host}]" if ":" in host else host
            print(
                f"eldric-p2p node {node.name} ({node.identity.peer_id}) serving on http://{shown}:{port}",
                flush=True,
            )
            print(f"  roles: {', '.join(config.roles)}", flush=True)
            if node.catalog is not None:
                for m in node.catalog.models.values():
                    print(f"  model {m.id}: {m.index.architecture}, {m.index.n_layers} layers, "
                          f"{format_size(m.version.size)}", flush=True)  # fmt: skip
            if node.worker is not None:
                w = node.worker
                offer = format_size(w.offered)
                print(
                    f"  worker: {w.device}, offers {offer}, pipeline links on port {w.link_port}", flush=True
                )
            if config.peers:
                print(f"  bootstrap peers: {', '.join(f'{h}:{p}' for h, p in config.peers)}", flush=True)
            if node.relay is not None and node.relay.address is not None:
                rhost, rport = node.relay.address
                print(f"  edge relay {node.identity.peer_id} on udp {rhost}:{rport}", flush=True)
            for member in node.members:
                print(f"  member of relay {member.host}:{member.port} (reconnects by itself)", flush=True)
            print(f"  mdns: {'on' if config.mdns else 'off'}", flush=True)
            m = node.membership
            if m.active and m.cert is not None and m.federation is not None:
                role = "admin" if m.is_admin else "member"
                print(
                    f"  federation {m.federation.name!r} ({m.id}): {role}; /v1 access: {node.v1_mode}",
                    flush=True,
                )
            else:
                print("  federation: none (open to anyone who reaches it; see `eldric-p2p federation init`)",
                      flush=True)  # fmt: skip

    trio.run(run)
    return 0
