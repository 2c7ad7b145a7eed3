"""The layer operations of `_ggmlops` reproduce llama.cpp bit for bit.

tests/fixtures/llamacpp_ops.npz holds inputs and outputs of one layer's rope, attention and gated activation
as llama.cpp computed them (benchmarks/llamacpp_tensors.py --ops-fixture), on Gemma 3 270M (GEGLU, q scaled
before attention, one KV head) and Qwen2.5-Coder-0.5B (SwiGLU, scale in the softmax, two KV heads), for a
batch of prompt tokens (llama.cpp's batched path) and for one decoded token (its single-token path).
"""

from __future__ import annotations

import math
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from engine_helpers import simd_set

_ggmlops = pytest.importorskip("eldric_p2p.engine._ggmlops", reason="the C extension is not built")

FIXTURE = Path(__file__).parent.parent / "fixtures" / "llamacpp_ops.npz"
# heads, KV heads, head size, rope base of the fixture's layer (a global one), score scale, activation
MODELS = {
    "gemma": dict(nh=4, nkv=1, hd=256, base=1000000.0, scale=1.0, act="geglu"),
    "qwen": dict(nh=14, nkv=2, hd=64, base=1000000.0, scale=0.125, act="swiglu"),
}
CASES = [(m, step) for m in MODELS for step in (0, 1)]


@pytest.fixture(scope="module")
def fx():
    return np.load(FIXTURE)


@pytest.fixture(params=["avx512", "avx2", "portable"], autouse=True)
def simd(request):
    """Each test runs with the AVX-512, the FMA/AVX2 and the portable code (the ones this CPU has): all must
    give llama.cpp's bits."""
    level = request.param if request.param != "portable" else False
    with simd_set(_ggmlops, level, f"this CPU cannot run the {request.param} code"):
        yield request.param


def _case(fx, model: str, step: int) -> dict[str, np.ndarray]:
    prefix = f"{model}/{step}/"
    return {k[len(prefix) :]: fx[k] for k in fx.files if k.startswith(prefix)}


@pytest.mark.parametrize("model,step", CASES)
def test_rms_norm_is_bit_exact(fx, model, step):
    c = _case(fx, model, step)
    eps = 1e-6
    out = np.zeros_like(c["norm_in"])
    _ggmlops.rms_norm(c["norm_in"], np.ones(c["norm_in"].shape[1], np.float32), out, eps)
    assert np.array_equal(out, c["norm_out"])
    # the torch fallback (CUDA, no C extension) computes the same bits
    from eldric_p2p.engine import ops

    with mock.patch.object(ops, "_ggmlops", None):
        ours = ops.rms_norm(torch.from_numpy(c["norm_in"]), torch.ones(out.shape[1]), eps)
    assert np.array_equal(ours.numpy(), c["norm_out"])


@pytest.mark.parametrize("model,step", CASES)
def test_rope_is_bit_exact(fx, model, step):
    c, m = _case(fx, model, step), MODELS[model]
    x = c["rope_in"].copy()
    pos0 = int(c["meta"][1])
    positions = np.arange(pos0, pos0 + len(x), dtype=np.int64)
    _ggmlops.rope(x, positions, m["nh"], m["hd"], m["hd"], m["base"], 1.0, True)
    assert np.array_equal(x, c["rope_out"])


def _attention(c: dict[str, np.ndarray], m: dict, pos0: int, ctx: int) -> np.ndarray:
    nkv, S, hd = c["k"].shape
    k = np.zeros((nkv, ctx, hd), np.float16)
    v = np.zeros((nkv, ctx, hd), np.float16)
    k[:, :S], v[:, :S] = c["k"], c["v"]
    T = len(c["q"])
    out = np.zeros((T, m["nh"] * hd), np.float32)
    _ggmlops.attention(c["q"], k.view(np.uint16), v.view(np.uint16), out, m["nh"], nkv, hd, pos0, ctx,
                       m["scale"], 0, T > 1)  # fmt: skip
    return out


