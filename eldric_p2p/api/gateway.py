"""The OpenAI-compatible HTTP API of every node: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.

A request is read with a size limit, validated into a `GenerationRequest` (every problem a 4xx in OpenAI's
error shape `{"error": {"message", "type", "param", "code"}}`), routed by the `Router` to a backend, and
answered from the backend's events: one JSON object, or Server-Sent Events in OpenAI's chunk format ending
with `data: [DONE]`.

One request is one trio nursery (`_Generation`): the backend's `generate`, and a watcher of the client's
connection. The response status is chosen when the backend's first event arrives, so a prompt the backend
refuses (too long for the context) is still a 400, not a broken stream. A client that goes away cancels the
nursery, which cancels the generation and frees its session. Errors after the stream started are sent as a
final `data: {"error": ...}` event (the `openai` client raises them as `APIError`).
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import trio
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from eldric_p2p.api import metrics
from eldric_p2p.api.backends.base import GenerationEvent, GenerationRequest, Overloaded
from eldric_p2p.api.router import Router
from eldric_p2p.engine.sampling import MAX_STOP_LEN, MAX_STOP_STRINGS, MAX_TOKENS_LIMIT, SamplingParams
from eldric_p2p.errors import (
    EldricError,
    InvalidInput,
    ModelNotFound,
    PeerUnavailable,
    RemoteProtocolError,
    UsageError,
)

log = logging.getLogger(__name__)

MAX_BODY = 4 * 1024 * 1024  # bytes of request body; more is 413
MAX_DRAIN = 64 * 1024 * 1024  # an oversized body is read and dropped up to here so the client sees the 413
MAX_MESSAGES = 10_000
DEFAULT_MAX_TOKENS = 1024  # when the request names none (capped to the model's context)
EVENT_BUFFER = 16
IDLE_TIMEOUT = 300.0  # seconds without an event from the backend before the request fails
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(Exception):
    """A request the API refuses: becomes `{"error": {...}}` with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def api_error_from(exc: BaseException) -> ApiError:
    """Map an error from routing or a backend to the API's status, type and code."""
    if isinstance(exc, ApiError):
        return exc
    msg = str(exc) or type(exc).__name__
    if isinstance(exc, ModelNotFound):
        return ApiError(404, msg, param="model", code="model_not_found")
    if isinstance(exc, Overloaded):
        retry = str(max(1, math.ceil(exc.retry_after)))
        return ApiError(429, msg, type="rate_limit_error", code="queue_full", headers={"Retry-After": retry})
    if isinstance(exc, PeerUnavailable):
        return ApiError(
            503, msg, type="server_error", code="backend_unavailable", headers={"Retry-After": "5"}
        )
    if isinstance(exc, InvalidInput):
        code = "context_length_exceeded" if "context" in msg else "invalid_value"
        return ApiError(400, msg, param="messages" if code == "context_length_exceeded" else None, code=code)
    if isinstance(exc, UsageError):
        return ApiError(400, msg, code="invalid_value")
    if isinstance(exc, RemoteProtocolError):
        return ApiError(502, msg, type="server_error", code="bad_gateway")
    if isinstance(exc, EldricError):
        return ApiError(500, msg, type="server_error", code=type(exc).__name__)
    return ApiError(500, "internal error", type="server_error", code="internal_error")


# ---- reading and validating requests ----------------------------------------------------------------------


async def read_json_body(request: Request, limit: int = MAX_BODY) -> Any:
    """The request's JSON body, read chunk by chunk and never held past `limit` bytes.

    Raises ApiError 413 (too large; the rest is read and dropped, up to MAX_DRAIN, so the client sees the
    answer), 400 (not JSON, not UTF-8).
    """
    declared = request.headers.get("content-length")
    too_big = ApiError(413, f"request body is over the {limit}-byte limit", code="request_too_large")
    if declared is not None and declared.isdigit() and int(declared) > MAX_DRAIN:
        raise too_big
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                chunks.clear()
                if size > MAX_DRAIN:
                    raise too_big
                continue
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(
            400, "client disconnected while sending the body", code="client_disconnected"
        ) from None
    if size > limit:
        raise too_big
    raw = b"".join(chunks)
    if not raw.strip():
        raise ApiError(400, "the request body is empty; expected a JSON object", code="invalid_json")
    try:
        return json.loads(raw)
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"the request body is not UTF-8: {exc}", code="invalid_json") from None
    except ValueError as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None


