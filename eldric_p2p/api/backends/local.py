"""A whole model in this process as a gateway backend (one machine, no pipeline).

Each request is a session with its own KV cache; forward passes run in worker threads one at a time (an
explicit `trio.CapacityLimiter`), so concurrent sessions take turns token by token. At most `max_active`
sessions hold a KV cache at once; later requests wait (the router bounds how many may wait). The sampling,
stop handling and text streaming are `Sampler` and `TextStream`, as in `eldric-p2p run`, so the greedy text is
the same.

Events: a first event with `prompt_token_ids` once the prompt is tokenized and accepted (before the prefill,
so the gateway can still answer a 4xx for a prompt that does not fit), one per sampled token with its text
delta, and a last one with `finish_reason`, `usage` and `timings`. Cancelling `generate` (client gone) waits
for the forward pass in flight, then frees the session.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import trio

from eldric_p2p.api.backends.base import GenerationEvent, GenerationRequest
from eldric_p2p.engine.generate import LocalModel, TextStream, prompt_token_ids
from eldric_p2p.engine.sampling import Sampler
from eldric_p2p.errors import InvalidInput


class LocalBackend:
    """Serve `model` (a loaded `LocalModel`) as `model_id`."""

    def __init__(
        self,
        model: LocalModel,
        model_id: str,
        *,
        max_active: int = 4,
        max_queue: int = 32,
        limiter: trio.CapacityLimiter | None = None,
    ) -> None:
        self.model = model
        self.model_id = model_id
        self.name = f"local:{model_id}"
        self.max_queue = max_queue
        self.sessions = max_active  # generations it runs at once (the router's route choice)
        self._sessions = trio.Semaphore(max_active)
        self._limiter = limiter or trio.CapacityLimiter(1)
        self._ids = itertools.count()
        self._waiting = 0
        self.active: set[str] = set()  # session ids holding a KV cache now

    @classmethod
    async def load(
        cls, path: str | Path, model_id: str | None = None, *, device: str = "cpu", weights: str = "auto",
        max_ctx: int = 4096, **kwargs: Any,
    ) -> LocalBackend:  # fmt: skip
        """Load a GGUF file in a worker thread; `model_id` defaults to the file name without `.gguf`."""
        path = Path(path)
        model = await trio.to_thread.run_sync(
            lambda: LocalModel(path, device=device, weights=weights, max_ctx=max_ctx)
        )
        return cls(model, model_id or path.name.removesuffix(".gguf"), **kwargs)

    @property
    def context_length(self) -> int:
        return self.model.stages[0].max_ctx

    @property
    def queue_depth(self) -> int:
        return len(self.active) + self._waiting

    def info(self) -> dict[str, Any]:
        return {
            "kind": "local",
            "id": self.name,
            "queue": self.queue_depth,
            "active_sessions": len(self.active),
            "context_length": self.context_length,
            "architecture": self.model.metadata.get("general.architecture"),
            "n_layers": self.model.stages[-1].end,
        }

    async def generate(
        self, request: GenerationRequest, events: trio.MemorySendChannel[GenerationEvent]
    ) -> None:
        async with events:
            model, params = self.model, request.params
            ids = await trio.to_thread.run_sync(
                lambda: prompt_token_ids(model.tokenizer, model.metadata, request.prompt, raw=request.raw),
                limiter=self._limiter,
            )
            if not ids:
                raise InvalidInput("the prompt is empty")
            ctx = self.context_length
            if len(ids) + params.max_tokens > ctx:
                raise InvalidInput(
                    f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) "
                    f"exceed the {ctx}-token context"
                )
            await events.send(GenerationEvent(prompt_token_ids=list(ids)))
            self._waiting += 1
            try:
                await self._sessions.acquire()
            finally:
                self._waiting -= 1
            sid = f"gw-{next(self._ids)}"
            try:
                for stage in model.stages:
                    stage.open_session(sid)
                self.active.add(sid)
                await self._run(sid, ids, request, events)
            finally:
                self.active.discard(sid)
                for stage in model.stages:
                    stage.close_session(sid)
                self._sessions.release()

    async def _run(
        self,
        sid: str,
        ids: list[int],
        request: GenerationRequest,
        events: trio.MemorySendChannel[GenerationEvent],
    ) -> None:
        model, params = self.model, request.params
        sampler = Sampler(params)
        stream = TextStream(model.tokenizer, max_tokens=params.max_tokens, stop=params.stop)
        history = list(ids)

        def step(tokens: list[int], pos: int) -> int:
            logits = model.forward(sid, tokens, pos, last_only=True)  # [1, vocab]
            return sampler.sample(logits[-1], history)

        t0 = time.perf_counter()
        token = await trio.to_thread.run_sync(step, ids, 0, limiter=self._limiter)
        t1 = time.perf_counter()
        steps = 0
        while True:
            n_before = len(stream.token_ids)
            text = stream.push(token)
            new_ids = stream.token_ids[n_before:]
            if stream.done:
                if text or new_ids:
                    await events.send(GenerationEvent(text=text, token_ids=new_ids))
                break
            await events.send(GenerationEvent(text=text, token_ids=new_ids))
            history.append(token)
            token = await trio.to_thread.run_sync(step, [token], len(history) - 1, limiter=self._limiter)
            steps += 1
        t2 = time.perf_counter()
        n_out = len(stream.token_ids)
        await events.send(
            GenerationEvent(
                finish_reason=stream.finish_reason or "stop",
                usage={
                    "prompt_tokens": len(ids),
                    "completion_tokens": n_out,
                    "total_tokens": len(ids) + n_out,
                },
                timings={
                    "prefill_s": t1 - t0,
                    "decode_s": t2 - t1,
                    "decode_tokens_per_s": steps / (t2 - t1) if t2 > t1 else 0.0,
                },
            )
        )
