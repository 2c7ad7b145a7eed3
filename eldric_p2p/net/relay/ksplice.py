"""The TCP lane's copy done by the kernel: splice(2) through a pipe per direction, in a worker thread.

Copying a relayed stream in the event loop costs a trio wake-up, a `recv` into a Python bytes object and a
`send` per chunk: tens of microseconds of Python, more when the relay shares its CPUs with busy processes (a
NAT lab's stages, a home machine's other work), and each of them delays a pipeline frame passing through.
`_ksplice.pump` (C) moves the bytes socket -> pipe -> socket inside the kernel and waits in `poll` between
chunks, holding no GIL from start to end: a frame passes the relay in a few microseconds and is never copied
into user space, and the relay's event loop (QUIC control, other members) never waits for it. (The same loop
in Python in a thread was slower than the event loop's copy: every chunk waited for the GIL.)

`kernel_splice(a, b, ...)` keeps the lane's semantics (tcplane.py): an EOF on one side is passed on as a
half-close, a broken side ends both directions, and a cancelled caller stops the thread at once (a wake-up
pipe in the same `poll`). It returns the bytes moved, or None when the kernel cannot splice these sockets and
nothing was read: then the caller copies in the loop. The caller must not touch the sockets while it runs.
"""

from __future__ import annotations

import os

import trio

try:
    from eldric_p2p.net.relay import _ksplice  # type: ignore[attr-defined]
except ImportError:  # not built (no C compiler at install) or not Linux
    _ksplice = None

__all__ = ["available", "kernel_splice"]


def available() -> bool:
    """The C pump is built and this platform has splice(2)."""
    return _ksplice is not None and hasattr(_ksplice, "pump")


async def kernel_splice(
    a: trio.SocketStream, b: trio.SocketStream, *, chunk: int, limiter: trio.CapacityLimiter | None = None
) -> int | None:
    """Splice `a` and `b` both ways in a worker thread until both directions ended or a side broke. Returns
    the bytes moved, or None when the kernel could not splice them (nothing was read: copy in the loop
    instead). Cancellation stops the thread; it is delivered once it returned. The thread holds a token of
    `limiter` (default: one of its own: the caller bounds the splices, not trio's shared default limiter)."""
    assert _ksplice is not None
    limiter = limiter or trio.CapacityLimiter(1)
    wake_r, wake_w = os.pipe2(os.O_CLOEXEC)
    result: tuple[int, int] = (0, 0)

    async def waker(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            os.write(wake_w, b"x")

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(waker)
            try:
                result = await trio.to_thread.run_sync(
                    _ksplice.pump, a.socket.fileno(), b.socket.fileno(), wake_r, chunk, limiter=limiter
                )
            finally:
                nursery.cancel_scope.cancel()
    finally:
        os.close(wake_r)
        os.close(wake_w)
    code, moved = result
    return None if code < 0 else moved
