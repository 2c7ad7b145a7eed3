"""The OpenAI-compatible gateway, through the official `openai` client and raw HTTP, on loopback."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
import trio
from gateway_helpers import PIECES, BusyBackend, FakeBackend, app_of, serving

from eldric_p2p.api.backends.base import GenerationEvent, GenerationRequest
from eldric_p2p.api.backends.local import LocalBackend
from eldric_p2p.api.gateway import gateway_routes
from eldric_p2p.api.requests import MAX_BODY
from eldric_p2p.api.router import Router
from eldric_p2p.engine.generate import LocalModel, prompt_token_ids
from eldric_p2p.engine.sampling import SamplingParams
from eldric_p2p.engine.synthetic import write_synthetic_gguf
from eldric_p2p.errors import StageFailed

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world"}]


def client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)


def stream_text(chunks: Any) -> tuple[str, list[Any]]:
    chunks = list(chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


@pytest.fixture
def fake() -> Iterator[tuple[str, FakeBackend]]:
    backend = FakeBackend("fake", context_length=64)
    router = Router()
    router.add(backend)
    with serving(app_of(gateway_routes(router))) as url:
        yield url, backend


# ---- a fake deterministic backend --------------------------------------------------------------------------


def test_chat_same_text_streaming_and_not(fake: tuple[str, FakeBackend]) -> None:
    url, backend = fake
    c = client(url)
    full = c.chat.completions.create(model="fake", messages=MESSAGES, max_tokens=5)
    assert full.object == "chat.completion"
    assert full.choices[0].message.role == "assistant"
    assert full.choices[0].message.content == "".join(PIECES[:5])
    assert full.choices[0].finish_reason == "length"
    assert (full.usage.prompt_tokens, full.usage.completion_tokens, full.usage.total_tokens) == (6, 5, 11)

    text, chunks = stream_text(
        c.chat.completions.create(model="fake", messages=MESSAGES, max_tokens=5, stream=True)
    )
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(ch.object == "chat.completion.chunk" and ch.id == chunks[0].id for ch in chunks)
    assert [ch.choices[0].finish_reason for ch in chunks].count("length") == 1
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage is None

    # the backend ran out of text before max_tokens: finish_reason "stop"; usage chunk last when asked for
    text, chunks = stream_text(c.chat.completions.create(
        model="fake", messages=MESSAGES, max_tokens=50, stream=True,
        stream_options={"include_usage": True}))  # fmt: skip
    assert text == "".join(PIECES)
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(PIECES)
    assert chunks[-1].usage.prompt_tokens == 6


def test_sse_wire_format(fake: tuple[str, FakeBackend]) -> None:
    url, _ = fake
    body = {"model": "fake", "messages": MESSAGES, "max_tokens": 2, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0][6:])
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    last = json.loads(events[-2][6:])
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] == "length"


def test_sampling_params_reach_the_backend(fake: tuple[str, FakeBackend]) -> None:
    url, backend = fake
    client(url).chat.completions.create(
        model="fake",
        messages=MESSAGES,
        max_completion_tokens=3,
        temperature=0.5,
        top_p=0.9,
        seed=7,
        stop=["x", "yz"],
    )
    p = backend.requests[-1].params
    assert (p.max_tokens, p.temperature, p.top_p, p.seed, p.stop) == (3, 0.5, 0.9, 7, ("x", "yz"))
    assert (p.top_k, p.min_p) == (0, 0.0)  # OpenAI semantics: only what the client asked for
    assert backend.requests[-1].prompt == MESSAGES and not backend.requests[-1].raw
    client(url).chat.completions.create(model="fake", messages=MESSAGES, temperature=0, stop="END")
    p = backend.requests[-1].params
    assert p.is_greedy and p.stop == ("END",)
    client(url).completions.create(model="fake", prompt="a b c", max_tokens=2)
    assert backend.requests[-1].raw and backend.requests[-1].prompt == "a b c"


def test_completions_endpoint(fake: tuple[str, FakeBackend]) -> None:
    url, _ = fake
    c = client(url)
    out = c.completions.create(model="fake", prompt="one two three", max_tokens=3)
    assert out.object == "text_completion" and out.choices[0].text == "Hello, world"
    assert out.usage.prompt_tokens == 3 and out.usage.completion_tokens == 3
    chunks = list(c.completions.create(model="fake", prompt="one", max_tokens=3, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == "Hello, world"
    assert chunks[-1].choices[0].finish_reason == "length"


def test_models_lists_every_backend_source() -> None:
    a, b, a2 = FakeBackend("alpha"), FakeBackend("beta", name="remote-beta"), FakeBackend("alpha", name="a2")
    extra: list[FakeBackend] = []
    router = Router([lambda: [a, b], lambda: extra])
    with serving(app_of(gateway_routes(router))) as url:
        assert [m.id for m in client(url).models.list().data] == ["alpha", "beta"]
        extra.append(a2)  # a pipeline appears later: no re-registration needed
        data = httpx.get(url + "/v1/models").json()["data"]
        assert [len(m["backends"]) for m in data] == [2, 1]
        assert httpx.get(url + "/v1/models/beta").json()["id"] == "beta"
        assert httpx.get(url + "/v1/models/gamma").status_code == 404


OK = {"model": "fake", "messages": MESSAGES}
BAD_INPUTS: list[tuple[str, Any, int, str | None, str | None]] = [
    # (case, body (bytes = sent as is), status, error code, error param)
    ("malformed JSON", b'{"model": "fake", "messages": [', 400, "invalid_json", None),
    ("not UTF-8", b'{"model": "\xff\xfe"}', 400, "invalid_json", None),
    ("empty body", b"", 400, "invalid_json", None),
    ("not an object", [1, 2], 400, "invalid_type", None),
    ("missing messages", {"model": "fake"}, 400, "missing_required_parameter", "messages"),
    ("empty messages", {"model": "fake", "messages": []}, 400, "empty_array", "messages"),
    ("messages not a list", {"model": "fake", "messages": "hi"}, 400, "invalid_type", "messages"),
    ("message not an object", {"model": "fake", "messages": ["hi"]}, 400, "invalid_type", "messages[0]"),
    ("bad role", {"model": "fake", "messages": [{"role": "wizard", "content": "x"}]}, 400, "invalid_value",
     "messages[0].role"),
    ("content a number", {"model": "fake", "messages": [{"role": "user", "content": 5}]}, 400, "invalid_type",
     "messages[0].content"),
    ("image content", {**OK, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "unsupported_value", "messages[0].content[0]"),
    ("missing model", {"messages": MESSAGES}, 400, "missing_required_parameter", "model"),
    ("model a number", {"model": 3, "messages": MESSAGES}, 400, "invalid_type", "model"),
    ("unknown model", {"model": "gpt-9", "messages": MESSAGES}, 404, "model_not_found", "model"),
    ("max_tokens a string", {**OK, "max_tokens": "10"}, 400, "invalid_type",
     "max_tokens"),
    ("max_tokens zero", {**OK, "max_tokens": 0}, 400, "invalid_value", "max_tokens"),
    ("max_tokens beyond context", {**OK, "max_tokens": 64}, 400,
     "context_length_exceeded", "max_tokens"),
    ("prompt + max_tokens beyond context", {**OK, "max_tokens": 60}, 400,
     "context_length_exceeded", "messages"),
    ("same, streaming", {**OK, "max_tokens": 60, "stream": True}, 400,
     "context_length_exceeded", "messages"),
    ("temperature too high", {**OK, "temperature": 5}, 400, "invalid_value",
     "temperature"),
    ("temperature a string", {**OK, "temperature": "hot"}, 400, "invalid_type",
     "temperature"),
    ("top_p above 1", {**OK, "top_p": 1.5}, 400, "invalid_value", "top_p"),
    ("seed a float", {**OK, "seed": 1.5}, 400, "invalid_type", "seed"),
    ("stop a number", {**OK, "stop": 7}, 400, "invalid_type", "stop"),
    ("empty stop string", {**OK, "stop": [""]}, 400, "invalid_value", "stop"),
    ("stream a string", {**OK, "stream": "yes"}, 400, "invalid_type", "stream"),
    ("stream_options a list", {**OK, "stream_options": []}, 400, "invalid_type",
     "stream_options"),
    ("n = 2", {**OK, "n": 2}, 400, "unsupported_value", "n"),
]  # fmt: skip


def test_bad_inputs_are_specific_4xx_and_the_node_keeps_serving(fake: tuple[str, FakeBackend]) -> None:
    url, backend = fake
    with httpx.Client(base_url=url, timeout=30) as http:
        for case, body, status, code, param in BAD_INPUTS:
            if isinstance(body, bytes):
                r = http.post(
                    "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
                )
            else:
                r = http.post("/v1/chat/completions", json=body)
            assert r.status_code == status, (case, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}, case
            assert (err["code"], err["param"]) == (code, param), (case, err)
            assert err["message"], case
        r = http.post("/v1/chat/completions", json={"model": "gpt-9", "messages": MESSAGES})
        assert "available: fake" in r.json()["error"]["message"]
        r = http.post("/v1/completions", json={"model": "fake", "prompt": [1, 2, 3]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        r = http.get("/v1/chat/completions")
        assert r.status_code == 405
    assert backend.active == 0
    out = client(url).chat.completions.create(model="fake", messages=MESSAGES, max_tokens=2)
    assert out.choices[0].message.content == "Hello,"


def test_ten_megabyte_prompt_is_413(fake: tuple[str, FakeBackend]) -> None:
    url, backend = fake
    huge = "word " * (2 * 1024 * 1024)  # 10 MiB
    with pytest.raises(openai.APIStatusError) as info:
        client(url).chat.completions.create(model="fake", messages=[{"role": "user", "content": huge}])
    assert info.value.status_code == 413
    assert info.value.body["code"] == "request_too_large"
    # just over the limit, without a Content-Length (chunked): still refused while reading
    body = json.dumps({"model": "fake", "messages": [{"role": "user", "content": "x" * MAX_BODY}]}).encode()
    r = httpx.post(
        url + "/v1/chat/completions", content=iter([body[i : i + 65536] for i in range(0, len(body), 65536)])
    )
    assert r.status_code == 413
    assert backend.requests == []
    assert client(url).chat.completions.create(model="fake", messages=MESSAGES, max_tokens=1).choices


def test_api_keys() -> None:
    router = Router()
    router.add(FakeBackend("fake"))
    with serving(app_of(gateway_routes(router, api_keys=["s3cret", "other"]))) as url:
        for key in ("wrong", ""):
            with pytest.raises(openai.AuthenticationError):
                client(url, key or "x").chat.completions.create(model="fake", messages=MESSAGES)
        r = httpx.get(url + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
        out = client(url, "other").chat.completions.create(model="fake", messages=MESSAGES, max_tokens=1)
        assert out.choices[0].message.content == "Hello"
        assert [m.id for m in client(url, "s3cret").models.list().data] == ["fake"]


def test_overload_is_429_and_no_healthy_backend_is_503() -> None:
    busy, sick = BusyBackend("busy"), FakeBackend("sick")
    sick.healthy = False
    router = Router()
    router.add(busy)
    router.add(sick)
    with serving(app_of(gateway_routes(router))) as url:
        for stream in (False, True):
            r = httpx.post(
                url + "/v1/chat/completions", json={"model": "busy", "messages": MESSAGES, "stream": stream}
            )
            assert r.status_code == 429 and r.headers["retry-after"] == "3"
            assert r.json()["error"]["type"] == "rate_limit_error"
        r = httpx.post(url + "/v1/chat/completions", json={"model": "sick", "messages": MESSAGES})
        assert r.status_code == 503 and int(r.headers["retry-after"]) > 0


def test_error_mid_stream_is_an_error_event() -> None:
    class Breaks(FakeBackend):
        async def generate(
            self, request: GenerationRequest, events: trio.MemorySendChannel[GenerationEvent]
        ) -> None:
            async with events:
                await events.send(GenerationEvent(prompt_token_ids=[1]))
                await events.send(GenerationEvent(text="par", token_ids=[1]))
                raise StageFailed("stage 2 (layers 16-24) on peer ab12 went away")

    class Buggy(FakeBackend):
        async def generate(
            self, request: GenerationRequest, events: trio.MemorySendChannel[GenerationEvent]
        ) -> None:
            raise ZeroDivisionError

    router = Router()
    router.add(Breaks("breaks"))
    router.add(Buggy("buggy"))
    with serving(app_of(gateway_routes(router))) as url:
        stream = client(url).chat.completions.create(model="breaks", messages=MESSAGES, stream=True)
        seen = []
        with pytest.raises(openai.APIError, match="went away"):
            for chunk in stream:
                seen.append(chunk.choices[0].delta.content)
        assert "par" in seen
        r = httpx.post(url + "/v1/chat/completions", json={"model": "breaks", "messages": MESSAGES})
        assert r.status_code == 503 and "went away" in r.json()["error"]["message"]
        r = httpx.post(url + "/v1/chat/completions", json={"model": "buggy", "messages": MESSAGES})
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"


def _run_many(url: str, n: int) -> list[tuple[int, str, str | None]]:
    """n concurrent streaming requests; each -> (status, text or error code, Retry-After)."""
    results: list[tuple[int, str, str | None]] = []

    async def one(http: httpx.AsyncClient, i: int) -> None:
        body = {"model": "fake", "messages": [{"role": "user", "content": f"request {i}"}], "stream": True}
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            raw = (await r.aread()).decode()
            if r.status_code == 200:
                events = [e[6:] for e in raw.split("\n\n") if e]
                assert events[-1] == "[DONE]", raw[-200:]
                text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])
                results.append((200, text, None))
            else:
                results.append(
                    (r.status_code, json.loads(raw)["error"]["code"], r.headers.get("retry-after"))
                )

    async def main() -> None:
        limits = httpx.Limits(max_connections=n + 10)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
            with trio.fail_after(60):  # none hangs
                async with trio.open_nursery() as nursery:
                    for i in range(n):
                        nursery.start_soon(one, http, i)

    trio.run(main)
    return results


def test_fifty_concurrent_streams_complete_or_get_a_clean_429() -> None:
    slow = FakeBackend("fake", delay=0.02)
    router = Router(max_queue=10)
    router.add(slow)
    with serving(app_of(gateway_routes(router))) as url:
        results = _run_many(url, 50)
    assert len(results) == 50
    ok = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] != 200]
    assert len(ok) >= 10 and all(text == "".join(PIECES) for _, text, _ in ok)
    assert refused and all(s == 429 and code == "queue_full" and retry for s, code, retry in refused)
    assert slow.completed == len(ok) and slow.active == 0

    # with room for all of them, all 50 complete
    slow2 = FakeBackend("fake", delay=0.02)
    router2 = Router(max_queue=64)
    router2.add(slow2)
    with serving(app_of(gateway_routes(router2))) as url:
        results = _run_many(url, 50)
    assert [r[0] for r in results] == [200] * 50 and slow2.completed == 50


def test_client_disconnect_cancels_the_generation() -> None:
    slow = FakeBackend("slow", delay=0.3)
    router = Router()
    router.add(slow)
    with serving(app_of(gateway_routes(router))) as url:
        body = {"model": "slow", "messages": MESSAGES, "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # the role chunk
            assert slow.active == 1
        deadline = time.monotonic() + 5
        while (slow.active or not slow.cancelled) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert slow.cancelled == 1 and slow.active == 0 and slow.completed == 0


# ---- LocalBackend on a synthetic model ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gw") / "tiny.gguf"
    return write_synthetic_gguf(path, arch="qwen2", n_layers=2, hidden=64, ffn=128, seed=3)


@pytest.fixture
def one_thread() -> Iterator[None]:
    # Forward passes of a tiny model are faster on one thread than fighting other processes for two.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def local(synthetic: Path, one_thread: None) -> Iterator[tuple[str, LocalBackend, LocalModel]]:
    reference = LocalModel(synthetic, max_ctx=512)

    async def load() -> LocalBackend:
        return await LocalBackend.load(synthetic, "tiny", max_ctx=512)

    backend = trio.run(load)
    router = Router()
    router.add(backend)
    with serving(app_of(gateway_routes(router))) as url:
        yield url, backend, reference


def test_local_backend_matches_the_run_command(local: tuple[str, LocalBackend, LocalModel]) -> None:
    url, backend, ref = local
    ids = prompt_token_ids(ref.tokenizer, ref.metadata, MESSAGES, raw=False)
    expected = ref.generate(ids, SamplingParams.greedy(max_tokens=24))
    assert len(expected.text) > 10
    c = client(url)
    full = c.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24, temperature=0)
    assert full.choices[0].message.content == expected.text
    assert full.choices[0].finish_reason == expected.finish_reason
    assert full.usage.prompt_tokens == len(ids)
    assert full.usage.completion_tokens == len(expected.token_ids)
    text, chunks = stream_text(c.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True}))  # fmt: skip
    assert text == expected.text
    assert chunks[-1].usage.prompt_tokens == len(ids)
    assert chunks[-1].usage.completion_tokens == len(expected.token_ids)
    # raw completions: the prompt is tokenized as is
    raw_ids = ref.tokenizer.encode("the cat sat")
    expected_raw = ref.generate(raw_ids, SamplingParams.greedy(max_tokens=12))
    out = c.completions.create(model="tiny", prompt="the cat sat", max_tokens=12, temperature=0)
    assert out.choices[0].text == expected_raw.text and out.usage.prompt_tokens == len(raw_ids)
    # seeded sampling repeats itself
    a, b = (
        c.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=1.0, seed=11)
        for _ in range(2)
    )
    assert a.choices[0].message.content == b.choices[0].message.content
    assert not backend.active


def test_local_backend_stop_strings_cut_exactly(local: tuple[str, LocalBackend, LocalModel]) -> None:
    url, _, ref = local
    ids = prompt_token_ids(ref.tokenizer, ref.metadata, MESSAGES, raw=False)
    full = ref.generate(ids, SamplingParams.greedy(max_tokens=30)).text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = full[: full.index(stop)]
    c = client(url)
    out = c.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=30, temperature=0, stop=[stop]
    )
    assert out.choices[0].message.content == cut and out.choices[0].finish_reason == "stop"
    text, chunks = stream_text(c.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=30, temperature=0, stop=stop, stream=True))  # fmt: skip
    assert text == cut and chunks[-1].choices[0].finish_reason == "stop"


def test_local_backend_context_and_disconnect(local: tuple[str, LocalBackend, LocalModel]) -> None:
    url, backend, _ = local
    r = httpx.post(
        url + "/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, "max_tokens": 512}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = httpx.post(
        url + "/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, "max_tokens": 500}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body) as r:
        lines = (line for line in r.iter_lines() if line)
        next(lines), next(lines)  # role chunk, first text
        assert len(backend.active) == 1
    deadline = time.monotonic() + 10
    while backend.active and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not backend.active
    assert all(not stage.sessions for stage in backend.model.stages)  # KV caches freed
    assert client(url).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2).choices


# ---- a node that hosts no stage routes /v1 to the pipeline -------------------------------------------------


def test_node_without_a_stage_routes_v1_to_the_pipeline(tmp_path: Path, one_thread: None) -> None:
    from eldric_p2p.node import Node, NodeConfig

    models = tmp_path / "models"
    models.mkdir()
    write_synthetic_gguf(models / "tiny.gguf", arch="qwen2", n_layers=6, hidden=64, ffn=128, seed=3)
    ref = LocalModel(models / "tiny.gguf", max_ctx=256)
    ids = prompt_token_ids(ref.tokenizer, ref.metadata, MESSAGES, raw=False)
    expected = ref.generate(ids, SamplingParams.greedy(max_tokens=16))

    async def start(nursery: trio.Nursery, cfg: NodeConfig) -> Node:
        node = Node(cfg)
        await nursery.start(node.run)
        return node

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            fast = {"listen_port": 0, "mdns": False, "peer_interval": 0.2}
            cfg = NodeConfig(name="entry", data_dir=tmp_path / "e", models=[models], worker=False, **fast)
            entry = await start(nursery, cfg)
            peer = [("127.0.0.1", entry.port)]
            for i in range(3):
                await start(
                    nursery, NodeConfig(name=f"w{i}", data_dir=tmp_path / f"w{i}", peers=peer, **fast)
                )
            async with httpx.AsyncClient(base_url=entry.url, timeout=60) as http:
                with trio.fail_after(30):
                    while len((await http.get("/api/v1/peers")).json()["peers"]) < 3:  # noqa: ASYNC110
                        await trio.sleep(0.1)
                body = {"model": "tiny", "workers": ["w0", "w1", "w2"], "max_ctx": 256}
                r = await http.post("/api/v1/pipeline/deploy", json=body)
                assert r.status_code == 200, r.text
                with trio.fail_after(30):  # the entry learns where the head is from its peers
                    while not (await http.get("/v1/models")).json()["data"]:  # noqa: ASYNC110
                        await trio.sleep(0.1)
                assert entry.worker is None  # this node runs no stage at all
                chat = {"model": "tiny", "messages": MESSAGES, "max_tokens": 16, "temperature": 0}
                r = await http.post("/v1/chat/completions", json=chat)
                assert r.status_code == 200, r.text
                out = r.json()
                assert out["choices"][0]["message"]["content"] == expected.text
                assert out["usage"]["completion_tokens"] == len(expected.token_ids)
                assert out["usage"]["prompt_tokens"] == len(ids)
                async with http.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as s:
                    lines = [ln[6:] async for ln in s.aiter_lines() if ln.startswith("data: ")]
                assert lines[-1] == "[DONE]"
                text = "".join(
                    json.loads(ln)["choices"][0]["delta"].get("content") or "" for ln in lines[:-1]
                )
                assert text == expected.text

                # 50 concurrent streams on the 3-stage pipeline: each completes with the same greedy text or
                # is refused cleanly (429/503 with Retry-After); none hangs.
                results: list[tuple[int, str, str | None]] = []

                async def one(i: int) -> None:
                    body = {**chat, "stream": True, "max_tokens": 8}
                    async with http.stream("POST", "/v1/chat/completions", json=body) as s:
                        raw = (await s.aread()).decode()
                        if s.status_code == 200:
                            events = [e[6:] for e in raw.split("\n\n") if e.startswith("data: ")]
                            assert events[-1] == "[DONE]", raw[-300:]
                            parts = [json.loads(e) for e in events[:-1]]
                            assert not any("error" in p for p in parts), raw[-300:]
                            text = "".join(p["choices"][0]["delta"].get("content") or "" for p in parts)
                            results.append((200, text, None))
                        else:
                            results.append((s.status_code, raw, s.headers.get("retry-after")))

                with trio.fail_after(180):
                    async with trio.open_nursery() as many:
                        for i in range(50):
                            many.start_soon(one, i)
                short = ref.generate(ids, SamplingParams.greedy(max_tokens=8)).text
                assert len(results) == 50
                done = [r for r in results if r[0] == 200]
                print(f"50 concurrent streams: {len(done)} completed, {50 - len(done)} refused (Retry-After)")
                assert done and all(text == short for _, text, _ in done)
                assert all(s in (429, 503) and retry for s, _, retry in results if s != 200), results
            nursery.cancel_scope.cancel()

    trio.run(main)
