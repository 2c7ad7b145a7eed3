"""For the gateway tests: serve an ASGI app on loopback in a thread; a deterministic fake backend."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import trio
from starlette.applications import Starlette

from eldric_p2p.api.backends.base import GenerationEvent, GenerationRequest, Overloaded
from eldric_p2p.errors import InvalidInput
from eldric_p2p.http_server import EXCEPTION_HANDLERS, serve_app

PIECES = ["Hello", ",", " world", "!", " How", " are", " you", " today", "?", " Fine", "."]


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """Serve `app` with `serve_app` on 127.0.0.1 in a thread with its own trio loop; yield the base URL."""
    started: queue.Queue[Any] = queue.Queue()
    holder: dict[str, Any] = {}

    def run() -> None:
        async def main() -> None:
            async with trio.open_nursery() as nursery:
                holder["token"] = trio.lowlevel.current_trio_token()
                holder["cancel"] = nursery.cancel_scope.cancel
                port = await nursery.start(serve_app, app, "127.0.0.1", 0)
                started.put(port)

        try:
            trio.run(main)
        except BaseException as exc:  # surface a failed start to the test thread
            started.put(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    port = started.get(timeout=30)
    if isinstance(port, BaseException):
        raise port
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        trio.from_thread.run_sync(holder["cancel"], trio_token=holder["token"])
        thread.join(10)


def app_of(routes: list[Any]) -> Starlette:
    return Starlette(routes=routes, exception_handlers=EXCEPTION_HANDLERS)


class FakeBackend:
    """Deterministic: answers PIECES (one token each), `delay` seconds apart; records cancellations."""

    def __init__(
        self, model_id: str = "fake", *, delay: float = 0.0, context_length: int = 4096,
        name: str | None = None,
        fail_with: Exception | None = None, max_queue: int | None = None,
    ) -> None:  # fmt: skip
        self.model_id = model_id
        self.name = name or f"fake:{model_id}"
        self.delay = delay
        self.context_length = context_length
        self.fail_with = fail_with
        if max_queue is not None:
            self.max_queue = max_queue
        self.active = 0
        self.started = 0
        self.cancelled = 0
        self.completed = 0
        self.requests: list[GenerationRequest] = []
        self.healthy = True

    @property
    def queue_depth(self) -> int:
        return self.active

    def info(self) -> dict[str, Any]:
        return {"kind": "fake", "id": self.name, "queue": self.active, "context_length": self.context_length}

    def prompt_tokens(self, request: GenerationRequest) -> int:
        if isinstance(request.prompt, str):
            return len(request.prompt.split())
        return sum(len(m["content"].split()) + 1 for m in request.prompt)

    async def generate(
        self, request: GenerationRequest, events: trio.MemorySendChannel[GenerationEvent]
    ) -> None:
        async with events:
            self.requests.append(request)
            if self.fail_with is not None:
                raise self.fail_with
            n_in = self.prompt_tokens(request)
            if n_in + request.params.max_tokens > self.context_length:
                raise InvalidInput(f"prompt + max_tokens exceed the {self.context_length}-token context")
            self.active += 1
            self.started += 1
            try:
                await events.send(GenerationEvent(prompt_token_ids=list(range(n_in))))
                n = min(request.params.max_tokens, len(PIECES))
                for i in range(n):
                    if self.delay:
                        await trio.sleep(self.delay)
                    await events.send(GenerationEvent(text=PIECES[i], token_ids=[i]))
                finish = "length" if n == request.params.max_tokens else "stop"
                await events.send(GenerationEvent(
                    finish_reason=finish, usage={"prompt_tokens": n_in, "completion_tokens": n,
                                                 "total_tokens": n_in + n}))  # fmt: skip
                self.completed += 1
            except trio.Cancelled:
                self.cancelled += 1
                raise
            finally:
                self.active -= 1


class BusyBackend(FakeBackend):
    """Refuses every request as overloaded."""

    async def generate(
        self, request: GenerationRequest, events: trio.MemorySendChannel[GenerationEvent]
    ) -> None:
        async with events:
            raise Overloaded("busy", retry_after=3.0)
