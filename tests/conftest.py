from __future__ import annotations

from pathlib import Path

import pytest

from eldric_p2p.paths import models_dir

REFERENCE_FILES = {
    "qwen": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    "gemma": "gemma-3-270m-q4_k_m.gguf",
}


def _reference(name: str) -> Path:
    path = models_dir() / REFERENCE_FILES[name]
    if not path.exists():
        pytest.skip(f"reference model missing: run `eldric-p2p models fetch` ({path})")
    return path


@pytest.fixture(scope="session")
def qwen_path() -> Path:
    return _reference("qwen")


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    return _reference("gemma")
