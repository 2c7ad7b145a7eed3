"""Continuous batching at a stage: the decode steps of all the sessions that wait at the same moment run as
one forward (`Stage.forward_batch`), so the weights are read once per step for all of them.

    batcher = StepBatcher(lambda: shard.stage, worker.compute, max_batch=shard.a.sessions + 2)
    nursery.start_soon(batcher.serve)
    out = await batcher.step(sid, x, pos, last_only=True, post=lambda logits: sampler.sample(...))

Every stage of a pipeline has one per loaded shard: the head's sessions call `step` from their own tasks,
the other stages from a task per HIDDEN frame. `serve` takes whatever steps are waiting, runs them together
(decode steps and prompts alike, each session's rows computed as their own batch), and hands each result
back; steps that arrive meanwhile form the next batch, so sessions join and leave between steps. `post` runs
on each session's output in the compute thread (sampling, the wire dtype). An engine error in a batch is
attributed by running its steps one by one (inputs are checked before any cache changes). With native weights
on the CPU each session's output is bit for bit what it would be alone.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from eldric_p2p.errors import EngineError, PeerUnavailable

if TYPE_CHECKING:
    import torch

    from eldric_p2p.engine.model import Stage

log = logging.getLogger(__name__)

GATHER_PASSES = 16  # scheduler passes a batch waits at most for more sessions' steps
GATHER_QUIET = 4  # ... and stops after this many passes with none arriving
RECENT = 32  # batches whose compute time the status's median covers
QUICK_MS = 25.0  # a decode step that takes at most this long (median) runs on the event loop: see _quick
QUICK_AFTER = 4  # ... once this many decode steps have been timed


@dataclass(eq=False)
class _Step:
    sid: str
    x: torch.Tensor
    pos: int
    last_only: bool
    post: Callable[[torch.Tensor], Any] | None
    done: trio.Event = field(default_factory=trio.Event)
    result: Any = None
    error: BaseException | None = None


class StepBatcher:
    """Batches one stage's forward steps across sessions (see the module docstring)."""

    def __init__(
        self,
        stage: Callable[[], Stage | None],
        compute: Callable[..., Awaitable[Any]],
        *,
        max_batch: int = 16,
        active: Callable[[], int] = lambda: 1,
    ) -> None:
        self.stage = stage
        self.compute = compute
        self.max_batch = max_batch
        self.active = active  # sessions open at the stage: how many steps a batch may still expect
        self._pending: list[_Step] = []
        self._running = False  # a batch is computing (a step that arrives now waits for the next)
        self._decode_ms: deque[float] = deque(maxlen=QUICK_AFTER)  # the last single-row steps' compute times
        self._wake = trio.Event()
        self.batches = 0  # forwards run
        self.steps = 0  # session steps they carried
        self.largest = 0  # the most sessions one forward carried
        self.compute_s = 0.0  # time in the compute thread, all batches
        self.last_compute_ms: deque[float] = deque(maxlen=RECENT)  # the last batches' compute times

    async def step(
        self,
        sid: str,
        x: torch.Tensor,
        pos: int,
        *,
        last_only: bool,
        post: Callable[[torch.Tensor], Any] | None = None,
    ) -> Any:
        """Run `x` at `pos` for session `sid` (with the next batch) and return `post(output)`. Raises what the
        stage raised for this session (EngineError), PeerUnavailable when the stage was unloaded."""
        step = _Step(sid, x, pos, last_only, post)
        if not self._pending and not self._running and self.active() <= 1:
            await self._run([step])  # nothing to batch with: run it from this task (two task switches less)
        else:
            self._pending.append(step)
            self._wake.set()
            try:
                await step.done.wait()
            except BaseException:
                if step in self._pending:  # cancelled before its batch started: it never runs
                    self._pending.remove(step)
                raise
        if step.error is not None:
            raise step.error
        return step.result

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run batches until cancelled; steps still waiting then fail with PeerUnavailable."""
        task_status.started()
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                while self._pending:
                    await self._gather()
                    batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
                    await self._run(batch)
        finally:
            for step in self._pending:
                step.error = PeerUnavailable("the stage was unloaded")
                step.done.set()
            self._pending = []

    async def _gather(self) -> None:
        """Let the other sessions' next steps join before the batch starts. A batch's sessions get their
        results together, but each does some work (streaming its text, sending its frame) before it asks
        for the next step; without this the first to come back would start a batch of one and the sessions
        would take turns instead of batching (one computing while the other queues, for ever). Only a few
        scheduler passes (tens of microseconds), and none when every open session is already waiting."""
        quiet = 0
        for _ in range(GATHER_PASSES):
            if len(self._pending) >= min(self.active(), self.max_batch):
                return
            before = len(self._pending)
            await trio.lowlevel.checkpoint()
            quiet = quiet + 1 if len(self._pending) == before else 0
            if quiet >= GATHER_QUIET:
                return

    async def _run(self, batch: list[_Step]) -> None:
        stage = self.stage()
        if stage is None:
            for step in batch:
                step.error = PeerUnavailable("the stage was unloaded")
        else:
            self._running = True
            try:
                await self.compute(self._compute, stage, batch, quick=self._quick(batch))
            except BaseException:
                for step in batch:
                    step.error = step.error or PeerUnavailable("the stage's compute was cancelled")
                    step.done.set()
                raise
            finally:
                self._running = False
            self.batches += 1
            self.steps += len(batch)
        for step in batch:
            step.done.set()

    def _quick(self, batch: list[_Step]) -> bool:
        """Whether `batch` is one decode step of a stage whose decode steps take under QUICK_MS: `compute`
        then runs it on the event loop instead of handing it to a thread and back (a few hundred microseconds
        per hop on a busy CPU, paid by every token). A longer step stays in the thread, so the loop (links,
        heartbeats, QUIC timers) is never blocked for long; so do the first steps, until their time is
        known."""
        if len(batch) != 1 or batch[0].x.shape[0] != 1 or len(self._decode_ms) < QUICK_AFTER:
            return False
        return statistics.median(self._decode_ms) <= QUICK_MS

    def _compute(self, stage: Stage, batch: list[_Step]) -> None:
        """In the compute thread: every step (prompts and decode steps alike) in one forward per `last_only`
        (a stage's steps all have the same), each session's rows computed as its own batch."""
        t0 = time.perf_counter()
        try:
            self._compute_groups(stage, batch)
        finally:
            took = time.perf_counter() - t0
            self.compute_s += took
            self.last_compute_ms.append(took * 1000)
            if len(batch) == 1 and batch[0].x.shape[0] == 1:
                self._decode_ms.append(took * 1000)

    def _compute_groups(self, stage: Stage, batch: list[_Step]) -> None:
        groups: dict[bool, list[_Step]] = {}
        for step in batch:
            groups.setdefault(step.last_only, []).append(step)
        for last_only, group in groups.items():
            if len(group) == 1:
                self._alone(stage, group[0])
                continue
            try:
                outs = stage.forward_batch([(s.sid, s.x, s.pos) for s in group], last_only=last_only)
            except EngineError:  # inputs are checked before any cache changes: find whose it was
                for s in group:
                    self._alone(stage, s)
                continue
            self.largest = max(self.largest, len(group))
            for s, out in zip(group, outs, strict=True):
                self._finish(s, out)

    def _alone(self, stage: Stage, step: _Step) -> None:
        try:
            out = stage.forward(step.sid, step.x, step.pos, last_only=step.last_only)
        except EngineError as exc:
            step.error = exc
            return
        self.largest = max(self.largest, 1)
        self._finish(step, out)

    @staticmethod
    def _finish(step: _Step, out: torch.Tensor) -> None:
        try:
            step.result = step.post(out) if step.post is not None else out
        except EngineError as exc:
            step.error = exc

    def status(self) -> dict[str, Any]:
        recent = statistics.median(self.last_compute_ms) if self.last_compute_ms else None
        return {
            "batches": self.batches,
            "steps": self.steps,
            "largest": self.largest,
            "mean": round(self.steps / self.batches, 2) if self.batches else 0.0,
            "compute_s": round(self.compute_s, 3),
            # the median of the last batches' compute times: a decode step's share of this stage
            "recent_compute_ms": round(recent, 2) if recent is not None else None,
        }
