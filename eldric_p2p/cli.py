"""The `eldric-p2p` program: one argparse tree, one module per command under `eldric_p2p.commands`.

Each command module defines `add_parser(subparsers)` and `main(args) -> int`; it is imported only when
its command runs, so `eldric-p2p status` does not pay for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from eldric_p2p import __version__
from eldric_p2p.errors import EldricError

# command name -> module under eldric_p2p.commands, in the order `--help` lists them
COMMANDS = {
    "node": "node",
    "run": "run",
    "models": "models",
    "deploy": "deploy",
    "status": "status",
    "chat": "chat",
    "demo": "demo",
    "federation": "federation",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eldric-p2p",
        description="Peer-to-peer inference: run one GGUF model split by layers across several machines.",
    )
    parser.add_argument("--version", action="version", version=f"eldric-p2p {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        if name != only:
            # Cheap placeholder so `--help` lists every command without importing all of them.
            sub.add_parser(name, help=_summary(module))
            continue
        mod = _load(module)
        if mod is not None:
            mod.add_parser(sub)
    return parser


def _load(module: str):  # type: ignore[no-untyped-def]
    try:
        return importlib.import_module(f"eldric_p2p.commands.{module}")
    except ModuleNotFoundError as exc:
        if exc.name == f"eldric_p2p.commands.{module}":
            return None
        raise


def _summary(module: str) -> str:
    return {
        "node": "run a node: gateway, data peer, worker, coordinator, relay",
        "run": "run a model locally in one process (the reference path)",
        "models": "fetch and list reference models",
        "deploy": "deploy a model across the federation's workers",
        "status": "show a node's peers and pipelines",
        "chat": "send one chat prompt to a node",
        "demo": "start a local swarm serving a reference model",
        "federation": "create a federation, invite and revoke members",
    }.get(module, "")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=first)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.command:
        parser.print_help()
        return 2
    mod = _load(COMMANDS[args.command])
    if mod is None:
        parser.error(f"command {args.command!r} is not available in this build")
    try:
        return int(mod.main(args) or 0)
    except EldricError as exc:
        print(f"eldric-p2p {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
