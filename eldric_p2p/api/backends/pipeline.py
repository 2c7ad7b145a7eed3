"""Generation across a pipeline, driven from its head: `PipelineBackend(worker, shard)`, the `Backend` for a
pipeline whose head stage is on this node. (A head on another node is reached by
`eldric_p2p.api.backends.remote.RemotePipelineBackend`.)

The head owns a session: it tokenizes the prompt, opens the session on every stage (OPEN_SESSION carries the
sampling parameters so the tail samples, and the prompt's last `repeat_last_n` ids when a repetition penalty
needs them), runs the head stage, sends HIDDEN to the next hop and waits for the tail's TOKEN, feeds it back,
and turns ids into text with `TextStream`, exactly as `LocalModel.generate` does in one process.

A stage failure ends the request with `StageFailed` naming the stage: the worker turns a broken link or an
ERROR frame into one at once; a stage that stops answering is caught by the per-step timeout.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from eldric_p2p.api.backends.base import GenerationEvent, GenerationRequest, Overloaded
from eldric_p2p.engine.sampling import Sampler
from eldric_p2p.errors import (
    EngineError,
    InvalidInput,
    PeerUnavailable,
    RemoteProtocolError,
    StageFailed,
    UsageError,
)
from eldric_p2p.net.frames import DType, Frame, FrameType, hidden_frame, payload_to_tensor
from eldric_p2p.pipeline.shard import Shard, new_session_id, wire_dtype
from eldric_p2p.pipeline.worker import Worker

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

PREFILL_TIMEOUT_S = 120.0  # first token: the whole prompt through every stage
STEP_TIMEOUT_S = 30.0  # each later token
MAX_QUEUE = 64
MAX_HISTORY_SENT = 8192


class PipelineBackend:
    """Generation with the head stage on this node (the `Backend` protocol)."""

    supports_resume = True

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
            "running": self._running,
            "max_queue": self.max_queue,
            "stages": [s.to_json() for s in a.stages],
            "state": self.shard.state,
            "decode_tokens_per_s": round(self.last_tokens_per_s, 2),
            "completed": self.completed,
        }

    @property
    def queue_depth(self) -> int:
        return self._waiting + self._running

    @property
    def hops(self) -> int:
        """Stages a token crosses (the router prefers fewer)."""
        return len(self.shard.a.stages)

    @property
    def sessions(self) -> int:
        return self.shard.a.sessions

    @property
    def token_s(self) -> float | None:
        """Seconds per decoded token of the last generation (the router prefers faster among equals)."""
        return 1.0 / self.last_tokens_per_s if self.last_tokens_per_s > 0 else None

    @property
    def capacity(self) -> int:
        """Requests this head takes: its sessions (the KV memory reserved on every stage) plus its queue."""
        return self.shard.a.sessions + self.max_queue

    async def generate(
        self, request: GenerationRequest, events: trio.MemorySendChannel[GenerationEvent]
    ) -> None:
        """Stream the events of one generation into `events`, then close it. Raises InvalidInput, Overloaded,
        StageFailed (a stage failed or stopped answering), PeerUnavailable (the pipeline is gone)."""
        async with events:
            if self.shard.state != "ready":
                raise PeerUnavailable(f"pipeline {self.shard.a.deployment_id} is {self.shard.state}")
            if self._slots.value == 0 and self._waiting >= self.max_queue:
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

            async def step(
                new: list[int], pos: int, timeout: float, emit: Callable[[], Awaitable[None]] | None = None
            ) -> int:
                return await self._step(sid, tokens, sampler, history, new, pos, timeout, emit)

            t0 = time.perf_counter()
            token = await step(ids, 0, self.prefill_timeout)
            t1 = time.perf_counter()
            steps = 0
            first = not request.resume  # a resumed client already has the prompt ids and `resume`'s text
            replay = list(request.resume)
            while True:
                if replay:  # the same steps as the first run, so the KV caches (and any RNG) end up the same
                    forced = replay.pop(0)
                    if forced != token:
                        log.warning("%s: replayed token %d differs from the first run's %d", shard.label,
                                    token, forced)  # fmt: skip
                    stream.push(forced)
                    history.append(forced)
                    token = await step([forced], len(history) - 1, self.step_timeout)
                    steps += 1
                    continue
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
                has = event.text or event.token_ids or event.prompt_token_ids
                emit = functools.partial(events.send, event) if has else None
                history.append(token)
                token = await step([token], len(history) - 1, self.step_timeout, emit)
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
            "stages": len(self.shard.a.stages),  # what a remote node routing here learns the path from
            "sessions": self.shard.a.sessions,
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
        emit: Callable[[], Awaitable[None]] | None = None,
    ) -> int:
        """Run `new` ids at positions [pos, pos+len) through the pipeline; return the next token id. `emit`
        (sending the previous token's event) runs once this step's hidden state is on its way down the
        pipeline: streaming it (to a client, maybe over a relayed link) then overlaps the other stages'
        compute instead of delaying this step. A single stage emits it first: there is nothing to overlap."""
        import torch

        shard, worker = self.shard, self.worker
        stage = shard.stage
        assert stage is not None
        x = torch.tensor(new, dtype=torch.int64)  # [T]
        wire = {"f32": DType.F32, "f16": DType.F16, "bf16": DType.BF16}[self.wire]

        def post(out: torch.Tensor) -> torch.Tensor | int:
            # [T, hidden], or [1, vocab] for a single stage (only the last position is sampled)
            if sampler is not None:
                return sampler.sample(out[-1], history)
            return out if wire == DType.F32 else out.to(wire_dtype(wire))

        if shard.batcher is None:
            raise PeerUnavailable(f"pipeline {shard.a.deployment_id} was unloaded")
        if emit is not None and sampler is not None:
            await emit()
            emit = None
        try:  # with the other sessions' steps waiting at this moment, in one forward
            out = await shard.batcher.step(str(sid), x, pos, last_only=sampler is not None, post=post)
        except EngineError as exc:
            raise InvalidInput(f"{shard.label}: {exc}") from exc
        if isinstance(out, int):
            return out
        sent = time.perf_counter()
        await worker.send_down(shard, hidden_frame(sid, pos, out))
        if emit is not None:
            await emit()
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
        if len(new) == 1:  # a decode step: how long the rest of the ring took
            shard.ring_ms.append((time.perf_counter() - sent) * 1000)
        token = int(ids[0])
        if not 0 <= token < stage.cfg.vocab:
            raise RemoteProtocolError(f"tail sent token id {token} outside the vocabulary")
        return token
