"""What the gateway talks to: something that generates text for one model.

A backend is a pipeline whose head runs on this node, a pipeline whose head runs on another node (reached over
HTTP, relayed when needed), an upstream OpenAI-compatible server, or a whole model in this process. The
gateway routes a request to a backend and streams its events; it does not care which kind it is.

    async with trio.open_nursery() as nursery:
        send, recv = trio.open_memory_channel[GenerationEvent](16)
        nursery.start_soon(backend.generate, request, send)   # closes `send` when done
        async for event in recv: ...

A backend raises `EldricError` subclasses: `InvalidInput` (the request cannot be served: too long, bad
params),
`ModelNotFound`, `PeerUnavailable`/`StageFailed` (a stage or peer failed mid-request), `Overloaded`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from eldric_p2p.engine.sampling import SamplingParams
from eldric_p2p.errors import PeerUnavailable


class Overloaded(PeerUnavailable):
    """The backend's queue is full; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class GenerationRequest:
    model: str
    prompt: str | list[dict[str, Any]]  # raw text (raw=True) or chat messages [{"role", "content"}]
    params: SamplingParams
    raw: bool = False
    # Token ids the client already has (a generation resumed on another pipeline after a stage failed): the
    # backend runs them through exactly as it would have generated them, sends no events for them, and goes
    # on from there. Only backends with `supports_resume = True` accept a non-empty list.
    resume: list[int] = field(default_factory=list)


@dataclass
class GenerationEvent:
    """A piece of a generation. The last event has `finish_reason` set and `usage` filled."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" on the last event
    usage: dict[str, int] | None = None  # {"prompt_tokens", "completion_tokens", "total_tokens"}
    timings: dict[str, float] | None = (
        None  # {"prefill_s", "decode_s", "decode_tokens_per_s"} on the last event
    )
    prompt_token_ids: list[int] | None = None  # on the first event

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v not in (None, "", [])}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> GenerationEvent:
        known = {k: obj[k] for k in cls.__dataclass_fields__ if k in obj}
        return cls(**known)


class Backend(Protocol):
    model_id: str

    def info(self) -> dict[str, Any]:
        """JSON-able: {"kind": "pipeline"|"remote"|"upstream"|"local", "queue": int, ...}."""
        ...

    @property
    def queue_depth(self) -> int:
        """Requests running or waiting; the router prefers the backend with the smallest."""
        ...

    async def generate(
        self, request: GenerationRequest, events: trio.MemorySendChannel[GenerationEvent]
    ) -> None:
        """Stream the generation's events into `events`, then close it. Raises on failure."""
        ...
