"""The decode step a CUDA graph captures (engine/cuda_graph.py), run eagerly on the CPU: its position is a
device tensor, its attention spans the whole cache with the later rows masked; it must follow the dynamic
torch path it replaces."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from eldric_p2p.engine.cuda_graph import StaticDecode, graphs_enabled
from eldric_p2p.engine.generate import LocalModel
from eldric_p2p.engine.synthetic import write_synthetic_gguf


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_the_static_step_follows_the_dynamic_one(tmp_path: Path, arch: str) -> None:
    path = write_synthetic_gguf(tmp_path / "m.gguf", arch=arch, n_layers=4, hidden=128, ffn=256, n_heads=4,
                                n_kv_heads=2, seed=3)  # fmt: skip
    model = LocalModel(path, weights="f32", max_ctx=96, splits=(2,))
    for st in model.stages:
        st.exact_ops = False  # the torch path: what runs on CUDA
    prompt = [(7 * i + 3) % 50 + 1 for i in range(58)]  # decode crosses gemma3's 64-position window
    steps = 12

    def run(static: bool) -> tuple[list[int], list[torch.Tensor]]:
        for st in model.stages:
            st.open_session("s")
        logits = model.forward("s", prompt, 0, last_only=True)
        toks, out = [int(logits[-1].argmax())], []
        decoders = [StaticDecode(st, st.sessions["s"]) for st in model.stages]
        for pos in range(len(prompt), len(prompt) + steps):
            if static:
                x: torch.Tensor = torch.tensor([toks[-1]])
                for st, dec in zip(model.stages, decoders, strict=True):
                    dec.h.copy_(st._input(x))
                    dec.pos.fill_(pos)
                    x = dec.run()
                    st.sessions["s"].length = pos + 1
                logits = x
            else:
                logits = model.forward("s", [toks[-1]], pos, last_only=True)
            out.append(logits)
            toks.append(int(logits[-1].argmax()))
        for st in model.stages:
            st.close_session("s")
        return toks, out

    dyn_toks, dyn = run(static=False)
    st_toks, st = run(static=True)
    assert st_toks == dyn_toks
    for a, b in zip(st, dyn, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_graphs_only_on_cuda_with_dense_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    assert graphs_enabled(torch.device("cuda"), "bf16")
    assert not graphs_enabled(torch.device("cpu"), "f32")
    assert not graphs_enabled(torch.device("cuda"), "native")
    monkeypatch.setenv("ELDRIC_CUDA_GRAPHS", "0")
    assert not graphs_enabled(torch.device("cuda"), "bf16")
