"""Replicas: a model deployed twice on disjoint workers. Sessions spread over the replicas by route choice,
and a session whose pipeline loses a stage resumes at once on the other replica, with nothing to fetch, the
tokens unchanged. In-process nodes on loopback, a synthetic model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from pipeline.test_pipeline import MODEL, MiB, cluster, deploy, local_answer, model_dir  # noqa: F401
from test_churn import slow_down

from eldric_p2p.engine.generate import LocalModel

PROMPT = "tell me about cats"


@pytest.fixture(scope="module")
def local(model_dir: Path) -> LocalModel:  # noqa: F811
    return LocalModel(model_dir / f"{MODEL}.gguf", max_ctx=256)


async def chat(c: httpx.AsyncClient, url: str, tokens: int, kill: Any = None) -> list[dict[str, Any]]:
    ask = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": tokens,
           "temperature": 0, "stream": True}  # fmt: skip
    chunks: list[dict[str, Any]] = []
    async with c.stream("POST", f"{url}/v1/chat/completions", json=ask, timeout=120) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
                if kill is not None and len(chunks) == 4:
                    kill()
    assert not any("error" in ch for ch in chunks), chunks[-1]
    return chunks


def text_of(chunks: list[dict[str, Any]]) -> str:
    return "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks if ch.get("choices"))


def test_two_replicas_share_sessions_and_a_failed_one_hands_over_without_a_fetch(
    tmp_path: Path,
    model_dir: Path,  # noqa: F811
) -> None:
    async def main() -> None:
        async with cluster(tmp_path, model_dir, [200 * MiB] * 4) as m, httpx.AsyncClient() as c:
            coord = m[0].node.coordinator
            r = await deploy(c, m[0].url, replicas=2, sessions=1)
            assert r.status_code == 200, r.text
            reps = r.json()["replicas"]
            assert len(reps) == 2 and all(d["state"] == "ready" for d in reps)
            placed = [[s["worker"] for s in d["stages"]] for d in reps]
            assert placed == [["n0", "n2"], ["n1", "n3"]], placed  # disjoint, memory dealt evenly
            assert reps[1]["note"] == f"replica 2 of {reps[0]['id']}"
            want = text_of(await chat(c, m[0].url, 24))

            # two sessions at once: one per replica (each has one session slot)
            for member in m:
                slow_down(member.node.worker, 0.01)
            heads = {name: m[i].node.worker for i, name in ((0, "n0"), (1, "n1"))}
            seen: dict[str, int] = {"n0": 0, "n1": 0}

            async def watch() -> None:
                while True:
                    for name, w in heads.items():
                        seen[name] = max(seen[name], sum(len(s.head_sessions) for s in w.shards.values()))
                    await trio.sleep(0.005)

            texts: list[str] = []

            async def one() -> None:
                texts.append(text_of(await chat(c, m[0].url, 24)))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                async with trio.open_nursery() as two:
                    two.start_soon(one)
                    two.start_soon(one)
                nursery.cancel_scope.cancel()
            assert texts == [want, want] and seen == {"n0": 1, "n1": 1}, seen

            # the tail of the replica serving a session dies: the session goes on on the other replica
            def fetched(node: int) -> int:
                return sum(s.bytes_fetched for s in m[node].node.worker.shards.values())

            before: dict[int, int] = {}
            killed: list[int] = []

            def kill_the_serving_tail() -> None:  # replicas n0 -> n2 and n1 -> n3
                head = 0 if any(s.head_sessions for s in m[0].node.worker.shards.values()) else 1
                tail, other = (2, (1, 3)) if head == 0 else (3, (0, 2))
                before.update({i: fetched(i) for i in other})
                killed.append(tail)
                m[tail].scope.cancel()

            chunks = await chat(c, m[0].url, 96, kill=kill_the_serving_tail)
            timings = chunks[-1].get("timings") or {}
            print(f"handed over to the replica: pause {timings.get('recovery_pause_s')} s")
            full = text_of(await chat(c, m[0].url, 96))
            assert text_of(chunks) == full
            # one recovery, not a wait for the re-plan (the fetch check below is the exact one); the pause
            # itself is a figure for bench_recovery, loose here for loaded machines (1.23 s seen)
            assert timings.get("recoveries") == 1 and timings["recovery_pause_s"] < 3.0, timings
            assert {i: fetched(i) for i in before} == before  # the replica that took over fetched nothing
            with trio.fail_after(30):  # and the broken replica is re-planned in the background
                while not coord.recovered:  # noqa: ASYNC110
                    await trio.sleep(0.1)
            r = await c.post(f"{m[0].url}/api/v1/pipeline/undeploy", json={"model": MODEL})
            assert r.status_code == 200 and coord.deployments == {}

    trio.run(main)