def _type_error(param: str, want: str, value: Any) -> ApiError:
    got = "null" if value is None else type(value).__name__
    return ApiError(400, f"'{param}' must be {want}, got {got}", param=param, code="invalid_type")


def _opt_number(body: Mapping[str, Any], name: str, lo: float, hi: float) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise _type_error(name, "a number", v)
    if not lo <= v <= hi:
        raise ApiError(
            400, f"'{name}' must be between {lo} and {hi}, got {v}", param=name, code="invalid_value"
        )
    return float(v)


def _opt_int(body: Mapping[str, Any], name: str, lo: int, hi: int) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise _type_error(name, "an integer", v)
    if not lo <= v <= hi:
        raise ApiError(
            400, f"'{name}' must be between {lo} and {hi}, got {v}", param=name, code="invalid_value"
        )
    return v


def _opt_bool(body: Mapping[str, Any], name: str) -> bool:
    v = body.get(name)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise _type_error(name, "a boolean", v)
    return v


@dataclass
class ParsedRequest:
    """A validated request: what to generate and how to answer."""

    model: str
    prompt: str | list[dict[str, str]]
    raw: bool
    max_tokens: int | None
    sampling: dict[str, Any]
    stream: bool
    include_usage: bool


def _model_field(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if model is None:
        raise ApiError(400, "'model' is required", param="model", code="missing_required_parameter")
    if not isinstance(model, str) or not model:
        raise _type_error("model", "a non-empty string", model)
    return model


def _common(body: Any, *, chat: bool) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_type")
    model = _model_field(body)
    max_tokens = _opt_int(body, "max_completion_tokens", 1, MAX_TOKENS_LIMIT) if chat else None
    if max_tokens is None:
        max_tokens = _opt_int(body, "max_tokens", 1, MAX_TOKENS_LIMIT)
    temperature = _opt_number(body, "temperature", 0.0, 2.0)
    top_p = _opt_number(body, "top_p", 0.0, 1.0)
    seed = _opt_int(body, "seed", -(1 << 63), (1 << 63) - 1)
    n = _opt_int(body, "n", 1, 128)
    if n not in (None, 1):
        raise ApiError(400, "only n=1 is supported", param="n", code="unsupported_value")
    for name in ("presence_penalty", "frequency_penalty"):  # accepted for compatibility, not applied
        _opt_number(body, name, -2.0, 2.0)
    top_k = _opt_int(body, "top_k", 0, 1 << 24)  # llama-server / vLLM extensions
    min_p = _opt_number(body, "min_p", 0.0, 0.999)
    repetition_penalty = _opt_number(body, "repetition_penalty", 0.01, 100.0)
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise _type_error("stop", "a string or a list of strings", stop)
    if len(stops) > MAX_STOP_STRINGS or any(not 0 < len(s) <= MAX_STOP_LEN for s in stops):
        raise ApiError(
            400,
            f"'stop' takes at most {MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_LEN} characters",
            param="stop",
            code="invalid_value",
        )
    stream = _opt_bool(body, "stream")
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not isinstance(opts, dict):
            raise _type_error("stream_options", "an object", opts)
        include_usage = _opt_bool(opts, "include_usage")
    if body.get("logprobs") not in (None, False, 0):
        raise ApiError(400, "logprobs are not supported", param="logprobs", code="unsupported_parameter")
    sampling: dict[str, Any] = {
        "temperature": 1.0 if temperature is None else temperature,
        "top_p": 1.0 if top_p is None or top_p == 0.0 else top_p,
        "top_k": top_k or 0,
        "min_p": min_p or 0.0,
        "repetition_penalty": repetition_penalty or 1.0,
        "stop": tuple(stops),
    }
    if top_p == 0.0:  # only the most likely token has mass: greedy
        sampling["temperature"] = 0.0
    if seed is not None:
        sampling["seed"] = seed % (1 << 63)
    return {"model": model, "max_tokens": max_tokens, "sampling": sampling, "stream": stream,
            "include_usage": include_usage}  # fmt: skip


def _message_content(m: Mapping[str, Any], i: int) -> str:
    content = m.get("content")
    param = f"messages[{i}].content"
    if content is None:
        if m.get("role") == "assistant":
            return ""
        raise ApiError(400, f"'{param}' is required", param=param, code="missing_required_parameter")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise ApiError(400, f"'{param}[{j}]' must be a text part: only text content is supported",
                               param=f"{param}[{j}]", code="unsupported_value")  # fmt: skip
            parts.append(part["text"])
        return "".join(parts)
    raise _type_error(param, "a string or a list of text parts", content)


def parse_chat_request(body: Any) -> ParsedRequest:
    """Validate a `/v1/chat/completions` body. Raises ApiError (400) naming the first bad parameter."""
    common = _common(body, chat=True)
    messages = body.get("messages")
    if messages is None:
        raise ApiError(400, "'messages' is required", param="messages", code="missing_required_parameter")
    if not isinstance(messages, list):
        raise _type_error("messages", "a list of messages", messages)
    if not messages:
        raise ApiError(
            400, "'messages' must contain at least one message", param="messages", code="empty_array"
        )
    if len(messages) > MAX_MESSAGES:
        raise ApiError(400, f"'messages' holds more than {MAX_MESSAGES} messages", param="messages",
                       code="invalid_value")  # fmt: skip
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _type_error(f"messages[{i}]", "an object", m)
        role = m.get("role")
        if not isinstance(role, str):
            raise _type_error(f"messages[{i}].role", "a string", role)
        if role not in ROLES:
            param = f"messages[{i}].role"
            msg = f"'{param}' {role!r} is not supported: use system, user or assistant"
            raise ApiError(400, msg, param=param, code="invalid_value")
        out.append({"role": ROLES[role], "content": _message_content(m, i)})
    return ParsedRequest(prompt=out, raw=False, **common)


def parse_completion_request(body: Any) -> ParsedRequest:
    """Validate a `/v1/completions` body (a text prompt, no chat template). Raises ApiError (400)."""
    common = _common(body, chat=False)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if prompt is None:
        raise ApiError(400, "'prompt' is required", param="prompt", code="missing_required_parameter")
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be a string (token-id and batched prompts are not supported)",
                       param="prompt", code="invalid_type")  # fmt: skip
    if not prompt:
        raise ApiError(400, "'prompt' must not be empty", param="prompt", code="invalid_value")
    for name in ("echo", "suffix", "best_of"):
        if body.get(name) not in (None, False, 1, ""):
            raise ApiError(400, f"'{name}' is not supported", param=name, code="unsupported_parameter")
    return ParsedRequest(prompt=prompt, raw=True, **common)


