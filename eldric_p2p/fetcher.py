"""Range fetcher: download exactly the tensors of a layer assignment from data peers into a shard cache.

    fetch_assignment(peers, model_id, start, end, cache_root=...)
      1. cache covers [start, end) and its bytes still verify  -> return, no network
      2. GET /tensors: published sha256 per tensor, and the data offset (= the header's length)
      3. header: GET blob bytes=0-(offset-1), parse it, check the tensor table against it; if the peer's
         offset was short, grow the prefix while the parser says TruncatedHeader
      4. plan: the assignment's tensors not yet cached -> coalesced ranges -> chunks of <= 16 MiB
      5. fetch chunks, `max_in_flight` at a time, spread over the peers; each answer must be 206 with exactly
         the asked Content-Range (a 200 is an error, never a silent full download); a broken transfer resumes
         from the byte where it stopped, with bounded retries and backoff, falling back to another peer
      6. hash every tensor; a mismatch raises IntegrityError naming the tensor; record verified ones

Chunks are written with positional writes into the sparse cache file, so chunks may finish in any order.
Pass `client=` (an httpx.AsyncClient, e.g. on a MockTransport) to inject faults in tests.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trio

from eldric_p2p.errors import (
    GGUFFormatError,
    IntegrityError,
    ModelNotFound,
    PeerUnavailable,
    RemoteProtocolError,
    UsageError,
)
from eldric_p2p.gguf_index import MAX_HEADER_BYTES, GGUFIndex, TensorInfo, TruncatedHeader, parse_gguf_untrusted
from eldric_p2p.shardcache import ShardCache, check_model_id

log = logging.getLogger(__name__)

CHUNK = 16 << 20
HEADER_FIRST = 1 << 20
WRITE_BUFFER = 4 << 20
MAX_TENSOR_TABLE = 64 << 20
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$", re.ASCII)
_SHA = re.compile(r"^[0-9a-f]{64}$")

Progress = Callable[[int, int], None]  # (bytes done, bytes planned)


@dataclass
class FetchResult:
    path: Path  # the shard cache file: open it with GGUFFile
    index: GGUFIndex
    bytes_fetched: int  # HTTP body bytes received (header + tensors + retries)
    tensors: list[str]  # the assignment's tensor names
    elapsed: float
    from_cache: bool = False


class _PeerRefused(RemoteProtocolError):
    """This peer broke the range protocol (e.g. 200 instead of 206): do not ask it again."""


class _NotServed(_PeerRefused):
    """This peer does not serve the model (404)."""


def _blob_url(peer: str, model_id: str) -> str:
    return f"{peer.rstrip('/')}/api/v1/models/{model_id}/blob"


def _parse_content_range(value: str | None) -> tuple[int, int, int]:
    m = _CONTENT_RANGE.match(value or "")
    if not m:
        raise _PeerRefused(f"206 without a valid Content-Range ({value!r})")
    return int(m.group(1)), int(m.group(2)) + 1, int(m.group(3))


class _Session:
    """State of one fetch: the client, peers still trusted, counters."""

    def __init__(self, client: httpx.AsyncClient, peers: list[str], model_id: str, *, retries: int, backoff: float):
        self.client = client
        self.peers = list(peers)
        self.bad: dict[str, Exception] = {}
        self.model_id = model_id
        self.retries = retries
        self.backoff = backoff
        self.bytes_fetched = 0
        self.etags: dict[str, str] = {}  # peer -> strong ETag of its copy, sent back as If-Range

    def peer_for(self, hint: int) -> str:
        alive = [p for p in self.peers if p not in self.bad]
        if not alive:
            first = next(iter(self.bad.values()))
            raise PeerUnavailable(f"no data peer left for {self.model_id!r}: {first}") from first
        return alive[hint % len(alive)]

    async def get_range(self, start: int, end: int, sink: Callable[[int, bytes], Any], *, hint: int = 0) -> int:
        """Fetch [start, end) into `sink(offset, data)`, resuming after breaks. Returns the file size.

        `end` past the end of the file is clipped there (the header probe does not know the size yet).
        Raises PeerUnavailable when every peer failed or retries ran out, _PeerRefused-derived
        RemoteProtocolError when the last peer broke the protocol.
        """
        pos = start
        failures = 0
        attempt = 0
        size = -1
        while pos < end:
            peer = self.peer_for(hint + attempt)
            attempt += 1
            headers = {"range": f"bytes={pos}-{end - 1}"}
            if peer in self.etags:
                headers["if-range"] = self.etags[peer]
            before = pos
            try:
                async with self.client.stream("GET", _blob_url(peer, self.model_id), headers=headers) as resp:
                    if resp.status_code == 200:
                        raise _PeerRefused(f"{peer} answered 200 to a Range request (ignores Range, or the file changed)")
                    if resp.status_code != 206:
                        body = (await resp.aread())[:300].decode("utf-8", "replace")
                        if resp.status_code == 404:
                            raise _NotServed(f"{peer} does not serve {self.model_id!r}: {body}")
                        if 400 <= resp.status_code < 500:
                            raise _PeerRefused(f"{peer} answered {resp.status_code} for bytes {pos}-{end - 1}: {body}")
                        raise PeerUnavailable(f"{peer} answered {resp.status_code}: {body}")
                    a, b, size = _parse_content_range(resp.headers.get("content-range"))
                    if a == pos and b == size < end:
                        end = size  # clipped at the end of the file (only the header probe asks past it)
                    if a != pos or b != end:
                        raise _PeerRefused(f"{peer} sent bytes {a}-{b - 1}, asked for {pos}-{end - 1}")
                    etag = resp.headers.get("etag")
                    if etag and not etag.startswith("W/"):
                        self.etags.setdefault(peer, etag)
                    buf = bytearray()
                    async for data in resp.aiter_raw():
                        if pos + len(buf) + len(data) > end:
                            raise _PeerRefused(f"{peer} sent more than the {end - start} bytes asked for")
                        buf += data
                        self.bytes_fetched += len(data)
                        if len(buf) >= WRITE_BUFFER:
                            await sink(pos, bytes(buf))
                            pos += len(buf)
                            buf.clear()
                    if buf:
                        await sink(pos, bytes(buf))
                        pos += len(buf)
                    if pos != end:
                        raise PeerUnavailable(f"{peer} ended the body at byte {pos}, expected {end}")
            except _PeerRefused as exc:
                log.warning("%s", exc)
                self.bad[peer] = exc
                if all(p in self.bad for p in self.peers):
                    if all(isinstance(e, _NotServed) for e in self.bad.values()):
                        raise ModelNotFound(f"no data peer serves {self.model_id!r}") from exc
                    raise
            except (httpx.HTTPError, PeerUnavailable) as exc:
                failures = 0 if pos > before else failures + 1
                if failures > self.retries:
                    raise PeerUnavailable(f"giving up on bytes {pos}-{end - 1} after {failures} failures: {exc}") from exc
                log.info("transfer from %s broke at byte %d (%s); resuming", peer, pos, exc)
                await trio.sleep(min(self.backoff * 2 ** max(failures - 1, 0), 5.0))
        return size

    async def get_json(self, path: str, *, hint: int = 0) -> tuple[str, Any]:
        """GET a JSON document from the first peer that answers; returns (peer, document)."""
        last: Exception | None = None
        for attempt in range(len(self.peers) * (self.retries + 1)):
            try:
                peer = self.peer_for(hint + attempt)
            except PeerUnavailable:
                break
            try:
                resp = await self.client.get(f"{peer.rstrip('/')}{path}")
                if resp.status_code == 404:
                    self.bad[peer] = _NotServed(f"{peer} does not serve {self.model_id!r}")
                    continue
                if resp.status_code != 200:
                    raise PeerUnavailable(f"{peer} answered {resp.status_code} to {path}")
                if len(resp.content) > MAX_TENSOR_TABLE:
                    raise _PeerRefused(f"{peer} sent a {len(resp.content)}-byte answer to {path}")
                self.bytes_fetched += len(resp.content)
                return peer, resp.json()
            except (httpx.HTTPError, PeerUnavailable, ValueError) as exc:
                last = exc
                await trio.sleep(min(self.backoff * 2 ** (attempt // len(self.peers)), 5.0))
        if self.bad and all(isinstance(e, _NotServed) for e in self.bad.values()) and len(self.bad) == len(self.peers):
            raise ModelNotFound(f"no data peer serves {self.model_id!r}")
        reasons = "; ".join(str(e) for e in self.bad.values()) or str(last)
        raise PeerUnavailable(f"no data peer answered {path}: {reasons}") from last


def _check_tensor_table(index: GGUFIndex, doc: Any) -> tuple[dict[str, str], str | None]:
    """Published hashes from a /tensors document, after checking it agrees with the parsed header."""
    if not isinstance(doc, dict) or not isinstance(doc.get("tensors"), list):
        raise RemoteProtocolError("tensor table is not a JSON object with a 'tensors' list")
    if doc.get("file_size") != index.file_size:
        raise RemoteProtocolError(f"tensor table is for a {doc.get('file_size')}-byte file, header says {index.file_size}")
    hashes: dict[str, str] = {}
    for row in doc["tensors"]:
        if not isinstance(row, dict):
            raise RemoteProtocolError("tensor table row is not an object")
        t = index.tensors.get(row.get("name"))  # type: ignore[arg-type]
        if t is None or row.get("offset") != t.offset or row.get("size") != t.nbytes:
            raise RemoteProtocolError(f"tensor table row {str(row)[:200]} disagrees with the GGUF header")
        sha = row.get("sha256")
        if not isinstance(sha, str) or not _SHA.match(sha):
            raise RemoteProtocolError(f"tensor {t.name!r}: no valid sha256 published")
        hashes[t.name] = sha
    missing = set(index.tensors) - set(hashes)
    if missing:
        raise RemoteProtocolError(f"tensor table lacks {len(missing)} tensors, e.g. {sorted(missing)[0]!r}")
    sha = doc.get("sha256")
    return hashes, sha if isinstance(sha, str) and _SHA.match(sha) else None


def plan_chunks(tensors: list[TensorInfo], *, gap: int, chunk: int = CHUNK) -> list[tuple[int, int]]:
    """Coalesce the tensors' spans (neighbours at most `gap` apart) and split them into <= `chunk` pieces."""
    merged: list[tuple[int, int]] = []
    for a, b in sorted((t.offset, t.end) for t in tensors):
        if merged and a - merged[-1][1] <= gap:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return [(p, min(p + chunk, b)) for a, b in merged for p in range(a, b, chunk)]


