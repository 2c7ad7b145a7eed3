"""Where a node keeps its state: identity, model files, shard cache, hash cache."""

from __future__ import annotations

import os
from pathlib import Path


def default_data_dir() -> Path:
    """`$ELDRIC_P2P_HOME`, else `$XDG_DATA_HOME/eldric-p2p`, else `~/.local/share/eldric-p2p`."""
    if env := os.environ.get("ELDRIC_P2P_HOME"):
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "eldric-p2p"


def models_dir(data_dir: Path | None = None) -> Path:
    """Folder where `eldric-p2p models fetch` places reference models."""
    return (data_dir or default_data_dir()) / "models"