def generation_request(parsed: ParsedRequest, context_length: int | None) -> GenerationRequest:
    """The backend request, with max_tokens checked against the model's context. Raises ApiError (400)."""
    max_tokens = parsed.max_tokens
    if max_tokens is None:
        max_tokens = (
            DEFAULT_MAX_TOKENS if context_length is None else min(DEFAULT_MAX_TOKENS, context_length // 2)
        )
    elif context_length is not None and max_tokens >= context_length:
        raise ApiError(
            400,
            f"max_tokens={max_tokens} does not fit the model's {context_length}-token context",
            param="max_tokens",
            code="context_length_exceeded",
        )
    try:
        params = SamplingParams(max_tokens=max(1, max_tokens), **parsed.sampling)
    except InvalidInput as exc:
        raise ApiError(400, str(exc), code="invalid_value") from None
    return GenerationRequest(model=parsed.model, prompt=parsed.prompt, params=params, raw=parsed.raw)


# ---- answering ---------------------------------------------------------------------------------------------


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class _Generation:
    """ASGI response for one generation: runs the backend, answers JSON or SSE. See the module docstring."""

    def __init__(self, router: Router, parsed: ParsedRequest, endpoint: str) -> None:
        self.router = router
        self.parsed = parsed
        self.endpoint = endpoint  # "chat" | "completions"
        self.chat = endpoint == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.status = 0  # what was sent, for metrics; 499 = client went away before the end
        self.started = False  # headers sent
        self.finished = False  # last body byte sent
        self._scope: trio.CancelScope | None = None
        self._error: BaseException | None = None
        self.backend_name = ""
        self._t0 = time.perf_counter()
        self._first_token = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        model = self.parsed.model
        active = metrics.ACTIVE.value(model=model) + 1
        metrics.ACTIVE.set(active, model=model)
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                nursery.start_soon(self._watch_disconnect, receive)
                await self._serve(send)
                nursery.cancel_scope.cancel()
        finally:
            metrics.ACTIVE.set(metrics.ACTIVE.value(model=model) - 1, model=model)
            status = self.status if self.finished else 499
            metrics.REQUESTS.inc(endpoint=self.endpoint, model=model, status=str(status))

    async def _watch_disconnect(self, receive: Receive) -> None:
        """Cancel the request (and so the generation) when the client goes away."""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not self.finished:
                    assert self._scope is not None
                    self._scope.cancel()
                return

    async def _serve(self, send: Send) -> None:
        parsed = self.parsed
        error: ApiError | EldricError | None = None
        try:
            request = generation_request(parsed, self.router.context_length(parsed.model))
            async with self.router.acquire(parsed.model) as backend:
                self.backend_name = getattr(backend, "name", "") or ""
                events_in, events_out = trio.open_memory_channel[GenerationEvent](EVENT_BUFFER)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._run_backend, backend, request, events_in)
                    try:
                        if parsed.stream:
                            await self._stream(events_out, send)
                        else:
                            await self._collect(events_out, send)
                    except (ApiError, EldricError) as exc:
                        error = exc
                        nursery.cancel_scope.cancel()
        except (ApiError, EldricError) as exc:
            error = exc
        if error is None:
            return
        if isinstance(error, Overloaded | PeerUnavailable) and not self.started:
            reason = "queue_full" if isinstance(error, Overloaded) else "unavailable"
            metrics.REJECTED.inc(model=parsed.model, reason=reason)
        await self._send_error(send, api_error_from(error))

    async def _run_backend(
        self, backend: Any, request: GenerationRequest, events: trio.MemorySendChannel[GenerationEvent]
    ) -> None:
        """Run `generate`; keep its error for the responder, which sees the channel end only after that."""
        async with events:
            mine = (
                events.clone()
            )  # the responder gets EndOfChannel when both are closed, i.e. after `_error` is set
            try:
                await backend.generate(request, mine)
            except (ApiError, EldricError) as exc:
                self._error = exc
            except Exception:  # noqa: BLE001 - a backend bug is a 500 for this request, not a dead node
                log.exception("backend %s failed", getattr(backend, "name", backend))
                self._error = ApiError(500, "internal error in the backend", type="server_error",
                                       code="internal_error")  # fmt: skip
            finally:
                mine.close()

    async def _next(self, events: trio.MemoryReceiveChannel[GenerationEvent]) -> GenerationEvent | None:
        """The next event; None when the backend is done (its error, if any, raised here)."""
        with trio.move_on_after(IDLE_TIMEOUT) as scope:
            try:
                return await events.receive()
            except trio.EndOfChannel:
                if self._error is not None:
                    raise self._error from None
                return None
        if scope.cancelled_caught:
            raise PeerUnavailable(f"the backend sent nothing for {IDLE_TIMEOUT:.0f} s")
        return None

    async def _send_error(self, send: Send, err: ApiError) -> None:
        if self.started:  # mid-stream: an error event, then end the body
            self.status = self.status or 200
            await self._send_body(send, _sse(err.body()), more=False)
            return
        self.status = err.status
        body = json.dumps(err.body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
        await self._send_start(send, err.status, headers)
        await self._send_body(send, body, more=False)

    async def _send_start(self, send: Send, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.started = True
        self.status = status
        await send({"type": "http.response.start", "status": status, "headers": headers})

    async def _send_body(self, send: Send, body: bytes, *, more: bool) -> None:
        if not more:  # before the await: the server reports the disconnect of a finished response at once
            self.finished = True
        try:
            await send({"type": "http.response.body", "body": body, "more_body": more})
        except OSError:  # the client is gone (ASGI 2.4): stop generating, as on http.disconnect
            assert self._scope is not None
            self._scope.cancel()
            await trio.lowlevel.checkpoint()

    def _account(self, event: GenerationEvent) -> None:
        """Tokens, tokens/s and time to first token, for every kind of backend alike."""
        model = self.parsed.model
        n = len(event.token_ids) or (1 if event.text else 0)  # an upstream's chunk carries text, no ids
        if n:
            if not self._first_token:
                self._first_token = True
                metrics.TTFT.observe(time.perf_counter() - self._t0, model=model)
            metrics.TOKENS.inc(n, model=model, kind="completion")
            metrics.TOKENS_PER_S.add(n, model=model)
        if event.usage and event.usage.get("prompt_tokens"):
            metrics.TOKENS.inc(event.usage["prompt_tokens"], model=model, kind="prompt")

    def _usage(
        self, prompt_ids: list[int] | None, n_out: int, final: GenerationEvent | None
    ) -> dict[str, int]:
        if final is not None and final.usage:
            return dict(final.usage)
        n_in = len(prompt_ids or [])
        return {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}

    async def _collect(self, events: trio.MemoryReceiveChannel[GenerationEvent], send: Send) -> None:
        parts: list[str] = []
        prompt_ids: list[int] | None = None
        n_out = 0
        final: GenerationEvent | None = None
        while (event := await self._next(events)) is not None:
            self._account(event)
            if event.prompt_token_ids is not None:
                prompt_ids = event.prompt_token_ids
            parts.append(event.text)
            n_out += len(event.token_ids)
            if event.finish_reason is not None:
                final = event
        if final is None:
            raise PeerUnavailable("the backend ended without finishing the generation")
        text = "".join(parts)
        choice: dict[str, Any]
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": final.finish_reason}  # fmt: skip
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": final.finish_reason}
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.parsed.model,
            "choices": [choice],
            "usage": self._usage(prompt_ids, n_out, final),
        }
        if final.timings:
            body["timings"] = final.timings
        data = json.dumps(body, ensure_ascii=False).encode()
        await self._send_start(send, 200, [(b"content-type", b"application/json"),
                                           (b"content-length", str(len(data)).encode())])  # fmt: skip
        await self._send_body(send, data, more=False)

    def _chunk(self, delta: str | None, finish_reason: str | None, *, role: bool = False) -> dict[str, Any]:
        choice: dict[str, Any]
        if self.chat:
            d: dict[str, Any] = {}
            if role:
                d["role"] = "assistant"
            if delta is not None:
                d["content"] = delta
            choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish_reason}
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.parsed.model,
            "choices": [choice],
        }
        if self.parsed.include_usage:
            chunk["usage"] = None
        return chunk

    async def _stream(self, events: trio.MemoryReceiveChannel[GenerationEvent], send: Send) -> None:
        first = await self._next(events)  # errors before this one are still a plain 4xx/5xx
        if first is None:
            raise PeerUnavailable("the backend ended without finishing the generation")
        await self._send_start(send, 200, SSE_HEADERS)
        try:
            await self._stream_events(first, events, send)
        except (EldricError, ApiError) as exc:
            await self._send_error(send, api_error_from(exc))

    async def _stream_events(
        self, event: GenerationEvent | None, events: trio.MemoryReceiveChannel[GenerationEvent], send: Send
    ) -> None:
        prompt_ids: list[int] | None = None
        n_out = 0
        final: GenerationEvent | None = None
        if self.chat:
            await self._send_body(send, _sse(self._chunk("", None, role=True)), more=True)
        while event is not None:
            self._account(event)
            if event.prompt_token_ids is not None:
                prompt_ids = event.prompt_token_ids
            n_out += len(event.token_ids)
            if event.text:
                await self._send_body(send, _sse(self._chunk(event.text, None)), more=True)
            if event.finish_reason is not None:
                final = event
                break
            event = await self._next(events)
        if final is None:
            raise PeerUnavailable("the backend ended without finishing the generation")
        tail = [_sse(self._chunk(None if self.chat else "", final.finish_reason))]
        if self.parsed.include_usage:
            usage_chunk = self._chunk(None, None)
            usage_chunk["choices"] = []
            usage_chunk["usage"] = self._usage(prompt_ids, n_out, final)
            tail.append(_sse(usage_chunk))
        tail.append(b"data: [DONE]\n\n")
        await self._send_body(send, b"".join(tail), more=False)


