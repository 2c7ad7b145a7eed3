"""Several models per node: loaded on demand by a request, unloaded after their TTL, the least recently used
evicted when memory is needed; admission bounded by the sessions a stage has KV memory for. In-process nodes
on loopback, synthetic models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import trio
from pipeline.test_pipeline import MiB, _start, local_answer

from eldric_p2p.data.gguf_index import GGUFFile
from eldric_p2p.engine.generate import LocalModel
from eldric_p2p.engine.model import estimate_stage_bytes
from eldric_p2p.engine.sampling import SamplingParams
from eldric_p2p.engine.synthetic import write_synthetic_gguf
from eldric_p2p.engine.weights import resolve_weights
from eldric_p2p.node import NodeConfig
from eldric_p2p.pipeline.assignment import StageRef
from eldric_p2p.pipeline.cache import evict_order, expired
from eldric_p2p.pipeline.coordinator import Deployment, ShardState

CTX = 256
PROMPT = "Hello world the cat"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("models")
    for seed, name in enumerate(("alpha", "beta", "gamma"), 5):
        write_synthetic_gguf(d / f"{name}.gguf", arch="qwen2", n_layers=8, hidden=64, ffn=128, seed=seed)
    return d


def needed(path: Path, sessions: int) -> int:
    """What one single-stage deployment of `path` reserves on a CPU worker."""
    f = GGUFFile(path)
    try:
        fmt = resolve_weights("auto", torch.device("cpu"))
        return estimate_stage_bytes(f.index, 0, f.index.n_layers, weights=fmt, max_ctx=CTX, sessions=sessions)
    finally:
        f.close()


async def complete(c: httpx.AsyncClient, url: str, model: str, max_tokens: int = 12) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
    return await c.post(f"{url}/v1/completions", json=body, timeout=60)


async def cache(c: httpx.AsyncClient, url: str) -> dict[str, Any]:
    r = await c.get(f"{url}/api/v1/cache")
    assert r.status_code == 200
    return r.json()


async def wait_polled(node: Any) -> None:
    """Two heartbeats: the coordinator has read every head's last use."""
    await trio.sleep(2.5 * node.coordinator.heartbeat_s)


def on_demand_node(tmp: Path, models: Path, memory: int, **kw: Any) -> NodeConfig:
    return NodeConfig(name="n0", data_dir=tmp / "n0", listen_port=0, models=[models], memory=memory,
                      mdns=False, on_demand=True, on_demand_options={"max_ctx": CTX, "sessions": 2},
                      heartbeat_s=0.1, **kw)  # fmt: skip


