"""A UDP socket read and written in batches, for the QUIC drivers.

trio's socket methods cost a checkpoint, an address resolution and a retry loop per datagram; at QUIC's
1350-byte datagrams that was a quarter of a relayed byte's CPU time. `DatagramSocket` keeps a plain
non-blocking socket:

- `receive_batch` waits until the socket is readable once, then drains what the kernel holds (up to a bound),
  so one wake-up of the reading task handles a burst;
- `send_batch` sends what a QUIC connection queued at once: runs of equal-sized datagrams to one address go
  out as one `sendmsg` with UDP generic segmentation offload (UDP_SEGMENT, Linux >= 4.18) where the kernel has
  it, the kernel cutting the run back into datagrams; elsewhere one `sendto` each. With UDP_GRO on, the kernel
  may likewise hand us a run of datagrams in one buffer, cut here at the segment size it reports.

Errors: a datagram that cannot be sent (no route, ICMP unreachable) is dropped, as the network would drop it;
QUIC's loss recovery sees a lost datagram. A full send buffer waits for the socket to become writable.
"""

from __future__ import annotations

import errno
import socket
import struct
import sys
from collections.abc import Sequence
from typing import Any

import trio

NetworkAddress = Any

MAX_DATAGRAM = 65535
RECEIVE_BURST = 64  # datagrams handled per wake-up before other tasks get a turn
GSO_MAX_SEGMENTS = 64  # the kernel's UDP_MAX_SEGMENTS
GSO_MAX_BYTES = 65000  # a GSO buffer is one IP datagram: under 64 KiB with headers
SOL_UDP = getattr(socket, "SOL_UDP", 17)
UDP_SEGMENT = 103  # linux/udp.h
UDP_GRO = 104
_GSO_SIZE = struct.Struct("=H")


class DatagramSocket:
    """A bound, non-blocking UDP socket with batched receive and send. Close it with `close()`."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.family = sock.family
        self.gso = sys.platform == "linux"  # off for good after the first refusal
        self.gro = False
        if sys.platform == "linux":
            try:
                sock.setsockopt(SOL_UDP, UDP_GRO, 1)
                self.gro = True
            except OSError:
                pass
        self.datagrams_sent = 0
        self.datagrams_received = 0
        self.send_errors = 0

    @classmethod
    def bind(cls, family: int, address: NetworkAddress) -> DatagramSocket:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.bind(address)
        except OSError:
            sock.close()
            raise
        return cls(sock)

    @classmethod
    def open(cls, family: int) -> DatagramSocket:
        """A socket on an ephemeral port of every address of `family` (AF_INET or AF_INET6)."""
        return cls.bind(family, ("0.0.0.0", 0) if family == socket.AF_INET else ("::", 0))

    def getsockname(self) -> NetworkAddress:
        return self.sock.getsockname()

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> DatagramSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------- receive

    async def receive_batch(self, limit: int = RECEIVE_BURST) -> list[tuple[bytes, NetworkAddress]]:
        """Wait for datagrams, then return every one the kernel holds, up to about `limit` (never empty)."""
        while True:
            await trio.lowlevel.wait_readable(self.sock)
            out: list[tuple[bytes, NetworkAddress]] = []
            while len(out) < limit:
                try:
                    if self.gro:
                        data, ancdata, _flags, addr = self.sock.recvmsg(MAX_DATAGRAM, 64)
                    else:
                        data, addr = self.sock.recvfrom(MAX_DATAGRAM)
                        ancdata = []
                except (BlockingIOError, InterruptedError):
                    break
                except ConnectionError:  # ICMP unreachable from an earlier send: not fatal for UDP
                    continue
                segment = _gro_segment(ancdata)
                if segment and len(data) > segment:
                    out.extend((data[i : i + segment], addr) for i in range(0, len(data), segment))
                else:
                    out.append((data, addr))
            if out:
                self.datagrams_received += len(out)
                return out

    # ------------------------------------------------------------------------------------------- send

    async def send(self, data: bytes, addr: NetworkAddress) -> None:
        """Send one datagram (dropped, and counted, if the network refuses it)."""
        while True:
            try:
                self.sock.sendto(data, addr)
                self.datagrams_sent += 1
                return
            except (BlockingIOError, InterruptedError):
                await trio.lowlevel.wait_writable(self.sock)
            except OSError:
                self.send_errors += 1
                return

    async def send_batch(self, datagrams: Sequence[tuple[bytes, NetworkAddress]]) -> None:
        """Send datagrams in order, runs of equal size to one address as one GSO send where possible."""
        i, n = 0, len(datagrams)
        while i < n:
            data, addr = datagrams[i]
            j = i + 1
            if self.gso:
                size, total = len(data), len(data)
                # a run: same address, same size, the last one may be shorter (then it ends the run)
                while (
                    j < n
                    and j - i < GSO_MAX_SEGMENTS
                    and datagrams[j][1] == addr
                    and len(datagrams[j][0]) <= size
                    and total + len(datagrams[j][0]) <= GSO_MAX_BYTES
                    and len(datagrams[j - 1][0]) == size
                ):
                    total += len(datagrams[j][0])
                    j += 1
            if j - i > 1 and await self._send_gso([d for d, _ in datagrams[i:j]], addr):
                i = j
                continue
            await self.send(data, addr)
            i += 1

    async def _send_gso(self, run: list[bytes], addr: NetworkAddress) -> bool:
        """One sendmsg with UDP_SEGMENT; False (and GSO off) where the kernel or the route refuses it."""
        ancillary = [(SOL_UDP, UDP_SEGMENT, _GSO_SIZE.pack(len(run[0])))]
        while True:
            try:
                self.sock.sendmsg(run, ancillary, 0, addr)
                self.datagrams_sent += len(run)
                return True
            except (BlockingIOError, InterruptedError):
                await trio.lowlevel.wait_writable(self.sock)
            except OSError as exc:
                if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOPROTOOPT, errno.EIO):
                    self.gso = False  # no GSO here (old kernel, a device without checksum offload)
                    return False
                self.send_errors += 1
                return True  # unreachable: dropped like a lost datagram


def _gro_segment(ancdata: list[tuple[int, int, bytes]]) -> int:
    """The segment size of a coalesced receive (the kernel reports an int), or 0."""
    for level, kind, value in ancdata:
        if level == SOL_UDP and kind == UDP_GRO:
            if len(value) >= 4:
                return int.from_bytes(value[:4], sys.byteorder, signed=True)
            if len(value) >= 2:
                return int(_GSO_SIZE.unpack_from(value)[0])
    return 0
