"""Reading and validating OpenAI requests: the body under a size limit, each parameter checked, and the
`ApiError` every refusal becomes.

`read_json_body` reads the body; `parse_chat_request` / `parse_completion_request` turn it into a
`ParsedRequest`; `generation_request` checks it against the model's context and makes the backend's
`GenerationRequest`. Every problem is an `ApiError`, answered in OpenAI's error shape
`{"error": {"message", "type", "param", "code"}}`; `api_error_from` maps our own errors to it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from eldric_p2p.api.backends.base import GenerationRequest, Overloaded
from eldric_p2p.engine.sampling import MAX_STOP_LEN, MAX_STOP_STRINGS, MAX_TOKENS_LIMIT, SamplingParams
from eldric_p2p.errors import (
    DoesNotFit,
    EldricError,
    InvalidInput,
    ModelNotFound,
    PeerUnavailable,
    RemoteProtocolError,
    UsageError,
)

MAX_BODY = 4 * 1024 * 1024  # bytes of request body; more is 413
MAX_DRAIN = 64 * 1024 * 1024  # an oversized body is read and dropped up to here so the client sees the 413
MAX_MESSAGES = 10_000
DEFAULT_MAX_TOKENS = 1024  # when the request names none (capped to the model's context)
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
    if isinstance(exc, DoesNotFit):  # an on-demand load with too little memory free in the swarm now
        return ApiError(
            503, msg, type="server_error", code="insufficient_memory", headers={"Retry-After": "30"}
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