def test_two_models_share_a_node_and_a_third_evicts_the_least_recently_used(
    tmp_path: Path, models: Path
) -> None:
    one = needed(models / "alpha.gguf", 2)
    greedy = SamplingParams.greedy(max_tokens=12)
    want = {m: local_answer(LocalModel(models / f"{m}.gguf", max_ctx=CTX), PROMPT, greedy)[0]
            for m in ("alpha", "beta", "gamma")}  # fmt: skip

    async def main() -> None:
        async with trio.open_nursery() as nursery, httpx.AsyncClient() as c:
            n = (await _start(nursery, on_demand_node(tmp_path, models, int(2.5 * one)))).node
            url = n.url
            assert (await cache(c, url))["models"] == []
            for model in ("alpha", "beta"):  # two models within the budget, both stay
                r = await complete(c, url, model)
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["text"] == want[model]
            listing = await cache(c, url)
            assert sorted(m["model"] for m in listing["models"]) == ["alpha", "beta"]
            assert all(
                m["on_demand"] and m["ttl_s"] == 1800 and m["memory"] == one for m in listing["models"]
            )
            assert listing["worker"]["reserved"] == 2 * one and len(listing["worker"]["shards"]) == 2
            await wait_polled(n)
            assert (await complete(c, url, "alpha")).status_code == 200  # alpha is now the more recent
            await wait_polled(n)
            used = {m["model"]: m["last_used"] for m in (await cache(c, url))["models"]}
            assert used["alpha"] > used["beta"]

            r = await complete(c, url, "gamma")  # no room for a third: beta (least recently used) goes
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == want["gamma"]
            listing = await cache(c, url)
            assert sorted(m["model"] for m in listing["models"]) == ["alpha", "gamma"]
            (ev,) = listing["evicted"]
            assert ev["model"] == "beta" and "least recently used" in ev["reason"]
            assert listing["worker"]["reserved"] == 2 * one

            # beta comes back on the next request for it (alpha, the least recently used now, makes room)
            r = await complete(c, url, "beta")
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == want["beta"]
            assert [e["model"] for e in (await cache(c, url))["evicted"]] == ["beta", "alpha"]

            # DELETE unloads; an unknown key is a 404; a model no data peer has is a 404 too
            r = await c.delete(f"{url}/api/v1/cache/gamma")
            assert r.status_code == 200 and r.json()["unloaded"][0]["model"] == "gamma"
            assert (await c.delete(f"{url}/api/v1/cache/gamma")).status_code == 404
            r = await complete(c, url, "nonesuch")
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
            r = await c.delete(f"{url}/api/v1/cache")
            assert [u["model"] for u in r.json()["unloaded"]] == ["beta"]
            assert (await cache(c, url))["worker"]["reserved"] == 0 and n.worker.shards == {}
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_an_idle_model_unloads_after_its_ttl_and_reloads_from_the_shard_cache(
    tmp_path: Path, models: Path
) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery, httpx.AsyncClient() as c:
            cfg = on_demand_node(tmp_path, models, 200 * MiB, model_ttl=1.0)
            n = (await _start(nursery, cfg)).node
            r = await complete(c, n.url, "alpha")
            assert r.status_code == 200
            first = n.worker.shards and next(iter(n.worker.shards.values()))
            assert first and first.bytes_fetched > 0
            (m,) = (await cache(c, n.url))["models"]
            assert m["ttl_s"] == 1.0 and m["expires_in_s"] <= 1.0
            with trio.fail_after(10):
                while not n.coordinator.evicted:  # noqa: ASYNC110 (the heartbeat's sweep unloads it)
                    await trio.sleep(0.1)
            listing = await cache(c, n.url)
            assert listing["models"] == [] and listing["worker"]["shards"] == []
            assert "idle" in listing["evicted"][0]["reason"]
            r = await complete(c, n.url, "alpha")  # loaded again, from this node's shard cache
            assert r.status_code == 200
            (shard,) = n.worker.shards.values()
            assert shard.bytes_fetched == 0
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_model_too_large_even_after_evicting_gets_a_503_and_busy_models_are_kept(
    tmp_path: Path, models: Path
) -> None:
    one = needed(models / "alpha.gguf", 2)

    async def main() -> None:
        async with trio.open_nursery() as nursery, httpx.AsyncClient() as c:
            n = (await _start(nursery, on_demand_node(tmp_path, models, int(1.5 * one)))).node
            assert (await complete(c, n.url, "alpha")).status_code == 200
            (dep,) = n.coordinator.deployments.values()
            (shard,) = n.worker.shards.values()
            held, _ = trio.open_memory_channel[object](1)
            shard.head_sessions[10**9] = held  # a session open at its head: alpha may not be evicted
            with trio.fail_after(10):  # once a heartbeat that saw it has landed (one in flight may not have)
                while dep.active != 1:  # noqa: ASYNC110 (the heartbeat sets it)
                    await trio.sleep(0.05)
            r = await complete(c, n.url, "beta")
            assert r.status_code == 503 and r.json()["error"]["code"] == "insufficient_memory"
            assert "in use, not unloaded: alpha" in r.json()["error"]["message"]
            assert int(r.headers["retry-after"]) > 0
            assert [d.model for d in n.coordinator.deployments.values()] == ["alpha"]
            assert (await c.get(f"{n.url}/api/v1/node")).status_code == 200
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_eviction_order_is_least_recently_used_and_skips_pinned_and_busy() -> None:
    def dep(name: str, used: float, ttl: float = 60, active: int = 0) -> Deployment:
        ready = ShardState(StageRef(0, 0, 8, "p" * 8, "w", "127.0.0.1", 1), "http://127.0.0.1:1", 1, "ready")
        d = Deployment(name, name, [], "proportional", "auto", CTX, 2, [ready], ttl_s=ttl, last_used=used)
        d.active = active
        return d

    deps = [dep("a", 30), dep("b", 10), dep("pinned", 0, ttl=0), dep("busy", 5, active=1), dep("c", 20)]
    assert [d.model for d in evict_order(deps)] == ["b", "c", "a"]
    assert [d.model for d in expired(deps, 85)] == ["b", "c"]  # idle 75 and 65 s > 60 s; a idle 55 s


