"""Continuous batching across sessions on every stage of a pipeline: 8 concurrent greedy sessions each equal
their single-session run, and the stages really ran them together. In-process nodes on loopback, a synthetic
K-quant model (the weights whose batched sums llama.cpp orders differently)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from pipeline.test_pipeline import MiB, cluster, local_answer

from eldric_p2p.engine.generate import LocalModel
from eldric_p2p.engine.sampling import SamplingParams
from eldric_p2p.engine.synthetic import write_synthetic_gguf

MODEL = "kq"
PROMPTS = [f"the cat {w} on the mat" for w in ("sat", "ran", "slept", "ate", "sang", "hid", "fell", "won")]


@pytest.fixture(scope="module")
def kq_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("kq")
    write_synthetic_gguf(d / f"{MODEL}.gguf", arch="qwen2", n_layers=6, hidden=256, ffn=512, n_heads=4,
                         n_kv_heads=2, tensor_types="Q4_K", seed=21)  # fmt: skip
    return d


async def generate(c: httpx.AsyncClient, url: str, prompt: str, params: SamplingParams) -> list[int]:
    body = {"model": MODEL, "prompt": prompt, "raw": True, "params": params.to_dict()}
    ids: list[int] = []
    events: list[dict[str, Any]] = []
    async with c.stream("POST", f"{url}/api/v1/pipeline/generate", json=body, timeout=120) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if line.strip():
                events.append(json.loads(line))
                ids += events[-1].get("token_ids", [])
    assert "error" not in events[-1], events[-1]
    return ids


@pytest.mark.parametrize("stages", [1, 3])
def test_eight_batched_sessions_each_equal_their_single_session_run(
    tmp_path: Path, kq_dir: Path, stages: int
) -> None:
    params = SamplingParams.greedy(max_tokens=24)
    local = LocalModel(kq_dir / f"{MODEL}.gguf", max_ctx=256)
    want = [local_answer(local, p, params)[1] for p in PROMPTS]

    async def main() -> None:
        async with cluster(tmp_path, kq_dir, [200 * MiB] * stages) as m, httpx.AsyncClient() as c:
            r = await c.post(f"{m[0].url}/api/v1/pipeline/deploy", timeout=60,
                             json={"model": MODEL, "max_ctx": 256, "sessions": 8})  # fmt: skip
            assert r.status_code == 200 and len(r.json()["stages"]) == stages, r.text
            got: dict[int, list[int]] = {}

            async def one(i: int) -> None:
                got[i] = await generate(c, m[0].url, PROMPTS[i], params)

            async with trio.open_nursery() as nursery:
                for i in range(len(PROMPTS)):
                    nursery.start_soon(one, i)
            assert [got[i] for i in range(len(PROMPTS))] == want
            for member in m:
                (shard,) = member.node.worker.shards.values()
                assert shard.batcher is not None
                st = shard.batcher.status()
                print(f"{member.node.name}: {st}")
                assert st["largest"] >= 2 and st["batches"] < st["steps"], st  # steps ran together
                sst = shard.status()  # where a decode step's time went: the head's wait, each hop's time
                if stages > 1 and shard.a.stage_index > 0:
                    assert sst["hop_ms"] > 0 and sst["ring_ms"] is None
                elif stages > 1:
                    assert sst["ring_ms"] > 0 and sst["hop_ms"] is None

    trio.run(main)
