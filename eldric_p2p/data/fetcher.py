"""Range fetcher: download exactly the tensors of a layer assignment from data peers into a shard cache.

    fetch_assignment(peers, model_id, start, end, cache_root=...)
      1. cache covers [start, end) and its bytes still verify  -> return, no network
      2. GET /tensors: published sha256 per tensor, and the data offset (= the header's length)
      3. header: GET blob bytes=0-(offset-1); a header already parsed in this process (same sha256) is reused;
         otherwise the transfer is planned from the peer's tensor table while the header parses in a thread,
         and the table must agree with the parsed header before anything is recorded as verified. A peer
         giving no offset: the prefix grows while the parser says TruncatedHeader, parsed before planning
      4. plan: the assignment's tensors not yet cached -> coalesced ranges -> chunks of <= 16 MiB
      5. fetch chunks, `max_in_flight` connections at a time, spread over the peers; each answer must be 206
         with exactly the asked Content-Range and length (a 200 is an error, never a silent full download); a
         broken transfer resumes from the byte where it stopped, with bounded retries and backoff, falling
         back to another peer
      6. each tensor is hashed while its bytes arrive (in order, across chunk boundaries); a mismatch raises
         IntegrityError naming the tensor; verified tensors are recorded in the manifest

The HTTP/1.1 client is `data.rangeclient`, the received bytes go through `data.sinks`, and the peer's tensor
table is checked in `data.tensortable`. Pass `connect=` to run HTTP over another byte stream (a link, or a
wrapper that injects faults in tests).
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from eldric_p2p.data.gguf_index import (
    MAX_HEADER_BYTES,
    GGUFIndex,
    TensorInfo,
    TruncatedHeader,
    parse_gguf_untrusted,
)
from eldric_p2p.data.rangeclient import (
    TIMEOUT,
    Broken,
    Connect,
    NotServed,
    PeerRefused,
    PeerURL,
    Pool,
    Sign,
    open_stream,
    parse_content_range,
)
from eldric_p2p.data.shardcache import ShardCache, check_model_id, parse_header_cached, parsed_header
from eldric_p2p.data.sinks import FileSink, MemorySink, ShardWriter, Sink
from eldric_p2p.data.tensortable import check_against_header, check_tensor_table, index_from_table, is_int
from eldric_p2p.errors import (
    EldricError,
    GGUFFormatError,
    IntegrityError,
    ModelNotFound,
    PeerUnavailable,
    RemoteProtocolError,
    UsageError,
)
from eldric_p2p.tasks import open_nursery

log = logging.getLogger(__name__)

CHUNK = 16 << 20  # bytes per range request
HEADER_FIRST = 1 << 20
MAX_TENSOR_TABLE = 64 << 20

Progress = Callable[[int, int], None]  # (bytes done, bytes planned)


@dataclass
class FetchResult:
    path: Path  # the shard cache file: open it with GGUFFile
    index: GGUFIndex
    bytes_fetched: int  # HTTP body bytes received (tensor table + header + tensors + retries)
    tensors: list[str]  # the assignment's tensor names
    elapsed: float
    from_cache: bool = False


@asynccontextmanager
async def _first_error_wins() -> AsyncIterator[Callable[..., None]]:
    """A nursery yielding `spawn(fn, *args)`: the first EldricError or OSError of a task cancels the others
    and is raised as itself (not in an exception group) once every task is done."""
    failed: list[BaseException] = []
    async with open_nursery() as nursery:

        def spawn(fn: Callable[..., Awaitable[None]], *args: Any) -> None:
            async def guarded() -> None:
                try:
                    await fn(*args)
                except (EldricError, OSError) as exc:
                    failed.append(exc)
                    nursery.cancel_scope.cancel()

            nursery.start_soon(guarded)

        yield spawn
    if failed:
        raise failed[0]


# --- the fetch ---------------------------------------------------------------------------------------------


class _Session:
    """State of one fetch: the connection pool, peers still trusted, counters."""

    def __init__(self, pool: Pool, peers: list[str], model_id: str, *, retries: int, backoff: float) -> None:
        self.pool = pool
        self.peers = list(peers)
        self.bad: dict[str, Exception] = {}
        self.model_id = model_id
        self.blob = f"/api/v1/models/{model_id}/blob"
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

    async def get_range(self, start: int, end: int, sink: Sink, *, hint: int = 0) -> int:
        """Fetch [start, end) into `sink`, resuming after breaks. Returns the file size.

        `end` past the end of the file is clipped there (the header probe does not know the size yet).
        Raises PeerUnavailable when every peer failed or retries ran out, PeerRefused-derived
        RemoteProtocolError when the last peer broke the protocol.
        """
        pos = start
        failures = 0
        attempt = 0
        size = -1
        while pos < end:
            peer = self.peer_for(hint + attempt)
            attempt += 1
            headers = [("range", f"bytes={pos}-{end - 1}")]
            if peer in self.etags:
                headers.append(("if-range", self.etags[peer]))
            before = pos
            try:
                async with self.pool.get(peer, self.blob, headers) as resp:
                    if resp.status == 200:
                        raise PeerRefused(
                            f"{peer} answered 200 to a Range request (ignores Range, or the file changed)"
                        )
                    if resp.status != 206:
                        body = (await resp.read(300)).decode("utf-8", "replace")
                        if resp.status == 404:
                            raise NotServed(f"{peer} does not serve {self.model_id!r}: {body}")
                        if 400 <= resp.status < 500:
                            raise PeerRefused(
                                f"{peer} answered {resp.status} for bytes {pos}-{end - 1}: {body}"
                            )
                        raise PeerUnavailable(f"{peer} answered {resp.status}: {body}")
                    a, b, size = parse_content_range(resp.headers.get("content-range"))
                    if a == pos and b == size < end:
                        end = size  # clipped at the end of the file (only the header probe asks past it)
                    if a != pos or b != end:
                        raise PeerRefused(f"{peer} sent bytes {a}-{b - 1}, asked for {pos}-{end - 1}")
                    if resp.length is not None and resp.length != end - pos:
                        raise PeerRefused(
                            f"{peer} announced {resp.length} body bytes for the {end - pos} asked for"
                        )
                    etag = resp.headers.get("etag")
                    if etag and not etag.startswith("W/"):
                        self.etags.setdefault(peer, etag)
                    while pos < end:
                        buf = await sink.buffer(end - pos)
                        view = memoryview(buf)
                        want = min(len(buf), end - pos)
                        n = 0
                        try:
                            while n < want:
                                k = await resp.readinto(view[n:want])
                                if k == 0:
                                    raise Broken(f"{peer} ended the body at byte {pos + n}, expected {end}")
                                n += k
                        except PeerUnavailable:
                            if not n:
                                sink.give_back(buf)
                                raise
                            await sink.put(pos, buf, n)  # keep what arrived: the retry resumes after it
                            pos += n
                            self.bytes_fetched += n
                            raise
                        await sink.put(pos, buf, n)
                        pos += n
                        self.bytes_fetched += n
                    if not await resp.at_end():
                        raise PeerRefused(f"{peer} sent more than the {end - start} bytes asked for")
            except PeerRefused as exc:
                log.warning("%s", exc)
                self.bad[peer] = exc
                if all(p in self.bad for p in self.peers):
                    if all(isinstance(e, NotServed) for e in self.bad.values()):
                        raise ModelNotFound(f"no data peer serves {self.model_id!r}") from exc
                    raise
            except PeerUnavailable as exc:
                failures = 0 if pos > before else failures + 1
                if failures > self.retries:
                    raise PeerUnavailable(
                        f"giving up on bytes {pos}-{end - 1} after {failures} failures: {exc}"
                    ) from exc
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
                async with self.pool.get(peer, path, []) as resp:
                    if resp.status == 404:
                        self.bad[peer] = NotServed(f"{peer} does not serve {self.model_id!r}")
                        continue
                    if resp.status != 200:
                        raise PeerUnavailable(f"{peer} answered {resp.status} to {path}")
                    body = await resp.read(MAX_TENSOR_TABLE + 1)
                if len(body) > MAX_TENSOR_TABLE:
                    raise PeerRefused(f"{peer} sent a {len(body)}-byte answer to {path}")
                self.bytes_fetched += len(body)
                return peer, json.loads(body)
            except (PeerUnavailable, ValueError) as exc:
                last = exc
                await trio.sleep(min(self.backoff * 2 ** (attempt // len(self.peers)), 5.0))
        if (
            self.bad
            and all(isinstance(e, NotServed) for e in self.bad.values())
            and len(self.bad) == len(self.peers)
        ):
            raise ModelNotFound(f"no data peer serves {self.model_id!r}")
        reasons = "; ".join(str(e) for e in self.bad.values()) or str(last)
        raise PeerUnavailable(f"no data peer answered {path}: {reasons}") from last


def plan_chunks(tensors: list[TensorInfo], *, gap: int, chunk: int = CHUNK) -> list[tuple[int, int]]:
    """Coalesce the tensors' spans (neighbours at most `gap` apart) and split them into <= `chunk` pieces."""
    merged: list[tuple[int, int]] = []
    for a, b in sorted((t.offset, t.end) for t in tensors):
        if merged and a - merged[-1][1] <= gap:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return [(p, min(p + chunk, b)) for a, b in merged for p in range(a, b, chunk)]