async def _fetch_header(s: _Session, hint: int | None = None) -> tuple[GGUFIndex, bytes]:
    """Fetch and parse the header. `hint` (the peer's claimed data offset) makes it one request; without it,
    or when the hint is short, the prefix grows until the parser stops raising TruncatedHeader."""
    prefix = bytearray()
    want = hint if hint is not None and 0 < hint <= MAX_HEADER_BYTES else HEADER_FIRST
    size: int | None = None

    async def sink(off: int, data: bytes) -> None:
        assert off == len(prefix)
        prefix.extend(data)

    while True:
        end = want if size is None else min(want, size)
        if end > len(prefix):
            size = await s.get_range(len(prefix), end, sink)
        try:
            index = parse_gguf_untrusted(bytes(prefix), file_size=size)
            return index, bytes(prefix[: index.data_offset])
        except TruncatedHeader as exc:
            if size is not None and len(prefix) >= min(size, MAX_HEADER_BYTES):
                raise GGUFFormatError(f"remote GGUF header is truncated at {len(prefix)} bytes") from exc
            want = min(max(exc.needed, 2 * len(prefix)), MAX_HEADER_BYTES)


async def fetch_assignment(
    peers: list[str],
    model_id: str,
    start: int,
    end: int,
    *,
    cache_root: str | os.PathLike[str],
    progress: Progress | None = None,
    client: httpx.AsyncClient | None = None,
    max_in_flight: int = 4,
    chunk_size: int = CHUNK,
    retries: int = 4,
    backoff: float = 0.2,
    verify_cached: bool = True,
) -> FetchResult:
    """Fetch layers [start, end) of `model_id` from data peers (base URLs) into the shard cache.

    Returns a FetchResult whose `path` opens with `GGUFFile`. A covered assignment is served from the cache
    without network (its bytes re-hashed unless `verify_cached=False`). Raises IntegrityError naming a tensor
    whose bytes do not match the published hash, PeerUnavailable when no peer delivers, RemoteProtocolError
    when a peer breaks the protocol, ModelNotFound when no peer serves the model, UsageError for a bad model
    id or layer range.
    """
    t0 = time.perf_counter()
    check_model_id(model_id)
    cache = ShardCache(cache_root, model_id)

    cached = await trio.to_thread.run_sync(_from_cache, cache, start, end, verify_cached)
    if cached is not None:
        return FetchResult(cache.path, cached, 0, [t.name for t in cached.assignment_tensors(start, end)],
                           time.perf_counter() - t0, from_cache=True)  # fmt: skip
    if not peers:
        raise PeerUnavailable(f"layers [{start}, {end}) of {model_id!r} are not cached and no data peer is known")

    own_client = client is None
    if client is None:
        client = httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=5.0), limits=httpx.Limits(max_connections=32))
    try:
        s = _Session(client, peers, model_id, retries=retries, backoff=backoff)
        _, doc = await s.get_json(f"/api/v1/models/{model_id}/tensors")
        hint = doc.get("data_offset") if isinstance(doc, dict) else None
        index, header = await _fetch_header(s, hint if isinstance(hint, int) else None)
        if not 0 <= start < end <= index.n_layers:
            raise UsageError(f"layer range [{start}, {end}) is not inside [0, {index.n_layers}) of {model_id!r}")
        hashes, file_sha = _check_tensor_table(index, doc)
        t_header = time.perf_counter()
        assert index.file_size is not None
        size = index.file_size
        await trio.to_thread.run_sync(lambda: cache.prepare(file_size=size, header=header, sha256=file_sha))
        wanted = index.assignment_tensors(start, end)
        have = cache.verified
        todo = [t for t in wanted if have.get(t.name) != hashes[t.name]]
        chunks = plan_chunks(todo, gap=index.alignment, chunk=chunk_size)
        total = sum(b - a for a, b in chunks)
        t_plan = time.perf_counter()
        await _fetch_chunks(s, cache.path, chunks, total, progress, max_in_flight)
        t_fetch = time.perf_counter()
        bad = await trio.to_thread.run_sync(cache.check, todo, hashes)
        log.debug("fetch %s [%d, %d): header+table %.2fs, prepare %.2fs, %d bytes in %.2fs, verify %.2fs", model_id,
                  start, end, t_header - t0, t_plan - t_header, total, t_fetch - t_plan, time.perf_counter() - t_fetch)
        good = {t.name: hashes[t.name] for t in todo if t.name not in bad}
        await trio.to_thread.run_sync(cache.mark_verified, good)
        if bad:
            raise IntegrityError(
                f"tensor {bad[0]!r} of {model_id!r} does not match its published sha256"
                + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
            )
        return FetchResult(cache.path, index, s.bytes_fetched, [t.name for t in wanted], time.perf_counter() - t0)
    finally:
        if own_client:
            await client.aclose()


