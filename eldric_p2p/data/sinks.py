"""Sinks: where a range transfer's bytes go, buffer by buffer.

Owns the `Sink` interface `data.fetcher` receives into, the in-memory sink (the header), and the shard cache
file's writer: each connection's two 4 MiB buffers, one filling while a worker thread `pwrite`s the other at
its file offset and hashes every tensor front to back as its bytes land.
"""

from __future__ import annotations

import bisect
import hashlib
import mmap
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import trio

from eldric_p2p.data.gguf_index import TensorInfo

BUFFER = 4 << 20  # receive buffer; each connection has two (one fills while the other is written and hashed)


class Sink(Protocol):
    """Where a range's bytes go: `buffer` lends a buffer to fill, `put` hands it back holding `n` bytes that
    start at file `offset`, `give_back` returns one left unfilled."""

    async def buffer(self, want: int) -> bytearray: ...

    async def put(self, offset: int, buf: bytearray, n: int) -> None: ...

    def give_back(self, buf: bytearray) -> None: ...


class MemorySink:
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


class ShardWriter:
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


class FileSink:
    """A connection's two receive buffers: one fills while the other is written and hashed in a thread."""

    def __init__(self, writer: ShardWriter, spawn: Callable[..., None], limiter: trio.CapacityLimiter,
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
