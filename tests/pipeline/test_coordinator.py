"""Coordinator: heartbeats that notice a lost worker, rebalance onto the survivors (planner: test_planner)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import test_pipeline
import trio
from test_pipeline import MODEL, cluster, deploy, generate, joined, local_answer

from eldric_p2p.engine.generate import LocalModel
from eldric_p2p.engine.sampling import SamplingParams

MiB = 1 << 20
model_dir = test_pipeline.model_dir  # shared module fixtures: the synthetic model, its one-process run
local = test_pipeline.local


def test_heartbeat_marks_a_lost_worker_and_rebalance_redeploys_on_the_rest(
    tmp_path: Path,
    model_dir: Path,
    local: LocalModel,
) -> None:
    params = SamplingParams.greedy(max_tokens=10)
    want = local_answer(local, "the world", params)

    async def main() -> None:
        async with (
            cluster(tmp_path, model_dir, [64 * MiB, 64 * MiB, 64 * MiB]) as m,
            httpx.AsyncClient() as c,
        ):
            coord = m[0].node.coordinator
            coord.heartbeat_s, coord.lost_after_s = 0.2, 1.0
            coord.auto_recover = False  # this test is about the manual rebalance (tests/test_recovery.py: auto)
            dep = (await deploy(c, m[0].url)).json()
            assert [s["worker"] for s in dep["stages"]] == ["n0", "n1", "n2"]
            await trio.sleep(0.5)
            st = (await c.get(f"{m[0].url}/api/v1/pipeline/status")).json()["deployments"][0]
            assert all(s["last_heartbeat_s"] is not None and s["last_heartbeat_s"] < 1 for s in st["stages"])
            m[2].scope.cancel()  # the tail's node goes away
            with trio.fail_after(5):
                while True:
                    st = (await c.get(f"{m[0].url}/api/v1/pipeline/status")).json()["deployments"][0]
                    if st["stages"][2]["state"] == "lost":
                        break
                    await trio.sleep(0.2)
            assert st["state"] == "degraded"
            r = await c.post(f"{m[0].url}/api/v1/pipeline/rebalance", json={"model": MODEL})
            assert r.status_code == 200, r.text
            assert [s["worker"] for s in r.json()["stages"]] == ["n0", "n1"]
            assert joined(await generate(c, m[1].url, "the world", params)) == want
            models = (await c.get(f"{m[0].url}/api/v1/pipeline/models")).json()["models"]
            assert [(x["id"], x["stages"], x["state"]) for x in models] == [(MODEL, 2, "ready")]

    trio.run(main)


def test_a_deploy_in_progress_is_listed_with_each_stage_and_leaves_the_list_when_ready(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import eldric_p2p.data.fetcher as fetcher

    release = trio.Event()
    real = fetcher.fetch_assignment

    async def held(*args: Any, **kwargs: Any) -> Any:  # each worker's fetch waits until the test has looked
        await release.wait()
        return await real(*args, **kwargs)

    monkeypatch.setattr(fetcher, "fetch_assignment", held)

    async def main() -> None:
        async with cluster(tmp_path, model_dir, [64 * MiB, 64 * MiB]) as m, httpx.AsyncClient() as c:
            async with trio.open_nursery() as nursery:
                answer: list[httpx.Response] = []

                async def run_deploy() -> None:
                    answer.append(await deploy(c, m[0].url))

                nursery.start_soon(run_deploy)
                with trio.fail_after(10):
                    while True:
                        st = (await c.get(f"{m[0].url}/api/v1/pipeline/status")).json()
                        pending = st["deploying"][0] if st["deploying"] else {"stages": []}
                        if pending["stages"] and all(s["state"] == "fetching" for s in pending["stages"]):
                            break
                        await trio.sleep(0.05)
                assert st["deployments"] == []
                assert pending["model"] == MODEL and pending["state"] == "loading"
                head, tail = pending["stages"]
                assert (head["worker"], head["start"], tail["worker"]) == ("n0", 0, "n1")
                assert head["end"] == tail["start"] and 0 < tail["start"] < tail["end"] == pending["n_layers"]
                release.set()
            assert answer[0].status_code == 200, answer[0].text
            st = (await c.get(f"{m[0].url}/api/v1/pipeline/status")).json()
            assert st["deploying"] == [] and [d["id"] for d in st["deployments"]] == [answer[0].json()["id"]]

    trio.run(main)
