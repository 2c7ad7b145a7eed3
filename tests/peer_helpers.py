"""Helpers shared by the peer-table and relay tests (relay, discovery, the TCP lane)."""

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


async def eventually(cond: Callable[[], bool]) -> None:
    """Poll `cond` (under the caller's deadline) for state that has no event: counters, flags."""
    while not cond():  # noqa: ASYNC110
        await trio.sleep(0.02)


async def roundtrip(stream: trio.abc.Stream, payload: bytes) -> bytes:
    """Send `payload` to an echoing peer while reading the echo back; returns what came back."""
    got = bytearray()

    async def reader() -> None:
        while len(got) < len(payload):
            chunk = await stream.receive_some()
            assert chunk, "stream ended early"
            got.extend(chunk)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await stream.send_all(payload)
    return bytes(got)
