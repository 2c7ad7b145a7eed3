"""Range client: HTTP/1.1 GET over any trio byte stream, with keep-alive connections per data peer.

Owns the peer URL, the connection and its response reader, the pool, `Content-Range` parsing and the errors a
range transfer tells apart (`PeerRefused` and `NotServed`: do not ask this peer again; `Broken`: retry,
resuming where the bytes stopped). `data.fetcher` plans what to ask for and checks each answer.

The client is small and written here: h11 parses every response head (and any body without a
Content-Length); a body with one is read with `recv_into` straight into the caller's buffer (`data.sinks`
writes and hashes it in a thread while the next one fills). httpx was measured first: httpcore reads 64 KiB
at a time and copies each byte through h11's buffer and its iterators, which capped a fetch at 130-300 MB/s
on loopback where this reader moves 0.7-1.4 GB/s (benchmarks/bench_fetch.py).
Pass a `Connect` to run HTTP over another byte stream (a link, or a wrapper that injects faults in tests).
"""

from __future__ import annotations

import collections
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11
import trio

from eldric_p2p.errors import PeerUnavailable, RemoteProtocolError, UsageError

MAX_RESPONSE_HEAD = 64 << 10
TIMEOUT = 30.0  # seconds without progress on a connection (connect: CONNECT_TIMEOUT)
CONNECT_TIMEOUT = 5.0
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$", re.ASCII)

Connect = Callable[[str, int, bool], Awaitable[trio.abc.Stream]]  # (host, port, tls) -> connected byte stream
Sign = Callable[[str, str, str], list[tuple[str, str]]]  # (method, target, host) -> extra headers (credentials)


class PeerRefused(RemoteProtocolError):
    """This peer broke the range protocol (e.g. 200 instead of 206): do not ask it again."""


class NotServed(PeerRefused):
    """This peer does not serve the model (404)."""


class Broken(PeerUnavailable):
    """The connection failed, timed out or ended early: retry, resuming where the bytes stopped."""


def parse_content_range(value: str | None) -> tuple[int, int, int]:
    """(start, end, file size) of a 206's Content-Range, `end` exclusive. Raises PeerRefused."""
    m = _CONTENT_RANGE.match(value or "")
    if not m:
        raise PeerRefused(f"206 without a valid Content-Range ({value!r})")
    return int(m.group(1)), int(m.group(2)) + 1, int(m.group(3))


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
class PeerURL:
    """A data peer's base URL, split for connecting. `PeerURL.parse(base)` raises UsageError for a bad one."""

    host: str
    port: int
    tls: bool
    prefix: str  # path of the base URL, without the trailing slash
    authority: str  # Host header

    @classmethod
    def parse(cls, base: str) -> PeerURL:
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
    raised as `Broken`.
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
            raise Broken("the peer sent bytes past the response body")  # nothing is pipelined

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
                raise Broken(f"connection closed with {self._left} body bytes missing")
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
                raise Broken(f"bad HTTP body: {exc}") from exc
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
            raise Broken(f"receiving failed: {exc!r}") from exc

    async def receive_some(self, n: int) -> bytes:
        try:
            with trio.fail_after(self.timeout):
                data = await self.stream.receive_some(n)
                return data if isinstance(data, bytes) else bytes(data)
        except (OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
            raise Broken(f"receiving failed: {exc!r}") from exc

    async def get(self, target: str, headers: list[tuple[str, str]]) -> _Response:
        """Send `GET target` and read the response head."""
        h = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)
        head = [("host", self.authority), ("accept-encoding", "identity"), *headers]
        request = h11.Request(method="GET", target=target, headers=head)
        try:
            with trio.fail_after(self.timeout):
                await self.stream.send_all(h.send(request) + h.send(h11.EndOfMessage()))
        except (OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
            raise Broken(f"sending the request failed: {exc!r}") from exc
        while True:
            try:
                ev = h.next_event()
            except h11.RemoteProtocolError as exc:
                raise Broken(f"bad HTTP response head: {exc}") from exc
            if ev is h11.NEED_DATA:
                h.receive_data(await self.receive_some(1 << 16))
            elif isinstance(ev, h11.Response):
                return _Response(self, h, ev)
            elif isinstance(ev, h11.ConnectionClosed):
                raise Broken("the peer closed the connection without answering")
            # InformationalResponse (1xx): keep reading

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


class Pool:
    """Keep-alive connections per peer. `async with pool.get(peer, path, headers) as response: ...`."""

    def __init__(self, connect: Connect, timeout: float, sign: Sign | None = None) -> None:
        self.connect = connect
        self.timeout = timeout
        self.sign = sign  # each request's credential headers (a federation's signed requests)
        self.idle: dict[str, list[_Connection]] = collections.defaultdict(list)
        self.urls: dict[str, PeerURL] = {}

    async def _open(self, url: PeerURL) -> _Connection:
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                stream = await self.connect(url.host, url.port, url.tls)
        except (OSError, trio.BrokenResourceError, trio.TooSlowError, ssl.SSLError) as exc:
            raise Broken(f"cannot connect to {url.authority}: {exc!r}") from exc
        return _Connection(stream, url.authority, self.timeout)

    @asynccontextmanager
    async def get(self, peer: str, path: str, headers: list[tuple[str, str]]) -> AsyncIterator[_Response]:
        url = self.urls.get(peer) or self.urls.setdefault(peer, PeerURL.parse(peer))
        if self.sign is not None:
            headers = headers + self.sign("GET", url.prefix + path, url.authority)
        idle = self.idle[peer]
        conn = idle.pop() if idle else None
        resp: _Response | None = None
        try:
            if conn is not None:
                try:
                    resp = await conn.get(url.prefix + path, headers)
                except Broken:  # an idle connection the peer closed meanwhile: one fresh try, not a failure
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
