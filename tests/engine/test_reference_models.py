"""The engine on the two real reference models, checked against llama.cpp's recorded outputs.

The fixtures in tests/fixtures/llamacpp_*.json were written by benchmarks/llamacpp_reference.py from
llama.cpp (llama-cpp-python) on the same files, so these tests need no llama.cpp.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from engine_helpers import greedy_logits

from eldric_p2p.data.gguf_index import GGUFFile
from eldric_p2p.engine.model import Stage

FIXTURES = Path(__file__).parent.parent / "fixtures"
pytestmark = [pytest.mark.models]


def fixture(name: str) -> dict:
    path = FIXTURES / f"llamacpp_{name}.json"
    if not path.exists():
        pytest.skip(f"{path.name} missing: run benchmarks/llamacpp_reference.py")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def qwen(qwen_path):
    src = GGUFFile(qwen_path)
    return src, Stage(src, 0, src.index.n_layers, max_ctx=1024)


@pytest.fixture(scope="module")
def gemma(gemma_path):
    src = GGUFFile(gemma_path)
    return src, Stage(src, 0, src.index.n_layers, max_ctx=1024)


def greedy(stage: Stage, prompt: list[int], n: int) -> list[int]:
    stage.open_session("g")
    try:
        logits = stage.forward("g", torch.tensor(prompt), 0)
        out = [int(logits[-1].argmax())]
        for i in range(n - 1):
            logits = stage.forward("g", torch.tensor(out[-1:]), len(prompt) + i)
            out.append(int(logits[-1].argmax()))
        return out
    finally:
        stage.close_session("g")


def teacher_forced_logits(stage: Stage, prompt: list[int], continuation: list[int]) -> torch.Tensor:
    """Logits at every position, evaluated the way the fixture's llama.cpp run did: the prompt in one batch,
    then llama.cpp's own continuation one token at a time (its batched and single-token paths differ)."""
    stage.open_session("t")
    try:
        rows = [stage.forward("t", torch.tensor(prompt), 0)]
        for i, tok in enumerate(continuation[:-1]):
            rows.append(stage.forward("t", torch.tensor([tok]), len(prompt) + i))
        return torch.cat(rows)
    finally:
        stage.close_session("t")


# The engine reproduces llama.cpp's CPU arithmetic bit for bit (activation quantization, every matmul path,
# norms, rope, attention, activations), so greedy continuations are identical and logits equal llama.cpp's up
# to the 4 decimals the fixture keeps (half a unit of the 4th decimal, plus float32 spacing near |x| ~ 30).
MAX_LOGIT_DELTA = 6e-5


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen", "gemma"])
def test_greedy_continuations_equal_llama_cpp(name, request):
    src, stage = request.getfixturevalue(name)
    fx = fixture(name)
    n = 32
    splits = []
    for p in fx["prompts"]:
        want = p["greedy_ids"][:n]
        got = greedy(stage, p["prompt_ids"], len(want))
        if got != want:
            first = next(i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
            splits.append((str(p["prompt"])[:40], first))
    same = len(fx["prompts"]) - len(splits)
    print(f"{name}: {same}/{len(fx['prompts'])} greedy continuations identical for {n} tokens")
    assert not splits, f"greedy leaves llama.cpp's continuation at (prompt, step): {splits}"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen", "gemma"])
def test_teacher_forced_argmax_agrees_with_llama_cpp(name, request):
    src, stage = request.getfixturevalue(name)
    fx = fixture(name)
    agree = total = 0
    deltas = []
    for p in fx["prompts"]:
        logits = teacher_forced_logits(stage, p["prompt_ids"], p["greedy_ids"])
        top_ids = torch.tensor(p["top_ids"])  # [T, 5], llama.cpp's best first
        k = min(len(logits), len(top_ids))
        agree += int((logits[:k].argmax(-1) == top_ids[:k, 0]).sum())
        total += k
        ours = logits[:k].gather(1, top_ids[:k])  # our logits of llama.cpp's top-5 tokens
        deltas.append((ours - torch.tensor(p["top_logits"])[:k]).abs())
    delta = torch.cat(deltas)
    assert total >= 500
    print(
        f"{name}: teacher-forced argmax agrees with llama.cpp at {agree}/{total} = {agree / total:.4f}; "
        f"|logit - llama.cpp's| over its top-5: mean {delta.mean():.2e}, max {delta.max():.2e}"
    )
    assert agree == total, f"argmax agreement {agree}/{total} = {agree / total:.4f}"
    assert float(delta.max()) <= MAX_LOGIT_DELTA


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen", "gemma"])
def test_any_split_of_a_real_model_gives_the_same_logits(name, request):
    src, whole = request.getfixturevalue(name)
    n = src.index.n_layers
    prompt = [int(t) for t in fixture(name)["prompts"][0]["prompt_ids"]]

    ref = greedy_logits([whole], prompt, steps=3, sid="split")  # prefill + 3 decode steps
    for k in (2, 3, 4):
        bounds = [round(i * n / k) for i in range(k + 1)]
        stages = [Stage(src, a, b, max_ctx=1024) for a, b in zip(bounds, bounds[1:], strict=False)]
        for a, b in zip(ref, greedy_logits(stages, prompt, steps=3, sid="split"), strict=True):
            assert torch.equal(a, b), f"{name}: {k} stages {bounds} differ from one stage"
