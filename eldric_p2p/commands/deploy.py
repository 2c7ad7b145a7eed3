"""`eldric-p2p deploy MODEL`: ask a node to plan and deploy a model over the workers it knows."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from eldric_p2p.node import DEFAULT_PORT

DEFAULT_NODE = os.environ.get("ELDRIC_P2P_NODE", f"http://127.0.0.1:{DEFAULT_PORT}")


def add_node_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--node", default=DEFAULT_NODE, help=f"HTTP address of any node (default {DEFAULT_NODE})")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="sign requests as the node of this data dir when it is in a federation (default: "
                        "$ELDRIC_P2P_HOME or ~/.local/share/eldric-p2p)")  # fmt: skip


def cli_auth(args: argparse.Namespace) -> Any:
    """The httpx auth that signs as the node of `--data-dir`, or None when that node is in no federation.

    Never creates an identity: a dir without one simply sends unsigned requests."""
    from eldric_p2p.net.federation.httpauth import SignedAuth
    from eldric_p2p.net.federation.store import Membership
    from eldric_p2p.net.identity import KEY_FILE, Identity
    from eldric_p2p.paths import default_data_dir

    data_dir = getattr(args, "data_dir", None) or default_data_dir()
    if not (Path(data_dir) / KEY_FILE).exists() or not (Path(data_dir) / "federation").is_dir():
        return None
    identity = Identity.load_or_create(data_dir)
    membership = Membership(data_dir, identity)
    return SignedAuth(identity.with_membership(membership)) if membership.active else None


def node_base(url: str) -> str:
    return (url if "://" in url else f"http://{url}").rstrip("/")


def raise_for_error(resp: Any, what: str) -> dict[str, Any]:
    """The JSON body of a 2xx answer; raises the matching EldricError for an error answer."""
    from eldric_p2p.api.backends.remote import exception_of
    from eldric_p2p.errors import PeerUnavailable

    try:
        body = resp.json()
    except ValueError:
        raise PeerUnavailable(f"{what}: HTTP {resp.status_code} without JSON") from None
    if resp.status_code >= 400:
        raise exception_of(body)
    return body


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("deploy", help="deploy a model across the federation's workers")
    p.add_argument("model", help="model id as a data peer serves it (file stem), or a reference model name")
    p.add_argument("--workers", default=None, help="comma-separated worker names (in order: first = head)")
    add_node_arg(p)
    p.add_argument(
        "--data-peer",
        action="append",
        default=None,
        metavar="URL",
        help="data peer (default: any that serves it)",
    )
    p.add_argument("--strategy", default="proportional", choices=["proportional", "fewest-hops"])
    p.add_argument("--weights", default="auto", help="auto | native | f32 | bf16 | f16")
    p.add_argument("--ctx", type=int, default=4096, help="context tokens per session (default 4096)")
    p.add_argument(
        "--sessions", type=int, default=4, help="concurrent sessions to reserve KV memory for (default 4)"
    )
    p.add_argument("--replicas", type=int, default=1,
                   help="pipelines of the model on disjoint workers, as many as memory allows (default "
                        "1): a session takes the best free one; one that fails resumes on another")  # fmt: skip
    p.add_argument("--timeout", type=float, default=900, help="seconds to wait for every shard to be ready")
    p.add_argument("--json", action="store_true", help="print the deployment as JSON")


def print_plan(dep: dict[str, Any], out: Any = sys.stdout) -> None:
    from eldric_p2p.units import format_size

    print(
        f"{dep['id']}: {dep['model']} {dep['state']} ({dep['n_layers']} layers, {len(dep['stages'])} stages; "
        f"{dep.get('note', '')})",
        file=out,
    )
    for s in dep["stages"]:
        hb = s.get("last_heartbeat_s")
        print(
            f"  stage {s['index']} {s['role']:<6} {s['worker']:<12} layers {s['start']:>3}-{s['end'] - 1:<3} "
            f"({s['layers']:>2})  {format_size(s['memory']):>10}  {s['state']:<8} fetched "
            f"{format_size(s['bytes_fetched'])}"
            + (f"  heartbeat {hb:.1f}s ago" if hb is not None else "")
            + (f"  link {s['link']}" if s.get("link") else "")  # to the next stage: direct|punched|relayed
            + (f" over {s['link_transport']}" if s.get("link") and s.get("link_transport") else ""),
            file=out,
        )


def main(args: argparse.Namespace) -> int:
    import httpx
    import trio

    from eldric_p2p.commands.progress import deploy_with_progress
    from eldric_p2p.errors import PeerUnavailable

    body: dict[str, Any] = {
        "model": args.model,
        "strategy": args.strategy,
        "weights": args.weights,
        "max_ctx": args.ctx,
        "sessions": args.sessions,
        "replicas": args.replicas,
    }
    if args.workers:
        body["workers"] = [w.strip() for w in args.workers.split(",") if w.strip()]
    if args.data_peer:
        body["data_peers"] = [node_base(u) for u in args.data_peer]
    base = node_base(args.node)

    async def run() -> httpx.Response:
        async with httpx.AsyncClient(timeout=args.timeout + 30, auth=cli_auth(args)) as client:
            if args.json:
                return await client.post(f"{base}/api/v1/pipeline/deploy", json=body)
            return await deploy_with_progress(client, base, body)

    try:
        resp = trio.run(run)
    except httpx.HTTPError as exc:
        raise PeerUnavailable(f"{base}: {exc}") from exc
    dep = raise_for_error(resp, base)
    if args.json:
        print(json.dumps(dep, indent=2))
    else:
        for one in dep.get("replicas") or [dep]:
            print_plan(one)
    return 0
