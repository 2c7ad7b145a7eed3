"""A model served by an existing OpenAI-compatible server (vLLM, llama.cpp's llama-server, Ollama).

`eldric-p2p node --upstream NAME=URL` offers the server's model as `NAME` to the federation; the gateway
routes to it like to any pipeline. `generate` posts a streaming request to `URL/v1/chat/completions` (or
`/v1/completions` for a raw prompt) and turns each SSE chunk into a `GenerationEvent`. The SSE parser is
sans-IO and treats the server's bytes as untrusted: line and event sizes are capped, a chunk that is not the
expected JSON is a `RemoteProtocolError`.

Errors: a connection failure is `PeerUnavailable` and marks the backend unhealthy for `cooldown` seconds (the
router then skips it); the server's 429/503 are `Overloaded` with its Retry-After; 404 `ModelNotFound`;
other 4xx `InvalidInput` with the server's message. Cancelling `generate` closes the HTTP stream, which is how
the upstream server learns the client went away.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import trio

from eldric_p2p.api.backends.base import GenerationEvent, GenerationRequest, Overloaded
from eldric_p2p.errors import InvalidInput, ModelNotFound, PeerUnavailable, RemoteProtocolError, UsageError

MAX_LINE = 1 << 20  # bytes in one SSE line
MAX_EVENT = 4 << 20  # bytes in one SSE event (its data lines together)
MAX_ERROR_BODY = 64 * 1024


def parse_upstream_spec(text: str) -> tuple[str, str]:
    """`'NAME=URL'` -> (name, url) for `--upstream`. Raises UsageError."""
    name, sep, url = text.partition("=")
    name, url = name.strip(), url.strip()
    if not sep or not name or not url.startswith(("http://", "https://")):
        raise UsageError(f"--upstream {text!r}: expected NAME=http://HOST:PORT (an OpenAI-compatible server)")
    return name, url


def api_base(url: str) -> str:
    """`http://h:8000`, `http://h:8000/` or `http://h:8000/v1` -> `http://h:8000/v1`."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


class SSEParser:
    """Server-Sent Events, sans-IO: `feed(bytes)` returns the `data` payloads of the events now complete."""

    def __init__(self, *, max_line: int = MAX_LINE, max_event: int = MAX_EVENT) -> None:
        self.max_line = max_line
        self.max_event = max_event
        self._buf = bytearray()
        self._data: list[bytes] = []
        self._size = 0

    def feed(self, chunk: bytes) -> list[str]:
        self._buf += chunk
        out: list[str] = []
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) > self.max_line:
                    raise RemoteProtocolError(f"upstream SSE line over {self.max_line} bytes")
                return out
            line = bytes(self._buf[:nl]).rstrip(b"\r")
            del self._buf[: nl + 1]
            if not line:  # blank line: the event is complete
                if self._data:
                    out.append(self._decode(b"\n".join(self._data)))
                self._data, self._size = [], 0
                continue
            if line.startswith(b":"):  # comment / keep-alive
                continue
            field, _, value = line.partition(b":")
            if field == b"data":
                value = value[1:] if value.startswith(b" ") else value
                self._size += len(value)
                if self._size > self.max_event:
                    raise RemoteProtocolError(f"upstream SSE event over {self.max_event} bytes")
                self._data.append(value)

    def close(self) -> list[str]:
        """Events left when the stream ends (a last event without its blank line)."""
        rest = self.feed(b"\n\n") if self._buf or self._data else []
        return rest

    @staticmethod
    def _decode(data: bytes) -> str:
        try:
            return data.decode()
        except UnicodeDecodeError as exc:
            raise RemoteProtocolError(f"upstream SSE data is not UTF-8: {exc}") from exc


def _chunk_fields(data: str, *, chat: bool) -> tuple[str, str | None, dict[str, int] | None]:
    """(text delta, finish_reason, usage) of a streamed chunk. Raises RemoteProtocolError, PeerUnavailable."""
    try:
        obj = json.loads(data)
    except ValueError as exc:
        raise RemoteProtocolError(f"upstream sent a chunk that is not JSON: {data[:80]!r}") from exc
    if not isinstance(obj, dict):
        raise RemoteProtocolError("upstream sent a chunk that is not an object")
    if "error" in obj:
        err = obj["error"]
        msg = err.get("message") if isinstance(err, dict) else err
        raise PeerUnavailable(f"upstream error mid-stream: {str(msg)[:500]}")
    usage = obj.get("usage")
    if usage is not None and not (
        isinstance(usage, dict)
        and all(isinstance(usage.get(k), int) for k in ("prompt_tokens", "completion_tokens"))
    ):
        usage = None
    choices = obj.get("choices") or []
    if not isinstance(choices, list):
        raise RemoteProtocolError("upstream chunk 'choices' is not a list")
    text, finish = "", None
    for choice in choices[:1]:
        if not isinstance(choice, dict):
            raise RemoteProtocolError("upstream chunk choice is not an object")
        piece = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
        if piece is not None and not isinstance(piece, str):
            raise RemoteProtocolError("upstream chunk content is not a string")
        text = piece or ""
        fr = choice.get("finish_reason")
        finish = str(fr) if fr else None
    if usage is not None:
        usage = {
            "prompt_tokens": usage["prompt_tokens"],
            "completion_tokens": usage["completion_tokens"],
            "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"],
        }
    return text, finish, usage


