"""Volunteers come and go: a refused deploy happens by itself when a worker joins, a worker that stops
drains (its stages move, the session in flight finishes on the old plan), and a worker yields to its owner.
In-process nodes on loopback, a synthetic model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from pipeline.test_pipeline import MODEL, MiB, _start, cluster, deploy, local_answer, model_dir  # noqa: F401

from eldric_p2p.engine.generate import LocalModel
from eldric_p2p.engine.sampling import SamplingParams
from eldric_p2p.errors import UsageError
from eldric_p2p.node import NodeConfig
from eldric_p2p.pipeline.owner import OwnerPolicy, in_share_hours, parse_share_hours, yield_to_owner


@pytest.fixture(scope="module")
def local(model_dir: Path) -> LocalModel:  # noqa: F811
    return LocalModel(model_dir / f"{MODEL}.gguf", max_ctx=256)


def slow_down(worker: Any, seconds: float) -> None:
    """Each forward on `worker` takes `seconds` longer, so a generation lasts long enough to act during it."""
    compute = worker.compute

    async def slow(fn: Any, *args: Any, **kwargs: Any) -> Any:
        await trio.sleep(seconds)
        return await compute(fn, *args, **kwargs)

    worker.compute = slow


async def generate_events(
    c: httpx.AsyncClient, url: str, params: SamplingParams, during: Any
) -> list[dict[str, Any]]:
    """NDJSON events of one generation; `during()` is started (as a task) after the third event."""
    body = {"model": MODEL, "prompt": "Hello world the cat", "raw": True, "params": params.to_dict()}
    events: list[dict[str, Any]] = []
    async with trio.open_nursery() as nursery:
        async with c.stream("POST", f"{url}/api/v1/pipeline/generate", json=body, timeout=120) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if line.strip():
                    events.append(json.loads(line))
                    if len(events) == 3:
                        nursery.start_soon(during)
    return events


def test_a_deploy_refused_for_memory_happens_by_itself_when_a_worker_joins(
    tmp_path: Path,
    model_dir: Path,  # noqa: F811
) -> None:
    async def main() -> None:
        async with cluster(tmp_path, model_dir, [512 * 1024] * 3) as m, httpx.AsyncClient() as c:
            coord = m[0].node.coordinator
            coord.heartbeat_s = 0.2
            r = await deploy(c, m[0].url)
            assert r.status_code == 409 and r.json()["pending"] is True, r.text
            assert "kept as pending" in r.json()["error"]["message"]
            status = (await c.get(f"{m[0].url}/api/v1/pipeline/status")).json()
            assert [p["model"] for p in status["pending"]] == [MODEL] and status["deployments"] == []
            async with trio.open_nursery() as nursery:  # a fourth worker with room joins
                await _start(nursery, NodeConfig(name="n3", data_dir=tmp_path / "n3", listen_port=0,
                                                 memory=300 * MiB, mdns=False, peer_interval=0.2,
                                                 peers=[("127.0.0.1", m[0].node.port)]))  # fmt: skip
                with trio.fail_after(15):
                    while not coord.deployments:  # noqa: ASYNC110 (the coordinator acts by itself)
                        await trio.sleep(0.1)
                (dep,) = coord.deployments.values()
                assert "n3" in [s.stage.name for s in dep.shards] and "by itself" in dep.note
                assert coord.pending == {}
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_stopping_worker_drains_and_the_session_in_flight_finishes_on_the_old_plan(
    tmp_path: Path,
    model_dir: Path,  # noqa: F811
    local: LocalModel,
) -> None:
    params = SamplingParams.greedy(max_tokens=96)
    want_text, want_ids = local_answer(local, "Hello world the cat", params)

    async def main() -> None:
        async with cluster(tmp_path, model_dir, [200 * MiB] * 4) as m, httpx.AsyncClient() as c:
            coord = m[0].node.coordinator
            coord.heartbeat_s = 0.2
            assert (await deploy(c, m[0].url, workers=["n0", "n1", "n2"])).status_code == 200
            slow_down(m[2].node.worker, 0.02)  # ~2 s of generation: the move happens while it runs
            drained: list[bool] = []

            async def stop_n1() -> None:
                drained.append(await m[1].node.worker.drain("stopping", 30))

            events = await generate_events(c, m[0].url, params, stop_n1)
            assert "error" not in events[-1], events[-1]
            ids = [t for e in events for t in e.get("token_ids", [])]
            assert ids == want_ids and "".join(e.get("text", "") for e in events) == want_text
            assert "recoveries" not in events[-1]["timings"]  # it never failed: it finished on the old plan
            with trio.fail_after(15):
                while not drained or not coord.recovered:  # noqa: ASYNC110
                    await trio.sleep(0.1)
            assert drained == [True] and m[1].node.worker.shards == {}
            (dep,) = coord.deployments.values()
            assert [s.stage.name for s in dep.shards] == ["n0", "n3", "n2"]
            assert coord.recovered[-1]["draining"] and coord.recovered[-1]["spares"] == ["n3"]
            # the moved pipeline serves new sessions
            again = await generate_events(
                c, m[0].url, SamplingParams.greedy(max_tokens=8), trio.lowlevel.checkpoint
            )
            assert "error" not in again[-1]

    trio.run(main)


def test_a_worker_yields_to_its_owner_within_seconds_and_comes_back(
    tmp_path: Path,
    model_dir: Path,  # noqa: F811
    local: LocalModel,
) -> None:
    params = SamplingParams.greedy(max_tokens=96)
    want = local_answer(local, "Hello world the cat", params)
    owner: list[str | None] = [None]
    policy = OwnerPolicy(probe=lambda: owner[0], check_s=0.1, idle_s=0.5)

    async def main() -> None:
        async with cluster(tmp_path, model_dir, [200 * MiB] * 4) as m, httpx.AsyncClient() as c:
            coord = m[0].node.coordinator
            coord.heartbeat_s = 0.2
            w1 = m[1].node.worker
            async with trio.open_nursery() as nursery:
                await nursery.start(yield_to_owner, w1, policy)
                assert (await deploy(c, m[0].url, workers=["n0", "n1", "n2"])).status_code == 200
                slow_down(m[2].node.worker, 0.02)
                t_owner: list[float] = []

                async def owner_arrives() -> None:
                    owner[0] = "the owner started a game"
                    t_owner.append(trio.current_time())

                events = await generate_events(c, m[0].url, params, owner_arrives)
                assert "error" not in events[-1]
                ids = [t for e in events for t in e.get("token_ids", [])]
                assert (("".join(e.get("text", "") for e in events)), ids) == want
                with trio.fail_after(10):
                    while w1.shards:  # noqa: ASYNC110
                        await trio.sleep(0.1)
                moved_s = trio.current_time() - t_owner[0]
                assert moved_s < 10 and w1.free == 0 and w1.draining.startswith("owner first")
                print(f"owner first: stages moved away {moved_s:.1f} s after the owner came")
                owner[0] = None
                with trio.fail_after(5):
                    while w1.draining is not None:  # noqa: ASYNC110
                        await trio.sleep(0.1)
                assert w1.free == w1.offered
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_share_hours_parse_and_wrap_midnight() -> None:
    assert parse_share_hours("18-08") == (18, 8)
    assert in_share_hours((18, 8), 23) and in_share_hours((18, 8), 3) and not in_share_hours((18, 8), 12)
    assert in_share_hours((9, 17), 9) and not in_share_hours((9, 17), 17)
    for bad in ("18", "25-3", "a-b", "6-6"):
        with pytest.raises(UsageError):
            parse_share_hours(bad)
    with pytest.raises(UsageError):
        OwnerPolicy(yield_when="sometimes")


def test_a_bigger_worker_joining_moves_a_running_model_onto_fewer_stages_without_dropping_a_session(
    tmp_path: Path,
    model_dir: Path,  # noqa: F811
    local: LocalModel,
) -> None:
    """Three small workers hold the model in 3 stages; a worker that holds it alone joins while a session
    runs: the model moves to 1 stage on it (make before break), the session finishes on the old plan with
    the same tokens, and the old stages unload."""
    from test_cache import needed

    params = SamplingParams.greedy(max_tokens=96)
    want = local_answer(local, "Hello world the cat", params)
    whole = needed(model_dir / f"{MODEL}.gguf", 4)

    async def main() -> None:
        async with cluster(tmp_path, model_dir, [int(0.45 * whole)] * 3) as m, httpx.AsyncClient() as c:
            coord = m[0].node.coordinator
            coord.heartbeat_s = 0.2
            r = await deploy(c, m[0].url, max_ctx=256)
            assert r.status_code == 200, r.text
            assert [s["worker"] for s in r.json()["stages"]] == ["n0", "n1", "n2"]
            slow_down(m[2].node.worker, 0.02)

            async def big_one_joins() -> None:
                await _start(nursery, NodeConfig(name="big", data_dir=tmp_path / "big", listen_port=0,
                                                 memory=2 * whole, mdns=False, peer_interval=0.2,
                                                 peers=[("127.0.0.1", m[0].node.port)]))  # fmt: skip

            async with trio.open_nursery() as nursery:
                events = await generate_events(c, m[0].url, params, big_one_joins)
                assert "error" not in events[-1] and "recoveries" not in events[-1]["timings"]
                ids = [t for e in events for t in e.get("token_ids", [])]
                assert ("".join(e.get("text", "") for e in events), ids) == want
                with trio.fail_after(20):
                    while not coord.recovered or any(w.node.worker.shards for w in m):  # noqa: ASYNC110
                        await trio.sleep(0.1)
                (dep,) = coord.deployments.values()
                assert [s.stage.name for s in dep.shards] == ["big"] and dep.workers_asked is None
                assert coord.recovered[-1]["better"] == "3 -> 1 stages"
                assert coord.recovered[-1]["joined"] == ["big"]
                again = await generate_events(c, m[0].url, params, trio.lowlevel.checkpoint)
                assert [t for e in again for t in e.get("token_ids", [])] == want[1]
                nursery.cancel_scope.cancel()

    trio.run(main)
