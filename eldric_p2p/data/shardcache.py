"""Shard cache: a sparse local copy of a remote GGUF file holding only the tensors a worker fetched.

    <cache_root>/<model_id>/model.gguf       same size and offsets as the remote file; holes cost no disk
    <cache_root>/<model_id>/manifest.json    file size, sha256, header length and hash, verified tensor hashes
    <cache_root>/<model_id>/.lock            flock'd while the manifest is read-modified-written

Because offsets are the remote file's, `GGUFFile(cache.path)` reads a cached shard with the same code as a
local model file; only tensors listed in the manifest hold real bytes (the rest read as zeros). The manifest
is the single source of truth: a tensor is listed only after its bytes matched the published sha256.
Blocking methods (file I/O) are meant to be called through `trio.to_thread.run_sync`.

`parse_header_cached` parses a GGUF header once per process (keyed by its sha256 and the file size): a
vocabulary-heavy header costs 0.3-0.5 s to parse, and the fetcher, the cache and the loader all need it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import mmap
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from eldric_p2p.data.gguf_index import GGUFIndex, TensorInfo, parse_gguf_untrusted
from eldric_p2p.errors import GGUFFormatError, UsageError

_SAFE_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+-]{0,199}$")
MANIFEST_VERSION = 1
PARSED_HEADERS_KEPT = 2  # a parsed 150k-token vocabulary holds ~30 MB of Python objects

_parsed: OrderedDict[tuple[str, int], GGUFIndex] = OrderedDict()
_parsed_lock = threading.Lock()


def parse_header_cached(
    header: bytes | memoryview, *, file_size: int, digest: str | None = None
) -> GGUFIndex:
    """`parse_gguf_untrusted(header, file_size=...)`, parsed once per (header sha256, file size) per process.

    The returned index is shared: treat it as read-only. `digest` is the header's sha256 hex when the caller
    has it. Raises what `parse_gguf_untrusted` raises (GGUFFormatError, TruncatedHeader); failures are not
    cached. Blocking (0.3-0.5 s on a miss for a vocabulary-heavy header).
    """
    key = (digest or hashlib.sha256(header).hexdigest(), file_size)
    with _parsed_lock:
        index = _parsed.get(key)
        if index is not None:
            _parsed.move_to_end(key)
            return index
    index = parse_gguf_untrusted(header, file_size=file_size)
    with _parsed_lock:
        _parsed[key] = index
        while len(_parsed) > PARSED_HEADERS_KEPT:
            _parsed.popitem(last=False)
    return index


def parsed_header(digest: str, file_size: int) -> GGUFIndex | None:
    """The index `parse_header_cached` holds for a header with this sha256 hex and file size, or None."""
    with _parsed_lock:
        return _parsed.get((digest, file_size))


def forget_parsed_headers() -> None:
    """Empty the process-wide parsed-header cache (benchmarks measuring a cold start call this)."""
    with _parsed_lock:
        _parsed.clear()


def check_model_id(model_id: str) -> str:
    """A model id usable as a single path component. Raises UsageError."""
    if not _SAFE_ID.match(model_id) or ".." in model_id:
        raise UsageError(f"model id {model_id!r} is not a plain name (letters, digits, . _ + -)")
    return model_id


class ShardCache:
    """The sparse copy of one model under `<cache_root>/<model_id>/`."""

    def __init__(self, cache_root: str | os.PathLike[str], model_id: str) -> None:
        self.dir = Path(cache_root) / check_model_id(model_id)
        self.path = self.dir / "model.gguf"
        self.manifest_path = self.dir / "manifest.json"
        self.manifest: dict[str, Any] = self._read_manifest()

    # --- manifest -------------------------------------------------------------------------------------
    def _read_manifest(self) -> dict[str, Any]:
        try:
            m = json.loads(self.manifest_path.read_text())
        except (OSError, ValueError):
            return {}
        if (
            not isinstance(m, dict)
            or m.get("version") != MANIFEST_VERSION
            or not isinstance(m.get("tensors"), dict)
        ):
            return {}
        return m

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write_manifest(self, m: dict[str, Any]) -> None:
        tmp = self.manifest_path.with_name(f"manifest.json.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(m, indent=1, sort_keys=True))
        os.replace(tmp, self.manifest_path)
        self.manifest = m

    @property
    def verified(self) -> dict[str, str]:
        """Tensor name -> sha256 of every tensor whose bytes in the cache file were verified."""
        return dict(self.manifest.get("tensors", {}))

    # --- header -----------------------------------------------------------------------------------------
    def index(self) -> GGUFIndex | None:
        """Index parsed from the cached header, or None when there is no usable cache."""
        m = self.manifest
        size, header = m.get("file_size"), m.get("header_bytes")
        if not isinstance(size, int) or not isinstance(header, int):
            return None
        try:
            with open(self.path, "rb") as f:
                if os.fstat(f.fileno()).st_size != size:
                    return None
                prefix = f.read(header)
            digest = hashlib.sha256(prefix).hexdigest()
            if digest != m.get("header_sha256"):
                return None
            return parse_header_cached(prefix, file_size=size, digest=digest)
        except (OSError, GGUFFormatError):
            return None

    def covers(self, start: int, end: int) -> bool:
        """True when every tensor of layers [start, end) is cached and verified (no network needed)."""
        index = self.index()
        if index is None or not 0 <= start < end <= index.n_layers:
            return False
        have = self.manifest.get("tensors", {})
        return all(t.name in have for t in index.assignment_tensors(start, end))

    def prepare(self, *, file_size: int, header: bytes, sha256: str | None) -> None:
        """Make the cache a sparse file of `file_size` bytes starting with `header`.

        A cache of a different file (size, sha256 or header differ) is discarded first.
        """
        with self._locked():
            m = self._read_manifest()
            same = (
                m.get("file_size") == file_size
                and m.get("header_sha256") == hashlib.sha256(header).hexdigest()
                and (sha256 is None or m.get("sha256") in (None, sha256))
            )
            if not same:
                m = {}
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | (0 if same else os.O_TRUNC), 0o644)
            try:
                os.ftruncate(fd, file_size)
                os.pwrite(fd, header, 0)
            finally:
                os.close(fd)
            m.update(
                version=MANIFEST_VERSION,
                file_size=file_size,
                header_bytes=len(header),
                header_sha256=hashlib.sha256(header).hexdigest(),
                sha256=sha256 or m.get("sha256"),
            )
            m.setdefault("tensors", {})
            self._write_manifest(m)

    def mark_verified(self, hashes: dict[str, str]) -> None:
        """Record tensors whose cached bytes matched `hashes` (merged with other writers' records)."""
        with self._locked():
            m = self._read_manifest()
            if not m:
                raise UsageError(f"shard cache {self.dir} was reset while being filled")
            m["tensors"].update(hashes)
            self._write_manifest(m)

    def forget(self, names: Iterable[str]) -> None:
        """Drop tensors from the manifest (their bytes no longer verify)."""
        with self._locked():
            m = self._read_manifest()
            for n in names:
                m.get("tensors", {}).pop(n, None)
            if m:
                self._write_manifest(m)

    def check(self, tensors: Iterable[TensorInfo], expected: dict[str, str]) -> list[str]:
        """Names of `tensors` whose cached bytes do NOT hash to `expected[name]`. Blocking."""
        bad: list[str] = []
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                for t in tensors:
                    if hashlib.sha256(view[t.offset : t.end]).hexdigest() != expected.get(t.name):
                        bad.append(t.name)
            finally:
                view.release()
        return bad