class UpstreamBackend:
    """The model `name` of the OpenAI-compatible server at `url` (its own id there: `upstream_model`)."""

    def __init__(
        self,
        name: str,
        url: str,
        *,
        upstream_model: str | None = None,
        api_key: str | None = None,
        max_queue: int = 64,
        cooldown: float = 5.0,
        connect_timeout: float = 5.0,
        read_timeout: float = 300.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.model_id = name
        self.name = f"upstream:{name}"
        self.base = api_base(url)
        self.upstream_model = upstream_model or name
        self.api_key = api_key
        self.max_queue = max_queue
        self.cooldown = cooldown
        self.timeout = httpx.Timeout(read_timeout, connect=connect_timeout)
        self.transport = transport
        self.inflight = 0
        self._down_until = 0.0
        self.last_error = ""

    @property
    def healthy(self) -> bool:
        return time.monotonic() >= self._down_until

    @property
    def queue_depth(self) -> int:
        return self.inflight

    def info(self) -> dict[str, Any]:
        return {"kind": "upstream", "id": self.name, "url": self.base, "queue": self.inflight,
                "healthy": self.healthy, "last_error": self.last_error}  # fmt: skip

    def _payload(self, request: GenerationRequest) -> tuple[str, dict[str, Any]]:
        p = request.params
        body: dict[str, Any] = {
            "model": self.upstream_model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": p.max_tokens,
            "temperature": p.temperature,
            "top_p": p.top_p,
        }
        if p.seed is not None:
            body["seed"] = p.seed
        if p.stop:
            body["stop"] = list(p.stop)
        if p.top_k:
            body["top_k"] = p.top_k
        if p.min_p:
            body["min_p"] = p.min_p
        if p.repetition_penalty != 1.0:
            body["repetition_penalty"] = p.repetition_penalty
        if request.raw:
            return "/completions", {**body, "prompt": request.prompt}
        messages = (
            [{"role": "user", "content": request.prompt}]
            if isinstance(request.prompt, str)
            else request.prompt
        )
        return "/chat/completions", {**body, "messages": messages}

    async def generate(
        self, request: GenerationRequest, events: trio.MemorySendChannel[GenerationEvent]
    ) -> None:
        async with events:
            path, body = self._payload(request)
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self.inflight += 1
            try:
                async with httpx.AsyncClient(timeout=self.timeout, transport=self.transport) as client:
                    async with client.stream("POST", self.base + path, json=body, headers=headers) as resp:
                        if resp.status_code != 200:
                            await self._raise_for(resp)
                        await events.send(GenerationEvent())  # accepted: the gateway may commit its answer
                        await self._relay(resp, events, chat=not request.raw)
            except httpx.TransportError as exc:
                self._down_until = time.monotonic() + self.cooldown
                self.last_error = f"{type(exc).__name__}: {exc}"
                raise PeerUnavailable(f"upstream {self.base} failed: {self.last_error}") from exc
            finally:
                self.inflight -= 1

    async def _raise_for(self, resp: httpx.Response) -> None:
        raw = b""
        async for chunk in resp.aiter_bytes():
            raw += chunk
            if len(raw) > MAX_ERROR_BODY:
                break
        try:
            err = json.loads(raw).get("error")
            message = str(err.get("message") if isinstance(err, dict) else err)[:500]
        except (ValueError, AttributeError):
            message = raw[:200].decode(errors="replace")
        status = resp.status_code
        where = f"upstream {self.base} answered {status}: {message}"
        if status in (429, 503):
            retry = resp.headers.get("retry-after", "")
            raise Overloaded(where, retry_after=float(retry) if retry.isdigit() else 2.0)
        if status == 404:
            raise ModelNotFound(where)
        if 400 <= status < 500 and status not in (401, 403):
            raise InvalidInput(where)
        raise PeerUnavailable(where)

    async def _relay(
        self, resp: httpx.Response, events: trio.MemorySendChannel[GenerationEvent], *, chat: bool
    ) -> None:
        parser = SSEParser()
        n_out = 0
        finish: str | None = None
        usage: dict[str, int] | None = None

        async for raw in resp.aiter_bytes():
            for data in parser.feed(raw):
                if data.strip() == "[DONE]":
                    await self._finish(events, finish, usage, n_out)
                    return
                text, fr, u = _chunk_fields(data, chat=chat)
                usage = u or usage
                finish = fr or finish
                if text:
                    n_out += 1  # a chunk is a token for servers that stream one token per chunk
                    await events.send(GenerationEvent(text=text))
        for data in parser.close():
            if data.strip() == "[DONE]":
                await self._finish(events, finish, usage, n_out)
                return
        raise PeerUnavailable(f"upstream {self.base} ended the stream without [DONE]")

    async def _finish(
        self,
        events: trio.MemorySendChannel[GenerationEvent],
        finish: str | None,
        usage: dict[str, int] | None,
        n_out: int,
    ) -> None:
        if usage is None:
            usage = {"prompt_tokens": 0, "completion_tokens": n_out, "total_tokens": n_out}
        await events.send(GenerationEvent(finish_reason=finish or "stop", usage=usage))