async def _fetch_header(s: _Session, hint: int | None = None) -> tuple[bytes, int, GGUFIndex | None]:
    """(header bytes, file size, parsed index or None).

    With `hint` (the peer's data offset) the header is one request; the index is the one this process parsed
    before for the same bytes, or None: parse it while the tensors transfer. Without a hint (or a bad one) the
    prefix grows until the parser stops raising TruncatedHeader, and the index is always returned.
    """
    sink = MemorySink()
    if hint is not None and 0 < hint <= MAX_HEADER_BYTES:
        size = await s.get_range(0, hint, sink)
        header = bytes(sink.data)
        if len(header) < hint:
            raise RemoteProtocolError(
                f"tensor table's data offset {hint} lies past the end of the {size}-byte file"
            )
        digest = hashlib.sha256(header).hexdigest()
        return header, size, parsed_header(digest, size)
    want = HEADER_FIRST
    size: int | None = None  # type: ignore[no-redef]
    while True:
        stop = want if size is None else min(want, size)
        if stop > len(sink.data):
            size = await s.get_range(len(sink.data), stop, sink)
        try:
            index = parse_gguf_untrusted(bytes(sink.data), file_size=size)
            return bytes(sink.data[: index.data_offset]), index.file_size or 0, index
        except TruncatedHeader as exc:
            if size is not None and len(sink.data) >= min(size, MAX_HEADER_BYTES):
                raise GGUFFormatError(f"remote GGUF header is truncated at {len(sink.data)} bytes") from exc
            want = min(max(exc.needed, 2 * len(sink.data)), MAX_HEADER_BYTES)


