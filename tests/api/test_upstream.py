"""UpstreamBackend against a tiny fake OpenAI server on loopback, via the gateway and openai client."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import openai
import pytest
import trio
from gateway_helpers import app_of, serving
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from eldric_p2p.api.backends.upstream import SSEParser, UpstreamBackend, api_base, parse_upstream_spec
from eldric_p2p.api.gateway import gateway_routes
from eldric_p2p.api.router import Router
from eldric_p2p.errors import RemoteProtocolError, UsageError

WORDS = ["The", " quick", " brown", " fox"]


class FakeOpenAI:
    """A minimal OpenAI-compatible server: streams WORDS one chunk each; records requests and disconnects."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.auth: list[str | None] = []
        self.mode = "ok"  # ok | busy | garbage | no-done | slow
        self.finished = 0
        self.cancelled = 0

    def routes(self) -> list[Route]:
        async def chat(request: Request) -> Response:
            return await self.answer(request, chat=True)

        async def completions(request: Request) -> Response:
            return await self.answer(request, chat=False)

        return [Route("/v1/chat/completions", chat, methods=["POST"]),
                Route("/v1/completions", completions, methods=["POST"])]  # fmt: skip

    async def answer(self, request: Request, *, chat: bool) -> Response:
        body = await request.json()
        self.requests.append(body)
        self.auth.append(request.headers.get("authorization"))
        if self.mode == "busy":
            return JSONResponse(
                {"error": {"message": "slots full"}}, status_code=503, headers={"Retry-After": "7"}
            )
        if body.get("model") != "served-model":
            return JSONResponse({"error": {"message": "no such model"}}, status_code=404)
        n = min(body.get("max_tokens", 100), len(WORDS))

        def chunk(text: str | None, finish: str | None) -> bytes:
            choice = {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}
            if not chat:
                choice = {"index": 0, "text": text or "", "finish_reason": finish}
            return b"data: " + json.dumps({"choices": [choice]}).encode() + b"\n\n"

        async def events() -> AsyncIterator[bytes]:
            try:
                yield b": keep-alive comment\n\n"
                for w in WORDS[:n]:
                    if self.mode == "slow":
                        await trio.sleep(0.2)
                    yield chunk(w, None)
                if self.mode == "garbage":
                    yield b"data: {not json\n\n"
                yield chunk(None, "length" if n < len(WORDS) else "stop")
                usage = {"prompt_tokens": 9, "completion_tokens": n, "total_tokens": 9 + n}
                yield b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n"
                if self.mode != "no-done":
                    yield b"data: [DONE]\n\n"
                self.finished += 1
            except BaseException:
                self.cancelled += 1
                raise

        return StreamingResponse(events(), media_type="text/event-stream")


@pytest.fixture
def upstream() -> Iterator[tuple[str, FakeOpenAI]]:
    fake = FakeOpenAI()
    with serving(app_of(fake.routes())) as url:
        yield url, fake


def gateway_for(backend: UpstreamBackend) -> Any:
    router = Router()
    router.add(backend)
    return serving(app_of(gateway_routes(router)))


def test_spec_and_base() -> None:
    assert parse_upstream_spec("llama=http://10.0.0.5:8080") == ("llama", "http://10.0.0.5:8080")
    assert api_base("http://h:1/") == "http://h:1/v1" and api_base("http://h:1/v1") == "http://h:1/v1"
    for bad in ("llama", "=http://x", "llama=ftp://x"):
        with pytest.raises(UsageError):
            parse_upstream_spec(bad)


def test_sse_parser_split_anywhere_and_limits() -> None:
    stream = b'data: {"a": 1}\r\n\r\n: comment\n\ndata: x\ndata: y\n\nevent: e\ndata: [DONE]\n\n'
    for cut in range(len(stream)):
        p = SSEParser()
        assert p.feed(stream[:cut]) + p.feed(stream[cut:]) == ['{"a": 1}', "x\ny", "[DONE]"]
    with pytest.raises(RemoteProtocolError):
        SSEParser(max_line=100).feed(b"data: " + b"x" * 200)
    with pytest.raises(RemoteProtocolError):
        SSEParser(max_event=10).feed(b"data: 123456\ndata: 123456\n")
    assert SSEParser().close() == []


