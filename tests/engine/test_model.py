from __future__ import annotations

import pytest
import torch
from engine_helpers import greedy_logits

from eldric_p2p.data.gguf_index import GGUFFile
from eldric_p2p.engine.config import ModelConfig
from eldric_p2p.engine.model import Stage, estimate_stage_bytes
from eldric_p2p.engine.synthetic import write_synthetic_gguf
from eldric_p2p.engine.weights import native_available
from eldric_p2p.errors import InvalidInput, UnsupportedModel, UsageError

ARCHS = ["llama", "qwen2", "gemma3"]
WEIGHTS = ["f32", "bf16"] + (["native"] if native_available() else [])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    out = {}
    for arch in ARCHS:
        kw = dict(n_layers=4, hidden=256, ffn=512, n_heads=4, n_kv_heads=2, vocab=400, seed=7)
        if arch == "gemma3":
            kw.update(tied_embeddings=True)
        out[arch] = GGUFFile(write_synthetic_gguf(root / f"{arch}.gguf", arch=arch, **kw))
    return out


def run_split(src, splits, weights, prompt, steps):
    """Logits of a prefill plus `steps` greedy decode steps through stages cut at `splits`."""
    n = src.index.n_layers
    bounds = [0, *splits, n]
    stages = [Stage(src, a, b, weights=weights, max_ctx=64) for a, b in zip(bounds, bounds[1:], strict=False)]
    return greedy_logits(stages, prompt, steps)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("weights", WEIGHTS)
def test_any_split_gives_the_same_logits(models, arch, weights):
    src = models[arch]
    prompt = [5, 17, 42, 99, 3, 250, 7]
    ref = run_split(src, [], weights, prompt, steps=3)
    for splits in ([2], [1, 3], [1, 2, 3]):
        got = run_split(src, splits, weights, prompt, steps=3)
        for a, b in zip(ref, got, strict=True):
            assert torch.equal(a, b), f"{arch} {weights} split {splits} differs"
    assert ref[0].shape == (len(prompt), src.index.tensors["token_embd.weight"].shape[1])


@pytest.mark.parametrize("arch", ARCHS)
def test_incremental_decode_equals_full_prefill(models, arch):
    """Decoding token by token with the KV cache gives the logits a single prefill of the same ids gives."""
    src = models[arch]
    ids = [1, 2, 3, 4, 5, 6, 7, 8]
    full = Stage(src, 0, src.index.n_layers, weights="f32", max_ctx=32)
    full.open_session("a")
    ref = full.forward("a", torch.tensor(ids), 0)
    full.open_session("b")
    steps = [full.forward("b", torch.tensor([t]), i) for i, t in enumerate(ids)]
    # Only summation order differs (batched vs one row at a time), so the match is close, not exact.
    torch.testing.assert_close(torch.cat(steps), ref, rtol=1e-3, atol=1e-3)


def test_sessions_are_independent_and_truncate_rewinds(models):
    src = models["qwen2"]
    st = Stage(src, 0, src.index.n_layers, weights="f32", max_ctx=32)
    st.open_session("a")
    st.open_session("b")
    a1 = st.forward("a", torch.tensor([1, 2, 3]), 0)
    st.forward("b", torch.tensor([9, 9, 9, 9]), 0)
    a2 = st.forward("a", torch.tensor([4]), 3)
    st.truncate("a", 3)
    assert st.session_length("a") == 3
    a3 = st.forward("a", torch.tensor([4]), 3)
    assert torch.equal(a2, a3)
    st.close_session("a")
    with pytest.raises(InvalidInput, match="unknown session"):
        st.forward("a", torch.tensor([1]), 0)
    assert a1.shape[0] == 3


def test_bad_inputs_raise_specific_errors(models):
    src = models["llama"]
    n = src.index.n_layers
    head = Stage(src, 0, 3, weights="f32", max_ctx=8)
    tail = Stage(src, 3, n, weights="f32", max_ctx=8)
    head.open_session("s")
    tail.open_session("s")
    with pytest.raises(InvalidInput, match="outside the vocabulary"):
        head.forward("s", torch.tensor([1, 100_000]), 0)
    with pytest.raises(InvalidInput, match="outside the vocabulary"):
        head.forward("s", torch.tensor([-1]), 0)
    head.forward("s", torch.tensor([1, 2]), 0)
    with pytest.raises(InvalidInput, match="may not skip"):
        head.forward("s", torch.tensor([3]), 5)
    with pytest.raises(InvalidInput, match="may not skip"):
        head.forward("s", torch.tensor([3]), 1)
    with pytest.raises(InvalidInput, match="context overflow"):
        head.forward("s", torch.arange(7), 2)
    hidden = ModelConfig.from_index(src.index).hidden
    with pytest.raises(InvalidInput, match=r"must be \[T, "):
        tail.forward("s", torch.zeros(2, hidden + 1), 0)
    with pytest.raises(InvalidInput, match="float32"):
        tail.forward("s", torch.zeros(2, hidden, dtype=torch.float16), 0)
    with pytest.raises(InvalidInput, match="token ids"):
        head.forward("s", torch.zeros(1, hidden), 2)
    with pytest.raises(UsageError):
        Stage(src, 2, 2)
    with pytest.raises(UsageError):
        Stage(src, 0, n + 1)


