"""Batched decode: one step of several sessions in one forward gives each session the bits of its own step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from eldric_p2p.engine.generate import LocalModel
from eldric_p2p.engine.model import Stage
from eldric_p2p.engine.synthetic import write_synthetic_gguf
from eldric_p2p.errors import InvalidInput


def decode_both_ways(model: LocalModel, prompts: list[list[int]], steps: int) -> None:
    """Greedy decode of every prompt, the sessions one at a time and then batched step by step (the prompts
    are prefilled alone, as the worker does); the logits must be equal at every step."""
    alone: list[list[torch.Tensor]] = []
    for i, ids in enumerate(prompts):
        sid = f"alone{i}"
        for st in model.stages:
            st.open_session(sid)
        logits = model.forward(sid, ids, 0, last_only=True)
        out = [logits]
        tok, pos = int(logits[-1].argmax()), len(ids)
        for _ in range(steps):
            logits = model.forward(sid, [tok], pos, last_only=True)
            out.append(logits)
            tok, pos = int(logits[-1].argmax()), pos + 1
        alone.append(out)
        for st in model.stages:
            st.close_session(sid)
    sids = [f"batch{i}" for i in range(len(prompts))]
    toks, first = [], []
    for sid, ids in zip(sids, prompts, strict=True):
        for st in model.stages:
            st.open_session(sid)
        logits = model.forward(sid, ids, 0, last_only=True)
        first.append(logits)
        toks.append(int(logits[-1].argmax()))
    for i in range(len(prompts)):
        assert torch.equal(first[i], alone[i][0])
    pos = [len(ids) for ids in prompts]
    for step in range(steps):
        xs: list[torch.Tensor] = [torch.tensor([t], dtype=torch.int64) for t in toks]
        for st in model.stages:
            xs = st.forward_batch([(sid, x, p) for sid, x, p in zip(sids, xs, pos, strict=True)])
        for i, logits in enumerate(xs):
            assert torch.equal(logits, alone[i][step + 1]), f"session {i}, step {step}"
        toks = [int(lg[-1].argmax()) for lg in xs]
        pos = [p + 1 for p in pos]


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_a_batch_of_sessions_equals_each_session_alone_synthetic(tmp_path: Path, arch: str) -> None:
    path = write_synthetic_gguf(tmp_path / "m.gguf", arch=arch, n_layers=4, hidden=256, ffn=512, n_heads=4,
                                n_kv_heads=2, tensor_types="Q4_K", seed=11)  # fmt: skip
    for splits in ((), (2,)):  # one stage, and two: hidden rows between stages batched too
        model = LocalModel(path, max_ctx=128, splits=splits)
        decode_both_ways(model, [[1, 5, 9], [7, 7, 7, 7, 3], [2], [11, 4, 8, 2, 19, 6], [3, 3]], steps=6)


def test_the_reference_model_batched_equals_alone(qwen_path: Path) -> None:
    model = LocalModel(qwen_path, max_ctx=128)
    tok = model.tokenizer
    prompts = [tok.encode(p) for p in ("def add(a, b):", "The capital of France", "1, 2, 3, 4,", "Hello")]
    decode_both_ways(model, prompts, steps=4)


def test_a_batch_refuses_repeated_sessions_and_multi_token_steps(tmp_path: Path) -> None:
    path = write_synthetic_gguf(tmp_path / "m.gguf", arch="qwen2", seed=2)
    stage = Stage(path_source(path), 0, 4, max_ctx=32)
    stage.open_session("a")
    one = torch.tensor([1])
    with pytest.raises(InvalidInput, match="each session once"):
        stage.forward_batch([("a", one, 0), ("a", one, 0)])
    with pytest.raises(InvalidInput, match="one position"):
        stage.forward_batch([("a", torch.tensor([1, 2]), 0)])
    with pytest.raises(InvalidInput, match="unknown session"):
        stage.forward_batch([("b", one, 0)])


def path_source(path: Path):  # type: ignore[no-untyped-def]
    from eldric_p2p.data.gguf_index import GGUFFile

    return GGUFFile(path)
