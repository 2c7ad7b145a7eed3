"""The C kernels against a NumPy model of ggml's arithmetic, and bit for bit against llama.cpp's own kernels.

- `ref_qlinear` quantizes each activation row like llama.cpp's x86 quantize_row_q8_0/q8_1/q8_K, decodes the
  weight blocks into integers and scales, forms the exact integer block sums and combines them in float64: the
  kernels must agree to float32 summation-order error, and be close to a float matmul on dequantized weights.
- tests/fixtures/qmatmul_llamacpp.npz holds what llama.cpp's CPU kernels (the ggml library that
  llama-cpp-python ships: ggml_mul_mat, and the gemv/gemm of the Q4_K weights it repacks) return for small
  weights of every type with an exact kernel, on batches of 1, 6 and 13 rows (its vec_dot, llamafile, repacked
  and tiled paths). Both kernel sets must reproduce them exactly. `python tests/engine/test_qmatmul.py
  --write-fixture` rewrites the file (needs llama-cpp-python); the slow tests compare against those kernels
  directly when it is installed.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_helpers import simd_set
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from eldric_p2p.engine import qmatmul as qm
from eldric_p2p.engine.synthetic import F16_FIELDS
from eldric_p2p.errors import InvalidInput

T = GGMLQuantizationType

pytestmark = pytest.mark.skipif(
    not qm.kernels_available(),
    reason="eldric_p2p.engine._qkernels is not built (pip install -e . with a C compiler)",
)

SIMPLE = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]
KQUANTS = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
ALL = [T.F32, T.F16, *SIMPLE, *KQUANTS]
SIMD_MODES = ["portable", "avx2", "avx512"]


@pytest.fixture(params=SIMD_MODES)
def simd(request: pytest.FixtureRequest):
    """Run a test with the portable kernels, then the AVX2 ones, then the AVX-512 ones (each skipped on CPUs
    without those instructions)."""
    from eldric_p2p.engine import _qkernels

    level = request.param if request.param != "portable" else False
    with simd_set(_qkernels, level, f"this CPU cannot run the {request.param} kernels"):
        yield request.param


# --- reference: activation quantization (ggml-quants.c quantize_row_q8_*_ref)


def _f16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float32)


def ref_q8_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[T, n] float32 -> (qs [T, nb, 32] int64, d [T, nb] float32) as llama.cpp's x86 quantize_row_q8_0 makes
    them: d = fp16(amax / 127), q = x * (127 / amax) in float32, rounded half to even."""
    b = x.reshape(x.shape[0], -1, 32)
    amax = np.abs(b).max(axis=-1)  # float32
    with np.errstate(divide="ignore"):
        mult = np.where(amax == 0, np.float32(0), np.float32(127) / amax).astype(np.float32)
    qs = np.rint(b * mult[..., None]).astype(np.int64)  # np.rint: half to even
    return qs, _f16(amax / np.float32(127))


def ref_q8_1(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[T, n] -> (qs, d, s): Q8_0 plus s = fp16(sum(qs) * d) with the unrounded d."""
    qs, d = ref_q8_0(x)
    d_raw = np.abs(x.reshape(x.shape[0], -1, 32)).max(axis=-1) / np.float32(127)
    return qs, d, _f16(qs.sum(axis=-1).astype(np.float32) * d_raw)


def ref_q8_K(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[T, n] -> (qs [T, nb, 256], d [T, nb] float32, bsums [T, nb, 16]): the signed max maps to -127."""
    b = x.reshape(x.shape[0], -1, 256)
    idx = np.abs(b).argmax(axis=-1)
    mx = np.take_along_axis(b, idx[..., None], axis=-1)[..., 0]
    zero = mx == 0
    with np.errstate(divide="ignore"):
        iscale = np.where(zero, np.float32(0), np.float32(-127) / np.where(zero, 1, mx)).astype(np.float32)
    # np.rint rounds half to even, like ggml's nearest_int
    qs = np.minimum(np.rint(iscale[..., None] * b), 127).astype(np.int64)
    with np.errstate(divide="ignore"):
        d = np.where(zero, np.float32(0), np.float32(1) / np.where(zero, 1, iscale)).astype(np.float32)
    return qs, d, qs.reshape(*qs.shape[:2], 16, 16).sum(axis=-1)


# --- reference: weight decoding


def _blocks(raw: np.ndarray, qtype: GGMLQuantizationType, rows: int) -> np.ndarray:
    return raw.reshape(rows, -1, GGML_QUANT_SIZES[qtype][1])


def _hf(b: np.ndarray, off: int) -> np.ndarray:
    return b[..., off : off + 2].copy().view(np.float16)[..., 0].astype(np.float64)


def _nib(qs: np.ndarray) -> np.ndarray:
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int64)


