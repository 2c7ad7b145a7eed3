"""Progress bars for the long steps a user waits on: assembling a reference model, and a deploy.

    path = assemble_with_progress(lookup("qwen"))           # one bar: bytes assembled, then sha256 checked
    dep = await deploy_with_progress(client, url, body)     # one bar per stage: bytes of its layers fetched

Bars go to stderr through rich, so stdout stays the answer (and `--json` stays JSON). Where stderr is not a
terminal rich draws nothing live; the caller's own summary lines still say what happened.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import httpx
import trio
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from eldric_p2p.data.refmodels import RefModel, assemble
from eldric_p2p.tasks import open_nursery

POLL_S = 0.5


def _bar(console: Console | None = None) -> Progress:
    return Progress(
        TextColumn("{task.description:<28}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console or Console(file=sys.stderr),
        transient=False,
    )


def assemble_with_progress(model: RefModel, dest: Path | None = None) -> Path:
    """`refmodels.assemble` with a bar of the bytes written (and then hashed)."""
    with _bar() as bar:
        task = bar.add_task(model.name, total=model.size)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        return assemble(model, dest, progress=progress)


def _pending(status: Any, model: str) -> dict[str, Any] | None:
    """The deployment of `model` still being set up, from `GET /api/v1/pipeline/status`."""
    if not isinstance(status, dict):
        return None
    for dep in status.get("deploying") or []:
        if isinstance(dep, dict) and dep.get("model") == model:
            return dep
    return None


def _stage_progress(s: Any) -> tuple[int, str, int, int] | None:
    """(index, label, bytes done, bytes total) of one stage of the status, or None where it is not that
    shape (the status comes from another node: anything it holds may be missing or of the wrong type)."""
    if not isinstance(s, dict):
        return None
    index, start, end, p = s.get("index"), s.get("start"), s.get("end"), s.get("progress")
    if not all(isinstance(v, int) for v in (index, start, end)) or not isinstance(p, dict):
        return None
    done, total = p.get("done"), p.get("total")
    if not isinstance(done, int) or not isinstance(total, int) or total <= 0:
        return None  # a stage still reading the header has no size to draw against yet
    if s.get("state") in ("loading", "ready"):
        done = total
    label = f"{str(s.get('worker', '?'))[:40]} layers {start}-{end - 1}"
    return index, label, min(max(done, 0), total), total


async def deploy_with_progress(
    client: httpx.AsyncClient, base: str, body: dict[str, Any], *, console: Console | None = None
) -> httpx.Response:
    """POST the deploy (with `client`'s timeout) and, while it runs, draw each stage's fetch from the
    coordinator's status.

    Returns the deploy's response (the caller reads its JSON or error). A status that cannot be read only
    costs the bars, never the deploy."""
    result: list[httpx.Response] = []
    with _bar(console) as bar:
        tasks: dict[int, TaskID] = {}

        async def watch() -> None:
            while True:
                await trio.sleep(POLL_S)
                try:
                    r = await client.get(f"{base}/api/v1/pipeline/status", timeout=5)
                    dep = _pending(r.json(), body["model"]) if r.status_code == 200 else None
                except (httpx.HTTPError, ValueError):
                    continue
                stages = (dep or {}).get("stages")
                for s in stages if isinstance(stages, list) else []:
                    if (stage := _stage_progress(s)) is None:
                        continue
                    index, label, done, total = stage
                    if index not in tasks:
                        tasks[index] = bar.add_task(label, total=total)
                    bar.update(tasks[index], completed=done, total=total)

        async with open_nursery() as nursery:
            nursery.start_soon(watch)
            result.append(await client.post(f"{base}/api/v1/pipeline/deploy", json=body))
            nursery.cancel_scope.cancel()
        if result[0].status_code == 200:  # the deploy answered: every stage is loaded
            for t in bar.tasks:
                bar.update(t.id, completed=t.total or t.completed)
    return result[0]
