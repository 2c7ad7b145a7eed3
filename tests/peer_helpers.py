"""Helpers shared by the peer-table tests (relay, discovery)."""

from __future__ import annotations

from collections.abc import Callable

import trio

from eldric_p2p.net.discovery import PeerTable


async def wait_for(tables: list[PeerTable], cond: Callable[[], bool]) -> None:
    """Wait (under the caller's deadline) until `cond` holds, re-checking whenever a table changes."""
    while True:
        versions = [t.version for t in tables]  # taken before the check, so no change slips between
        if cond():
            return
        async with trio.open_nursery() as nursery:
            for t, v in zip(tables, versions, strict=True):

                async def changed(t: PeerTable = t, v: int = v) -> None:
                    await t.wait_changed(v)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(changed)