@pytest.mark.parametrize("model,step", CASES)
@pytest.mark.parametrize("ctx", [None, 40])  # the cache's size and its unused tail change nothing
def test_attention_is_bit_exact(fx, model, step, ctx):
    c, m = _case(fx, model, step), MODELS[model]
    pos0 = int(c["meta"][1])
    out = _attention(c, m, pos0, ctx or c["k"].shape[1])
    assert np.array_equal(out, c["attn_out"])


@pytest.mark.parametrize("model,step", CASES)
def test_gated_activation_is_bit_exact(fx, model, step):
    c, m = _case(fx, model, step), MODELS[model]
    out = np.zeros_like(c["gate"])
    getattr(_ggmlops, m["act"])(c["gate"], c["up"], out)
    assert np.array_equal(out, c["act"])


def test_attention_matches_a_plain_softmax_attention():
    """Independent of the fixtures: causal and sliding-window masks, GQA, odd lengths, both orders."""
    g = torch.Generator().manual_seed(0)
    nh, nkv, hd, ctx = 6, 2, 64, 50
    for pos0, T, window in [(0, 7, 0), (13, 1, 0), (20, 9, 5), (0, 1, 0)]:
        S = pos0 + T
        q = torch.randn(T, nh, hd, generator=g)
        k = torch.randn(nkv, ctx, hd, generator=g).half()
        v = torch.randn(nkv, ctx, hd, generator=g).half()
        out = torch.empty(T, nh * hd)
        _ggmlops.attention(
            q.numpy(), k.numpy(), v.numpy(), out.numpy(), nh, nkv, hd, pos0, ctx, 0.125, window, T > 1
        )
        qpos = torch.arange(pos0, S)[:, None]
        kpos = torch.arange(S)[None, :]
        hidden = (kpos > qpos) | ((qpos - kpos >= window) if window else torch.zeros_like(kpos > qpos))
        kk = k[:, :S].float().repeat_interleave(nh // nkv, 0)  # [nh, S, hd]
        vv = v[:, :S].float().repeat_interleave(nh // nkv, 0)
        scores = torch.einsum("thd,hsd->hts", q.half().float(), kk) * 0.125
        p = torch.softmax(scores.masked_fill(hidden, -math.inf), -1)
        ref = torch.einsum("hts,hsd->thd", p, vv).reshape(T, -1)
        torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)


def test_activations_match_their_formulas_on_odd_lengths():
    g = torch.linspace(-12, 12, 1001)
    u = torch.linspace(2, -1, 1001)
    for name, ref, tol in (
        ("swiglu", F.silu(g) * u, 1e-5),
        ("geglu", F.gelu(g, approximate="tanh") * u, 3e-2),
    ):
        out = torch.empty_like(g)
        getattr(_ggmlops, name)(g.numpy(), u.numpy(), out.numpy())
        torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


def test_bad_sizes_are_errors():
    q = np.zeros((2, 4, 64), np.float32)
    kv = np.zeros((1, 8, 64), np.float16)
    out = np.zeros((2, 256), np.float32)
    with pytest.raises(ValueError):
        _ggmlops.attention(q, kv, kv, out, 4, 1, 64, 7, 8, 1.0, 0, True)  # 7 + 2 positions exceed the context
    with pytest.raises(ValueError):
        _ggmlops.attention(q, kv[:, :4], kv, out, 4, 1, 64, 0, 8, 1.0, 0, True)  # k is not [nkv, ctx, hd]
    with pytest.raises(ValueError):
        x5 = np.zeros((2, 5), np.float32)
        _ggmlops.rms_norm(x5, np.ones(4, np.float32), x5.copy(), 1e-6)  # rows are not a multiple of len(w)
    with pytest.raises(ValueError):
        _ggmlops.rope(np.zeros((2, 4, 64), np.float32), np.arange(3), 4, 64, 64, 1e4, 1.0, True)


def test_simd_and_portable_ops_are_bit_identical(simd):
    """The vector code computes each element with the portable code's operations: the same bits for inputs
    that reach every branch (the table's +-10 cut-offs, f16 subnormals, exponentials that overflow and
    underflow), odd lengths and the attention's masks, grouped heads, odd groups."""
    if simd == "portable":
        pytest.skip("compares each vector level with the portable code")
    rng = np.random.default_rng(3)
    edges = [-10.0, 10.0, 9.999, -9.999, 0.0, -0.0, 88.0, -88.0, 104.0, -104.0]
    g = np.concatenate([rng.standard_normal(997) * 4, rng.standard_normal(100) * 100, edges,
                        rng.standard_normal(50) * 1e-6])  # fmt: skip
    g = g.astype(np.float32)
    u = rng.standard_normal(len(g)).astype(np.float32)

    def both(fn):  # type: ignore[no-untyped-def]
        outs = []
        for level in (simd, False):
            _ggmlops.set_simd(level)
            outs.append(fn())
        _ggmlops.set_simd(simd)
        return outs

    for name in ("swiglu", "geglu"):
        for n in (len(g), 13, 8, 3):
            a, b = both(lambda name=name, n=n: _run_gated(name, g[:n], u[:n]))
            assert a.view(np.uint32).tolist() == b.view(np.uint32).tolist(), f"{name} {n}"
    for rows in (1, 3, 4, 5, 7, 8, 9, 12, 13, 16, 17, 38):  # 8 rows a vector pass, then 4, then one by one
        for n in (4, 12, 64, 256, 640, 7):  # 7: no 4-wide columns, the scalar sum
            x = (rng.standard_normal((rows, n)) * rng.choice([1e-3, 1.0, 30.0], (rows, 1))).astype(np.float32)
            w = rng.standard_normal(n).astype(np.float32)

            def norm(x=x, w=w, in_place=False):  # type: ignore[no-untyped-def]
                out = x.copy() if in_place else np.zeros_like(x)
                # in place too, as a fused layer's q and k norms are
                _ggmlops.rms_norm(out if in_place else x, w, out, 1e-6)
                return out

            for in_place in (False, True):
                a, b = both(lambda norm=norm, in_place=in_place: norm(in_place=in_place))
                assert a.view(np.uint32).tolist() == b.view(np.uint32).tolist(), f"rms_norm {rows}x{n}"
    for nh, nkv, hd, ctx, pos0, T, window in [
        (4, 2, 64, 80, 0, 9, 0), (4, 2, 64, 80, 30, 1, 0), (4, 2, 64, 80, 40, 13, 7), (4, 2, 64, 80, 0, 1, 0),
        (4, 2, 64, 80, 70, 3, 0), (7, 1, 32, 40, 5, 11, 0), (3, 3, 96, 40, 0, 17, 4),
    ]:  # fmt: skip
        q = rng.standard_normal((T, nh, hd)).astype(np.float32) * 3
        k = (rng.standard_normal((nkv, ctx, hd)) * 2).astype(np.float16)
        v = rng.standard_normal((nkv, ctx, hd)).astype(np.float16)

        def attend(q=q, k=k, v=v, T=T, pos0=pos0, window=window, nh=nh, nkv=nkv, hd=hd, ctx=ctx):  # type: ignore[no-untyped-def]
            out = np.zeros((T, nh * hd), np.float32)
            kb, vb = k.view(np.uint16), v.view(np.uint16)
            _ggmlops.attention(q, kb, vb, out, nh, nkv, hd, pos0, ctx, 0.125, window, T > 1)
            return out

        a, b = both(attend)
        assert a.view(np.uint32).tolist() == b.view(np.uint32).tolist(), (pos0, T, window)


def _run_gated(name: str, g: np.ndarray, u: np.ndarray) -> np.ndarray:
    out = np.zeros_like(g)
    getattr(_ggmlops, name)(g, u, out)
    return out
