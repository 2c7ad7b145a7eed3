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


def prompts_and_steps_together(model: LocalModel, prompts: list[list[int]], steps: int) -> None:
    """Sessions start one after another: each new prompt is prefilled in the same forward as the decode
    steps of the sessions already running (and of the other new ones), as the batcher does; every session's
    logits equal its run alone."""
    alone: list[list[torch.Tensor]] = []
    for i, ids in enumerate(prompts):
        sid = f"alone{i}"
        for st in model.stages:
            st.open_session(sid)
        out = [model.forward(sid, ids, 0, last_only=True)]
        pos = len(ids)
        for _ in range(steps + len(prompts)):
            out.append(model.forward(sid, [int(out[-1][-1].argmax())], pos, last_only=True))
            pos += 1
        alone.append(out)
    running: dict[int, tuple[list[int], int]] = {}  # session -> (next input ids, position)
    got: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(prompts))}
    for tick in range(steps + len(prompts)):
        if tick < len(prompts):  # a new session joins with its prompt; and the next one too, every 2nd tick
            for j in (tick,) if tick % 2 else (tick, tick + 1)[: len(prompts) - tick]:
                if j not in running:
                    for st in model.stages:
                        st.open_session(f"b{j}")
                    running[j] = (prompts[j], 0)
        order = sorted(running)
        xs: list[torch.Tensor] = [torch.tensor(running[j][0], dtype=torch.int64) for j in order]
        for st in model.stages:
            xs = st.forward_batch([(f"b{j}", x, running[j][1]) for j, x in zip(order, xs, strict=True)])
        for j, logits in zip(order, xs, strict=True):
            got[j].append(logits)
            ids, pos = running[j]
            running[j] = ([int(logits[-1].argmax())], pos + len(ids))
    for i in range(len(prompts)):
        for k, logits in enumerate(got[i]):
            assert torch.equal(logits, alone[i][k]), f"session {i}, step {k}"


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_a_batch_of_sessions_equals_each_session_alone_synthetic(tmp_path: Path, arch: str) -> None:
    path = write_synthetic_gguf(tmp_path / "m.gguf", arch=arch, n_layers=4, hidden=256, ffn=512, n_heads=4,
                                n_kv_heads=2, tensor_types="Q4_K", seed=11)  # fmt: skip
    for splits in ((), (2,)):  # one stage, and two: hidden rows between stages batched too
        model = LocalModel(path, max_ctx=128, splits=splits)
        prompts = [[1, 5, 9], [7, 7, 7, 7, 3], [2], [11, 4, 8, 2, 19, 6], [3, 3], list(range(1, 14))]
        decode_both_ways(model, prompts, steps=6)
        prompts_and_steps_together(model, prompts, steps=3)  # 13 rows: the tiled path; 5, 6: the 4-row gemm


def test_the_reference_model_batched_equals_alone(qwen_path: Path) -> None:
    model = LocalModel(qwen_path, max_ctx=128)
    tok = model.tokenizer
    prompts = [tok.encode(p) for p in ("def add(a, b):", "The capital of France", "1, 2, 3, 4,", "Hello")]
    decode_both_ways(model, prompts, steps=4)
    prompts_and_steps_together(model, prompts, steps=2)


def test_a_batch_refuses_repeated_and_unknown_sessions(tmp_path: Path) -> None:
    path = write_synthetic_gguf(tmp_path / "m.gguf", arch="qwen2", seed=2)
    stage = Stage(path_source(path), 0, 4, max_ctx=32)
    stage.open_session("a")
    one = torch.tensor([1])
    with pytest.raises(InvalidInput, match="each session once"):
        stage.forward_batch([("a", one, 0), ("a", one, 0)])
    with pytest.raises(InvalidInput, match="unknown session"):
        stage.forward_batch([("b", one, 0)])


def path_source(path: Path):  # type: ignore[no-untyped-def]
    from eldric_p2p.data.gguf_index import GGUFFile

    return GGUFFile(path)
