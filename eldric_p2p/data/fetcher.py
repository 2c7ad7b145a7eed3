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

The HTTP/1.1 client is small and written here: h11 parses every response head (and any body without a
Content-Length); a body with one is read with `recv_into` straight into a 4 MiB buffer that a worker thread
then writes (`os.pwrite` at the file offset) and hashes while the next buffer fills. httpx was measured first:
httpcore reads 64 KiB at a time and copies each byte through h11's buffer and its iterators, which capped a
fetch at 130-300 MB/s on loopback where this reader moves 0.7-1.4 GB/s (benchmarks/bench_fetch.py).
Pass `connect=` to run HTTP over another byte stream (a link, or a wrapper that injects faults in tests).
"""

from __future__ import annotations

import bisect
import collections
import hashlib
import json
import logging
import mmap
import os
import re
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import h11
import trio
from gguf import GGMLQuantizationType

from eldric_p2p.data.gguf_index import (
    MAX_DIMS,
    MAX_HEADER_BYTES,
    MAX_NAME,
    GGUFIndex,
    TensorInfo,
    TruncatedHeader,
    parse_gguf_untrusted,
)
from eldric_p2p.data.shardcache import ShardCache, check_model_id, parse_header_cached, parsed_header
from eldric_p2p.errors import (
    EldricError,
    GGUFFormatError,
    IntegrityError,
    ModelNotFound,
    PeerUnavailable,
    RemoteProtocolError,
    UsageError,
)

log = logging.getLogger(__name__)

CHUNK = 16 << 20  # bytes per range request
BUFFER = 4 << 20  # receive buffer; each connection has two (one fills while the other is written and hashed)
HEADER_FIRST = 1 << 20
MAX_TENSOR_TABLE = 64 << 20
MAX_RESPONSE_HEAD = 64 << 10
TIMEOUT = 30.0  # seconds without progress on a connection (connect: CONNECT_TIMEOUT)
CONNECT_TIMEOUT = 5.0
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$", re.ASCII)
_SHA = re.compile(r"^[0-9a-f]{64}$")

Progress = Callable[[int, int], None]  # (bytes done, bytes planned)
Connect = Callable[[str, int, bool], Awaitable[trio.abc.Stream]]  # (host, port, tls) -> connected byte stream


@dataclass
class FetchResult:
    path: Path  # the shard cache file: open it with GGUFFile
    index: GGUFIndex
    bytes_fetched: int  # HTTP body bytes received (tensor table + header + tensors + retries)
    tensors: list[str]  # the assignment's tensor names
    elapsed: float
    from_cache: bool = False


class _PeerRefused(RemoteProtocolError):
    """This peer broke the range protocol (e.g. 200 instead of 206): do not ask it again."""


class _NotServed(_PeerRefused):
    """This peer does not serve the model (404)."""


class _Broken(PeerUnavailable):
    """The connection failed, timed out or ended early: retry, resuming where the bytes stopped."""


def _parse_content_range(value: str | None) -> tuple[int, int, int]:
    m = _CONTENT_RANGE.match(value or "")
    if not m:
        raise _PeerRefused(f"206 without a valid Content-Range ({value!r})")
    return int(m.group(1)), int(m.group(2)) + 1, int(m.group(3))


# --- HTTP/1.1 ---------------------------------------------------------------------------------------------

_ssl_context: ssl.SSLContext | None = None


async def open_stream(host: str, port: int, tls: bool) -> trio.abc.Stream:
    """The default `connect`: TCP (happy eyeballs), wrapped in TLS for https peers."""
    global _ssl_context
    stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
    if tls:
        if _ssl_context is None:
            _ssl_context = ssl.create_default_context()
        stream = trio.SSLStream(stream, _ssl_context, server_hostname=host, https_compatible=True)
    return stream


@dataclass(frozen=True)
class _PeerURL:
    host: str
    port: int
    tls: bool
    prefix: str  # path of the base URL, without the trailing slash
    authority: str  # Host header

    @classmethod
    def parse(cls, base: str) -> _PeerURL:
        u = urlsplit(base)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise UsageError(f"data peer {base!r} is not an http:// or https:// URL")
        try:
            port = u.port or (443 if u.scheme == "https" else 80)
        except ValueError as exc:
            raise UsageError(f"data peer {base!r}: {exc}") from None
        return cls(u.hostname, port, u.scheme == "https", u.path.rstrip("/"), u.netloc)


class _Response:
    """One HTTP/1.1 exchange on a connection: h11 for the head; the body read into the caller's buffers.

    A body with a Content-Length is read with `recv_into` (plain TCP) or `receive_some` (any other stream)
    and counted here; any other framing (chunked, until close) goes through h11. Every transport failure is
    raised as `_Broken`.
    """

    def __init__(self, conn: _Connection, h: h11.Connection, head: h11.Response) -> None:
        self.conn = conn
        self.status = head.status_code
        self.headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in head.headers}
        close = any(k == b"connection" and b"close" in v.lower() for k, v in head.headers)
        self.keep_alive = head.http_version == b"1.1" and not close
        self._h = h
        chunked = any(k == b"transfer-encoding" for k, _ in head.headers)
        length = self.headers.get("content-length")  # h11 checked it is one non-negative integer
        self.length = int(length) if length is not None and not chunked else None
        self._left = self.length if self.length is not None else -1  # -1: framed by h11
        pending, _ = h.trailing_data
        self._pending = bytes(pending) if self.length is not None else b""
        self._ended = self._left == 0
        if self.length is not None and len(self._pending) > self.length:
            raise _Broken("the peer sent bytes past the response body")  # nothing is pipelined

    @property
    def reusable(self) -> bool:
        return self._ended and self.keep_alive and not self._pending

    async def readinto(self, view: memoryview) -> int:
        """Read up to len(view) body bytes into `view`; 0 at the end of the body."""
        if self._ended:
            return 0
        if self._left > 0:
            view = view[: min(len(view), self._left)]
        if self._pending:
            n = min(len(view), len(self._pending))
            view[:n] = self._pending[:n]
            self._pending = self._pending[n:]
        elif self._left > 0:
            n = await self.conn.recv_into(view)
            if n == 0:
                raise _Broken(f"connection closed with {self._left} body bytes missing")
        else:
            return await self._readinto_h11(view)
        if self._left > 0:
            self._left -= n
            self._ended = self._left == 0
        return n

    async def _readinto_h11(self, view: memoryview) -> int:
        while True:
            try:
                ev = self._h.next_event()
            except h11.RemoteProtocolError as exc:
                raise _Broken(f"bad HTTP body: {exc}") from exc
            if ev is h11.NEED_DATA:
                self._h.receive_data(await self.conn.receive_some(1 << 20))
            elif isinstance(ev, h11.Data):
                data = bytes(ev.data)
                n = min(len(view), len(data))
                view[:n] = data[:n]
                self._pending = data[n:]
                return n
            elif isinstance(ev, h11.EndOfMessage):
                self._ended = True
                self.keep_alive = self.keep_alive and not self._h.trailing_data[0]
                return 0

    async def read(self, limit: int) -> bytes:
        """The whole body, or its first `limit` bytes (the connection is then not reused)."""
        out = bytearray()
        buf = bytearray(1 << 16)
        while len(out) < limit:
            n = await self.readinto(memoryview(buf)[: limit - len(out)])
            if n == 0:
                break
            out += buf[:n]
        return bytes(out)

    async def at_end(self) -> bool:
        """True when no body byte is left (reads ahead one byte for h11-framed bodies)."""
        if not self._ended and self._left < 0:
            extra = bytearray(1)
            return await self.readinto(memoryview(extra)) == 0
        return self._ended


class _Connection:
    """An HTTP/1.1 client connection over a trio byte stream; one request at a time, no pipelining."""

    def __init__(self, stream: trio.abc.Stream, authority: str, timeout: float) -> None:
        self.stream = stream
        self._sock = stream.socket if isinstance(stream, trio.SocketStream) else None
        self.authority = authority
        self.timeout = timeout

    async def recv_into(self, view: memoryview) -> int:
        try:
            with trio.fail_after(self.timeout):
                if self._sock is not None:
                    return await self._sock.recv_into(view)
                data = await self.stream.receive_some(len(view))
                view[: len(data)] = data
                return len(data)
        except (OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
            raise _Broken(f"receiving failed: {exc!r}") from exc

    async def receive_some(self, n: int) -> bytes:
        try:
            with trio.fail_after(self.timeout):
                data = await self.stream.receive_some(n)
                return data if isinstance(data, bytes) else bytes(data)
        except (OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
            raise _Broken(f"receiving failed: {exc!r}") from exc

    async def get(self, target: str, headers: list[tuple[str, str]]) -> _Response:
        """Send `GET target` and read the response head."""
        h = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)
        head = [("host", self.authority), ("accept-encoding", "identity"), *headers]
        request = h11.Request(method="GET", target=target, headers=head)
        try:
            with trio.fail_after(self.timeout):
                await self.stream.send_all(h.send(request) + h.send(h11.EndOfMessage()))
        except (OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
            raise _Broken(f"sending the request failed: {exc!r}") from exc
        while True:
            try:
                ev = h.next_event()
            except h11.RemoteProtocolError as exc:
                raise _Broken(f"bad HTTP response head: {exc}") from exc
            if ev is h11.NEED_DATA:
                h.receive_data(await self.receive_some(1 << 16))
            elif isinstance(ev, h11.Response):
                return _Response(self, h, ev)
            elif isinstance(ev, h11.ConnectionClosed):
                raise _Broken("the peer closed the connection without answering")
            # InformationalResponse (1xx): keep reading

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


class _Pool:
    """Keep-alive connections per peer. `async with pool.get(peer, path, headers) as response: ...`."""

    def __init__(self, connect: Connect, timeout: float) -> None:
        self.connect = connect
        self.timeout = timeout
        self.idle: dict[str, list[_Connection]] = collections.defaultdict(list)
        self.urls: dict[str, _PeerURL] = {}

    async def _open(self, url: _PeerURL) -> _Connection:
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                stream = await self.connect(url.host, url.port, url.tls)
        except (OSError, trio.BrokenResourceError, trio.TooSlowError, ssl.SSLError) as exc:
            raise _Broken(f"cannot connect to {url.authority}: {exc!r}") from exc
        return _Connection(stream, url.authority, self.timeout)

    @asynccontextmanager
    async def get(self, peer: str, path: str, headers: list[tuple[str, str]]) -> AsyncIterator[_Response]:
        url = self.urls.get(peer) or self.urls.setdefault(peer, _PeerURL.parse(peer))
        idle = self.idle[peer]
        conn = idle.pop() if idle else None
        resp: _Response | None = None
        try:
            if conn is not None:
                try:
                    resp = await conn.get(url.prefix + path, headers)
                except _Broken:  # an idle connection the peer closed meanwhile: one fresh try, not a failure
                    await conn.aclose()
                    conn = None
            if conn is None:
                conn = await self._open(url)
                resp = await conn.get(url.prefix + path, headers)
            assert resp is not None
            yield resp
        finally:
            if conn is not None:
                if resp is not None and resp.reusable:
                    idle.append(conn)
                else:
                    await conn.aclose()

    async def aclose(self) -> None:
        for conns in self.idle.values():
            for conn in conns:
                await conn.aclose()
        self.idle.clear()


# --- receiving into buffers --------------------------------------------------------------------------------


class _Sink(Protocol):
    async def buffer(self, want: int) -> bytearray: ...

    async def put(self, offset: int, buf: bytearray, n: int) -> None: ...

    def give_back(self, buf: bytearray) -> None: ...


class _MemorySink:
    """Collects a contiguous range in memory (the header)."""

    def __init__(self) -> None:
        self.data = bytearray()

    async def buffer(self, want: int) -> bytearray:
        return bytearray(min(want, BUFFER))

    async def put(self, offset: int, buf: bytearray, n: int) -> None:
        assert offset == len(self.data)
        self.data += memoryview(buf)[:n]

    def give_back(self, buf: bytearray) -> None:
        pass


class _ShardWriter:
    """Writes received buffers into the sparse cache file and hashes every tensor in order as its bytes land.

    `write` runs in worker threads. A tensor's bytes may land out of order (its chunks arrive over several
    connections, each in 4 MiB buffers): whichever write makes the tensor's next bytes available hashes them,
    from the buffer in hand, then from the file (page cache) for bytes other writes put there earlier. One
    thread at a time hashes a given tensor, so each is hashed once, front to back, with no pass afterwards.
    """

    def __init__(self, path: Path, tensors: list[TensorInfo]) -> None:
        self.fd = os.open(path, os.O_RDWR)
        self._mm: mmap.mmap | None = None
        self._lock = threading.Lock()
        self._written: list[tuple[int, int]] = []  # merged, sorted [a, b) spans written so far
        self._tensors = sorted(tensors, key=lambda t: t.offset)
        self._starts = [t.offset for t in self._tensors]
        self._pos = [t.offset for t in self._tensors]  # next byte to hash, per tensor
        self._sha = [hashlib.sha256() for _ in self._tensors]
        self._busy = [False] * len(self._tensors)

    def _add_span(self, a: int, b: int) -> None:
        spans = self._written
        i = bisect.bisect_left(spans, (a, a))
        if i > 0 and spans[i - 1][1] >= a:
            i -= 1
        j = i
        while j < len(spans) and spans[j][0] <= b:
            a, b = min(a, spans[j][0]), max(b, spans[j][1])
            j += 1
        spans[i:j] = [(a, b)]

    def _written_to(self, pos: int) -> int:
        """End of the written span holding byte `pos`, or `pos` when it is not written yet."""
        i = bisect.bisect_right(self._written, (pos, 1 << 62)) - 1
        return self._written[i][1] if i >= 0 and self._written[i][0] <= pos < self._written[i][1] else pos

    def write(self, offset: int, view: memoryview) -> None:
        """pwrite `view` at `offset`, then hash whatever tensor bytes became contiguous. Blocking."""
        done = 0
        while done < len(view):
            n = os.pwrite(self.fd, view[done:], offset + done)
            if n <= 0:
                raise OSError(f"short write to the shard cache at byte {offset + done}")
            done += n
        end = offset + len(view)
        claimed: list[int] = []
        with self._lock:
            self._add_span(offset, end)
            i = max(bisect.bisect_right(self._starts, offset) - 1, 0)
            while i < len(self._tensors) and self._tensors[i].offset < end:
                t = self._tensors[i]
                if (
                    t.end > offset
                    and not self._busy[i]
                    and self._pos[i] < t.end
                    and self._written_to(self._pos[i]) > self._pos[i]
                ):
                    self._busy[i] = True
                    claimed.append(i)
                i += 1
        for i in claimed:
            self._hash_forward(i, offset, view)

    def _hash_forward(self, i: int, offset: int, view: memoryview) -> None:
        t, sha = self._tensors[i], self._sha[i]
        try:
            while True:
                with self._lock:
                    a = self._pos[i]
                    upto = min(self._written_to(a), t.end)
                    if upto <= a:
                        self._busy[i] = False
                        return
                if offset <= a < offset + len(view):
                    b = min(upto, offset + len(view))
                    sha.update(view[a - offset : b - offset])
                else:
                    b = min(upto, a + BUFFER)
                    with memoryview(self._file_map())[a:b] as back:
                        sha.update(back)
                with self._lock:
                    self._pos[i] = b
        except BaseException:
            with self._lock:
                self._busy[i] = False
            raise

    def _file_map(self) -> mmap.mmap:
        with self._lock:
            if self._mm is None:
                self._mm = mmap.mmap(self.fd, 0, access=mmap.ACCESS_READ)
            return self._mm

    def digests(self) -> dict[str, str]:
        """sha256 hex of every tensor whose bytes were all written (call after the writes finished)."""
        done = zip(self._tensors, self._sha, self._pos, strict=True)
        return {t.name: sha.hexdigest() for t, sha, pos in done if pos == t.end}

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
        os.close(self.fd)


class _FileSink:
    """A connection's two receive buffers: one fills while the other is written and hashed in a thread."""

    def __init__(self, writer: _ShardWriter, spawn: Callable[..., None], limiter: trio.CapacityLimiter,
                 on_written: Callable[[int], None]) -> None:  # fmt: skip
        self._writer = writer
        self._spawn = spawn
        self._limiter = limiter
        self._on_written = on_written
        self._free_send, self._free = trio.open_memory_channel[bytearray](2)
        for _ in range(2):
            self._free_send.send_nowait(bytearray(BUFFER))

    async def buffer(self, want: int) -> bytearray:
        return await self._free.receive()

    async def put(self, offset: int, buf: bytearray, n: int) -> None:
        self._spawn(self._write, offset, buf, n)

    def give_back(self, buf: bytearray) -> None:
        self._free_send.send_nowait(buf)

    async def _write(self, offset: int, buf: bytearray, n: int) -> None:
        await trio.to_thread.run_sync(self._writer.write, offset, memoryview(buf)[:n], limiter=self._limiter)
        self._free_send.send_nowait(buf)
        self._on_written(n)


