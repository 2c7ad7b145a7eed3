"""Generation across a pipeline: the head side, and the backends the gateway routes to.

The head owns a session: it tokenizes the prompt, opens the session on every stage (OPEN_SESSION carries the
sampling parameters so the tail samples, and the prompt's last `repeat_last_n` ids when a repetition penalty
needs them), runs the head stage, sends HIDDEN to the next hop and waits for the tail's TOKEN, feeds it back,
and turns ids into text with `TextStream`, exactly as `LocalModel.generate` does in one process.

    PipelineBackend(worker, shard)       head on this node
    RemotePipelineBackend(url, model)    head on another node: NDJSON events from its
                                         POST /api/v1/pipeline/generate

A stage failure ends the request with `StageFailed` naming the stage: the worker turns a broken link or an
ERROR frame into one at once; a stage that stops answering is caught by the per-step timeout.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import httpx
import trio
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from eldric_p2p.api.backends.base import Backend, GenerationEvent, GenerationRequest, Overloaded
from eldric_p2p.engine.sampling import Sampler, SamplingParams
from eldric_p2p.errors import (
    DoesNotFit,
    EldricError,
    EngineError,
    InvalidInput,
    ModelNotFound,
    PeerUnavailable,
    RemoteProtocolError,
    StageFailed,
    UsageError,
)
from eldric_p2p.http_server import error_response
from eldric_p2p.net.frames import DType, Frame, FrameType, hidden_frame, payload_to_tensor
from eldric_p2p.pipeline.worker import Shard, Worker, new_session_id, wire_dtype

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

PREFILL_TIMEOUT_S = 120.0  # first token: the whole prompt through every stage
STEP_TIMEOUT_S = 30.0  # each later token
MAX_QUEUE = 64
MAX_HISTORY_SENT = 8192
MAX_LINE = 1 << 20


class PipelineBackend:
    """Generation with the head stage on this node (the `Backend` protocol)."""

    def __init__(
        self,
        worker: Worker,
        shard: Shard,
        *,
        max_queue: int = MAX_QUEUE,
        prefill_timeout: float = PREFILL_TIMEOUT_S,
        step_timeout: float = STEP_TIMEOUT_S,
        wire: str = "f32",
    ) -> None:
        if shard.a.stage_index != 0:
            raise UsageError(f"{shard.label} is not a head stage")
        self.worker = worker
        self.shard = shard
        self.model_id = shard.a.model_id
        self.max_queue = max_queue
        self.prefill_timeout = prefill_timeout
        self.step_timeout = step_timeout
        self.wire = wire
        self._slots = trio.Semaphore(shard.a.sessions)
        self._waiting = 0
        self._running = 0
        self.last_tokens_per_s = 0.0
        self.completed = 0

    def info(self) -> dict[str, Any]:
        a = self.shard.a
        return {
            "kind": "pipeline",
            "model": self.model_id,
            "deployment_id": a.deployment_id,
            "queue": self.queue_depth,
            "sessions": a.sessions,
            "stages": [s.to_json() for s in a.stages],
            "state": self.shard.state,
            "decode_tokens_per_s": round(self.last_tokens_per_s, 2),
            "completed": self.completed,
        }

    @property
    def queue_depth(self) -> int:
        return self._waiting + self._running

    async def generate(
        self, request: GenerationRequest, events: trio.MemorySendChannel[GenerationEvent]
    ) -> None:
        """Stream the events of one generation into `events`, then close it. Raises InvalidInput, Overloaded,
        StageFailed (a stage failed or stopped answering), PeerUnavailable (the pipeline is gone)."""
        async with events:
            if self.shard.state != "ready":
                raise PeerUnavailable(f"pipeline {self.shard.a.deployment_id} is {self.shard.state}")
            if self._waiting >= self.max_queue:
                raise Overloaded(
                    f"{self._waiting} requests already wait for {self.model_id}", retry_after=2.0
                )
            self._waiting += 1
            try:
                await self._slots.acquire()
            finally:
                self._waiting -= 1
            self._running += 1
            try:
                await self._run(request, events)
            finally:
                self._running -= 1
                self._slots.release()

    async def _run(self, request: GenerationRequest, events: trio.MemorySendChannel[GenerationEvent]) -> None:
        from eldric_p2p.engine.generate import TextStream, prompt_token_ids

        shard, worker = self.shard, self.worker
        stage, tok, index = shard.stage, shard.tokenizer, shard.index
        if stage is None or tok is None or index is None:
            raise PeerUnavailable(f"pipeline {shard.a.deployment_id} was unloaded")
        params = request.params
        ids = prompt_token_ids(tok, index.metadata, request.prompt, raw=request.raw)
        if not ids:
            raise InvalidInput("empty prompt")
        ctx = len(ids) + params.max_tokens
        if ctx > stage.max_ctx:
            raise InvalidInput(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceed the "
                f"{stage.max_ctx}-token context"
            )
        sid = new_session_id()
        tokens = worker.open_head_session(shard, sid)
        stage.open_session(str(sid), ctx)
        single = shard.a.single
        sampler = Sampler(params) if single else None
        stream = TextStream(tok, max_tokens=params.max_tokens, stop=params.stop)
        history = list(ids)
        opened = False
        try:
            if not single:
                keep = min(params.repeat_last_n, MAX_HISTORY_SENT) if params.repetition_penalty != 1.0 else 0
                ext = {
                    "deployment": shard.a.deployment_id,
                    "params": params.to_dict(),
                    "ctx": ctx,
                    "history": ids[-keep:] if keep else [],
                    "wire": self.wire,
                }
                await worker.send_down(shard, Frame(FrameType.OPEN_SESSION, sid, ext=ext))
                opened = True

            async def step(new: list[int], pos: int, timeout: float) -> int:
                return await self._step(sid, tokens, sampler, history, new, pos, timeout)

            t0 = time.perf_counter()
            token = await step(ids, 0, self.prefill_timeout)
            t1 = time.perf_counter()
            steps = 0
            first = True
            while True:
                n_before = len(stream.token_ids)
                text = stream.push(token)
                event = GenerationEvent(text=text, token_ids=stream.token_ids[n_before:])
                if first:
                    event.prompt_token_ids = list(ids)
                    first = False
                if stream.done:
                    t2 = time.perf_counter()
                    self._finish(
                        event,
                        stream.finish_reason or "stop",
                        len(ids),
                        len(stream.token_ids),
                        t1 - t0,
                        t2 - t1,
                        steps,
                    )
                    await events.send(event)
                    break
                if event.text or event.token_ids or event.prompt_token_ids:
                    await events.send(event)
                history.append(token)
                token = await step([token], len(history) - 1, self.step_timeout)
                steps += 1
        finally:
            stage.close_session(str(sid))
            worker.close_head_session(shard, sid)
            if opened:
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    try:
                        await worker.send_down(shard, Frame(FrameType.CLOSE_SESSION, sid))
                    except StageFailed:
                        pass

    def _finish(
        self,
        event: GenerationEvent,
        reason: str,
        n_prompt: int,
        n_out: int,
        prefill_s: float,
        decode_s: float,
        steps: int,
    ) -> None:
        tps = steps / decode_s if decode_s > 0 else 0.0
        event.finish_reason = reason
        event.usage = {
            "prompt_tokens": n_prompt,
            "completion_tokens": n_out,
            "total_tokens": n_prompt + n_out,
        }
        event.timings = {
            "prefill_s": round(prefill_s, 4),
            "decode_s": round(decode_s, 4),
            "decode_steps": steps,
            "decode_tokens_per_s": round(tps, 2),
        }
        self.last_tokens_per_s = tps
        self.completed += 1

    async def _step(
        self,
        sid: int,
        tokens: trio.MemoryReceiveChannel[Frame],
        sampler: Sampler | None,
        history: list[int],
        new: list[int],
        pos: int,
        timeout: float,
    ) -> int:
        """Run `new` ids at positions [pos, pos+len) through the pipeline; return the next token id."""
        import torch

        shard, worker = self.shard, self.worker
        stage = shard.stage
        assert stage is not None
        x = torch.tensor(new, dtype=torch.int64)  # [T]
        wire = {"f32": DType.F32, "f16": DType.F16, "bf16": DType.BF16}[self.wire]

        def run() -> torch.Tensor | int:
            # [T, hidden], or [1, vocab] for a single stage (only the last position is sampled)
            out = stage.forward(str(sid), x, pos, last_only=sampler is not None)
            if sampler is not None:
                return sampler.sample(out[-1], history)
            return out if wire == DType.F32 else out.to(wire_dtype(wire))

        try:
            out = await worker.compute(run)
        except EngineError as exc:
            raise InvalidInput(f"{shard.label}: {exc}") from exc
        if isinstance(out, int):
            return out
        await worker.send_down(shard, hidden_frame(sid, pos, out))
        with trio.move_on_after(timeout) as scope:
            try:
                frame = await tokens.receive()
            except trio.EndOfChannel:
                raise PeerUnavailable(f"pipeline {shard.a.deployment_id} was unloaded") from None
        if scope.cancelled_caught:
            stages = ", ".join(s.label() for s in shard.a.stages[1:])
            raise StageFailed(f"no token from the pipeline within {timeout:.0f} s (stages: {stages})")
        if frame.type == FrameType.ERROR:
            ext = frame.ext or {}
            raise StageFailed(f"{ext.get('stage', 'a stage')}: {ext.get('message', 'failed')}")
        ids = payload_to_tensor(frame)
        if frame.start != pos + len(new) or ids.numel() != 1:
            raise RemoteProtocolError(
                f"tail sent a token for position {frame.start}, expected {pos + len(new)}"
            )
        token = int(ids[0])
        if not 0 <= token < stage.cfg.vocab:
            raise RemoteProtocolError(f"tail sent token id {token} outside the vocabulary")
        return token


# --------------------------------------------------------------------------------------------- remote heads


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
    if code == "overloaded":
        retry = err.get("retry_after", 1.0)
        return Overloaded(message, retry if isinstance(retry, int | float) else 1.0)
    return _ERRORS.get(str(code), PeerUnavailable)(message)


class RemotePipelineBackend:
    """A pipeline whose head runs on another node, reached over HTTP (the `Backend` protocol)."""

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

    def info(self) -> dict[str, Any]:
        return {
            "kind": "remote",
            "model": self.model_id,
            "node": self.node_url,
            "queue": self._running,
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
        timeout = httpx.Timeout(connect=5.0, read=self.step_timeout, write=30.0, pool=5.0)
        self._running += 1
        finished = False
        try:
            async with events, self.client_factory(timeout=timeout) as client:
                url = f"{self.node_url}/api/v1/pipeline/generate"
                async with client.stream("POST", url, json=body) as resp:
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


# --------------------------------------------------------------------------------------------- HTTP endpoint


class NDJSONEvents:
    """An ASGI response that runs `backend.generate` and writes one JSON event per line.

    A failure after the first line is written as a last line `{"error": {...}}`; a client that disconnects
    cancels the generation.
    """

    def __init__(self, backend: Backend, request: GenerationRequest) -> None:
        self.backend = backend
        self.request = request

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

        async with trio.open_nursery() as nursery:

            async def watch_disconnect() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                nursery.cancel_scope.cancel()

            async def produce() -> None:
                try:
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
    return GenerationRequest(model, prompt, params, raw=bool(body.get("raw", False))), bool(
        body.get("local", False)
    )


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
        return NDJSONEvents(candidates[0], req)  # type: ignore[return-value]

    return [Route("/api/v1/pipeline/generate", generate, methods=["POST"])]