def _from_cache(cache: ShardCache, start: int, end: int, verify: bool) -> GGUFIndex | None:
    if not cache.covers(start, end):
        return None
    index = cache.index()
    assert index is not None
    if verify:
        tensors = index.assignment_tensors(start, end)
        bad = cache.check(tensors, cache.verified)
        if bad:
            log.warning("shard cache %s: %d tensors no longer verify; refetching", cache.dir, len(bad))
            cache.forget(bad)
            return None
    return index


async def _fetch_chunks(
    s: _Session, path: Path, chunks: list[tuple[int, int]], total: int, progress: Progress | None, width: int
) -> None:
    queue = collections.deque(chunks)
    done = 0
    fd = os.open(path, os.O_RDWR)
    write_limiter = trio.CapacityLimiter(2)

    async def sink(off: int, data: bytes) -> None:
        nonlocal done
        written = await trio.to_thread.run_sync(os.pwrite, fd, data, off, limiter=write_limiter)
        if written != len(data):
            raise OSError(f"short write to {path}")
        done += len(data)
        if progress is not None:
            progress(done, total)

    failed: list[BaseException] = []

    async def worker(i: int, cancel: trio.CancelScope) -> None:
        while queue:
            a, b = queue.popleft()
            try:
                await s.get_range(a, b, sink, hint=i)
            except (RemoteProtocolError, PeerUnavailable, OSError) as exc:
                failed.append(exc)  # first failure wins; the others are cancelled
                cancel.cancel()
                return

    try:
        if progress is not None:
            progress(0, total)
        async with trio.open_nursery() as nursery:
            for i in range(max(1, min(width, len(chunks)))):
                nursery.start_soon(worker, i, nursery.cancel_scope)
    finally:
        os.close(fd)
    if failed:
        raise failed[0]
