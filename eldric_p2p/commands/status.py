"""`eldric-p2p status`: a node's identity, its peers, its worker and the pipelines it coordinates."""

from __future__ import annotations

import argparse
import json
from typing import Any

from eldric_p2p.commands.deploy import add_node_arg, cli_auth, node_base, print_plan, raise_for_error


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="show a node's peers and pipelines")
    add_node_arg(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def gather(base: str, auth: Any = None) -> dict[str, Any]:
    """{"node", "peers", "worker", "pipelines"} from a node's HTTP API. Raises PeerUnavailable."""
    import httpx

    from eldric_p2p.errors import PeerUnavailable

    out: dict[str, Any] = {}
    try:
        with httpx.Client(base_url=base, timeout=10, auth=auth) as c:
            out["node"] = raise_for_error(c.get("/api/v1/node"), base)
            out["peers"] = raise_for_error(c.get("/api/v1/peers"), base).get("peers", [])
            w = c.get("/api/v1/worker/status")
            out["worker"] = w.json() if w.status_code == 200 else None
            out["pipelines"] = raise_for_error(c.get("/api/v1/pipeline/status"), base).get("deployments", [])
    except (httpx.HTTPError, ValueError) as exc:
        raise PeerUnavailable(f"{base}: {exc}") from exc
    return out


def main(args: argparse.Namespace) -> int:
    from eldric_p2p.units import format_size

    base = node_base(args.node)
    st = gather(base, cli_auth(args))
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    n = st["node"]
    print(f"node {n['name']}  peer id {n['peer_id']}  ({', '.join(n['roles'])})  {base}")
    if n.get("models"):
        print(f"  serves: {', '.join(n['models'])}")
    w = st["worker"]
    if w:
        print(
            f"  worker: {w['device']}, offers {format_size(w['offered'])}, {format_size(w['free'])} free, "
            f"link port {w['link_port']}"
        )
        for s in w["shards"]:
            print(
                f"    {s['deployment_id']}: {s['role']} layers {s['start']}-{s['end'] - 1} {s['state']}"
                f" ({format_size(s['needed'])}, fetched {format_size(s['bytes_fetched'])})"
            )
    print(f"peers ({len(st['peers'])}):")
    for p in st["peers"]:
        wk = p.get("worker") or {}
        mem = f", offers {format_size(wk['offered'])}" if wk.get("offered") else ""
        print(
            f"  {p['name']:<12} {p['peer_id']}  {p['url']}  {', '.join(p['roles'])}{mem}"
            f"  seen {p['last_seen_s']}s ago"
        )
    print(f"pipelines ({len(st['pipelines'])}):")
    for dep in st["pipelines"]:
        print_plan(dep)
    return 0