@asynccontextmanager
async def _first_error_wins() -> AsyncIterator[Callable[..., None]]:
    """A nursery yielding `spawn(fn, *args)`: the first EldricError or OSError of a task cancels the others
    and is raised as itself (not in an exception group) once every task is done."""
    failed: list[BaseException] = []
    async with trio.open_nursery() as nursery:

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

    def __init__(self, pool: _Pool, peers: list[str], model_id: str, *, retries: int, backoff: float) -> None:
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

    async def get_range(self, start: int, end: int, sink: _Sink, *, hint: int = 0) -> int:
        """Fetch [start, end) into `sink`, resuming after breaks. Returns the file size.

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
            headers = [("range", f"bytes={pos}-{end - 1}")]
            if peer in self.etags:
                headers.append(("if-range", self.etags[peer]))
            before = pos
            try:
                async with self.pool.get(peer, self.blob, headers) as resp:
                    if resp.status == 200:
                        raise _PeerRefused(
                            f"{peer} answered 200 to a Range request (ignores Range, or the file changed)"
                        )
                    if resp.status != 206:
                        body = (await resp.read(300)).decode("utf-8", "replace")
                        if resp.status == 404:
                            raise _NotServed(f"{peer} does not serve {self.model_id!r}: {body}")
                        if 400 <= resp.status < 500:
                            raise _PeerRefused(
                                f"{peer} answered {resp.status} for bytes {pos}-{end - 1}: {body}"
                            )
                        raise PeerUnavailable(f"{peer} answered {resp.status}: {body}")
                    a, b, size = _parse_content_range(resp.headers.get("content-range"))
                    if a == pos and b == size < end:
                        end = size  # clipped at the end of the file (only the header probe asks past it)
                    if a != pos or b != end:
                        raise _PeerRefused(f"{peer} sent bytes {a}-{b - 1}, asked for {pos}-{end - 1}")
                    if resp.length is not None and resp.length != end - pos:
                        raise _PeerRefused(
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
                                    raise _Broken(f"{peer} ended the body at byte {pos + n}, expected {end}")
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
                        raise _PeerRefused(f"{peer} sent more than the {end - start} bytes asked for")
            except _PeerRefused as exc:
                log.warning("%s", exc)
                self.bad[peer] = exc
                if all(p in self.bad for p in self.peers):
                    if all(isinstance(e, _NotServed) for e in self.bad.values()):
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
                        self.bad[peer] = _NotServed(f"{peer} does not serve {self.model_id!r}")
                        continue
                    if resp.status != 200:
                        raise PeerUnavailable(f"{peer} answered {resp.status} to {path}")
                    body = await resp.read(MAX_TENSOR_TABLE + 1)
                if len(body) > MAX_TENSOR_TABLE:
                    raise _PeerRefused(f"{peer} sent a {len(body)}-byte answer to {path}")
                self.bytes_fetched += len(body)
                return peer, json.loads(body)
            except (PeerUnavailable, ValueError) as exc:
                last = exc
                await trio.sleep(min(self.backoff * 2 ** (attempt // len(self.peers)), 5.0))
        if (
            self.bad
            and all(isinstance(e, _NotServed) for e in self.bad.values())
            and len(self.bad) == len(self.peers)
        ):
            raise ModelNotFound(f"no data peer serves {self.model_id!r}")
        reasons = "; ".join(str(e) for e in self.bad.values()) or str(last)
        raise PeerUnavailable(f"no data peer answered {path}: {reasons}") from last


def _check_tensor_table(index: GGUFIndex, doc: Any) -> tuple[dict[str, str], str | None]:
    """Published hashes from a /tensors document, after checking it agrees with the parsed header."""
    if not isinstance(doc, dict) or not isinstance(doc.get("tensors"), list):
        raise RemoteProtocolError("tensor table is not a JSON object with a 'tensors' list")
    if doc.get("file_size") != index.file_size:
        raise RemoteProtocolError(
            f"tensor table is for a {doc.get('file_size')}-byte file, header says {index.file_size}"
        )
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


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _index_from_table(doc: Any, data_offset: int, file_size: int) -> GGUFIndex:
    """A provisional index from a peer's /tensors document, to plan the transfer while the header parses.

    Only names, types, shapes, offsets, sizes and the layer count are taken from it; `fetch_assignment` checks
    them against the parsed header before any tensor is recorded as verified. Raises RemoteProtocolError.
    """
    if not isinstance(doc, dict) or not isinstance(doc.get("tensors"), list):
        raise RemoteProtocolError("tensor table is not a JSON object with a 'tensors' list")
    n_layers: Any = doc.get("n_layers")
    alignment: Any = doc.get("alignment")
    if not _int(n_layers) or not 0 < n_layers <= 1 << 16:
        raise RemoteProtocolError(f"tensor table has no valid n_layers ({n_layers!r})")
    if not _int(alignment) or not 0 < alignment <= 1 << 20 or alignment & (alignment - 1):
        raise RemoteProtocolError(f"tensor table has no valid alignment ({alignment!r})")
    tensors: dict[str, TensorInfo] = {}
    for row in doc["tensors"]:
        if not isinstance(row, dict):
            raise RemoteProtocolError("tensor table row is not an object")
        fields: list[Any] = [row.get(k) for k in ("name", "type_id", "shape", "offset", "size")]
        name, type_id, shape, offset, size = fields
        ok = (
            isinstance(name, str) and 0 < len(name) <= MAX_NAME and name not in tensors
            and _int(type_id) and _int(offset) and _int(size) and size >= 0
            and data_offset <= offset and offset + size <= file_size
            and isinstance(shape, list) and 1 <= len(shape) <= MAX_DIMS
            and all(_int(d) and d > 0 for d in shape)
        )  # fmt: skip
        try:
            ggml_type = GGMLQuantizationType(type_id) if ok else None
        except ValueError:
            ggml_type = None
        if ggml_type is None:
            raise RemoteProtocolError(f"tensor table row {str(row)[:200]} is not a valid tensor")
        tensors[name] = TensorInfo(name, ggml_type, tuple(shape), offset, size)
    meta = {"general.architecture": "table", "table.block_count": n_layers}
    return GGUFIndex(0, meta, tensors, alignment, data_offset, file_size=file_size)


def _check_against_header(index: GGUFIndex, plan: GGUFIndex, doc: Any, start: int, end: int) -> None:
    """The header parsed while the transfer ran must agree with the table the transfer was planned from."""
    _check_tensor_table(index, doc)
    if index.data_offset != plan.data_offset or index.n_layers != plan.n_layers:
        raise RemoteProtocolError(
            f"tensor table (data offset {plan.data_offset}, {plan.n_layers} layers) disagrees with the GGUF "
            f"header (data offset {index.data_offset}, {index.n_layers} layers)"
        )
    got = [t.name for t in index.assignment_tensors(start, end)]
    if got != [t.name for t in plan.assignment_tensors(start, end)]:
        raise RemoteProtocolError("tensor table and GGUF header disagree on the assignment's tensors")


async def _fetch_header(s: _Session, hint: int | None = None) -> tuple[bytes, int, GGUFIndex | None]:
    """(header bytes, file size, parsed index or None).

    With `hint` (the peer's data offset) the header is one request; the index is the one this process parsed
    before for the same bytes, or None: parse it while the tensors transfer. Without a hint (or a bad one) the
    prefix grows until the parser stops raising TruncatedHeader, and the index is always returned.
    """
    sink = _MemorySink()
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
    max_in_flight: int = 4,
    chunk_size: int = CHUNK,
    retries: int = 4,
    backoff: float = 0.2,
    verify_cached: bool = True,
) -> FetchResult:
    """Fetch layers [start, end) of `model_id` from data peers (base URLs) into the shard cache.

    Returns a FetchResult whose `path` opens with `GGUFFile`. A covered assignment is served from the cache
    without network (its bytes re-hashed unless `verify_cached=False`). `connect(host, port, tls)` opens the
    byte stream HTTP runs over (default: TCP, TLS for https). Raises IntegrityError naming a tensor whose
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
        _PeerURL.parse(p)

    pool = _Pool(connect or open_stream, TIMEOUT)
    try:
        s = _Session(pool, peers, model_id, retries=retries, backoff=backoff)
        _, doc = await s.get_json(f"/api/v1/models/{model_id}/tensors")
        hint = doc.get("data_offset") if isinstance(doc, dict) else None
        header, size, index = await _fetch_header(s, hint if _int(hint) else None)
        plan = index if index is not None else _index_from_table(doc, len(header), size)
        if not 0 <= start < end <= plan.n_layers:
            raise UsageError(
                f"layer range [{start}, {end}) is not inside [0, {plan.n_layers}) of {model_id!r}"
            )
        hashes, file_sha = _check_tensor_table(plan, doc)
        t_header = time.perf_counter()
        await trio.to_thread.run_sync(lambda: cache.prepare(file_size=size, header=header, sha256=file_sha))
        wanted = plan.assignment_tensors(start, end)
        have = cache.verified
        todo = [t for t in wanted if have.get(t.name) != hashes[t.name]]
        chunks = plan_chunks(todo, gap=plan.alignment, chunk=chunk_size)
        total = sum(b - a for a, b in chunks)
        writer = _ShardWriter(cache.path, todo)
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
            _check_against_header(index, plan, doc, start, end)
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
    writer: _ShardWriter,
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
            sink = _FileSink(writer, spawn, limiter, written)
            while queue:
                a, b = queue.popleft()
                await s.get_range(a, b, sink, hint=i)

        for i in range(max(1, min(width, len(chunks)))):
            spawn(worker, i)
