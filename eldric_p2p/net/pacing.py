"""TCP for latency-critical frames: a congestion control that sends a frame at once instead of pacing it.

    with unpaced():
        stream = await trio.open_tcp_stream(host, port)      # or trio.open_tcp_listeners(...)

A pipeline link sends one frame per decode step (a hidden state: 3.6 KB for Qwen2.5-0.5B in f32, 16 KB for a
4096-wide model) and then waits for the next step. Where the system's TCP congestion control paces (bbr, the
default of many cloud images), the kernel sends such a frame a few segments at a time at a rate of about
cwnd / RTT, so a frame arrives later the longer the path: measured in the NAT lab with bbr at 20 ms per WAN
link (40 ms round trip), the last bytes of a 3662-byte frame left 1.3 ms after the first, and of a 16400-byte
frame 11.5 ms after, on every hop; with cubic both arrive whole (0.01 ms). cubic and reno do not pace (without
the fq qdisc), so sockets opened inside `unpaced()` switch to cubic (else reno) when the default is a pacing
one, and keep any other default. The switch must come before the connection is established: bbr turns pacing
on for the socket when the connection starts, for good. Sockets trio creates (connecting or listening; an
accepted socket inherits its listener's) pass through a socket factory that applies it inside the block only;
everything else keeps the system's choice (bulk downloads, say, where bbr is at its best).
"""

from __future__ import annotations

import contextlib
import logging
import socket as stdlib_socket
from collections.abc import Iterator
from contextvars import ContextVar

import trio

log = logging.getLogger(__name__)

PACING = ("bbr",)  # congestion controls that pace every flow (bbr, bbr2, bbr3 all start with it)
UNPACED = (b"cubic", b"reno")  # the first of these the kernel lets us set
INET = (stdlib_socket.AF_INET, stdlib_socket.AF_INET6)
TCP_CONGESTION = getattr(stdlib_socket, "TCP_CONGESTION", None)  # Linux only

_unpaced: ContextVar[bool] = ContextVar("eldric_unpaced_tcp", default=False)
_installed: trio.lowlevel.RunVar[bool] = trio.lowlevel.RunVar("eldric_unpaced_factory", default=False)


def congestion_control(sock: stdlib_socket.socket | trio.socket.SocketType) -> str | None:
    """The socket's TCP congestion control, or None where the OS does not say."""
    if TCP_CONGESTION is None:
        return None
    try:
        return sock.getsockopt(stdlib_socket.IPPROTO_TCP, TCP_CONGESTION, 16).split(b"\0")[0].decode()
    except OSError:
        return None


def unpace(sock: stdlib_socket.socket | trio.socket.SocketType) -> str | None:
    """Switch a TCP socket (not yet connected) from a pacing congestion control to one that does not pace;
    returns the one it has now (None where the OS does not say)."""
    cc = congestion_control(sock)
    if cc is None or not cc.startswith(PACING):
        return cc
    for name in UNPACED:
        try:
            sock.setsockopt(stdlib_socket.IPPROTO_TCP, TCP_CONGESTION, name)
        except OSError:  # not built, or not allowed for this user (tcp_allowed_congestion_control)
            continue
        return name.decode()
    log.debug("TCP congestion control %s paces and none of %s could be set", cc, UNPACED)
    return cc


class _Factory(trio.abc.SocketFactory):
    """Trio's sockets, or those of the factory installed before: TCP ones unpaced inside `unpaced()`."""

    def __init__(self, inner: trio.abc.SocketFactory | None) -> None:
        self.inner = inner

    def socket(
        self, family: int | None = None, type: int | None = None, proto: int | None = None
    ) -> trio.socket.SocketType:
        family = stdlib_socket.AF_INET if family is None or family == -1 else family
        type = stdlib_socket.SOCK_STREAM if type is None or type == -1 else type
        proto = 0 if proto is None or proto == -1 else proto
        if self.inner is not None:
            sock = self.inner.socket(family, type, proto)
        else:
            sock = trio.socket.from_stdlib_socket(stdlib_socket.socket(family, type, proto))
        flags = getattr(stdlib_socket, "SOCK_NONBLOCK", 0) | getattr(stdlib_socket, "SOCK_CLOEXEC", 0)
        if _unpaced.get() and type & ~flags == stdlib_socket.SOCK_STREAM and family in INET:
            unpace(sock)
        return sock


@contextlib.contextmanager
def unpaced() -> Iterator[None]:
    """TCP sockets that trio creates in this block (and in tasks it starts from it) do not pace; see the
    module docstring. Inside `trio.run` only."""
    if TCP_CONGESTION is not None and not _installed.get():
        trio.socket.set_custom_socket_factory(_Factory(trio.socket.set_custom_socket_factory(None)))
        _installed.set(True)
    token = _unpaced.set(True)
    try:
        yield
    finally:
        _unpaced.reset(token)