def test_twenty_concurrent_requests_over_a_budget_for_four_sessions(tmp_path: Path, models: Path) -> None:
    """A 2-stage pipeline deployed for 4 sessions, a queue of 8: 4 run at once on every stage, 8 wait, the
    rest get 429 with Retry-After; every answer served equals the single-session one; the node lives on."""
    from test_churn import slow_down

    want = local_answer(LocalModel(models / "alpha.gguf", max_ctx=CTX), PROMPT,
                        SamplingParams.greedy(max_tokens=16))[0]  # fmt: skip

    async def main() -> None:
        async with (
            trio.open_nursery() as nursery,
            httpx.AsyncClient(limits=httpx.Limits(max_connections=40)) as c,
        ):
            n0 = (await _start(nursery, NodeConfig(name="n0", data_dir=tmp_path / "n0", listen_port=0,
                                                   models=[models], memory=200 * MiB, mdns=False, max_queue=8,
                                                   peer_interval=0.2))).node  # fmt: skip
            n1 = (await _start(nursery, NodeConfig(name="n1", data_dir=tmp_path / "n1", listen_port=0,
                                                   memory=200 * MiB, mdns=False, peer_interval=0.2,
                                                   peers=[("127.0.0.1", n0.port)]))).node  # fmt: skip
            ask = {"model": "alpha", "workers": ["n0", "n1"], "max_ctx": CTX, "sessions": 4}
            r = await c.post(f"{n0.url}/api/v1/pipeline/deploy", timeout=60, json=ask)
            assert r.status_code == 200, r.text
            slow_down(n1.worker, 0.03)  # each request lasts ~0.5 s: all 20 overlap
            peaks = {"head": 0, "tail": 0}

            async def watch() -> None:
                while True:
                    heads = sum(len(s.head_sessions) for s in n0.worker.shards.values())
                    peaks["head"] = max(peaks["head"], heads)
                    peaks["tail"] = max(peaks["tail"], len(n1.worker._stage_sessions))
                    await trio.sleep(0.005)

            results: list[tuple[int, str, str | None]] = []

            async def one(i: int) -> None:
                body = {
                    "model": "alpha",
                    "prompt": PROMPT,
                    "max_tokens": 16,
                    "temperature": 0,
                    "stream": True,
                }
                async with c.stream("POST", f"{n0.url}/v1/completions", json=body, timeout=60) as resp:
                    raw = (await resp.aread()).decode()
                    if resp.status_code != 200:
                        err = json.loads(raw)["error"]["code"]
                        results.append((resp.status_code, err, resp.headers.get("retry-after")))
                        return
                    chunks = [json.loads(e[6:]) for e in raw.split("\n\n") if e.startswith("data: {")]
                    assert raw.rstrip().endswith("data: [DONE]") and not any("error" in ch for ch in chunks)
                    results.append((200, "".join(ch["choices"][0]["text"] for ch in chunks), None))

            async with trio.open_nursery() as inner:
                inner.start_soon(watch)
                with trio.fail_after(60):
                    async with trio.open_nursery() as requests:
                        for i in range(20):
                            requests.start_soon(one, i)
                inner.cancel_scope.cancel()
            ok = [r for r in results if r[0] == 200]
            refused = [r for r in results if r[0] != 200]
            print(f"20 concurrent: {len(ok)} served, {len(refused)} refused with 429; peak sessions {peaks}")
            assert len(results) == 20 and peaks == {"head": 4, "tail": 4}
            assert len(ok) >= 12 and all(text == want for _, text, _ in ok)
            assert refused and all(s == 429 and code == "queue_full" and retry for s, code, retry in refused)
            assert (await complete(c, n0.url, "alpha")).status_code == 200  # and the node serves on
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_on_demand_deploys_over_the_swarm_when_the_model_fits_no_single_worker(
    tmp_path: Path, models: Path
) -> None:
    """A data peer with no worker takes the request; each worker has room for about 60% of the model: the
    load is a 2-stage pipeline. Unloaded and asked again, it comes back (no stale head answers 404)."""
    one = needed(models / "alpha.gguf", 2)
    want = local_answer(LocalModel(models / "alpha.gguf", max_ctx=CTX), PROMPT,
                        SamplingParams.greedy(max_tokens=12))[0]  # fmt: skip

    async def main() -> None:
        async with trio.open_nursery() as nursery, httpx.AsyncClient() as c:
            cfg = on_demand_node(tmp_path, models, None)
            cfg.worker = False  # and the default 2 s between peer polls: its table lags behind an unload
            n0 = (await _start(nursery, cfg)).node
            for name in ("w1", "w2"):
                await _start(nursery, NodeConfig(name=name, data_dir=tmp_path / name, listen_port=0,
                                                 memory=int(0.6 * one), mdns=False, peer_interval=0.2,
                                                 peers=[("127.0.0.1", n0.port)]))  # fmt: skip
            with trio.fail_after(10):
                while len(n0.peers.table.peers()) < 2:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            for _ in range(2):
                r = await complete(c, n0.url, "alpha")
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["text"] == want
                (m,) = (await cache(c, n0.url))["models"]
                assert sorted(s["worker"] for s in m["stages"]) == ["w1", "w2"] and m["on_demand"]
                with trio.fail_after(10):  # n0's peer table lists the head on w1 or w2
                    while not any(n0.peers.heads_of(i) for i in n0.peers.table.peers()):  # noqa: ASYNC110
                        await trio.sleep(0.1)
                assert (await c.delete(f"{n0.url}/api/v1/cache/alpha")).status_code == 200
            nursery.cancel_scope.cancel()

    trio.run(main)
