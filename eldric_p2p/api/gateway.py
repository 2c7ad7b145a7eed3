"""The OpenAI-compatible HTTP API of every node: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.

A request is read and validated by `eldric_p2p.api.requests` into a `GenerationRequest` (every problem a 4xx
in OpenAI's error shape), routed by the `Router` to a backend, and answered here from the backend's events:
one JSON object, or Server-Sent Events in OpenAI's chunk format ending with `data: [DONE]`.

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
import secrets
import time
from collections.abc import Iterable
from typing import Any

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from eldric_p2p.api import metrics
from eldric_p2p.api.backends.base import GenerationEvent, GenerationRequest, Overloaded
from eldric_p2p.api.recovery import Resumer
from eldric_p2p.api.requests import (
    MAX_BODY,
    ApiError,
    ParsedRequest,
    api_error_from,
    generation_request,
    parse_chat_request,
    parse_completion_request,
    read_json_body,
)
from eldric_p2p.api.router import Router
from eldric_p2p.errors import DoesNotFit, EldricError, ModelNotFound, PeerUnavailable
from eldric_p2p.tasks import open_nursery

log = logging.getLogger(__name__)

EVENT_BUFFER = 16
IDLE_TIMEOUT = 300.0  # seconds without an event from the backend before the request fails


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
            async with open_nursery() as nursery:
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
                async with open_nursery() as nursery:
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
                model = request.model
                load = self.router.on_missing
                resumer = Resumer(lambda: self.router.backends(model), self.router.refresh,
                                  load=(lambda: load(model)) if load is not None else None)  # fmt: skip
                await resumer.generate(backend, request, mine)
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

    def _envelope(self, choice: dict[str, Any], *, chunk: bool) -> dict[str, Any]:
        """The fields every answer shares: a whole completion, or (`chunk`) one SSE chunk of it."""
        if self.chat:
            obj = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            obj = "text_completion"  # OpenAI names a completion and its chunks alike
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.parsed.model,
            "choices": [choice],
        }

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
        body = self._envelope(choice, chunk=False)
        body["usage"] = self._usage(prompt_ids, n_out, final)
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
        chunk = self._envelope(choice, chunk=True)
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
        last = self._chunk(None if self.chat else "", final.finish_reason)
        if final.timings:  # as llama.cpp's server does: prefill/decode time, and any recovery pause
            last["timings"] = final.timings
        tail = [_sse(last)]
        if self.parsed.include_usage:
            usage_chunk = self._chunk(None, None)
            usage_chunk["choices"] = []
            usage_chunk["usage"] = self._usage(prompt_ids, n_out, final)
            tail.append(_sse(usage_chunk))
        tail.append(b"data: [DONE]\n\n")
        await self._send_body(send, b"".join(tail), more=False)


# ---- routes ------------------------------------------------------------------------------------------------


def _check_key(request: Request, api_keys: tuple[bytes, ...]) -> None:
    if not api_keys or "eldric.member" in request.scope:  # a member's signed request, checked by the gate
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
                try:
                    await router.ensure(parsed.model)  # with --on-demand: loads the model
                except PeerUnavailable as exc:
                    if not router.backends(parsed.model):
                        message = f"loading {parsed.model!r} failed: {exc}"
                        raise ApiError(503, message, type="server_error", code="backend_unavailable",
                                       headers={"Retry-After": "5"}) from exc  # fmt: skip
                router.pick(parsed.model)  # unknown model -> 404 before anything streams
            except (ApiError, ModelNotFound, DoesNotFit) as exc:
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
