"""A generation that outlives a pipeline: when a stage fails mid-request, go on on another pipeline.

    await Resumer(lambda: router.backends(model), router.refresh).generate(backend, request, events)

The node where the request came in (the gateway, or `/api/v1/pipeline/generate`) owns what the client has
seen: the token ids streamed so far. When a pipeline fails with `StageFailed` or `PeerUnavailable` (a stage
died, its link broke, a head node went away), the `Resumer` waits for a pipeline of the same model (the
coordinator re-plans onto a spare or the survivors when its heartbeat finds the stage lost; see
`pipeline.coordinator`) and asks it to *resume*: `GenerationRequest.resume` holds the streamed ids, which the
new pipeline runs through with the same steps as the first run (the prompt as one batch, then one token at a
time), sending nothing for them, and then goes on generating. Greedy output is unchanged, because the same
engine on the same steps computes the same numbers; the client sees a pause, not an error.

Bounded: `within_s` after a failure (default 60 s) without a pipeline that takes the request, the request
ends with the error. Only backends with `supports_resume` (pipelines, local or remote) are resumed onto;
other errors (bad input, overload, authentication) end the request as before. The final event's `timings`
reports `recoveries` and `recovery_pause_s`: from the failure to the next token the client got.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

import trio

from eldric_p2p.api.backends.base import Backend, GenerationEvent, GenerationRequest, Overloaded
from eldric_p2p.errors import EldricError, PeerUnavailable
from eldric_p2p.tasks import open_nursery

log = logging.getLogger(__name__)

RECOVER_WITHIN_S = 60.0
RETRY_S = 0.25
AVOID_S = 2.0  # a backend that just failed is not tried again for this long
REFRESH_EVERY_S = 1.0


def resumable(exc: BaseException) -> bool:
    return isinstance(exc, PeerUnavailable) and not isinstance(exc, Overloaded)


class Resumer:
    """Runs one generation on `first`, and on a pipeline failure resumes it on another candidate."""

    def __init__(
        self,
        candidates: Callable[[], list[Backend]],
        refresh: Callable[[], Awaitable[None]] | None = None,
        *,
        within_s: float = RECOVER_WITHIN_S,
        load: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        self.candidates = candidates
        self.refresh = refresh
        self.load = load  # with --on-demand: deploys the model when no pipeline of it is left
        self.within_s = within_s
        self.produced: list[int] = []
        self.recoveries = 0
        self.pause_s = 0.0

    async def generate(
        self, first: Backend, request: GenerationRequest, events: trio.MemorySendChannel[GenerationEvent]
    ) -> None:
        """Stream the generation's events into `events` (closed at the end). Raises the last error when no
        pipeline took the request over within `within_s`."""
        async with events:
            backend = first
            failed: dict[int, float] = {}
            while True:
                try:
                    await self._attempt(backend, request, events)
                    return
                except EldricError as exc:
                    if not (resumable(exc) and getattr(backend, "supports_resume", False)):
                        raise
                    error = exc
                now = time.monotonic()
                failed[id(backend)] = now
                log.warning("generation of %s failed after %d tokens (%s); resuming on another pipeline",
                            request.model, len(self.produced), error)  # fmt: skip
                self._failed_at = now
                backend = await self._next_backend(failed, error)

    async def _attempt(
        self, backend: Backend, request: GenerationRequest, events: trio.MemorySendChannel[GenerationEvent]
    ) -> None:
        inner_send, inner_recv = trio.open_memory_channel[GenerationEvent](16)
        attempt = replace(request, resume=list(request.resume) + self.produced)
        error: list[BaseException] = []

        async def run() -> None:
            try:
                await backend.generate(attempt, inner_send)
            except EldricError as exc:
                error.append(exc)

        async with open_nursery() as nursery:
            nursery.start_soon(run)
            async for event in inner_recv:
                if self._failed_at is not None:  # the first token after a failure: the pause is over
                    self.pause_s += time.monotonic() - self._failed_at
                    self._failed_at = None
                self.produced += event.token_ids
                if event.finish_reason is not None and self.recoveries:
                    event.timings = {**(event.timings or {}), "recoveries": self.recoveries,
                                     "recovery_pause_s": round(self.pause_s, 3)}  # fmt: skip
                await events.send(event)
        if error:
            raise error[0]

    _failed_at: float | None = None

    async def _next_backend(self, failed: dict[int, float], error: EldricError) -> Backend:
        deadline = time.monotonic() + self.within_s
        last_refresh = 0.0
        while time.monotonic() < deadline:
            now = time.monotonic()
            usable = [
                b
                for b in self.candidates()
                if getattr(b, "supports_resume", False) and now - failed.get(id(b), -AVOID_S) >= AVOID_S
            ]
            if usable:
                usable.sort(key=lambda b: (b.info().get("kind") != "pipeline", b.queue_depth))
                self.recoveries += 1
                return usable[0]
            if now - last_refresh >= REFRESH_EVERY_S:
                last_refresh = now
                if self.refresh is not None:
                    await self.refresh()
                if self.load is not None and not self.candidates():
                    try:
                        await self.load()
                    except EldricError as exc:
                        log.info("loading %s again: %s", error, exc)
            await trio.sleep(RETRY_S)
        raise PeerUnavailable(
            f"{error}; no pipeline took the request over within {self.within_s:.0f} s"
        ) from error
