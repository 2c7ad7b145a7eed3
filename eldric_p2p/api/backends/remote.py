"""The pipeline-generation wire, `POST /api/v1/pipeline/generate`, both ends.

The serving end (`pipeline_routes`) runs a generation on a local head (or, unless the body says `"local"`,
a peer's) and streams its `GenerationEvent`s as NDJSON (`NDJSONEvents`); `error_of` turns a failure into a
status and `{"error": {...}}` body. The calling end (`RemotePipelineBackend`) is the `Backend` for a pipeline
whose head runs on another node; `exception_of` turns a reported error back into our own exception class.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import trio
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from eldric_p2p.api.backends.base import Backend, GenerationEvent, GenerationRequest, Overloaded
from eldric_p2p.api.backends.pipeline import PREFILL_TIMEOUT_S
from eldric_p2p.engine.sampling import SamplingParams
from eldric_p2p.errors import (
    AuthenticationError,
    DoesNotFit,
    EldricError,
    InvalidInput,
    ModelNotFound,
    PeerUnavailable,
    RemoteProtocolError,
    StageFailed,
    UsageError,
)
from eldric_p2p.http_server import error_response
from eldric_p2p.tasks import open_nursery

MAX_LINE = 1 << 20  # bytes in one NDJSON event line, and in a request body


# ------------------------------------------------------------------ errors on the wire, and the calling end


_ERRORS: dict[str, type[EldricError]] = {
    "stage_failed": StageFailed,
    "invalid_input": InvalidInput,
    "model_not_found": ModelNotFound,
    "does_not_fit": DoesNotFit,
    "peer_unavailable": PeerUnavailable,
}


def error_of(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """HTTP status and `{"error": {...}}` body for an exception raised by a backend."""
    if isinstance(exc, Overloaded):
        return 429, _err(str(exc), "overloaded", "overloaded", retry_after=exc.retry_after)
    if isinstance(exc, StageFailed):
        return 502, _err(str(exc), "stage_failed", "stage_failed")
    if isinstance(exc, ModelNotFound):
        return 404, _err(str(exc), "not_found_error", "model_not_found")
    if isinstance(exc, InvalidInput | UsageError):
        return 400, _err(str(exc), "invalid_request_error", "invalid_input")
    if isinstance(exc, EldricError):
        return 502, _err(str(exc), "peer_error", "peer_unavailable")
    return 500, _err(f"{type(exc).__name__}: {exc}", "server_error", "internal")


def _err(message: str, type_: str, code: str, **more: Any) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "code": code, **more}}


def exception_of(body: Any) -> EldricError:
    """The error a remote node reported, as our own exception class."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return PeerUnavailable(f"remote node failed: {str(body)[:300]}")
    message, code = str(err.get("message", ""))[:2000], err.get("code")
    if err.get("type") in ("authentication_error", "permission_error"):
        return AuthenticationError(message)  # a federation's gate: missing, bad or insufficient credential
    if code == "overloaded":
        retry = err.get("retry_after", 1.0)
        return Overloaded(message, retry if isinstance(retry, int | float) else 1.0)
    return _ERRORS.get(str(code), PeerUnavailable)(message)


