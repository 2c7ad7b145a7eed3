"""The engine on the two real reference models, checked against llama.cpp's recorded outputs.

The fixtures in tests/fixtures/llamacpp_*.json were written by benchmarks/llamacpp_reference.py from
llama.cpp (llama-cpp-python) on the same files, so these tests need no llama.cpp.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from eldric_p2p.engine.model import Stage
from eldric_p2p.gguf_index import GGUFFile

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


def teacher_forced_argmax(stage: Stage, ids: list[int]) -> list[int]:
    stage.open_session("t")
    try:
        return stage.forward("t", torch.tensor(ids), 0).argmax(-1).tolist()
    finally:
        stage.close_session("t")


# llama.cpp is not bit-reproducible across its own code paths: evaluating the fixture sequences in one batch
# instead of token by token moves its logits by up to 0.31 (mean 0.035) and flips 2 of 674 argmaxes on Qwen,
# and by up to 1.19 (mean 0.13) with 10 of 600 flipped on Gemma (2 threads, llama-cpp-python 0.3.36). A greedy
# continuation can therefore only be required to follow llama.cpp's until a step where llama.cpp's own top two
# logits are closer than that noise.
LLAMA_CPP_NOISE = {"qwen": 0.35, "gemma": 1.2}
MIN_AGREEMENT = {"qwen": 0.99, "gemma": 0.97}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen", "gemma"])
def test_greedy_continuations_equal_llama_cpp(name, request):
    src, stage = request.getfixturevalue(name)
    fx = fixture(name)
    n = 32  # every step up to the first near-tie is checked; after a divergence the contexts differ
    exact, near_tie_splits, real_splits = 0, [], []
    for p in fx["prompts"]:
        want = p["greedy_ids"][:n]
        got = greedy(stage, p["prompt_ids"], len(want))
        if got == want:
            exact += 1
            continue
        first = next(i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
        top = p["top_logits"][len(p["prompt_ids"]) - 1 + first]
        gap = top[0] - top[1]
        (near_tie_splits if gap < LLAMA_CPP_NOISE[name] else real_splits).append(
            (str(p["prompt"])[:40], first, round(gap, 3))
        )
    print(
        f"{name}: {exact}/{len(fx['prompts'])} greedy continuations identical for {n} tokens; "
        f"near-tie divergences (prompt, step, llama.cpp top-2 gap): {near_tie_splits}"
    )
    assert not real_splits, f"greedy leaves llama.cpp where it is not a near-tie: {real_splits}"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen", "gemma"])
def test_teacher_forced_argmax_agrees_with_llama_cpp(name, request):
    src, stage = request.getfixturevalue(name)
    fx = fixture(name)
    agree = total = 0
    for p in fx["prompts"]:
        ids = p["prompt_ids"] + p["greedy_ids"]
        ours = teacher_forced_argmax(stage, ids)
        theirs = [top[0] for top in p["top_ids"]]
        k = min(len(ours), len(theirs))
        agree += sum(a == b for a, b in zip(ours[:k], theirs[:k], strict=True))
        total += k
    assert total >= 500
    print(f"{name}: teacher-forced argmax agrees with llama.cpp at {agree}/{total} = {agree / total:.4f}")
    # llama.cpp agrees with itself (one batch vs token by token) at 672/674 on Qwen and only 590/600 = 0.983
    # on Gemma 3 270M, whose logits are large and sensitive; we hold Qwen to the 0.99 bar and Gemma to 0.97.
    assert agree / total >= MIN_AGREEMENT[name], f"argmax agreement {agree}/{total} = {agree / total:.4f}"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen", "gemma"])
def test_any_split_of_a_real_model_gives_the_same_logits(name, request):
    src, whole = request.getfixturevalue(name)
    n = src.index.n_layers
    prompt = [int(t) for t in fixture(name)["prompts"][0]["prompt_ids"]]

    def run(stages: list[Stage]) -> list[torch.Tensor]:
        for s in stages:
            s.open_session("split")
        outs, ids, pos = [], torch.tensor(prompt), 0
        try:
            for _ in range(4):  # prefill + 3 decode steps
                x = ids
                for s in stages:
                    x = s.forward("split", x, pos)
                outs.append(x)
                pos += len(ids)
                ids = x[-1:].argmax(-1)
        finally:
            for s in stages:
                s.close_session("split")
        return outs

    ref = run([whole])
    for k in (2, 3, 4):
        bounds = [round(i * n / k) for i in range(k + 1)]
        stages = [Stage(src, a, b, max_ctx=1024) for a, b in zip(bounds, bounds[1:], strict=False)]
        for a, b in zip(ref, run(stages), strict=True):
            assert torch.equal(a, b), f"{name}: {k} stages {bounds} differ from one stage"
