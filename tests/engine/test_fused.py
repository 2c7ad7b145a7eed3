"""The fused layers (`_qkernels.layers`, one C call per forward) compute what the layers in torch glue
(`Stage._layer` over the kernels and `_ggmlops`) compute, bit for bit: prompts, decode steps, several
sessions in one batch, sliding windows, biases, q/k norms and post norms, the weight types with a kernel."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_helpers import simd_set

from eldric_p2p.data.gguf_index import GGUFFile
from eldric_p2p.engine.model import Stage
from eldric_p2p.engine.synthetic import write_synthetic_gguf
from eldric_p2p.engine.weights import native_available

pytestmark = pytest.mark.skipif(not native_available(), reason="the C kernels are not built")

TYPES = {
    "default": None,  # Q5_0, Q8_0, Q4_K, F16, Q6_K: the reference models' mix
    "q4_k": "Q4_K",  # repacked Q4_K everywhere: the 4-row gemm and the gemv
    "mixed": {
        "attn_q": "Q4_0",
        "attn_k": "Q5_1",
        "attn_v": "Q4_1",
        "attn_output": "Q8_0",
        "ffn_gate": "Q6_K",
        "ffn_up": "F16",
        "ffn_down": "F32",
    },  # fmt: skip
}


def run(stage: Stage, fused: bool, prompts: list[list[int]], steps: int) -> list[torch.Tensor]:
    """Each prompt alone, then `steps` decode steps of all the sessions batched together; every logit row."""
    stage.fused = fused
    sids = [f"s{i}" for i in range(len(prompts))]
    out = []
    for sid, ids in zip(sids, prompts, strict=True):
        stage.open_session(sid)
        out.append(stage.forward(sid, torch.tensor(ids), 0))
    toks = [int(o[-1].argmax()) for o in out]
    pos = [len(p) for p in prompts]
    for _ in range(steps):
        batch = [(sid, torch.tensor([t]), p) for sid, t, p in zip(sids, toks, pos, strict=True)]
        logits = stage.forward_batch(batch, last_only=False)
        out += logits
        toks = [int(lg[-1].argmax()) for lg in logits]
        pos = [p + 1 for p in pos]
    # a new prompt batched with a decode step of a running session
    stage.open_session("late")
    late = [("late", torch.tensor(prompts[0][:9]), 0), (sids[0], torch.tensor([1]), pos[0])]
    out += stage.forward_batch(late, last_only=False)
    for sid in [*sids, "late"]:
        stage.close_session(sid)
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("types", list(TYPES))
@pytest.mark.parametrize("level", ["avx2", "avx512"])
def test_fused_layers_equal_the_torch_glue(tmp_path: Path, arch: str, types: str, level: str) -> None:
    from eldric_p2p.engine import _qkernels

    with simd_set(_qkernels, level, f"this CPU cannot run the {level} kernels"):
        fused_equals_glue(tmp_path, arch, types)


def fused_equals_glue(tmp_path: Path, arch: str, types: str) -> None:
    path = write_synthetic_gguf(tmp_path / "m.gguf", arch=arch, n_layers=3, hidden=256, ffn=512, n_heads=4,
                                n_kv_heads=2, vocab=400, tensor_types=TYPES[types], seed=5)  # fmt: skip
    src = GGUFFile(path)
    if arch == "gemma3":
        src.index.metadata["gemma3.attention.sliding_window"] = 6  # hides keys of the longer prompts
    prompts = [list(range(3, 16)), [7, 8, 9, 10, 11], [42], [5, 6, 7, 8, 9, 10, 11, 12]]
    for threads in (1, 2):
        stage = Stage(src, 0, 3, weights="native", max_ctx=64, threads=threads)
        assert stage.fused, "native weights with the exact ops run fused"
        ref = run(stage, False, prompts, steps=4)
        got = run(stage, True, prompts, steps=4)
        for i, (a, b) in enumerate(zip(ref, got, strict=True)):
            assert torch.equal(a, b), f"{arch} {types} threads={threads}: output {i} differs"


def test_a_hidden_state_input_is_not_written_to(tmp_path: Path) -> None:
    """A middle stage gets float32 rows from the previous one; the fused layers work on a copy."""
    src = GGUFFile(write_synthetic_gguf(tmp_path / "m.gguf", arch="qwen2", n_layers=4, hidden=256, ffn=512))
    stage = Stage(src, 2, 4, weights="native", max_ctx=32)
    stage.open_session("a")
    x = torch.randn(3, 256)
    before = x.clone()
    stage.forward("a", x, 0)
    assert torch.equal(x, before)