class RemotePipelineBackend:
    """A pipeline whose head runs on another node, reached over HTTP (the `Backend` protocol)."""

    supports_resume = True

    def __init__(
        self,
        node_url: str,
        model_id: str,
        *,
        info: dict[str, Any] | None = None,
        step_timeout: float = PREFILL_TIMEOUT_S,
        client_factory: Callable[..., httpx.AsyncClient] = httpx.AsyncClient,
    ) -> None:
        self.node_url = node_url.rstrip("/")
        self.client_factory = client_factory  # a Connector's client reaches a head behind NAT by peer URL
        self.model_id = model_id
        self._info = info or {}
        self.step_timeout = step_timeout
        self._running = 0
        # learnt from the head's final events (the router's route choice): None until a generation ends
        self.hops: int | None = None
        self.sessions: int | None = None
        self.token_s: float | None = None

    def _learn(self, timings: dict[str, Any]) -> None:
        stages, sessions = timings.get("stages"), timings.get("sessions")
        tps = timings.get("decode_tokens_per_s")
        if isinstance(stages, int) and 0 < stages <= 64:
            self.hops = stages
        if isinstance(sessions, int) and 0 < sessions <= 4096:
            self.sessions = sessions
        if isinstance(tps, int | float) and 0 < tps < 1e6:
            self.token_s = 1.0 / tps

    def info(self) -> dict[str, Any]:
        return {
            "kind": "remote",
            "model": self.model_id,
            "node": self.node_url,
            "queue": self._running,
            "stages": self.hops,
            **self._info,
        }

    @property
    def queue_depth(self) -> int:
        return self._running

    async def generate(
        self, request: GenerationRequest, events: trio.MemorySendChannel[GenerationEvent]
    ) -> None:
        """Stream the remote head's events. Raises what the remote raised (by error code), PeerUnavailable."""
        body = {
            "model": self.model_id,
            "prompt": request.prompt,
            "raw": request.raw,
            "params": request.params.to_dict(),
            "local": True,
        }
        if request.resume:
            body["resume"] = list(request.resume)
        timeout = httpx.Timeout(connect=5.0, read=self.step_timeout, write=30.0, pool=5.0)
        self._running += 1
        finished = False
        try:
            async with events, self.client_factory(timeout=timeout) as client:
                url = f"{self.node_url}/api/v1/pipeline/generate"
                async with client.stream("POST", url, json=body) as resp:
                    if resp.status_code == 404:  # it headed this pipeline when the peer table was read
                        raise PeerUnavailable(f"{self.node_url} heads no pipeline of {self.model_id} now")
                    if resp.status_code != 200:
                        raw = await resp.aread()
                        try:
                            raise exception_of(json.loads(raw[:MAX_LINE]))
                        except ValueError:
                            raise PeerUnavailable(f"{url} answered {resp.status_code}") from None
                    async for line in _lines(resp):
                        obj = json.loads(line)
                        if not isinstance(obj, dict):
                            raise RemoteProtocolError(f"{url} sent a non-object event")
                        if "error" in obj:
                            raise exception_of(obj)
                        event = GenerationEvent.from_json(obj)
                        await events.send(event)
                        if event.finish_reason is not None:
                            finished = True
                            self._learn(event.timings or {})
                            break
            if not finished:
                raise PeerUnavailable(f"{self.node_url} ended the stream before the generation finished")
        except httpx.HTTPError as exc:
            raise PeerUnavailable(f"{self.node_url}: {exc or type(exc).__name__}") from exc
        except ValueError as exc:
            raise RemoteProtocolError(f"{self.node_url} sent a malformed event: {exc}") from exc
        finally:
            self._running -= 1


async def _lines(resp: httpx.Response) -> Any:
    """Lines of an NDJSON body, each at most MAX_LINE bytes."""
    buf = bytearray()
    async for chunk in resp.aiter_bytes():
        buf += chunk
        while (nl := buf.find(b"\n")) >= 0:
            line = bytes(buf[:nl])
            del buf[: nl + 1]
            if line.strip():
                yield line
        if len(buf) > MAX_LINE:
            raise RemoteProtocolError(f"event line over {MAX_LINE} bytes")
    if buf.strip():
        yield bytes(buf)


# ------------------------------------------------------------------------------------------ the serving end


