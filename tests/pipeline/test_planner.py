"""Planner (pure): contiguous layer ranges over the workers' free memory, and the numbers when none fits."""

from __future__ import annotations

import pytest

from eldric_p2p.data.gguf_index import GGUFIndex, read_index
from eldric_p2p.engine.model import estimate_stage_bytes
from eldric_p2p.engine.synthetic import write_synthetic_gguf
from eldric_p2p.errors import UsageError
from eldric_p2p.pipeline.planner import PlanDoesNotFit, WorkerView, plan_layers

MiB = 1 << 20


@pytest.fixture(scope="module")
def index24(tmp_path_factory: pytest.TempPathFactory) -> GGUFIndex:
    path = tmp_path_factory.mktemp("m") / "m24.gguf"
    write_synthetic_gguf(
        path, arch="qwen2", n_layers=24, hidden=64, ffn=128, vocab=32768
    )  # a large vocabulary: embedding and output dwarf a layer
    return read_index(path)


def worker(name: str, free: int) -> WorkerView:
    return WorkerView(name, f"id-{name}", f"http://{name}", name, 1, "cpu", "native", free, free)


def spans(plan: list) -> list[tuple[str, int, int]]:
    return [(p.worker.name, p.start, p.end) for p in plan]


def test_proportional_split_follows_offered_memory(index24: GGUFIndex) -> None:
    plan, note = plan_layers(index24, [worker("a", 24 * MiB), worker("b", 16 * MiB), worker("c", 24 * MiB)])
    assert spans(plan) == [("a", 0, 9), ("b", 9, 15), ("c", 15, 24)]
    assert "proportion" in note
    assert all(p.needed == estimate_stage_bytes(index24, p.start, p.end) for p in plan)
    plan, _ = plan_layers(index24, [worker("a", 10 * MiB), worker("b", 30 * MiB)])
    assert spans(plan) == [("a", 0, 6), ("b", 6, 24)]


def test_split_shifts_layers_off_the_head_when_the_embedding_would_not_fit(index24: GGUFIndex) -> None:
    # equal memory, but the head also holds the embedding and the tail the output matrix: 8/8/8 cannot fit
    kv = {"max_ctx": 64, "sessions": 1}
    free = max(estimate_stage_bytes(index24, 0, 4, **kv), estimate_stage_bytes(index24, 20, 24, **kv)) + 1
    assert estimate_stage_bytes(index24, 0, 8, **kv) > free
    plan, note = plan_layers(index24, [worker("a", free), worker("b", free), worker("c", free)], **kv)
    assert "adjusted" in note and all(p.needed <= p.worker.free for p in plan)
    assert [p.end - p.start for p in plan][1] > 8  # the middle, without embedding or output, takes more


def test_fewest_hops_uses_the_fewest_workers_that_fit(index24: GGUFIndex) -> None:
    whole = estimate_stage_bytes(index24, 0, 24)
    ws = [worker("small", whole // 3), worker("big", whole + MiB), worker("mid", whole // 2)]
    plan, _ = plan_layers(index24, ws, strategy="fewest-hops")
    assert spans(plan) == [("big", 0, 24)]
    ws = [worker("x", int(whole * 0.6)), worker("y", int(whole * 0.7)), worker("z", whole // 10)]
    plan, _ = plan_layers(index24, ws, strategy="fewest-hops")
    assert sorted(p.worker.name for p in plan) == ["x", "y"]


def test_refusal_carries_the_numbers(index24: GGUFIndex) -> None:
    with pytest.raises(PlanDoesNotFit) as info:
        plan_layers(index24, [worker("a", MiB), worker("b", 2 * MiB)], max_ctx=1024, sessions=8)
    d = info.value.details
    assert d["needed"] == estimate_stage_bytes(index24, 0, 24, max_ctx=1024, sessions=8)
    assert d["free"] == 3 * MiB and [w["name"] for w in d["workers"]] == ["a", "b"]
    assert "8 sessions x 1024 tokens" in str(info.value) and "3.00 MiB free in total" in str(info.value)
    with pytest.raises(UsageError):
        plan_layers(index24, [worker("a", MiB)], strategy="fastest")