def _bits(b4: np.ndarray) -> np.ndarray:
    """[..., 4] bytes of a little-endian u32 -> [..., 32] bits, bit j at index j."""
    return np.unpackbits(b4, axis=-1, bitorder="little").astype(np.int64)


def _k4_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[..., 12] -> 8 six-bit scales and 8 mins of Q4_K/Q5_K."""
    s = s.astype(np.int64)
    sc = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)], axis=-1)
    mn = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], axis=-1)
    return sc, mn


def ref_qlinear(
    x: np.ndarray, raw: np.ndarray, qtype: GGMLQuantizationType, rows: int
) -> tuple[np.ndarray, np.ndarray]:
    """ggml's CPU result for x [T, n] and weight rows -> (out [T, rows] float64, scale of its summands)."""
    if qtype in (T.F32, T.F16):
        w = raw.reshape(rows, -1).view(np.float32 if qtype == T.F32 else np.float16).astype(np.float64)
        xa = x.astype(np.float64) if qtype == T.F32 else _f16(x).astype(np.float64)
        return xa @ w.T, np.abs(xa) @ np.abs(w).T
    b = _blocks(raw, qtype, rows)  # [rows, nb, type_size]
    if qtype in SIMPLE:
        d = _hf(b, 0)
        if qtype == T.Q4_0:
            q = _nib(b[..., 2:]) - 8
        elif qtype == T.Q4_1:
            q = _nib(b[..., 4:])
        elif qtype == T.Q5_0:
            q = (_nib(b[..., 6:]) | (_bits(b[..., 2:6]) << 4)) - 16
        elif qtype == T.Q5_1:
            q = _nib(b[..., 8:]) | (_bits(b[..., 4:8]) << 4)
        else:
            q = b[..., 2:].view(np.int8).astype(np.int64)
        if qtype in (T.Q4_1, T.Q5_1):
            qx, dx, sx = ref_q8_1(x)
            mins = np.einsum("rb,tb->trb", _hf(b, 2), sx.astype(np.float64))
        else:
            qx, dx = ref_q8_0(x)
            mins = 0.0
        isum = np.einsum("rbj,tbj->trb", q, qx)
        terms = np.einsum("rb,tb->trb", d, dx.astype(np.float64)) * isum + mins
        return terms.sum(axis=-1), np.abs(terms).sum(axis=-1)

    qx, dx, bsums = ref_q8_K(x)
    nb = b.shape[1]
    minsum = 0
    if qtype == T.Q2_K:
        sc = b[..., 0:16].astype(np.int64)
        q2 = b[..., 16:80].reshape(rows, nb, 2, 1, 32)  # [rows, nb, half, 1, 32]
        q = (
            ((q2 >> np.array([0, 2, 4, 6]).reshape(1, 1, 1, 4, 1)) & 3)
            .astype(np.int64)
            .reshape(rows, nb, 256)
        )
        scales, sub = sc & 0x0F, 16
        minsum = np.einsum("rbj,tbj->trb", sc >> 4, bsums)
        d, dmin = _hf(b, 80), _hf(b, 82)
    elif qtype == T.Q3_K:
        hm, q3, s = b[..., 0:32], b[..., 32:96].reshape(rows, nb, 2, 1, 32), b[..., 96:108].astype(np.int64)
        lo = (
            ((q3 >> np.array([0, 2, 4, 6]).reshape(1, 1, 1, 4, 1)) & 3)
            .astype(np.int64)
            .reshape(rows, nb, 256)
        )
        hbit = np.unpackbits(hm, axis=-1, bitorder="little").reshape(rows, nb, 32, 8)  # [.., l, bit]
        hbit = hbit.transpose(0, 1, 3, 2).reshape(rows, nb, 256).astype(np.int64)  # element bit*32 + l
        q = lo - 4 * (1 - hbit)
        low4 = np.concatenate([s[..., 0:8] & 0x0F, s[..., 0:8] >> 4], axis=-1)  # [.., 16]
        high2 = (s[..., 8:12, None] >> np.array([0, 2, 4, 6])) & 3  # [.., byte j&3, shift j>>2]
        scales, sub = (low4 | (high2.transpose(0, 1, 3, 2).reshape(rows, nb, 16) << 4)) - 32, 16
        d, dmin = _hf(b, 108), None
    elif qtype in (T.Q4_K, T.Q5_K):
        five = qtype == T.Q5_K
        qs = b[..., 48:176] if five else b[..., 16:144]
        qs = qs.reshape(rows, nb, 4, 32)
        q = np.stack([qs & 0x0F, qs >> 4], axis=3).astype(np.int64).reshape(rows, nb, 256)
        if five:
            hbit = np.unpackbits(b[..., 16:48], axis=-1, bitorder="little").reshape(rows, nb, 32, 8)
            q = q + 16 * hbit.transpose(0, 1, 3, 2).reshape(rows, nb, 256).astype(np.int64)
        scales, mins = _k4_scales(b[..., 4:16])
        sub = 32
        minsum = np.einsum("rbj,tbj->trb", np.repeat(mins, 2, axis=-1), bsums)
        d, dmin = _hf(b, 0), _hf(b, 2)
    else:  # Q6_K
        ql = b[..., 0:128].reshape(rows, nb, 2, 2, 32).astype(np.int64)  # [.., half, 32-group, l]
        qh = b[..., 128:192].reshape(rows, nb, 2, 1, 32).astype(np.int64)
        # [.., half, nibble, group, l]: element nibble*64 + group*32 + l of the half
        low = np.stack([ql & 0x0F, ql >> 4], axis=3)
        high = (qh >> np.array([0, 2, 4, 6]).reshape(1, 1, 1, 4, 1)) & 3  # [.., half, 4, l]: element k*32 + l
        q = (low.reshape(rows, nb, 2, 128) | (high.reshape(rows, nb, 2, 128) << 4)) - 32
        q = q.reshape(rows, nb, 256)
        scales, sub = b[..., 192:208].view(np.int8).astype(np.int64), 16
        d, dmin = _hf(b, 208), None
    n_sub = 256 // sub
    part = np.einsum(
        "rbsl,tbsl->trbs", q.reshape(rows, nb, n_sub, sub), qx.reshape(*qx.shape[:2], n_sub, sub)
    )
    isum = np.einsum("trbs,rbs->trb", part, scales)
    dd = dx.astype(np.float64)
    terms = np.einsum("rb,tb->trb", d, dd) * isum
    if dmin is not None:
        terms = terms - np.einsum("rb,tb->trb", dmin, dd) * minsum
    return terms.sum(axis=-1), np.abs(terms).sum(axis=-1)


