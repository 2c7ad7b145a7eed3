"""The CUDA path of the engine against the CPU (dense weights on both): skipped where no GPU is present.

Run on a CUDA machine with `python -m pytest tests/engine/test_cuda.py`; `benchmarks/bench_gpu.py` does the
same on the reference models and times it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from eldric_p2p.engine.generate import LocalModel
from eldric_p2p.engine.synthetic import write_synthetic_gguf

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def greedy(model: LocalModel, ids: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    for st in model.stages:
        st.open_session("s")
    try:
        logits = model.forward("s", ids, 0, last_only=True)
        toks, out = [], [logits.float().cpu()]
        for _ in range(steps):
            toks.append(int(logits[-1].argmax()))
            logits = model.forward("s", [toks[-1]], len(ids) + len(toks) - 1, last_only=True)
            out.append(logits.float().cpu())
        return toks, out
    finally:
        for st in model.stages:
            st.close_session("s")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_cuda_f32_follows_the_cpu(tmp_path: Path, arch: str) -> None:
    path = write_synthetic_gguf(tmp_path / "m.gguf", arch=arch, n_layers=4, hidden=256, ffn=512, n_heads=4,
                                n_kv_heads=2, tensor_types="Q4_K", seed=5)  # fmt: skip
    prompt = [1, 9, 4, 22, 7, 3, 15]
    cpu_toks, cpu_logits = greedy(LocalModel(path, weights="f32", max_ctx=128), prompt, 12)
    gpu = LocalModel(path, device="cuda", weights="f32", max_ctx=128)
    gpu_toks, gpu_logits = greedy(gpu, prompt, 12)
    assert gpu_toks == cpu_toks
    for a, b in zip(gpu_logits, cpu_logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    split = LocalModel(path, device="cuda", weights="f32", max_ctx=128, splits=(2,))
    split_toks, split_logits = greedy(split, prompt, 12)
    assert split_toks == gpu_toks
    for a, b in zip(split_logits, gpu_logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_cuda_bf16_batch_follows_each_session_alone(tmp_path: Path) -> None:
    path = write_synthetic_gguf(tmp_path / "m.gguf", arch="qwen2", n_layers=4, hidden=256, ffn=512, n_heads=4,
                                n_kv_heads=2, tensor_types="Q4_K", seed=6)  # fmt: skip
    model = LocalModel(path, device="cuda", weights="bf16", max_ctx=128)
    stage = model.stages[0]
    prompts = [[1, 5, 9], [7, 7, 7, 7, 3], [2], [11, 4, 8, 2, 19, 6]]
    runs = [greedy(model, p, 6) for p in prompts]  # each session alone: its tokens and logits
    sids = [f"b{i}" for i in range(len(prompts))]
    for sid in sids:
        stage.open_session(sid)
    outs = stage.forward_batch([(sid, torch.tensor(p), 0) for sid, p in zip(sids, prompts, strict=True)])
    pos = [len(p) for p in prompts]
    for step in range(6):
        for i, lg in enumerate(outs):
            torch.testing.assert_close(lg.float().cpu(), runs[i][1][step], rtol=2e-2, atol=2e-2)
        toks = [run[0][step] for run in runs]  # the tokens each session chose alone (bf16 near-ties)
        steps = [(sid, torch.tensor([t]), p) for sid, t, p in zip(sids, toks, pos, strict=True)]
        outs = stage.forward_batch(steps)
        pos = [p + 1 for p in pos]


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_cuda_graph_steps_follow_the_eager_ones(
    tmp_path: Path, arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_synthetic_gguf(tmp_path / "m.gguf", arch=arch, n_layers=4, hidden=256, ffn=512, n_heads=4,
                                n_kv_heads=2, tensor_types="Q4_K", seed=7)  # fmt: skip
    prompt = [(5 * i + 1) % 40 + 1 for i in range(60)]  # decode crosses gemma3's 64-position window
    graphs = LocalModel(path, device="cuda", weights="f32", max_ctx=96, splits=(2,))
    assert all(st.graphs is not None for st in graphs.stages)
    g_toks, g_logits = greedy(graphs, prompt, 16)
    assert all("s" not in st.graphs for st in graphs.stages)  # dropped with the session
    monkeypatch.setenv("ELDRIC_CUDA_GRAPHS", "0")
    eager = LocalModel(path, device="cuda", weights="f32", max_ctx=96, splits=(2,))
    assert all(st.graphs is None for st in eager.stages)
    e_toks, e_logits = greedy(eager, prompt, 16)
    assert g_toks == e_toks
    for a, b in zip(g_logits, e_logits, strict=True):  # the graph's softmax spans the whole masked cache:
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)  # another summation order (1.3e-4 seen, H200)