def test_streams_through_the_gateway(upstream: tuple[str, FakeOpenAI]) -> None:
    url, fake = upstream
    backend = UpstreamBackend("mylab", url, upstream_model="served-model", api_key="k1")
    with gateway_for(backend) as gw:
        c = openai.OpenAI(base_url=gw + "/v1", api_key="x", max_retries=0)
        msgs = [{"role": "user", "content": "hi"}]
        out = c.chat.completions.create(
            model="mylab", messages=msgs, max_tokens=3, temperature=0, stop=["zz"]
        )
        assert out.choices[0].message.content == "The quick brown"
        assert out.choices[0].finish_reason == "length"
        assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (9, 3)
        sent = fake.requests[-1]
        assert sent["model"] == "served-model" and sent["messages"] == msgs and sent["stream"] is True
        assert (sent["max_tokens"], sent["temperature"], sent["stop"]) == (3, 0.0, ["zz"])
        assert fake.auth[-1] == "Bearer k1"
        chunks = list(c.chat.completions.create(model="mylab", messages=msgs, stream=True))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == "".join(WORDS)
        assert chunks[-1].choices[0].finish_reason == "stop"
        comp = c.completions.create(model="mylab", prompt="once", max_tokens=2)
        assert comp.choices[0].text == "The quick" and fake.requests[-1]["prompt"] == "once"
        assert [m.id for m in c.models.list().data] == ["mylab"]


def test_upstream_errors_map_to_the_gateway(upstream: tuple[str, FakeOpenAI]) -> None:
    url, fake = upstream
    msgs = [{"role": "user", "content": "hi"}]
    with gateway_for(UpstreamBackend("mylab", url, upstream_model="served-model")) as gw:
        fake.mode = "busy"
        r = httpx.post(gw + "/v1/chat/completions", json={"model": "mylab", "messages": msgs})
        assert r.status_code == 429 and r.headers["retry-after"] == "7"
        for mode in ("garbage", "no-done"):
            fake.mode = mode
            r = httpx.post(gw + "/v1/chat/completions", json={"model": "mylab", "messages": msgs})
            assert r.status_code in (502, 503), mode
            stream = openai.OpenAI(base_url=gw + "/v1", api_key="x", max_retries=0).chat.completions.create(
                model="mylab", messages=msgs, stream=True
            )
            with pytest.raises(openai.APIError):
                list(stream)
    with gateway_for(UpstreamBackend("wrong", url)) as gw:  # the server has no model "wrong"
        fake.mode = "ok"
        r = httpx.post(gw + "/v1/chat/completions", json={"model": "wrong", "messages": msgs})
        assert r.status_code == 404 and "no such model" in r.json()["error"]["message"]


def test_unreachable_upstream_is_503_then_skipped() -> None:
    with serving(app_of([])) as dead_url:
        pass  # the port is closed again: nothing listens there now
    backend = UpstreamBackend("gone", dead_url, cooldown=30)
    with gateway_for(backend) as gw:
        body = {"model": "gone", "messages": [{"role": "user", "content": "hi"}]}
        r = httpx.post(gw + "/v1/chat/completions", json=body)
        assert r.status_code == 503 and "retry-after" in r.headers
        assert not backend.healthy and "Connect" in backend.last_error
        r = httpx.post(gw + "/v1/chat/completions", json=body)
        assert r.status_code == 503 and "no healthy backend" in r.json()["error"]["message"]


def test_client_disconnect_reaches_the_upstream(upstream: tuple[str, FakeOpenAI]) -> None:
    url, fake = upstream
    fake.mode = "slow"
    backend = UpstreamBackend("mylab", url, upstream_model="served-model")
    with gateway_for(backend) as gw:
        body = {"model": "mylab", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        with httpx.stream("POST", gw + "/v1/chat/completions", json=body) as r:
            lines = (line for line in r.iter_lines() if line)
            next(lines), next(lines)  # role chunk, first word
        deadline = time.monotonic() + 5
        while (backend.inflight or not fake.cancelled) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert backend.inflight == 0 and fake.cancelled == 1 and fake.finished == 0
