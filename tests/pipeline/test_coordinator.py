"""Coordinator: heartbeats that notice a lost worker, rebalance onto the survivors (planner: test_planner)."""

from __future__ import annotations

from pathlib import Path

import httpx
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
