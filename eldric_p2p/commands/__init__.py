"""The `eldric-p2p` subcommands, one module each; `cli.py` wires them into argparse. The top layer."""
