"""The planner: contiguous layer ranges over the workers' free memory. Pure: no I/O, no clock, no trio.

`plan_layers` takes a model's `GGUFIndex` and `WorkerView`s and returns `StagePlan`s or raises
`PlanDoesNotFit` with the numbers; the coordinator (pipeline/coordinator.py) gathers the views and deploys
the plan.

The memory of a stage [a, b) is `estimate_stage_bytes` (weights in the worker's format, the embedding on the
head, the output matrix on the tail, KV caches for `sessions` x `max_ctx`). "proportional" gives each worker a
contiguous range whose layer count is proportional to its free memory; when that range would not fit (the head
and tail carry the embedding and the output matrix), it falls back to the contiguous split that minimises the
largest memory use relative to each worker's free memory. "fewest-hops" uses the fewest workers (largest
first) that fit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from eldric_p2p.errors import DoesNotFit, UsageError
from eldric_p2p.units import format_size

if TYPE_CHECKING:
    from eldric_p2p.data.gguf_index import GGUFIndex

STRATEGIES = ("proportional", "fewest-hops")


@dataclass
class WorkerView:
    """A worker as its status endpoint describes it (`coordinator.parse_worker_status_untrusted`)."""

    name: str
    peer_id: str
    url: str
    host: str
    link_port: int
    device: str
    weights: str
    offered: int
    free: int


@dataclass
class StagePlan:
    worker: WorkerView
    start: int
    end: int
    needed: int


class PlanDoesNotFit(DoesNotFit):
    """No split over the offered workers fits; `details` holds the numbers (JSON-able)."""

    def __init__(self, message: str, details: dict[str, Any]) -> None:
        super().__init__(message)
        self.details = details


def _proportional_bounds(n: int, mems: list[int]) -> list[int]:
    """Boundaries [0, b1, ..., n] with layer counts proportional to `mems`, at least one layer each."""
    total = sum(mems)
    bounds = [0]
    acc = 0
    for i, m in enumerate(mems[:-1]):
        acc += m
        b = round(n * acc / total)
        b = max(b, bounds[-1] + 1)  # at least one layer
        b = min(b, n - (len(mems) - 1 - i))  # leave one for each worker after
        bounds.append(b)
    bounds.append(n)
    return bounds


def _balanced_bounds(n: int, ws: list[WorkerView], cost: Callable[[int, int, int], int]) -> list[int] | None:
    """Contiguous split minimising max(cost / free) over workers (dynamic programming); None if W > n."""
    w = len(ws)
    if w > n:
        return None
    inf = float("inf")
    # best[k][b]: the smallest max-utilisation covering layers [0, b) with the first k workers
    best = [[inf] * (n + 1) for _ in range(w + 1)]
    cut = [[0] * (n + 1) for _ in range(w + 1)]
    best[0][0] = 0.0
    for k in range(1, w + 1):
        free = max(ws[k - 1].free, 1)
        for b in range(k, n - (w - k) + 1):
            for a in range(k - 1, b):
                if best[k - 1][a] == inf:
                    continue
                u = max(best[k - 1][a], cost(k - 1, a, b) / free)
                if u < best[k][b]:
                    best[k][b], cut[k][b] = u, a
    bounds = [n]
    for k in range(w, 0, -1):
        bounds.append(cut[k][bounds[-1]])
    return bounds[::-1]


def plan_layers(
    index: GGUFIndex,
    workers: list[WorkerView],
    *,
    strategy: str = "proportional",
    weights: str = "auto",
    max_ctx: int = 4096,
    sessions: int = 4,
) -> tuple[list[StagePlan], str]:
    """Contiguous layer ranges over `workers` (in order: the first is the head). Returns (plan, note).

    Raises PlanDoesNotFit with the numbers, UsageError for an unknown strategy or no workers.
    """
    from eldric_p2p.engine.model import estimate_stage_bytes

    if strategy not in STRATEGIES:
        raise UsageError(f"unknown strategy {strategy!r}: use {' or '.join(STRATEGIES)}")
    if not workers:
        raise UsageError("no workers to deploy on")
    n = index.n_layers
    memo: dict[tuple[str, int, int], int] = {}

    def fmt(w: WorkerView) -> str:
        return w.weights if weights == "auto" else weights

    def need(w: WorkerView, a: int, b: int) -> int:
        key = (fmt(w), a, b)
        if key not in memo:
            memo[key] = estimate_stage_bytes(index, a, b, weights=key[0], max_ctx=max_ctx, sessions=sessions)
        return memo[key]

    def build(ws: list[WorkerView], bounds: list[int]) -> list[StagePlan]:
        return [StagePlan(w, a, b, need(w, a, b)) for w, a, b in zip(ws, bounds, bounds[1:], strict=False)]

    def fits(plan: list[StagePlan]) -> bool:
        return all(p.needed <= p.worker.free for p in plan)

    usable = [w for w in workers if w.free > 0][:n]
    if strategy == "proportional":
        candidates = [usable]
    else:
        by_size = sorted(usable, key=lambda w: -w.free)
        candidates = [by_size[:k] for k in range(1, len(by_size) + 1)]
    best_attempt: list[StagePlan] = []
    for ws in candidates:
        if not ws:
            continue
        plan = build(ws, _proportional_bounds(n, [w.free for w in ws]))
        if fits(plan):
            return plan, f"{strategy}: layers in proportion to free memory"
        bounds = _balanced_bounds(n, ws, lambda k, a, b, ws=ws: need(ws[k], a, b))  # type: ignore[misc]
        if bounds is not None:
            balanced = build(ws, bounds)
            if fits(balanced):
                return balanced, f"{strategy}: adjusted so the head's embedding and the tail's output fit"
            best_attempt = balanced
        else:
            best_attempt = plan
    whole = need(usable[0], 0, n) if usable else need(workers[0], 0, n)
    free = sum(w.free for w in workers)
    lines = [
        f"{p.worker.name} layers {p.start}-{p.end - 1} need {format_size(p.needed)} of "
        f"{format_size(p.worker.free)} free"
        for p in best_attempt
    ]
    message = (
        f"{index.metadata.get('general.name', 'the model')} does not fit: it needs about "
        f"{format_size(whole)} in one stage (KV for {sessions} sessions x {max_ctx} tokens included), "
        f"the {len(workers)} workers offer "
        f"{format_size(free)} free in total" + (f"; best split: {'; '.join(lines)}" if lines else "")
    )
    details = {
        "needed": whole,
        "free": free,
        "workers": [
            {"name": w.name, "peer_id": w.peer_id, "offered": w.offered, "free": w.free} for w in workers
        ],
        "best": [
            {
                "worker": p.worker.name,
                "start": p.start,
                "end": p.end,
                "needed": p.needed,
                "free": p.worker.free,
            }
            for p in best_attempt
        ],
    }
    raise PlanDoesNotFit(message, details)