# --- weights


def _random_raw(qtype: GGMLQuantizationType, rows: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Random block bytes (every bit pattern) whose fp16 scale fields are finite, moderate, of either sign."""
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows * n // block, size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        vals = rng.uniform(0.002, 0.02, size=raw.shape[0]) * rng.choice([-1, 1], size=raw.shape[0])
        raw[:, off : off + 2] = vals.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


def _quantized(qtype: GGMLQuantizationType, rows: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Weights as a file holds them: random floats quantized by gguf-py (or the synthetic K quantizers)."""
    w = (rng.standard_normal((rows, n)) * 0.05).astype(np.float32)
    if qtype in (T.F32, T.F16):
        return w.astype(np.float32 if qtype == T.F32 else np.float16).view(np.uint8).reshape(rows, -1)
    if qtype in (T.Q4_K, T.Q6_K):
        from eldric_p2p.engine.synthetic import quantize_array

        return np.ascontiguousarray(quantize_array(w, qtype)).view(np.uint8).reshape(rows, -1)
    if qtype in SIMPLE:
        return gguf_quants.quantize(w, qtype).reshape(rows, -1)
    return _random_raw(qtype, rows, n, rng)


def _weights(
    qtype: GGMLQuantizationType, rows: int, n: int, rng: np.random.Generator, kind: str
) -> np.ndarray:
    if kind == "random" and qtype not in (T.F32, T.F16):
        return _random_raw(qtype, rows, n, rng)
    return _quantized(qtype, rows, n, rng)


def _activations(t: int, n: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((t, n)).astype(np.float32)
    x[:, 5] *= 8.0  # an outlier channel, as real hidden states have
    return x


def _run(
    x: np.ndarray, raw: np.ndarray, qtype: GGMLQuantizationType, rows: int, threads: int = 1
) -> np.ndarray:
    w = qm.QuantWeight.from_raw(raw, qtype, x.shape[1], rows)
    return qm.qlinear(torch.from_numpy(x), w, n_threads=threads).numpy()


def _in_features(qtype: GGMLQuantizationType) -> int:
    return 768 if qtype in KQUANTS else 224


# --- tests


def test_supports_every_type_the_engine_meets() -> None:
    for qtype in ALL:
        assert qm.supports(qtype), qtype.name
    assert not qm.supports(T.IQ2_XXS)
    assert not qm.supports(T.BF16)


@pytest.mark.parametrize("kind", ["quantized", "random"])
@pytest.mark.parametrize("t", [1, 5])
@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
def test_matches_ggml_reference_arithmetic(qtype: GGMLQuantizationType, t: int, kind: str, simd: str) -> None:
    rng = np.random.default_rng(1000 * int(qtype) + t)
    n, rows = _in_features(qtype), 37
    x = _activations(t, n, rng)
    raw = _weights(qtype, rows, n, rng, kind)
    got = _run(x, raw, qtype, rows)
    ref, scale = ref_qlinear(x, raw, qtype, rows)
    assert got.shape == (t, rows) and got.dtype == np.float32
    err = np.abs(got - ref)
    assert (err <= 1e-5 * scale + 1e-30).all(), f"max error / scale {np.max(err / scale):.3g}"


@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
def test_close_to_float_matmul_on_dequantized_weights(qtype: GGMLQuantizationType, simd: str) -> None:
    rng = np.random.default_rng(7 + int(qtype))
    n, rows = _in_features(qtype), 33
    x = _activations(3, n, rng)
    raw = _quantized(qtype, rows, n, rng)
    if qtype in (T.F32, T.F16):
        w = raw.view(np.float32 if qtype == T.F32 else np.float16).astype(np.float32)
    else:
        w = gguf_quants.dequantize(raw, qtype).reshape(rows, n)
    want = x.astype(np.float64) @ w.T.astype(np.float64)
    got = _run(x, raw, qtype, rows)
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    # fp16 activations; 8-bit activations in blocks of 32; in blocks of 256, where the outlier sets the step
    bound = {T.F32: 1e-6, T.F16: 1e-3}.get(qtype, 4e-2 if qtype in KQUANTS else 2e-2)
    assert rel < bound, f"relative error {rel:.3g}"


def test_fp16_activation_rounding_is_exact() -> None:
    """A 1x1 F16 weight of 1.0: each output is the activation rounded to fp16, which must equal numpy's
    rounding for normals, subnormals, exact ties, and values that overflow to inf."""
    rng = np.random.default_rng(3)
    bits = rng.integers(0, 1 << 32, size=4000, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32).copy()
    x[~np.isfinite(x)] = 1.0
    special = [65504.0, 65519.996, 65520.0, 1e9, 2.0**-24, 2.0**-25, 1.5 * 2.0**-25, -(2.0**-14), 1 + 2**-11]
    x = np.concatenate([x, special, rng.uniform(-1e-4, 1e-4, 500), rng.uniform(-7e4, 7e4, 500)])
    x = x.astype(np.float32).reshape(-1, 1)
    one = np.array([1.0], dtype=np.float16).view(np.uint8).reshape(1, 2)
    got = _run(x, one, T.F16, 1)
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(got, want)


def test_q8_0_activation_quantization_matches_ggml_x86() -> None:
    """Q8_0 weights that pick one element with scale 1: the output is the quantized activation itself. It
    must be llama.cpp's x86 rounding (multiplier 127/amax, half to even), not the portable reference's (1/d,
    roundf)."""
    rng = np.random.default_rng(4)
    n = 96
    x = _activations(6, n, rng)
    x[1, :32] = 0.0  # an all-zero block
    # amax 127 makes the scale exactly 1, so the k + 0.5 values are ties: half to even, where roundf goes away
    x[2, :32] = np.arange(32, dtype=np.float32) - 15.5
    x[2, 0] = -127.0
    blocks = np.zeros((n, n // 32, 34), dtype=np.uint8)
    blocks[..., :2] = np.array([1.0], dtype=np.float16).view(np.uint8)
    for r in range(n):
        blocks[r, r // 32, 2 + r % 32] = 1
    got = _run(x, blocks.reshape(n, -1), T.Q8_0, n)
    qs, d = ref_q8_0(x)
    want = (qs * d[..., None]).reshape(x.shape).astype(np.float32)
    np.testing.assert_array_equal(got, want)
    assert got[2, 16] == 0.0 and got[2, 17] == 2.0  # -0.5 -> 0 and 1.5 -> 2 (half to even)
    # where 1/d and 127/amax differ by an ulp, the two rules can part: the kernel follows 127/amax
    portable = gguf_quants.dequantize(gguf_quants.quantize(x, T.Q8_0), T.Q8_0).reshape(x.shape)
    assert not np.array_equal(got[2], portable[2])


def test_n_threads_do_not_change_results() -> None:
    rng = np.random.default_rng(5)
    for qtype in ALL:
        n, rows = _in_features(qtype), 101
        x = _activations(4, n, rng)
        raw = _weights(qtype, rows, n, rng, "random")
        np.testing.assert_array_equal(_run(x, raw, qtype, rows, 1), _run(x, raw, qtype, rows, 2))


@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
def test_rows_alone_gives_each_row_the_bits_of_its_own_single_row_call(
    qtype: GGMLQuantizationType, simd: str
) -> None:
    """Decode steps of 13 sessions batched into one call (the weights read once) equal 13 one-row calls, bit
    for bit; a batch computed the usual way may not (llama.cpp's 8+ row and repacked paths sum in another
    order)."""
    rng = np.random.default_rng(40 + int(qtype))
    n, rows = _in_features(qtype), 64  # 64 rows: a Q4_K weight llama.cpp repacks
    x = torch.from_numpy(_activations(13, n, rng))
    w = qm.QuantWeight.from_raw(_weights(qtype, rows, n, rng, "random"), qtype, n, rows)
    one_by_one = torch.cat([qm.qlinear(x[i : i + 1], w, n_threads=2) for i in range(13)])
    batched = qm.qlinear(x, w, n_threads=2, rows_alone=True)
    assert torch.equal(batched, one_by_one)


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K], ids=lambda q: q.name)
def test_segments_give_each_its_own_batch_bits(qtype: GGMLQuantizationType, simd: str) -> None:
    """Several sessions' prompts and steps in one call (`segments`) equal one call per segment, bit for
    bit: 13 rows take the tiled path, 6 the 4-row gemm plus the gemv, 1 the gemv (or vec_dot)."""
    rng = np.random.default_rng(70 + int(qtype))
    n, rows = _in_features(qtype), 64
    sizes = (13, 9, 1, 1, 1, 6, 8, 1, 9, 4)  # neighbours with the same path share tiles
    x = torch.from_numpy(_activations(sum(sizes), n, rng))
    w = qm.QuantWeight.from_raw(_weights(qtype, rows, n, rng, "random"), qtype, n, rows)
    parts, t = [], 0
    for k in sizes:
        parts.append(qm.qlinear(x[t : t + k], w, n_threads=2))
        t += k
    assert torch.equal(qm.qlinear(x, w, n_threads=2, segments=sizes), torch.cat(parts))
    with pytest.raises(ValueError, match="segments"):
        qm.qlinear(x, w, segments=(13, 1))
    with pytest.raises(ValueError, match="segments"):
        qm.qlinear(x, w, segments=(0, sum(sizes)))


def test_leading_dimensions_are_kept() -> None:
    rng = np.random.default_rng(6)
    raw = _quantized(T.Q8_0, 9, 64, rng)
    w = qm.QuantWeight.from_raw(raw, T.Q8_0, 64, 9)
    x = torch.from_numpy(rng.standard_normal((2, 3, 64)).astype(np.float32))
    y = qm.qlinear(x, w)
    assert y.shape == (2, 3, 9)
    torch.testing.assert_close(y[1, 2], qm.qlinear(x[1, 2], w), rtol=0, atol=0)
    assert qm.qlinear(torch.zeros((0, 64)), w).shape == (0, 9)


def test_wrong_sizes_raise_value_error_not_crash() -> None:
    from eldric_p2p.engine import _qkernels

    rng = np.random.default_rng(8)
    raw = _quantized(T.Q4_K, 3, 256, rng).reshape(-1)
    x = np.ones((2, 256), np.float32)
    out = np.zeros((2, 3), np.float32)
    _qkernels.qmatmul(x, raw, out, int(T.Q4_K), 256, 3, 1)
    with pytest.raises(ValueError, match="w has"):
        _qkernels.qmatmul(x, raw[:-1], out, int(T.Q4_K), 256, 3, 1)
    with pytest.raises(ValueError, match="w has"):
        _qkernels.qmatmul(x, raw, out, int(T.Q4_K), 256, 4, 1)
    with pytest.raises(ValueError, match="x has"):
        _qkernels.qmatmul(x.reshape(-1)[:-1], raw, out, int(T.Q4_K), 256, 3, 1)
    with pytest.raises(ValueError, match="out has"):
        _qkernels.qmatmul(x, raw, out[:1], int(T.Q4_K), 256, 3, 1)
    with pytest.raises(ValueError, match="multiple of 256"):
        _qkernels.qmatmul(x, raw, out, int(T.Q4_K), 128, 6, 1)
    with pytest.raises(TypeError):
        _qkernels.qmatmul(x.astype(np.float64), raw, out, int(T.Q4_K), 256, 3, 1)
    with pytest.raises(TypeError):
        _qkernels.qmatmul(x, raw, np.zeros((2, 3), np.int32), int(T.Q4_K), 256, 3, 1)
    with pytest.raises(NotImplementedError):
        _qkernels.qmatmul(x, raw, out, int(T.IQ2_XXS), 256, 3, 1)
    with pytest.raises((TypeError, BufferError)):
        _qkernels.qmatmul(x, raw, bytes(24), int(T.Q4_K), 256, 3, 1)  # read-only out


def test_quant_weight_checks_shape_and_wraps_without_copy() -> None:
    rng = np.random.default_rng(9)
    raw = _quantized(T.Q5_0, 4, 64, rng).reshape(-1)
    with pytest.raises(InvalidInput, match="needs 176 bytes"):
        qm.QuantWeight.from_raw(raw[:-2], T.Q5_0, 64, 4)
    with pytest.raises(InvalidInput, match="multiple of 32"):
        qm.QuantWeight.from_raw(raw, T.Q5_0, 48, 4)
    ro = memoryview(raw.tobytes())  # read-only, like an mmap view of the model file
    w = qm.QuantWeight.from_raw(ro, T.Q5_0, 64, 4)
    assert w.nbytes == 176 and w.data.shape == (4, 44)
    x = torch.from_numpy(_activations(2, 64, rng))
    with pytest.raises(InvalidInput):
        qm.qlinear(x.double(), w)
    with pytest.raises(InvalidInput):
        qm.qlinear(x[:, :32], w)


@pytest.mark.parametrize("level", ["avx2", "avx512"])
def test_simd_kernels_are_bit_identical_to_the_portable_ones(level: str) -> None:
    """The kernel sets implement the same float order independently: every output, every path (one to 13
    activation rows, repacked Q4_K or not, row counts that leave a chunk's last rows to the one-row kernels),
    equal to the bit."""
    from eldric_p2p.engine import _qkernels

    rng = np.random.default_rng(11)
    with simd_set(_qkernels, level, f"this CPU cannot run the {level} kernels"):
        for qtype in EXACT:
            n = _in_features(qtype)
            for rows in (16, 21, 66):
                raw = _weights(qtype, rows, n, rng, "random")
                x = _activations(13, n, rng)
                for t in (1, 2, 3, 5, 6, 7, 8, 13):
                    _qkernels.set_simd(level)
                    fast = _run(x[:t], raw, qtype, rows, threads=2)
                    _qkernels.set_simd(False)
                    np.testing.assert_array_equal(
                        fast, _run(x[:t], raw, qtype, rows), err_msg=f"{qtype.name} {t}"
                    )


def test_repacked_q4_k_follows_llama_cpp_rule() -> None:
    """Q4_K with a multiple of 8 rows takes llama.cpp's repacked order unless told otherwise; no other weight
    can."""
    rng = np.random.default_rng(12)
    x = torch.from_numpy(_activations(5, 256, rng))
    raw = _quantized(T.Q4_K, 16, 256, rng)
    auto = qm.qlinear(x, qm.QuantWeight.from_raw(raw, T.Q4_K, 256, 16))
    packed = qm.qlinear(x, qm.QuantWeight.from_raw(raw, T.Q4_K, 256, 16, repacked=True))
    plain = qm.qlinear(x, qm.QuantWeight.from_raw(raw, T.Q4_K, 256, 16, repacked=False))
    torch.testing.assert_close(auto, packed, rtol=0, atol=0)
    assert not torch.equal(auto, plain)  # same sums, other float order
    torch.testing.assert_close(auto, plain, rtol=1e-5, atol=1e-5)
    with pytest.raises(InvalidInput, match="does not repack"):
        qm.QuantWeight.from_raw(raw[:12], T.Q4_K, 256, 12, repacked=True)
    with pytest.raises(InvalidInput, match="does not repack"):
        qm.QuantWeight.from_raw(_quantized(T.Q6_K, 16, 256, rng), T.Q6_K, 256, 16, repacked=True)


# --- llama.cpp's own kernels: the checked-in fixture, and (slow) the library itself

# Types whose kernels reproduce llama.cpp's x86 AVX2 results bit for bit (Q2_K, Q3_K, F16, F32 do not).
EXACT = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K]
LLAMA_FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "qmatmul_llamacpp.npz"
FIXTURE_BATCHES = (1, 6, 13)  # vec_dot (llamafile for Q4_0/Q5_0/Q8_0), repacked gemm + gemv, tiled K-quants
# (name, type, in_features, rows, repacked): a Q4_K weight with a multiple of 8 rows is repacked by llama.cpp
FIXTURE_CASES = [
    ("q4_0", T.Q4_0, 256, 16, False),
    ("q4_1", T.Q4_1, 256, 16, False),
    ("q5_0", T.Q5_0, 256, 16, False),
    ("q5_1", T.Q5_1, 256, 16, False),
    ("q8_0", T.Q8_0, 256, 16, False),
    ("q4_k", T.Q4_K, 512, 20, False),
    ("q4_k_repacked", T.Q4_K, 512, 16, True),
    ("q5_k", T.Q5_K, 512, 16, False),
    ("q6_k", T.Q6_K, 512, 16, False),
]


class _LlamaCppKernels:
    """ggml's CPU kernels from llama-cpp-python's shared libraries, through ctypes."""

    class _Init(ctypes.Structure):
        _fields_ = [
            ("mem_size", ctypes.c_size_t),
            ("mem_buffer", ctypes.c_void_p),
            ("no_alloc", ctypes.c_bool),
        ]

    class _Tensor(ctypes.Structure):  # struct ggml_tensor, up to its name (what the repack reads)
        _fields_ = [
            ("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
            ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
            ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
            ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64),
            ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8),
        ]  # fmt: skip

    def __init__(self, lib_dir: str) -> None:
        vp, sz, i64, c_int = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64, ctypes.c_int
        mode = ctypes.RTLD_GLOBAL
        self.base = base = ctypes.CDLL(os.path.join(lib_dir, "libggml-base.so"), mode=mode)
        self.cpu = cpu = ctypes.CDLL(os.path.join(lib_dir, "libggml-cpu.so"), mode=mode)
        cpu.ggml_cpu_init()
        for name, res, args in [
            ("ggml_init", vp, [self._Init]), ("ggml_new_tensor_2d", vp, [vp, c_int, i64, i64]),
            ("ggml_mul_mat", vp, [vp, vp, vp]), ("ggml_new_graph", vp, [vp]),
            ("ggml_build_forward_expand", None, [vp, vp]), ("ggml_get_data", vp, [vp]),
            ("ggml_free", None, [vp]),
        ]:  # fmt: skip
            getattr(base, name).restype, getattr(base, name).argtypes = res, args
        cpu.ggml_graph_compute_with_ctx.argtypes = [vp, vp, c_int]
        cpu.quantize_row_q8_K.argtypes = [vp, vp, i64]
        cpu.ggml_quantize_mat_q8_K_4x8.argtypes = [vp, vp, i64]
        for f in (cpu.ggml_gemv_q4_K_8x8_q8_K, cpu.ggml_gemm_q4_K_8x8_q8_K):
            f.argtypes = [c_int, vp, sz, vp, vp, c_int, c_int]
        # ggml::cpu::repack::tensor_traits<block_q4_K, 8, 8, GGML_TYPE_Q8_K>::repack(tensor, data, size); it
        # does not use `this`
        self.repack = cpu[
            "_ZN4ggml3cpu6repack13tensor_traitsI10block_q4_KLl8ELl8EL9ggml_type15EE6repackEP11ggml_tensorPKvm"
        ]
        self.repack.argtypes, self.repack.restype = [vp, vp, vp, sz], c_int

    def mul_mat(self, x: np.ndarray, raw: np.ndarray, qtype: int, n: int) -> np.ndarray:
        """ggml_mul_mat with a plain weight, as llama.cpp runs every weight it does not repack."""
        x, raw = np.ascontiguousarray(x, np.float32), np.ascontiguousarray(raw)  # alive while copied
        b_, rows, t = self.base, raw.shape[0], x.shape[0]
        ctx = b_.ggml_init(self._Init(raw.nbytes + 3 * x.nbytes + (64 << 20), None, False))
        try:
            a = b_.ggml_new_tensor_2d(ctx, qtype, n, rows)
            b = b_.ggml_new_tensor_2d(ctx, int(T.F32), n, t)
            ctypes.memmove(b_.ggml_get_data(a), raw.ctypes.data, raw.nbytes)
            ctypes.memmove(b_.ggml_get_data(b), x.ctypes.data, x.nbytes)
            c = b_.ggml_mul_mat(ctx, a, b)
            graph = b_.ggml_new_graph(ctx)
            b_.ggml_build_forward_expand(graph, c)
            assert self.cpu.ggml_graph_compute_with_ctx(ctx, graph, 1) == 0
            out = ctypes.cast(b_.ggml_get_data(c), ctypes.POINTER(ctypes.c_float))
            return np.ctypeslib.as_array(out, shape=(t, rows)).copy()
        finally:
            b_.ggml_free(ctx)

    def repacked_q4_k(self, x: np.ndarray, raw: np.ndarray, n: int) -> np.ndarray:
        """llama.cpp's q4_K_8x8 path: activation rows in fours through its gemm, the rest through its gemv."""
        x, raw = np.ascontiguousarray(x, np.float32), np.ascontiguousarray(raw)
        t, rows, nb = x.shape[0], raw.shape[0], n // 256
        packed = np.zeros_like(raw)
        tensor = self._Tensor(type=int(T.Q4_K), data=packed.ctypes.data, name=b"w")
        tensor.ne[:] = [n, rows, 1, 1]
        assert self.repack(None, ctypes.addressof(tensor), raw.ctypes.data, raw.nbytes) == 0
        out = np.zeros((t, rows), np.float32)
        grouped = t - t % 4
        if grouped:
            xq = np.zeros((grouped // 4, nb * 1168), np.uint8)  # block_q8_Kx4
            for i in range(grouped // 4):
                self.cpu.ggml_quantize_mat_q8_K_4x8(x[4 * i : 4 * i + 4].ctypes.data, xq[i].ctypes.data, n)
            self.cpu.ggml_gemm_q4_K_8x8_q8_K(
                n, out.ctypes.data, rows, packed.ctypes.data, xq.ctypes.data, grouped, rows
            )
        for i in range(grouped, t):
            xq = np.zeros(nb * 292, np.uint8)  # block_q8_K
            row = np.zeros(rows, np.float32)
            self.cpu.quantize_row_q8_K(x[i].ctypes.data, xq.ctypes.data, n)
            self.cpu.ggml_gemv_q4_K_8x8_q8_K(
                n, row.ctypes.data, rows, packed.ctypes.data, xq.ctypes.data, 1, rows
            )
            out[i] = row
        return out

    def matmul(self, x: np.ndarray, raw: np.ndarray, qtype: int, n: int, repacked: bool) -> np.ndarray:
        return self.repacked_q4_k(x, raw, n) if repacked else self.mul_mat(x, raw, qtype, n)


@functools.cache
def _llama_cpp() -> _LlamaCppKernels:
    llama_cpp = pytest.importorskip("llama_cpp")
    try:
        return _LlamaCppKernels(os.path.join(os.path.dirname(llama_cpp.__file__), "lib"))
    except (OSError, AttributeError) as e:  # another build layout, or a ggml without these kernels
        pytest.skip(f"llama.cpp's ggml kernels are not reachable: {e}")


def _fixture_inputs() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(2024)
    x = _activations(max(FIXTURE_BATCHES), 512, rng) * np.float32(3.0)
    weights = {name: _weights(qtype, rows, n, rng, "random") for name, qtype, n, rows, _ in FIXTURE_CASES}
    return x, weights


def write_llama_cpp_fixture(path: Path = LLAMA_FIXTURE) -> None:
    """Record llama.cpp's outputs for FIXTURE_CASES (inputs included, so the test never regenerates them)."""
    kernels = _llama_cpp()
    x, weights = _fixture_inputs()
    arrays = {"x": x}
    for name, qtype, n, _rows, repacked in FIXTURE_CASES:
        arrays[f"{name}.w"] = weights[name]
        for t in FIXTURE_BATCHES:
            arrays[f"{name}.out{t}"] = kernels.matmul(x[:t, :n], weights[name], int(qtype), n, repacked)
    np.savez_compressed(path, **arrays)


@pytest.mark.parametrize("name, qtype, n, rows, repacked", FIXTURE_CASES, ids=[c[0] for c in FIXTURE_CASES])
def test_bit_exact_with_llama_cpp_fixture(name, qtype, n, rows, repacked, simd: str) -> None:
    data = np.load(LLAMA_FIXTURE)
    x, raw = data["x"], data[f"{name}.w"]
    for t in FIXTURE_BATCHES:
        w = qm.QuantWeight.from_raw(raw, qtype, n, rows, repacked=None if repacked else False)
        got = qm.qlinear(torch.from_numpy(x[:t, :n].copy()), w, n_threads=2).numpy()
        want = data[f"{name}.out{t}"]
        assert got.view(np.uint32).tolist() == want.view(np.uint32).tolist(), (
            f"{t} rows: {(got != want).sum()} differ"
        )


@pytest.mark.slow
def test_llama_cpp_fixture_is_current() -> None:
    """The checked-in outputs are what the installed llama.cpp computes (else rewrite them, see the module
    doc)."""
    kernels = _llama_cpp()
    data = np.load(LLAMA_FIXTURE)
    for name, qtype, n, _rows, repacked in FIXTURE_CASES:
        for t in FIXTURE_BATCHES:
            got = kernels.matmul(data["x"][:t, :n], data[f"{name}.w"], int(qtype), n, repacked)
            np.testing.assert_array_equal(got, data[f"{name}.out{t}"], err_msg=f"{name} {t} rows")


@pytest.mark.slow
@pytest.mark.parametrize("qtype", EXACT, ids=lambda q: q.name)
def test_bit_exact_with_llama_cpp_kernels(qtype: GGMLQuantizationType, simd: str) -> None:
    """Random weights (every bit pattern, and quantized floats), batches of 1 to 16 rows, both row counts."""
    kernels = _llama_cpp()
    rng = np.random.default_rng(100 + int(qtype))
    n = _in_features(qtype)
    for rows in (24, 36):  # a Q4_K weight with a multiple of 8 rows is repacked by llama.cpp
        for kind in ("random", "quantized"):
            raw = _weights(qtype, rows, n, rng, kind)
            repacked = qtype == T.Q4_K and rows % 8 == 0
            for t in range(1, 17):
                x = _activations(t, n, rng) * np.float32(rng.uniform(0.01, 30))
                got = _run(x, raw, qtype, rows, threads=2)
                want = kernels.matmul(x, raw, int(qtype), n, repacked)
                assert (got == want).all(), f"{kind} rows={rows} t={t}: {(got != want).sum()} differ"


if __name__ == "__main__":
    if sys.argv[1:] != ["--write-fixture"]:
        raise SystemExit("usage: python tests/engine/test_qmatmul.py --write-fixture")
    write_llama_cpp_fixture()
    print(f"wrote {LLAMA_FIXTURE} ({LLAMA_FIXTURE.stat().st_size} bytes)")
