"""The progress bars of `deploy` and `demo`: drawn from the coordinator's status while the deploy runs."""

from __future__ import annotations

import io
import json

import httpx
import trio
from rich.console import Console

from eldric_p2p.commands.progress import POLL_S, deploy_with_progress


def stage(index: int, worker: str, start: int, end: int, done: int, total: int, state: str) -> dict:
    return {"index": index, "worker": worker, "start": start, "end": end, "state": state,
            "progress": {"done": done, "total": total}}  # fmt: skip


def test_deploy_draws_one_bar_per_stage_from_the_status_and_returns_the_deploy_answer() -> None:
    polls: list[int] = []
    answer = {"id": "tiny-abc", "model": "tiny", "state": "ready", "stages": []}

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/v1/pipeline/status":
            n = len(polls)
            polls.append(n)
            pending = {"model": "tiny", "stages": [
                stage(0, "pc", 0, 12, min(n, 3) * 1_000_000, 3_000_000, "fetching"),
                stage(1, "mac", 12, 24, 2_000_000, 2_000_000, "loading"),
                stage(2, "pi", 24, 30, 0, 0, "fetching"),  # still reading the header: no size yet
            ]}  # fmt: skip
            other = {"model": "someone-else", "stages": [stage(0, "x", 0, 1, 0, 9, "fetching")]}
            return httpx.Response(200, json={"deployments": [], "deploying": [other, pending]})
        assert request.url.path == "/api/v1/pipeline/deploy"
        assert json.loads(request.content) == {"model": "tiny"}
        await trio.sleep(POLL_S * 4.5)  # the deploy blocks until every shard is ready
        return httpx.Response(200, json=answer)

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)

    async def main() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await deploy_with_progress(client, "http://node", {"model": "tiny"}, console=console)

    resp = trio.run(main)
    assert resp.status_code == 200 and resp.json() == answer
    assert len(polls) >= 3
    text = out.getvalue()
    assert "pc layers 0-11" in text and "mac layers 12-23" in text
    assert "x layers" not in text  # another model's deploy is not drawn
    assert "pi layers" not in text  # nor a stage whose size is not known yet
    assert "3.0/3.0 MB" in text and "2.0/2.0 MB" in text  # finished bars show every byte


def test_an_unreadable_status_costs_the_bars_not_the_deploy() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/v1/pipeline/status":
            return httpx.Response(500, content=b"not json")
        await trio.sleep(POLL_S * 2.5)
        return httpx.Response(409, json={"error": {"message": "does not fit", "code": "does_not_fit"}})

    async def main() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            console = Console(file=io.StringIO(), force_terminal=True)
            return await deploy_with_progress(client, "http://node", {"model": "tiny"}, console=console)

    resp = trio.run(main)
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "does_not_fit"


def test_a_status_of_the_wrong_shape_costs_the_bars_not_the_deploy() -> None:
    garbage = [
        {"deploying": [{"model": "tiny", "stages": 5}]},
        {"deploying": [{"model": "tiny", "stages": [
            {"index": 0, "start": 0, "end": 4, "progress": []},
            {"index": 1, "start": "a", "end": 4, "progress": {"done": 1, "total": 2}},
            {"index": 2, "start": 0, "end": 4, "progress": {"done": "x", "total": 2}},
            {"index": 3, "start": 0, "end": 4, "progress": {"done": 1, "total": -5}},
            "not a stage",
        ]}]},  # fmt: skip
        {"deploying": "nope"},
        [],
    ]
    polls: list[int] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/v1/pipeline/status":
            polls.append(1)
            return httpx.Response(200, json=garbage[(len(polls) - 1) % len(garbage)])
        await trio.sleep(POLL_S * 5.5)
        return httpx.Response(200, json={"id": "tiny-abc", "stages": []})

    out = io.StringIO()

    async def main() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            console = Console(file=out, force_terminal=True)
            return await deploy_with_progress(client, "http://node", {"model": "tiny"}, console=console)

    resp = trio.run(main)
    assert resp.status_code == 200 and resp.json()["id"] == "tiny-abc"
    assert len(polls) >= 4 and "layers" not in out.getvalue()  # every poll was read; none drew a bar
