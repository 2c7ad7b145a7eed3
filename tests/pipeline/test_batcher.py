"""StepBatcher's scheduling, with a stand-in stage: a lone session's step runs from its own task, a decode
step of a fast stage runs on the event loop (`quick`), and sessions that wait together share one forward."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import trio

from eldric_p2p.net.identity import Identity
from eldric_p2p.pipeline.batching import QUICK_AFTER, QUICK_MS, StepBatcher
from eldric_p2p.pipeline.worker import Worker


class FakeStage:
    """Adds the position to every row; `delay` seconds per forward (the clock the batcher times)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.forwards: list[list[str]] = []  # the sessions of each forward

    def forward(self, sid: str, x: torch.Tensor, pos: int, *, last_only: bool = False) -> torch.Tensor:
        self.forwards.append([sid])
        time.sleep(self.delay)
        return x + pos

    def forward_batch(
        self, steps: list[tuple[str, torch.Tensor, int]], *, last_only: bool = False
    ) -> list[Any]:
        self.forwards.append([sid for sid, _, _ in steps])
        time.sleep(self.delay)
        return [x + pos for _, x, pos in steps]


class Recorder:
    """A `compute` that runs in a thread unless `quick`, and records which it was asked for."""

    def __init__(self) -> None:
        self.quick: list[bool] = []

    async def __call__(self, fn: Any, *args: Any, quick: bool = False) -> Any:
        self.quick.append(quick)
        if quick:
            return fn(*args)
        return await trio.to_thread.run_sync(fn, *args)


def test_a_lone_session_runs_without_the_serving_task() -> None:
    async def main() -> None:
        stage = FakeStage()
        batcher = StepBatcher(lambda: stage, Recorder(), active=lambda: 1)  # serve() is never started
        with trio.fail_after(5):
            out = await batcher.step("s", torch.ones(1, 4), 3, last_only=False, post=lambda t: t * 2)
        assert out.tolist() == [[8.0] * 4]
        assert batcher.batches == 1 and batcher.steps == 1

    trio.run(main)


def test_fast_decode_steps_run_on_the_event_loop_and_slow_or_long_ones_in_a_thread() -> None:
    async def main() -> None:
        stage = FakeStage()
        compute = Recorder()
        batcher = StepBatcher(lambda: stage, compute, active=lambda: 1)
        await batcher.step("s", torch.ones(5, 4), 0, last_only=False)  # a prompt: never quick
        for pos in range(5, 5 + QUICK_AFTER + 2):
            await batcher.step("s", torch.ones(1, 4), pos, last_only=False)
        # until QUICK_AFTER decode steps are timed, threads; then (each well under QUICK_MS) the loop
        assert compute.quick == [False] * (1 + QUICK_AFTER) + [True, True]
        await batcher.step("s", torch.ones(2, 4), 20, last_only=False)  # two rows: a thread again
        assert compute.quick[-1] is False

        slow = FakeStage(delay=QUICK_MS * 1.5 / 1000)
        compute = Recorder()
        batcher = StepBatcher(lambda: slow, compute, active=lambda: 1)
        for pos in range(QUICK_AFTER + 2):
            await batcher.step("s", torch.ones(1, 4), pos, last_only=False)
        assert compute.quick == [False] * (QUICK_AFTER + 2)  # a stage this slow never blocks the loop

    trio.run(main)


def test_sessions_waiting_together_share_one_forward() -> None:
    async def main() -> None:
        stage = FakeStage(delay=0.02)
        batcher = StepBatcher(lambda: stage, Recorder(), active=lambda: 3)
        results: dict[str, list[list[float]]] = {}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(batcher.serve)

            async def one(sid: str, pos: int) -> None:
                results[sid] = (await batcher.step(sid, torch.zeros(1, 2), pos, last_only=False)).tolist()

            with trio.fail_after(5):
                async with trio.open_nursery() as steps:
                    for i, sid in enumerate("abc"):
                        steps.start_soon(one, sid, i)
            nursery.cancel_scope.cancel()
        assert results == {"a": [[0.0, 0.0]], "b": [[1.0, 1.0]], "c": [[2.0, 2.0]]}
        assert sorted(stage.forwards[0]) == ["a", "b", "c"] and len(stage.forwards) == 1

    trio.run(main)


@pytest.fixture
def worker(tmp_path: Path) -> Worker:
    return Worker(Identity.generate(), name="w", data_dir=tmp_path, device="cpu", memory=1 << 30, keep_warm=0)


def test_worker_compute_quick_runs_on_the_loop_thread_and_waits_for_a_forward_in_a_thread(
    worker: Worker,
) -> None:
    async def main() -> None:
        loop_thread = threading.get_ident()
        assert await worker.compute(threading.get_ident, quick=True) == loop_thread
        assert await worker.compute(threading.get_ident) != loop_thread
        order: list[str] = []

        def long() -> None:
            time.sleep(0.1)
            order.append("thread")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker.compute, long)
            await trio.sleep(0.02)  # the threaded forward holds the limiter now
            await worker.compute(lambda: order.append("quick"), quick=True)
        assert order == ["thread", "quick"]  # one forward at a time, whichever way it runs

    trio.run(main)
