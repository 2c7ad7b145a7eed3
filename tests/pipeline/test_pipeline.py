"""Generation across a pipeline of in-process nodes on loopback, on a synthetic model.

Several `Node`s run in one trio process (each with its own data dir, identity, HTTP port and link port); the
first is also the data peer. What a user notices: the pipeline's text and token ids equal one process's,
concurrent sessions do not disturb each other, and a failed stage ends a request quickly, by name.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from eldric_p2p.api.backends.base import GenerationEvent, GenerationRequest
from eldric_p2p.engine.generate import LocalModel, prompt_token_ids
from eldric_p2p.engine.sampling import SamplingParams
from eldric_p2p.engine.synthetic import write_synthetic_gguf
from eldric_p2p.errors import StageFailed
from eldric_p2p.net.frames import FrameType
from eldric_p2p.node import Node, NodeConfig

MODEL = "tiny"
MiB = 1 << 20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("models")
    write_synthetic_gguf(d / f"{MODEL}.gguf", arch="qwen2", n_layers=8, hidden=64, ffn=128, seed=3)
    return d


@dataclass
class Member:
    node: Node
    scope: trio.CancelScope

    @property
    def url(self) -> str:
        assert self.node.url is not None
        return self.node.url


async def _start(nursery: trio.Nursery, cfg: NodeConfig) -> Member:
    node = Node(cfg)

    async def runner(*, task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as inner:
                await inner.start(node.run)
                task_status.started(scope)

    scope = await nursery.start(runner)
    return Member(node, scope)


@asynccontextmanager
async def cluster(
    tmp: Path, model_dir: Path | None, memories: list[int | None]
) -> AsyncIterator[list[Member]]:
    """Nodes n0..nK; n0 serves `model_dir` and the others bootstrap from it (`--peer`)."""
    async with trio.open_nursery() as nursery:
        members = [
            await _start(
                nursery,
                NodeConfig(
                    name="n0",
                    data_dir=tmp / "n0",
                    listen_port=0,
                    models=[model_dir] if model_dir else [],
                    memory=memories[0],
                    worker=memories[0] is not None,
                    mdns=False,
                    peer_interval=0.2,
                ),
            )
        ]
        port0 = members[0].node.port
        assert port0 is not None
        for i, mem in enumerate(memories[1:], 1):
            members.append(
                await _start(
                    nursery,
                    NodeConfig(
                        name=f"n{i}",
                        data_dir=tmp / f"n{i}",
                        listen_port=0,
                        memory=mem,
                        mdns=False,
                        peers=[("127.0.0.1", port0)],
                        peer_interval=0.2,
                    ),
                )
            )
        try:
            yield members
        finally:
            nursery.cancel_scope.cancel()


async def deploy(client: httpx.AsyncClient, url: str, **body: Any) -> httpx.Response:
    body.setdefault("model", MODEL)
    body.setdefault("max_ctx", 256)
    return await client.post(f"{url}/api/v1/pipeline/deploy", json=body, timeout=60)


async def generate(
    client: httpx.AsyncClient, url: str, prompt: str, params: SamplingParams, *, raw: bool = True
) -> list[dict[str, Any]]:
    body = {"model": MODEL, "prompt": prompt, "raw": raw, "params": params.to_dict()}
    async with client.stream("POST", f"{url}/api/v1/pipeline/generate", json=body, timeout=30) as resp:
        if resp.status_code != 200:
            return [json.loads(await resp.aread())]
        return [json.loads(line) async for line in resp.aiter_lines() if line.strip()]


def joined(events: list[dict[str, Any]]) -> tuple[str, list[int]]:
    assert "error" not in events[-1], events[-1]
    assert events[-1]["finish_reason"] in ("stop", "length")
    return "".join(e.get("text", "") for e in events), [t for e in events for t in e.get("token_ids", [])]


@pytest.fixture(scope="module")
def local(model_dir: Path) -> LocalModel:
    return LocalModel(model_dir / f"{MODEL}.gguf", max_ctx=256)


def local_answer(
    local: LocalModel, prompt: str, params: SamplingParams, *, raw: bool = True
) -> tuple[str, list[int]]:
    ids = prompt_token_ids(local.tokenizer, local.metadata, prompt, raw=raw)
    r = local.generate(ids, params)
    return r.text, r.token_ids


def test_deploy_splits_in_proportion_and_greedy_chat_equals_one_process(
    tmp_path: Path, model_dir: Path, local: LocalModel
) -> None:  # noqa: F811
    params = SamplingParams.greedy(max_tokens=24)
    want = local_answer(local, "Hello world the cat", params)

    async def main() -> None:
        async with (
            cluster(tmp_path, model_dir, [300 * MiB, 200 * MiB, 300 * MiB]) as m,
            httpx.AsyncClient() as c,
        ):
            r = await deploy(c, m[0].url, workers=["n0", "n1", "n2"])
            assert r.status_code == 200, r.text
            plan = r.json()
            assert [(s["worker"], s["start"], s["end"]) for s in plan["stages"]] == [
                ("n0", 0, 3),
                ("n1", 3, 5),
                ("n2", 5, 8),
            ]
            assert [s["role"] for s in plan["stages"]] == ["head", "middle", "tail"]
            assert all(s["state"] == "ready" and s["bytes_fetched"] > 0 for s in plan["stages"])
            # through the head's node, and through a node that is not the head (routed to the head over HTTP)
            for node in (m[0], m[1]):
                for _ in range(30):  # node n1 learns of the head from its peer poll
                    if any(b.model_id == MODEL for b in node.node.backends()):
                        break
                    await trio.sleep(0.1)
                assert joined(await generate(c, node.url, "Hello world the cat", params)) == want
            status = (await c.get(f"{m[0].url}/api/v1/pipeline/status")).json()
            (dep,) = status["deployments"]
            assert dep["state"] == "ready" and dep["stages"][1]["layers"] == 2
            models = (await c.get(f"{m[2].url}/api/v1/pipeline/models")).json()
            assert models == {"models": []}  # only the coordinator that deployed it lists it
            peers = (await c.get(f"{m[0].url}/api/v1/peers")).json()["peers"]
            assert sorted(p["name"] for p in peers) == ["n1", "n2"]

    trio.run(main)


def test_the_coordinator_routes_to_a_head_it_deployed_before_any_peer_poll_reports_it(
    tmp_path: Path, model_dir: Path, local: LocalModel
) -> None:  # noqa: F811
    """The data node (no worker) deploys onto n1 and n2 and is asked at once: it knows the head from its own
    deployment, so neither a slow peer poll nor an empty peer table turns the request into a 404."""
    params = SamplingParams.greedy(max_tokens=12)
    want = local_answer(local, "Hello world the cat", params)

    async def main() -> None:
        async with cluster(tmp_path, model_dir, [None, 300 * MiB, 300 * MiB]) as m, httpx.AsyncClient() as c:
            r = await deploy(c, m[0].url, workers=["n1", "n2"])
            assert r.status_code == 200, r.text
            n0 = m[0].node

            async def no_refresh() -> None:
                return None

            n0.peers.refresh = no_refresh  # type: ignore[method-assign]
            n0.peers.table.excluded = lambda peer_id: True  # as if no poll of n1 had come back yet
            for peer_id in [p.peer_id for p in n0.peers.table.peers()]:
                n0.peers.table.forget(peer_id)
            assert not n0.peers.table.peers()
            assert joined(await generate(c, m[0].url, "Hello world the cat", params)) == want

    trio.run(main)


def test_four_concurrent_sessions_each_equal_to_alone(
    tmp_path: Path, model_dir: Path, local: LocalModel
) -> None:  # noqa: F811
    prompts = ["Hello", "the world is", "and the cat", "Hello world and"]
    params = [
        SamplingParams.greedy(max_tokens=16),
        SamplingParams.greedy(max_tokens=20),
        SamplingParams(temperature=0.9, seed=7, max_tokens=18, top_k=0, top_p=1.0, min_p=0.0),
        SamplingParams(temperature=0.7, seed=11, max_tokens=14, repetition_penalty=1.3),
    ]
    wants = [local_answer(local, p, sp) for p, sp in zip(prompts, params, strict=True)]

    async def main() -> None:
        async with (
            cluster(tmp_path, model_dir, [100 * MiB, 100 * MiB, 100 * MiB]) as m,
            httpx.AsyncClient() as c,
        ):
            assert (await deploy(c, m[0].url)).status_code == 200
            got: list[Any] = [None] * 4

            async def one(i: int) -> None:
                got[i] = joined(await generate(c, m[0].url, prompts[i], params[i]))

            async with trio.open_nursery() as nursery:
                for i in range(4):
                    nursery.start_soon(one, i)
            assert got == wants

    trio.run(main)


def test_chat_template_prompt_and_single_stage(tmp_path: Path, model_dir: Path, local: LocalModel) -> None:  # noqa: F811
    params = SamplingParams.greedy(max_tokens=12)
    want = local_answer(local, "What is the world?", params, raw=False)

    async def main() -> None:
        async with cluster(tmp_path, model_dir, [200 * MiB, 10 * MiB]) as m, httpx.AsyncClient() as c:
            r = await deploy(c, m[0].url, strategy="fewest-hops")
            assert r.status_code == 200, r.text
            assert [(s["worker"], s["role"]) for s in r.json()["stages"]] == [("n0", "single")]
            assert joined(await generate(c, m[0].url, "What is the world?", params, raw=False)) == want

    trio.run(main)


def test_deploy_that_does_not_fit_is_refused_with_numbers(tmp_path: Path, model_dir: Path) -> None:  # noqa: F811
    async def main() -> None:
        # the model needs about 1.35 MiB in one stage with a 256-token context for 4 sessions
        async with cluster(tmp_path, model_dir, [512 << 10, 512 << 10]) as m, httpx.AsyncClient() as c:
            r = await deploy(c, m[0].url)
            assert r.status_code == 409
            body = r.json()
            assert body["error"]["code"] == "does_not_fit"
            assert body["needed"] > body["free"] == 1 << 20
            msg = body["error"]["message"]
            assert (
                "does not fit" in msg and "1.00 MiB free in total" in msg and "1.35 MiB in one stage" in msg
            )
            assert [w["free"] for w in body["workers"]] == [512 << 10, 512 << 10]
            assert [(b["worker"], b["start"], b["end"]) for b in body["best"]] == [("n0", 0, 4), ("n1", 4, 8)]
            assert all(b["needed"] > b["free"] for b in body["best"])
            # with more context or sessions it only gets worse; with less it fits
            assert (await deploy(c, m[0].url, max_ctx=32, sessions=1)).status_code == 200
            for node in m:
                st = (await c.get(f"{node.url}/api/v1/worker/status")).json()
                assert len(st["shards"]) == 1 and st["free"] < 512 << 10

    trio.run(main)


def test_worker_refuses_an_assignment_that_does_not_fit_its_memory(tmp_path: Path, model_dir: Path) -> None:  # noqa: F811
    """A coordinator with a stale view pushes too much: the worker itself refuses, with its numbers."""
    from eldric_p2p.pipeline.assignment import Assignment, StageRef

    async def main() -> None:
        async with cluster(tmp_path, model_dir, [256 << 10]) as m, httpx.AsyncClient() as c:
            w = m[0].node.worker
            assert w is not None
            stage = StageRef(0, 0, 8, m[0].node.identity.peer_id, "n0", "127.0.0.1", w.link_port)
            a = Assignment("d1", MODEL, (m[0].url,), 0, (stage,), max_ctx=256)
            r = await c.post(f"{m[0].url}/api/v1/pipeline/load", json=a.to_json())
            assert r.status_code == 409
            body = r.json()
            assert body["error"]["code"] == "does_not_fit"
            assert body["needed"] > body["offered"] == body["free"] == 256 << 10
            assert "layers 0-7 of tiny need 1.35 MiB" in body["error"]["message"]
            assert (await c.get(f"{m[0].url}/api/v1/worker/status")).json()["shards"] == []

    trio.run(main)


def test_killed_middle_stage_fails_the_request_by_name_then_a_new_deploy_works(
    tmp_path: Path, model_dir: Path, local: LocalModel
) -> None:  # noqa: F811
    params = SamplingParams.greedy(max_tokens=200)

    async def main() -> None:
        async with (
            cluster(tmp_path, model_dir, [100 * MiB, 100 * MiB, 100 * MiB]) as m,
            httpx.AsyncClient() as c,
        ):
            assert (await deploy(c, m[0].url, workers=["n0", "n1", "n2"])).status_code == 200
            head = m[0].node
            (backend,) = [b for b in head.backends() if b.info()["kind"] == "pipeline"]
            # slow each forward down a little so the kill lands mid-generation
            assert head.worker is not None
            send, recv = trio.open_memory_channel[GenerationEvent](100)
            req = GenerationRequest(MODEL, "Hello world", params, raw=True)
            failed: list[BaseException] = []

            async def run() -> None:
                try:
                    await backend.generate(req, send)
                except StageFailed as exc:
                    failed.append(exc)

            t_kill = 0.0
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run)
                n = 0
                async for _event in recv:
                    n += 1
                    if n == 3:
                        m[1].scope.cancel()  # the middle worker's node goes away
                        t_kill = trio.current_time()
            took = trio.current_time() - t_kill
            assert failed and "stage 1" in str(failed[0]) and "n1" in str(failed[0]), failed
            assert took < 5
            # the pipeline is degraded; the others still serve a new deploy on the two that are left
            r = await deploy(c, m[0].url, workers=["n0", "n2"])
            assert r.status_code == 200, r.text
            want = local_answer(local, "Hello world", SamplingParams.greedy(max_tokens=10))
            got = joined(await generate(c, m[2].url, "Hello world", SamplingParams.greedy(max_tokens=10)))
            assert got == want

    trio.run(main)


def test_a_client_that_disconnects_mid_stream_frees_the_session_on_every_stage(
    tmp_path: Path, model_dir: Path
) -> None:
    """OpenAI streaming through a node with no stage; the client goes away after two chunks."""

    def open_sessions(members: list[Member]) -> int:
        n = 0
        for member in members:
            worker = member.node.worker
            if worker is None:
                continue
            for shard in worker.shards.values():
                n += len(shard.stage.sessions) if shard.stage is not None else 0
        return n

    async def main() -> None:
        async with (
            cluster(tmp_path, model_dir, [None, 100 * MiB, 100 * MiB, 100 * MiB]) as m,
            httpx.AsyncClient(timeout=30) as c,
        ):
            assert (await deploy(c, m[0].url, workers=["n1", "n2", "n3"])).status_code == 200
            tail = next(iter(m[3].node.worker.shards.values())).stage
            forward = tail.forward

            def slow_forward(*args: Any, **kwargs: Any) -> Any:  # 200 tokens now take > 10 s
                time.sleep(0.05)
                return forward(*args, **kwargs)

            tail.forward = slow_forward
            body = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 200,
                    "temperature": 0, "stream": True}  # fmt: skip
            with trio.fail_after(30):
                while (await c.get(f"{m[0].url}/v1/models")).json()["data"] == []:  # noqa: ASYNC110
                    await trio.sleep(0.1)
                async with c.stream("POST", f"{m[0].url}/v1/chat/completions", json=body) as resp:
                    assert resp.status_code == 200
                    chunks = 0
                    async for line in resp.aiter_lines():
                        chunks += line.startswith("data: ")
                        if chunks == 3:
                            assert open_sessions(m) == 3  # one KV cache per stage while it runs
                            break  # leaving the block closes the connection mid-stream
            with trio.fail_after(3):  # far sooner than the 200 tokens would take: the generation stopped
                while open_sessions(m) != 0:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            # and the pipeline still serves
            short = {**body, "stream": False, "max_tokens": 4}
            r = await c.post(f"{m[0].url}/v1/chat/completions", json=short)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4

    trio.run(main)


def test_the_head_streams_a_token_while_the_ring_computes_the_next(
    tmp_path: Path, model_dir: Path, local: LocalModel
) -> None:  # noqa: F811
    """Token k's event leaves the head after step k+1's hidden state went down the pipeline, so streaming it
    (to a client, maybe over a relayed link) overlaps the other stages' compute instead of delaying the step;
    the text and ids are unchanged."""
    params = SamplingParams.greedy(max_tokens=12)

    async def main() -> None:
        async with cluster(tmp_path, model_dir, [100 * MiB, 100 * MiB]) as m, httpx.AsyncClient() as c:
            assert (await deploy(c, m[0].url, workers=["n0", "n1"])).status_code == 200
            head = m[0].node
            worker = head.worker
            assert worker is not None
            (backend,) = [b for b in head.backends() if b.info()["kind"] == "pipeline"]
            log: list[tuple[str, int]] = []
            send_down = worker.send_down

            async def logged_send_down(shard: Any, frame: Any) -> None:
                await send_down(shard, frame)
                if frame.type == FrameType.HIDDEN:
                    log.append(("hidden", frame.start))

            worker.send_down = logged_send_down  # type: ignore[method-assign]
            send, recv = trio.open_memory_channel[GenerationEvent](100)
            ids: list[int] = []
            async with trio.open_nursery() as nursery:
                req = GenerationRequest(MODEL, "Hello world", params, raw=True)
                nursery.start_soon(backend.generate, req, send)
                async for event in recv:
                    ids += event.token_ids
                    log.append(("event", len(ids)))
            n_prompt = len(prompt_token_ids(local.tokenizer, local.metadata, "Hello world", raw=True))
            assert ids == local_answer(local, "Hello world", params)[1]
            # the event that brought the k-th token (k >= 1) came after the hidden state of the step that
            # computes token k+1 (at position n_prompt + k - 1) was sent
            for k in range(1, len(ids) - 1):
                hidden_at = log.index(("hidden", n_prompt + k - 1))
                event_at = next(i for i, (kind, n) in enumerate(log) if kind == "event" and n >= k)
                assert hidden_at < event_at, (k, log)

    trio.run(main)
