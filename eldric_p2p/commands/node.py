"""`eldric-p2p node`: run a node with the roles its flags enable, until Ctrl-C."""

from __future__ import annotations

import argparse
import signal
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
        "--relay-listen",
        default=None,
        metavar="HOST:PORT",
        help="run an edge relay on this address (QUIC on UDP, its TCP lane on TCP, the same port)",
    )
    p.add_argument("--no-punch", action="store_true",
                   help="no UDP hole punching: peers behind NAT are reached only through relays")  # fmt: skip
    p.add_argument("--no-tcp-punch", action="store_true",
                   help="keep punched links on QUIC: no TCP connection through the NATs")  # fmt: skip
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1 (repeatable)")  # fmt: skip
    p.add_argument(
        "--v1-auth",
        choices=["open", "api-key", "member"],
        default=None,
        help="who may use /v1 on a federated node: anyone, --api-key holders, or members "
        "(signed requests; also --api-key holders if keys are given). Default: api-key if "
        "--api-key is given, else member. Outside a federation only --api-key counts",
    )
    p.add_argument(
        "--yield-when",
        choices=["never", "user-active", "gpu-busy"],
        default="never",
        help="owner first: move this worker's stages away while other processes use the "
        "CPUs (user-active) or a GPU (gpu-busy: NVML, nvidia-ml-py); default never",
    )
    p.add_argument(
        "--share-hours",
        default=None,
        metavar="START-END",
        help="serve the swarm only in these local hours, e.g. 18-08 (evenings and nights)",
    )
    p.add_argument("--drain-timeout", type=float, default=60.0, metavar="S",
                   help="on SIGTERM (systemctl stop), wait this long for the coordinators to move our "
                        "stages away before stopping (default 60); Ctrl-C stops at once")  # fmt: skip
    p.add_argument("--on-demand", action="store_true",
                   help="a request for a model no pipeline serves, but a data peer holds, deploys it (over the "
                        "swarm when it does not fit here)")  # fmt: skip
    p.add_argument("--model-ttl", default="30m", metavar="DURATION",
                   help="unload a model loaded on demand after this long unused, e.g. 10m, 2h (default 30m; "
                        "0: never); the least recently used go first when memory is needed")  # fmt: skip
    p.add_argument("--no-rebalance", action="store_true",
                   help="keep running models where they are when a worker joins (by default a model "
                        "moves, make before break, onto fewer stages once free memory allows)")  # fmt: skip
    p.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="requests that may wait for a pipeline headed here once its sessions are busy; "
                        "more get 429 with Retry-After (default 64)")  # fmt: skip
    p.add_argument("--keep-warm", type=float, default=None, metavar="S",
                   help="while a model generates here, keep the CPUs from idling between its steps for S "
                        "seconds after each (spinners at the lowest priority: no work waits for them, the "
                        "next step computes at full speed; costs power); default 1, off under a cgroup CPU "
                        "quota; 0 turns it off")  # fmt: skip
    p.add_argument("--upstream", action="append", default=[], metavar="NAME=URL",
                   help="offer model NAME served by an OpenAI-compatible server (vLLM, llama-server, Ollama)")  # fmt: skip


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    """NodeConfig from parsed flags. Raises UsageError for a bad size, address or device."""
    from eldric_p2p.api.backends.upstream import parse_upstream_spec
    from eldric_p2p.errors import UsageError
    from eldric_p2p.pipeline.owner import OwnerPolicy, parse_share_hours
    from eldric_p2p.units import parse_duration

    device = args.device
    if args.max_queue < 0:
        raise UsageError("--max-queue must be 0 or more")
    if args.keep_warm is not None and not 0 <= args.keep_warm <= 3600:
        raise UsageError("--keep-warm must be 0..3600 seconds")
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
        punch=not args.no_punch,
        tcp_punch=not args.no_tcp_punch,
        api_keys=list(args.api_key),
        v1_auth=args.v1_auth,
        owner=OwnerPolicy(
            yield_when=args.yield_when,
            share_hours=parse_share_hours(args.share_hours) if args.share_hours else None,
        ),
        upstreams=[parse_upstream_spec(u) for u in args.upstream],
        on_demand=args.on_demand,
        model_ttl=parse_duration(args.model_ttl, max_s=365 * 86400, allow_zero=True),
        max_queue=args.max_queue,
        rebalance=not args.no_rebalance,
        keep_warm=args.keep_warm,
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
            if config.owner is not None and config.owner.active and node.worker is not None:
                hours = config.owner.share_hours
                during = f", share hours {hours[0]:02d}-{hours[1]:02d}" if hours else ""
                print(f"  owner first: yield when {config.owner.yield_when}{during}", flush=True)
            fm = node.membership
            if fm.active and fm.cert is not None and fm.federation is not None:
                role = "admin" if fm.is_admin else "member"
                print(
                    f"  federation {fm.federation.name!r} ({fm.id}): {role}; /v1 access: {node.v1_mode}",
                    flush=True,
                )
            else:
                print("  federation: none (open to anyone who reaches it; see `eldric-p2p federation init`)",
                      flush=True)  # fmt: skip

            await stop_gracefully(node, args.drain_timeout)
            nursery.cancel_scope.cancel()

    trio.run(run)
    return 0


async def stop_gracefully(node: Node, timeout: float) -> None:  # noqa: ASYNC109 (the drain's bound)
    """Wait for SIGTERM or Ctrl-C. Ctrl-C (SIGINT) stops at once. SIGTERM (`systemctl stop`), if we hold
    stages, first drains: the coordinators move them away, their sessions finishing first, for at most
    `timeout` s. Another signal meanwhile stops at once."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        signum = None
        async for signum in signals:  # noqa: B007 (the first signal decides)
            break
        worker = node.worker
        if signum != signal.SIGTERM or worker is None or not worker.shards:
            return
        print(f"stopping: moving {len(worker.shards)} stage(s) to other workers first "
              f"(at most {timeout:.0f} s; Ctrl-C to stop now)", flush=True)  # fmt: skip
        async with trio.open_nursery() as inner:

            async def second_signal() -> None:
                async for _ in signals:
                    print("stopping now", flush=True)
                    inner.cancel_scope.cancel()

            inner.start_soon(second_signal)
            moved = await worker.drain("stopping", timeout)
            print(
                "all stages moved" if moved else f"{len(worker.shards)} stage(s) not moved in time",
                flush=True,
            )
            inner.cancel_scope.cancel()