def _parse_header(header: bytes, size: int) -> GGUFIndex:
    try:
        return parse_header_cached(header, file_size=size)
    except TruncatedHeader as exc:
        raise RemoteProtocolError(
            f"tensor table's data offset {len(header)} is short of the GGUF header"
        ) from exc


async def fetch_assignment(
    peers: list[str],
    model_id: str,
    start: int,
    end: int,
    *,
    cache_root: str | os.PathLike[str],
    progress: Progress | None = None,
    connect: Connect | None = None,
    sign: Sign | None = None,
    max_in_flight: int = 4,
    chunk_size: int = CHUNK,
    retries: int = 4,
    backoff: float = 0.2,
    verify_cached: bool = True,
) -> FetchResult:
    """Fetch layers [start, end) of `model_id` from data peers (base URLs) into the shard cache.

    Returns a FetchResult whose `path` opens with `GGUFFile`. A covered assignment is served from the cache
    without network (its bytes re-hashed unless `verify_cached=False`). `connect(host, port, tls)` opens the
    byte stream HTTP runs over (default: TCP, TLS for https); `sign(method, target, host)` adds each request's
    credential headers. Raises IntegrityError naming a tensor whose
    bytes do not match the published hash, PeerUnavailable when no peer delivers, RemoteProtocolError when a
    peer breaks the protocol, ModelNotFound when no peer serves the model, UsageError for a bad model id,
    peer URL or layer range, GGUFFormatError for a header that does not parse.
    """
    t0 = time.perf_counter()
    check_model_id(model_id)
    cache = ShardCache(cache_root, model_id)

    cached = await trio.to_thread.run_sync(_from_cache, cache, start, end, verify_cached)
    if cached is not None:
        return FetchResult(cache.path, cached, 0, [t.name for t in cached.assignment_tensors(start, end)],
                           time.perf_counter() - t0, from_cache=True)  # fmt: skip
    if not peers:
        raise PeerUnavailable(
            f"layers [{start}, {end}) of {model_id!r} are not cached and no data peer is known"
        )
    for p in peers:
        PeerURL.parse(p)

    pool = Pool(connect or open_stream, TIMEOUT, sign)
    try:
        s = _Session(pool, peers, model_id, retries=retries, backoff=backoff)
        _, doc = await s.get_json(f"/api/v1/models/{model_id}/tensors")
        hint = doc.get("data_offset") if isinstance(doc, dict) else None
        header, size, index = await _fetch_header(s, hint if is_int(hint) else None)
        plan = index if index is not None else index_from_table(doc, len(header), size)
        if not 0 <= start < end <= plan.n_layers:
            raise UsageError(
                f"layer range [{start}, {end}) is not inside [0, {plan.n_layers}) of {model_id!r}"
            )
        hashes, file_sha = check_tensor_table(plan, doc)
        t_header = time.perf_counter()
        await trio.to_thread.run_sync(lambda: cache.prepare(file_size=size, header=header, sha256=file_sha))
        wanted = plan.assignment_tensors(start, end)
        have = cache.verified
        todo = [t for t in wanted if have.get(t.name) != hashes[t.name]]
        chunks = plan_chunks(todo, gap=plan.alignment, chunk=chunk_size)
        total = sum(b - a for a, b in chunks)
        writer = ShardWriter(cache.path, todo)
        parsed: list[GGUFIndex] = []

        async def parse() -> None:
            parsed.append(await trio.to_thread.run_sync(_parse_header, header, size))

        try:
            async with _first_error_wins() as spawn:
                if index is None:
                    spawn(parse)
                spawn(_fetch_chunks, s, writer, chunks, total, progress, max_in_flight)
        finally:
            writer.close()
        t_fetch = time.perf_counter()
        if index is None:
            index = parsed[0]
            check_against_header(index, plan, doc, start, end)
        digests = writer.digests()
        bad = [t.name for t in todo if digests.get(t.name) != hashes[t.name]]
        log.debug("fetch %s [%d, %d): table+header %.2fs, %d bytes fetched+hashed in %.2fs (header parse %s)",
                  model_id, start, end, t_header - t0, total, t_fetch - t_header,
                  "overlapped" if parsed else "cached")  # fmt: skip
        good = {t.name: hashes[t.name] for t in todo if t.name not in bad}
        await trio.to_thread.run_sync(cache.mark_verified, good)
        if bad:
            raise IntegrityError(
                f"tensor {bad[0]!r} of {model_id!r} does not match its published sha256"
                + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
            )
        return FetchResult(
            cache.path, index, s.bytes_fetched, [t.name for t in wanted], time.perf_counter() - t0
        )
    finally:
        await pool.aclose()


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
    s: _Session,
    writer: ShardWriter,
    chunks: list[tuple[int, int]],
    total: int,
    progress: Progress | None,
    width: int,
) -> None:
    queue = collections.deque(chunks)
    done = 0
    limiter = trio.CapacityLimiter(max(1, width))

    def written(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    if progress is not None:
        progress(0, total)
    async with _first_error_wins() as spawn:

        async def worker(i: int) -> None:
            sink = FileSink(writer, spawn, limiter, written)
            while queue:
                a, b = queue.popleft()
                await s.get_range(a, b, sink, hint=i)

        for i in range(max(1, min(width, len(chunks)))):
            spawn(worker, i)
