"""Nurseries whose errors read like the code that raised them.

trio (>= 0.25) wraps whatever leaves a nursery in an `ExceptionGroup`, even a lone error. Every nursery in
this package is an implementation detail of the function that opens it: its callers catch `PeerUnavailable`
or `UsageError`, not a group. `open_nursery` is `trio.open_nursery` that raises a group of one as that one
exception (nested groups of one included), and lets real groups of several through as they are:

    async with open_nursery() as nursery:
        nursery.start_soon(reader)
        await writer()          # a PeerUnavailable here reaches the caller as a PeerUnavailable
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio


def lone_error(group: BaseExceptionGroup) -> BaseException | None:
    """The one exception inside `group` and its nested groups of one, or None if there are several."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        if len(exc.exceptions) != 1:
            return None
        exc = exc.exceptions[0]
    return exc


@asynccontextmanager
async def open_nursery() -> AsyncIterator[trio.Nursery]:
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        exc = lone_error(group)
        if exc is None:
            raise
        raise exc from exc.__cause__  # its own cause kept; the group it travelled in is not news
