"""`eldric-p2p federation init|invite|join|revoke|status`: make a federation, let nodes in, put them out.

Every subcommand works on the node of `--data-dir` (its identity and `federation/` folder) and needs no
running node, except `join`, which talks to the inviter. A running node picks the changes up by itself
within a second (it watches the folder) and pushes revocations to its peers.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from eldric_p2p.paths import default_data_dir

NODE_STATE = "node.json"  # written by a running node: where it can be reached (for invites)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("federation", help="create a federation, invite and revoke members")
    fsub = p.add_subparsers(dest="federation_command", metavar="SUBCOMMAND", required=True)

    def data_dir(q: argparse.ArgumentParser) -> None:
        q.add_argument("--data-dir", type=Path, default=None,
                       help=f"the node's identity and state (default {default_data_dir()})")  # fmt: skip

    init = fsub.add_parser("init", help="create a federation; this node becomes its first admin")
    init.add_argument("name", help="the federation's name, e.g. 'campus-labs'")
    data_dir(init)
    inv = fsub.add_parser("invite", help="print a one-line invite token for one new node")
    data_dir(inv)
    inv.add_argument("--ttl", default="24h", help="how long the token is good for (default 24h; 30m, 7d ...)")
    inv.add_argument("--uses", type=int, default=1, help="how many nodes may join with it (default 1)")
    inv.add_argument(
        "--admin", action="store_true", help="the joiner becomes an admin (root key holder only)"
    )
    inv.add_argument("--address", action="append", default=[], metavar="HOST:PORT",
                     help="HTTP address the joiner reaches this node at (default: what the running node "
                          "listens on)")  # fmt: skip
    inv.add_argument("--relay", action="append", default=[], metavar="HOST:PORT",
                     help="relay the joiner may come through (default: the node's relays)")  # fmt: skip
    inv.add_argument("--relay-only", action="store_true",
                     help="name no HTTP address: the joiner comes through a relay (the inviter is behind "
                          "NAT, or its HTTP port is not for the world)")  # fmt: skip
    join = fsub.add_parser("join", help="enrol this node with an invite token (contacts the inviter)")
    join.add_argument("token", help="the token `federation invite` printed")
    data_dir(join)
    join.add_argument("--name", default="", help="how the inviter lists this node")
    join.add_argument("--timeout", type=float, default=60.0, help="seconds to reach the inviter (default 60)")
    rev = fsub.add_parser(
        "revoke", help="put a member out of the federation (reaches every member in seconds)"
    )
    rev.add_argument("peer_id", help="the member's peer id (see `federation status`)")
    data_dir(rev)
    st = fsub.add_parser("status", help="federation id, this node's membership, members, revoked")
    data_dir(st)
    st.add_argument("--json", action="store_true", help="print one JSON object")


def _membership(args: argparse.Namespace, *, create_identity: bool = False):  # type: ignore[no-untyped-def]
    from eldric_p2p.errors import UsageError
    from eldric_p2p.net.federation.store import Membership
    from eldric_p2p.net.identity import KEY_FILE, Identity

    data_dir = args.data_dir or default_data_dir()
    if not create_identity and not (Path(data_dir) / KEY_FILE).exists():
        raise UsageError(f"{data_dir} holds no node identity: start `eldric-p2p node --data-dir "
                         f"{data_dir}` once, or run `federation init` / `join` there")  # fmt: skip
    identity = Identity.load_or_create(data_dir)
    return data_dir, identity, Membership(data_dir, identity)


def _reachable(data_dir: Path) -> tuple[list[str], list[str]]:
    """(HTTP addresses, relays) the running node of `data_dir` wrote down at its start."""
    try:
        state = json.loads((Path(data_dir) / NODE_STATE).read_text())
    except (FileNotFoundError, ValueError):
        return [], []
    http = [a for a in state.get("http", []) if isinstance(a, str)]
    relays = [a for a in state.get("relays", []) if isinstance(a, str)]
    return http, relays


def main(args: argparse.Namespace) -> int:
    from eldric_p2p.errors import UsageError
    from eldric_p2p.net.federation.certs import Issuer, create_root, expiry_text
    from eldric_p2p.net.federation.invites import create_invite, parse_ttl

    cmd = args.federation_command
    if cmd == "init":
        data_dir, identity, m = _membership(args, create_identity=True)
        if m.federation is not None:
            raise UsageError(f"{data_dir} is already in federation {m.id} ({m.federation.name})")
        key, root = create_root(args.name)
        from cryptography.hazmat.primitives import serialization

        root_pem = root.public_bytes(serialization.Encoding.PEM)
        chain = Issuer(key, root).issue(identity.public_key, ("member", "admin"))
        m.save(root_pem, chain, root_key=key)
        m.record_issued(m.cert, "(this node)")
        print(f"federation {args.name!r} created: id {m.id}")
        print(f"  this node {identity.peer_id} is its first admin")
        print(f"  root key: {m.dir / 'root.key'} (keep it safe: whoever holds it can make admins)")
        print("  next: start the node with this --data-dir, then `eldric-p2p federation invite` per new node")
        return 0
    if cmd == "invite":
        data_dir, identity, m = _membership(args)
        http, relays = _reachable(data_dir)
        invite = create_invite(
            m,
            addresses=[] if args.relay_only else args.address or http,
            relays=args.relay or relays,
            ttl_s=parse_ttl(args.ttl),
            uses=args.uses,
            admin=args.admin,
        )
        print(invite.to_token())
        return 0
    if cmd == "join":
        import trio

        from eldric_p2p.net.federation.service import join_federation

        data_dir, identity, _ = _membership(args, create_identity=True)
        m = trio.run(
            lambda: join_federation(args.token, identity, data_dir, name=args.name, timeout=args.timeout)
        )
        assert m.cert is not None and m.federation is not None
        role = "an admin" if m.is_admin else "a member"
        print(f"joined federation {m.federation.name!r} ({m.id}) as {role}: {identity.peer_id}")
        print(f"  certificate valid until {expiry_text(m.cert.not_after)}; renewed by the running node")
        return 0
    if cmd == "revoke":
        _, _, m = _membership(args)
        record = m.revoke(args.peer_id)
        print(f"revoked {record.peer_id} from federation {m.id}; a running node pushes it to every member")
        return 0
    _, identity, m = _membership(args)
    status = m.status()
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    _print_status(status)
    return 0


def _print_status(s: dict[str, Any]) -> None:
    from eldric_p2p.net.federation.certs import expiry_text

    if s["federation"] is None:
        print(f"node {s['peer_id']} is in no federation (`eldric-p2p federation init NAME` or `join TOKEN`)")
        return
    print(f"federation {s['name']!r} ({s['federation']})")
    member = s.get("member")
    if member:
        left = (member["not_after"] - time.time()) / 86400
        roles = ", ".join(member["roles"])
        print(f"  this node {s['peer_id']}: {roles}; certificate until {expiry_text(member['not_after'])} "
              f"({left:.1f} days){'; holds the root key' if s['root_key'] else ''}")  # fmt: skip
    else:
        print(f"  this node {s['peer_id']}: no valid certificate")
    if s["members"]:
        print(f"  members issued here ({len(s['members'])}):")
        for pid, rec in sorted(s["members"].items()):
            gone = " REVOKED" if pid in s["revoked"] else ""
            print(f"    {pid}  {rec.get('name', '')[:24]:24} {','.join(rec.get('roles', []))}  "
                  f"until {expiry_text(rec['not_after'])}{gone}")  # fmt: skip
    print(f"  revoked ({len(s['revoked'])}): {', '.join(s['revoked']) or '-'}")