def test_unsupported_architecture_is_refused_at_load(tmp_path, models):
    src = models["llama"]
    src.index.metadata["general.architecture"] = "mamba"
    try:
        with pytest.raises(UnsupportedModel, match="mamba"):
            Stage(src, 0, 1)
    finally:
        src.index.metadata["general.architecture"] = "llama"


def test_memory_estimate_tracks_format_and_context(models):
    src = models["qwen2"]
    ix = src.index
    n = ix.n_layers
    small = estimate_stage_bytes(ix, 0, n, weights="native", max_ctx=64, sessions=1)
    dense = estimate_stage_bytes(ix, 0, n, weights="f32", max_ctx=64, sessions=1)
    longer = estimate_stage_bytes(ix, 0, n, weights="native", max_ctx=1024, sessions=4)
    assert small < dense < dense * 10
    assert longer > small
    half = estimate_stage_bytes(
        ix, 1, 3, weights="f32", max_ctx=64, sessions=1
    )  # middle: no embedding, no head
    assert half < dense / 2


def test_sliding_window_hides_keys_older_than_the_window(tmp_path):
    path = write_synthetic_gguf(tmp_path / "g.gguf", arch="gemma3", n_layers=6, hidden=64, vocab=400, seed=3)
    src = GGUFFile(path)
    src.index.metadata["gemma3.attention.sliding_window"] = 4
    st = Stage(src, 0, 6, weights="f32", max_ctx=32)
    assert [layer.sliding for layer in st.layers] == [True] * 5 + [False]  # every 6th layer is global
    masks = st._masks(pos0=6, T=2)  # queries at 6, 7 over keys 0..7
    assert masks[True][0].tolist() == [True, True, True, False, False, False, False, True]
    assert masks[True][1].tolist() == [True, True, True, True, False, False, False, False]
    assert masks[False][1].tolist() == [False] * 8
    assert st._masks(pos0=2, T=1) == {False: None, True: None}  # one query inside the window: nothing hidden
    # incremental decode past the window still equals a single prefill
    ids = list(range(1, 13))
    st.open_session("a")
    ref = st.forward("a", torch.tensor(ids), 0)
    st.open_session("b")
    steps = torch.cat([st.forward("b", torch.tensor([t]), i) for i, t in enumerate(ids)])
    torch.testing.assert_close(steps, ref, rtol=1e-3, atol=1e-3)


def test_a_model_file_with_wrong_tensor_shapes_is_refused_at_load(tmp_path):
    """A hostile or broken file: tensors of the wrong shape are a clear error, not a torch crash mid-run."""
    from dataclasses import replace

    src = GGUFFile(write_synthetic_gguf(tmp_path / "m.gguf", arch="qwen2", n_layers=2, hidden=64, vocab=400))
    good = src.index.tensors["blk.1.ffn_up.weight"]
    src.index.tensors["blk.1.ffn_up.weight"] = replace(good, shape=(good.shape[1], good.shape[0]))
    with pytest.raises(UnsupportedModel, match=r"blk\.1\.ffn_up\.weight has shape"):
        Stage(src, 0, 2, weights="f32")
    Stage(src, 0, 1, weights="f32")  # the other layer alone still loads
    src.index.tensors["blk.1.ffn_up.weight"] = good
    del src.index.tensors["blk.0.attn_norm.weight"]
    with pytest.raises(UnsupportedModel, match="lacks tensor blk.0.attn_norm.weight"):
        Stage(src, 0, 1, weights="f32")


@pytest.mark.parametrize("weights", WEIGHTS)
def test_last_only_logits_equal_the_last_row(models, weights):
    src = models["qwen2"]
    st = Stage(src, 0, src.index.n_layers, weights=weights, max_ctx=32)
    st.open_session("a")
    st.open_session("b")
    full = st.forward("a", torch.tensor([3, 4, 5, 6]), 0)
    last = st.forward("b", torch.tensor([3, 4, 5, 6]), 0, last_only=True)
    assert last.shape == (1, full.shape[1])
    if weights == "native":  # the kernels compute each row alone: bit-identical
        assert torch.equal(last[0], full[-1])
    else:  # BLAS picks another summation order for one row than for four
        torch.testing.assert_close(last[0], full[-1], rtol=1e-4, atol=1e-4)
    assert st.session_length("b") == 4  # the whole input still went into the KV cache