class NDJSONEvents:
    """An ASGI response that runs `backend.generate` and writes one JSON event per line.

    A failure after the first line is written as a last line `{"error": {...}}`; a client that disconnects
    cancels the generation.
    """

    def __init__(self, backend: Backend, request: GenerationRequest, resumer: Any = None) -> None:
        self.backend = backend
        self.request = request
        self.resumer = resumer  # an api.recovery.Resumer: a failed pipeline's request goes on on another

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        send_chan, recv_chan = trio.open_memory_channel[GenerationEvent](16)
        failure: list[BaseException] = []
        done = trio.Event()

        async def body(data: bytes, more: bool = True) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": more})

        async def start(status: int, ctype: bytes) -> None:
            await send(
                {"type": "http.response.start", "status": status, "headers": [(b"content-type", ctype)]}
            )

        async with open_nursery() as nursery:

            async def watch_disconnect() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                nursery.cancel_scope.cancel()

            async def produce() -> None:
                try:
                    if self.resumer is not None:
                        await self.resumer.generate(self.backend, self.request, send_chan)
                    else:
                        await self.backend.generate(self.request, send_chan)
                except (EldricError, trio.BrokenResourceError) as exc:
                    failure.append(exc)
                finally:
                    done.set()

            nursery.start_soon(watch_disconnect)
            nursery.start_soon(produce)
            started = False
            async for event in recv_chan:
                if not started:
                    await start(200, b"application/x-ndjson")
                    started = True
                await body(json.dumps(event.as_json()).encode() + b"\n")
            await done.wait()
            if failure:
                status, err = error_of(failure[0])
                if not started:
                    await start(status, b"application/json")
                    await body(json.dumps(err).encode(), more=False)
                else:
                    await body(json.dumps(err).encode() + b"\n", more=False)
            else:
                if not started:
                    await start(200, b"application/x-ndjson")
                await body(b"", more=False)
            nursery.cancel_scope.cancel()


def generation_request_of(body: Any) -> tuple[GenerationRequest, bool]:
    """(request, local_only) from a JSON body. Raises UsageError / InvalidInput."""
    if not isinstance(body, dict):
        raise UsageError("body must be a JSON object")
    model, prompt = body.get("model"), body.get("prompt")
    if not isinstance(model, str) or not model:
        raise UsageError("model is required")
    if not isinstance(prompt, str | list):
        raise UsageError("prompt must be a string or a list of messages")
    params = SamplingParams.from_dict(body.get("params") or {})
    resume = body.get("resume") or []
    if not (
        isinstance(resume, list)
        and len(resume) < params.max_tokens
        and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**31 for t in resume)
    ):
        raise UsageError("resume must be a list of token ids, fewer than max_tokens")
    request = GenerationRequest(model, prompt, params, raw=bool(body.get("raw", False)), resume=resume)
    return request, bool(body.get("local", False))


def pipeline_routes(
    backends: Callable[[], list[Backend]], refresh: Callable[[], Awaitable[None]] | None = None
) -> list[Route]:
    """`POST /api/v1/pipeline/generate`: a generation on a pipeline of `model`, as NDJSON GenerationEvents.

    Local heads first; with `"local": false` (the default) a pipeline whose head is on a peer is used too
    (when none is known, the peers are polled once before answering 404).
    """

    def pick(model: str, local_only: bool) -> list[Backend]:
        found = [b for b in backends() if b.model_id == model]
        return [b for b in found if b.info().get("kind") == "pipeline"] if local_only else found

    async def generate(request: Request) -> Response:
        raw = await request.body()
        try:
            if len(raw) > MAX_LINE:
                raise UsageError(f"body over {MAX_LINE} bytes")
            try:
                body = json.loads(raw)
            except ValueError as exc:
                raise UsageError(f"body is not JSON: {exc}") from exc
            req, local_only = generation_request_of(body)
        except EldricError as exc:
            status, err = error_of(exc)
            return Response(json.dumps(err), status_code=status, media_type="application/json")
        candidates = pick(req.model, local_only)
        if not candidates and not local_only and refresh is not None:
            await refresh()
            candidates = pick(req.model, local_only)
        if not candidates:
            return error_response(
                404, f"no pipeline serves {req.model!r} here", "not_found_error", "model_not_found"
            )
        candidates.sort(key=lambda b: (b.info().get("kind") != "pipeline", b.queue_depth))
        resumer = None
        if not local_only:  # the node the client asked owns the recovery; a head asked by a peer does not
            from eldric_p2p.api.recovery import Resumer

            resumer = Resumer(lambda: pick(req.model, False), refresh)
        return NDJSONEvents(candidates[0], req, resumer)  # type: ignore[return-value]

    return [Route("/api/v1/pipeline/generate", generate, methods=["POST"])]
