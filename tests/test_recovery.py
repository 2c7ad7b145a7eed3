"""A stage dies mid-generation and the request goes on: the coordinator re-plans onto a spare (or the
survivors), the node that took the request resumes it there, and the client's tokens equal an uninterrupted
run's. In-process nodes on loopback; "kill -9" is the node's whole task tree cancelled at once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from pipeline.test_pipeline import MODEL, MiB, cluster, deploy, local_answer, model_dir  # noqa: F401

from eldric_p2p.engine.generate import LocalModel
from eldric_p2p.engine.sampling import SamplingParams

TOKENS = 128


@pytest.fixture(scope="module")
def local(model_dir: Path) -> LocalModel:  # noqa: F811
    return LocalModel(model_dir / f"{MODEL}.gguf", max_ctx=256)


async def stream_and_kill(c: httpx.AsyncClient, url: str, body: dict[str, Any], kill: Any, at: int = 3):  # type: ignore[no-untyped-def]
    """NDJSON events of one generation; `kill()` runs once `at` events have arrived."""
    events: list[dict[str, Any]] = []
    async with c.stream("POST", f"{url}/api/v1/pipeline/generate", json=body, timeout=120) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if line.strip():
                events.append(json.loads(line))
                if len(events) == at:
                    kill()
    return events


@pytest.mark.parametrize(
    ("victim", "spare"), [(1, True), (2, True), (1, False)], ids=["middle", "tail", "no-spare"]
)
def test_a_stage_killed_mid_generation_the_stream_completes_with_the_same_tokens(
    tmp_path: Path,
    model_dir: Path,  # noqa: F811
    local: LocalModel,
    victim: int,
    spare: bool,
) -> None:
    params = SamplingParams.greedy(max_tokens=TOKENS)
    want_text, want_ids = local_answer(local, "Hello world the cat", params)
    memories = [200 * MiB, 200 * MiB, 200 * MiB] + ([200 * MiB] if spare else [])

    async def main() -> None:
        async with cluster(tmp_path, model_dir, memories) as m, httpx.AsyncClient() as c:
            coord = m[0].node.coordinator
            coord.heartbeat_s = 0.2
            r = await deploy(c, m[0].url, workers=["n0", "n1", "n2"])
            assert r.status_code == 200, r.text
            body = {"model": MODEL, "prompt": "Hello world the cat", "raw": True, "params": params.to_dict()}
            events = await stream_and_kill(c, m[0].url, body, m[victim].scope.cancel)
            assert "error" not in events[-1], events[-1]
            assert events[-1]["finish_reason"] == "length"
            ids = [t for e in events for t in e.get("token_ids", [])]
            assert ids == want_ids and "".join(e.get("text", "") for e in events) == want_text
            timings = events[-1]["timings"]
            assert timings["recoveries"] >= 1, timings  # the kill did land mid-generation
            (new,) = coord.deployments.values()
            workers = [s.stage.name for s in new.shards]
            expected = {1: ["n0", "n3", "n2"], 2: ["n0", "n1", "n3"]}[victim] if spare else ["n0", "n2"]
            assert workers == expected
            assert coord.recovered[-1]["spares"] == (["n3"] if spare else [])
            pause_ms, replan_s = timings["recovery_pause_s"] * 1000, coord.recovered[-1]["seconds"]
            print(f"stage {victim} killed ({'spare' if spare else 'no spare'}): pause {pause_ms:.0f} ms, "
                  f"re-plan {replan_s} s")  # fmt: skip

    trio.run(main)


def test_openai_streaming_chat_survives_the_middle_stage_dying(
    tmp_path: Path,
    model_dir: Path,  # noqa: F811
) -> None:
    ask = {"model": MODEL, "messages": [{"role": "user", "content": "tell me about cats"}], "max_tokens": 96,
           "temperature": 0, "stream": True}  # fmt: skip

    async def chat(c: httpx.AsyncClient, url: str, kill: Any = None) -> tuple[str, list[dict[str, Any]]]:
        chunks: list[dict[str, Any]] = []
        async with c.stream("POST", f"{url}/v1/chat/completions", json=ask, timeout=120) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks.append(json.loads(line[6:]))
                    if kill is not None and len(chunks) == 4:
                        kill()
        text = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks if ch.get("choices"))
        return text, chunks

    async def main() -> None:
        async with cluster(tmp_path, model_dir, [200 * MiB] * 4) as m, httpx.AsyncClient() as c:
            m[0].node.coordinator.heartbeat_s = 0.2
            assert (await deploy(c, m[0].url, workers=["n0", "n1", "n2"])).status_code == 200
            want, _ = await chat(c, m[0].url)
            got, chunks = await chat(c, m[0].url, kill=m[1].scope.cancel)
            assert not any("error" in ch for ch in chunks), chunks[-1]
            assert got == want and len(want) > 20
            assert m[0].node.coordinator.recovered, "the kill did not land mid-generation"

    trio.run(main)
