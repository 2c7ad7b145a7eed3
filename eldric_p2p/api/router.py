"""Which backend serves a request: the healthy one with the smallest queue, with bounded admission.

The router holds *sources*: callables that return the backends available right now (the node's local
pipelines, remote pipeline heads learnt from peers, `--upstream` servers, a `LocalBackend`). Sources are read
on every request, so backends that come and go need no registration.

    router = Router([node.backends, lambda: upstreams])
    async with router.acquire("qwen") as backend:   # ModelNotFound / Overloaded / PeerUnavailable
        await backend.generate(request, send)

A backend is healthy unless it has an attribute `healthy` that is false. Its load is the larger of what it
reports (`queue_depth`) and the requests this router has sent it and not seen finish. A backend at its queue
limit (`capacity` attribute: the sessions it runs at once plus its queue; else `max_queue`, else the
router's) takes no more; when every backend of the model is full the
router raises `Overloaded` (the gateway answers 429 with Retry-After), when none is healthy `PeerUnavailable`
(503).
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any

from eldric_p2p.api.backends.base import Backend, Overloaded
from eldric_p2p.errors import ModelNotFound, PeerUnavailable

BackendSource = Callable[[], Iterable[Backend]]

DEFAULT_MAX_QUEUE = 64
UNKNOWN_HOPS = 64  # a backend that does not say how many stages it has ranks after those that do


def backend_key(backend: Backend) -> str:
    """A stable label for a backend (metrics, dashboard): its `name` or `info()["id"]`, else kind + id()."""
    name = getattr(backend, "name", None)
    if isinstance(name, str) and name:
        return name
    try:
        info = backend.info()
    except Exception:  # noqa: BLE001 - a label must never fail a request
        info = {}
    return str(info.get("id") or f"{info.get('kind', 'backend')}-{id(backend):x}")


class Router:
    """Backends by model id, read from sources on each call."""

    def __init__(
        self,
        sources: Iterable[BackendSource] = (),
        *,
        max_queue: int = DEFAULT_MAX_QUEUE,
        retry_after: float = 2.0,
        refresh: Callable[[], Awaitable[None]] | None = None,
        load: Callable[[str], Awaitable[object]] | None = None,
    ) -> None:
        self.sources: list[BackendSource] = list(sources)
        self.refresh = refresh  # asks the peers again (a pipeline deployed a moment ago may not be known yet)
        self.on_missing = load  # loads a model nothing serves (`--on-demand`)
        self.max_queue = max_queue
        self.retry_after = retry_after
        self._inflight: dict[
            int, int
        ] = {}  # id(backend) -> requests acquired through this router, not released
        self._turn = itertools.count()  # breaks ties between equally loaded backends in turn

    def add(self, backend: Backend) -> None:
        """Serve a fixed backend (a LocalBackend, an upstream) for as long as the router lives."""
        self.sources.append(lambda: [backend])

    def all_backends(self) -> list[Backend]:
        out: list[Backend] = []
        seen: set[int] = set()
        for source in self.sources:
            for b in source():
                if id(b) not in seen:
                    seen.add(id(b))
                    out.append(b)
        return out

    def backends(self, model: str) -> list[Backend]:
        return [b for b in self.all_backends() if b.model_id == model]

    async def ensure(self, model: str) -> None:
        """Refresh the sources once when nothing serves `model` yet; then, with an on-demand loader, load it.
        Raises what the loader raises (ModelNotFound, DoesNotFit, PeerUnavailable)."""
        if self.refresh is not None and not self.backends(model):
            await self.refresh()
        if self.on_missing is not None and not self.backends(model):
            await self.on_missing(model)

    def model_ids(self) -> list[str]:
        return sorted({b.model_id for b in self.all_backends()})

    def models(self) -> list[dict[str, Any]]:
        """One entry per model id with its backends' `info()` and load (for `/v1/models`, the dashboard)."""
        by_model: dict[str, list[dict[str, Any]]] = {}
        for b in self.all_backends():
            info = dict(_safe_info(b))
            info.setdefault("id", backend_key(b))
            info["queue"] = self.load(b)
            info["healthy"] = is_healthy(b)
            by_model.setdefault(b.model_id, []).append(info)
        return [{"id": m, "backends": by_model[m]} for m in sorted(by_model)]

    def context_length(self, model: str) -> int | None:
        """The smallest `info()["context_length"]` of `model`'s backends; None if none reports one."""
        lengths = [
            int(n)
            for b in self.backends(model)
            if isinstance(n := _safe_info(b).get("context_length"), int) and n > 0
        ]
        return min(lengths) if lengths else None

    def load(self, backend: Backend) -> int:
        try:
            reported = int(backend.queue_depth)
        except Exception:  # noqa: BLE001 - a remote backend's stale figure must not fail routing
            reported = 0
        return max(reported, self._inflight.get(id(backend), 0))

    def _limit(self, backend: Backend) -> int:
        """Requests a backend may hold: its `capacity` (sessions it runs at once + its queue), else its
        `max_queue`, else the router's."""
        capacity = getattr(backend, "capacity", None)
        if isinstance(capacity, int) and capacity > 0:
            return capacity
        limit = getattr(backend, "max_queue", None)
        return limit if isinstance(limit, int) and limit > 0 else self.max_queue

    def pick(self, model: str) -> Backend:
        """The healthy backend of `model` with room and the best `route_rank` (equals in turn).

        Raises ModelNotFound (no backend serves `model`; the message lists the models there are),
        PeerUnavailable (none healthy), Overloaded (all at their queue limit).
        """
        candidates = self.backends(model)
        if not candidates:
            available = ", ".join(self.model_ids()) or "none"
            raise ModelNotFound(
                f"the model {model!r} does not exist or is not served here; available: {available}"
            )
        healthy = [b for b in candidates if is_healthy(b)]
        if not healthy:
            raise PeerUnavailable(f"no healthy backend serves {model!r} right now")
        open_ = [b for b in healthy if self.load(b) < self._limit(b)]
        if not open_:
            raise Overloaded(
                f"every backend of {model!r} is at its queue limit", retry_after=self.retry_after
            )
        turn = next(self._turn)
        return min(enumerate(open_), key=lambda ib: (*self.route_rank(ib[1]), (ib[0] - turn) % len(open_)))[1]

    def route_rank(self, backend: Backend) -> tuple[bool, int, int, float]:
        """How good a route `backend` is for a new session, smaller first: one with a free session slot
        (its `sessions` not all busy; one that does not say has one slot) before one where it would queue;
        then the fewest `hops` (stages a token crosses; unknown counts as many); then the smaller load; then
        the faster per token (`token_s`, what its last generation measured)."""
        load = self.load(backend)
        sessions = getattr(backend, "sessions", None)
        full = load >= (sessions if isinstance(sessions, int) and sessions > 0 else 1)
        hops = getattr(backend, "hops", None)
        token_s = getattr(backend, "token_s", None)
        return (
            full,
            hops if isinstance(hops, int) else UNKNOWN_HOPS,
            load,
            token_s if isinstance(token_s, int | float) else 0.0,
        )

    @asynccontextmanager
    async def acquire(self, model: str) -> AsyncIterator[Backend]:
        """`pick(model)` and count the request against that backend until the block exits."""
        backend = self.pick(model)
        key = id(backend)
        self._inflight[key] = self._inflight.get(key, 0) + 1
        try:
            yield backend
        finally:
            left = self._inflight[key] - 1
            if left:
                self._inflight[key] = left
            else:
                del self._inflight[key]

    def queue_depths(self) -> list[tuple[dict[str, Any], float]]:
        """(labels, depth) per backend for the `eldric_queue_depth` gauge."""
        return [({"model": b.model_id, "backend": backend_key(b)}, self.load(b)) for b in self.all_backends()]


def is_healthy(backend: Backend) -> bool:
    return bool(getattr(backend, "healthy", True))


def _safe_info(backend: Backend) -> dict[str, Any]:
    try:
        info = backend.info()
    except Exception:  # noqa: BLE001 - one broken backend must not hide the others from /v1/models
        return {"kind": "unknown"}
    return info if isinstance(info, dict) else {}