# ---- routes ------------------------------------------------------------------------------------------------


def _check_key(request: Request, api_keys: tuple[bytes, ...]) -> None:
    if not api_keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "missing API key: send 'Authorization: Bearer KEY'", type="authentication_error",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
    given = token.strip().encode()
    # Compare against every key, always, so the time taken does not say which prefix matched.
    ok = False
    for key in api_keys:
        ok |= hmac.compare_digest(given, key)
    if not ok:
        raise ApiError(401, "invalid API key", type="authentication_error", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})  # fmt: skip


def model_list(router: Router) -> list[dict[str, Any]]:
    """`/v1/models` entries: every model some backend in reach serves."""
    return [
        {"id": m["id"], "object": "model", "created": 0, "owned_by": "eldric-p2p", "backends": m["backends"]}
        for m in router.models()
    ]


def gateway_routes(router: Router, *, api_keys: Iterable[str] = (), max_body: int = MAX_BODY) -> list[Route]:
    """The `/v1` routes, answered by `router`'s backends. With `api_keys`, every route needs one of them."""
    keys = tuple(k.encode() for k in api_keys if k)

    def endpoint(kind: str):  # type: ignore[no-untyped-def]
        parse = parse_chat_request if kind == "chat" else parse_completion_request

        async def handler(request: Request) -> Response:
            try:
                _check_key(request, keys)
                parsed = parse(await read_json_body(request, max_body))
                await router.ensure(parsed.model)
                router.pick(parsed.model)  # unknown model -> 404 before anything streams
            except (ApiError, ModelNotFound) as exc:
                err = api_error_from(exc)
                metrics.REQUESTS.inc(endpoint=kind, model="", status=str(err.status))
                return err.response()
            except (Overloaded, PeerUnavailable):
                pass  # the generation reports these, with Retry-After, once it tries to acquire
            return _Generation(router, parsed, kind)  # type: ignore[return-value]

        return handler

    async def models(request: Request) -> Response:
        try:
            _check_key(request, keys)
        except ApiError as err:
            return err.response()
        return JSONResponse({"object": "list", "data": model_list(router)})

    async def one_model(request: Request) -> Response:
        try:
            _check_key(request, keys)
        except ApiError as err:
            return err.response()
        wanted = request.path_params["model"]
        for m in model_list(router):
            if m["id"] == wanted:
                return JSONResponse(m)
        available = ", ".join(router.model_ids()) or "none"
        return ApiError(404, f"the model {wanted!r} does not exist; available: {available}", param="model",
                        code="model_not_found").response()  # fmt: skip

    metrics.QUEUE_DEPTH.set_function(router.queue_depths, key="router")
    return [
        Route("/v1/chat/completions", endpoint("chat"), methods=["POST"]),
        Route("/v1/completions", endpoint("completions"), methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", one_model, methods=["GET"]),
    ]
