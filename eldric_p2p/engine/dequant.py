"""Dequantization of GGUF block formats into torch tensors, bit-exact with gguf-py.

Each block kernel mirrors the float32 arithmetic of `gguf.quants.<TYPE>.dequantize_blocks` operation for
operation (the same products, in the same order, with no fused multiply-add), so in float32 the result equals
`gguf.quants.dequantize` bit for bit; other dtypes are that float32 result cast once. The kernels take a
`[n_blocks, type_size]` uint8 tensor and stay in uint8/int8 until the one multiply that produces float32, and
a tensor is processed a bounded number of blocks at a time, so the peak extra memory is a few chunk-sized
temporaries whatever the tensor size. Everything runs on the target device, so the same code serves CUDA.

gguf-py's numpy dequantizer is the reference, not the implementation: it is about an order of magnitude slower
and only produces numpy float32 on the CPU.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, QK_K, GGMLQuantizationType

from eldric_p2p.errors import GGUFFormatError, UnsupportedModel

T = GGMLQuantizationType
RawBytes = bytes | bytearray | memoryview | np.ndarray | torch.Tensor

# Output elements per chunk. On the CPU a chunk's temporaries should stay in the L2/L3 caches; on a GPU
# bigger chunks amortize the kernel launches and host-to-device copies.
CPU_CHUNK_ELEMENTS = 1 << 17
CUDA_CHUNK_ELEMENTS = 1 << 24


def _f16(blocks: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Little-endian float16 fields at bytes [start, stop) of each block as float32: [n, (stop-start)//2]."""
    return blocks[:, start:stop].contiguous().view(torch.float16).to(torch.float32)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., m] uint8 -> [..., 2m]: the m low nibbles, then the m high nibbles (ggml's 4-bit order)."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=-1)


def _shifts(values: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=device)


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks, 0, 2)  # [n, 1]
    q = _nibbles(blocks[:, 2:]).view(torch.int8) - 8  # [n, 32] int8 in [-8, 7]
    return d * q


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks, 0, 2)  # [n, 1]
    m = _f16(blocks, 2, 4)  # [n, 1]
    q = _nibbles(blocks[:, 4:])  # [n, 32] uint8
    return (d * q).add_(m)


def _q5_high_bits(qh: torch.Tensor) -> torch.Tensor:
    """[n, 4] bytes of a little-endian uint32 -> [n, 32] uint8 holding bit i of it, shifted to value 16."""
    n = qh.shape[0]
    bits = (qh.unsqueeze(-1) >> _shifts(range(8), qh.device)) & 1  # [n, 4, 8]
    return bits.view(n, 32) << 4


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks, 0, 2)  # [n, 1]
    q = _nibbles(blocks[:, 6:]) | _q5_high_bits(blocks[:, 2:6])  # [n, 32] uint8 in [0, 31]
    return d * (q.view(torch.int8) - 16)


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks, 0, 2)  # [n, 1]
    m = _f16(blocks, 2, 4)  # [n, 1]
    q = _nibbles(blocks[:, 8:]) | _q5_high_bits(blocks[:, 4:8])  # [n, 32] uint8
    return (d * q).add_(m)


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks, 0, 2)  # [n, 1]
    return blocks[:, 2:].view(torch.int8) * d  # [n, 32]


def _q2_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    scales = blocks[:, : QK_K // 16]  # [n, 16]
    qs = blocks[:, QK_K // 16 : QK_K // 16 + QK_K // 4]  # [n, 64]
    d = _f16(blocks, 80, 82)  # [n, 1]
    dmin = _f16(blocks, 82, 84)  # [n, 1]
    dl = (d * (scales & 0x0F)).unsqueeze(-1)  # [n, 16, 1]
    ml = (dmin * (scales >> 4)).unsqueeze(-1)  # [n, 16, 1]
    shifts = _shifts([0, 2, 4, 6], blocks.device).view(1, 1, 4, 1)
    q = (qs.reshape(n, 2, 1, 32) >> shifts) & 3  # [n, 2, 4, 32]
    q = q.view(n, QK_K // 16, 16)
    return (dl * q).sub_(ml).view(n, QK_K)


def _q3_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    dev = blocks.device
    hmask = blocks[:, : QK_K // 8]  # [n, 32]
    qs = blocks[:, QK_K // 8 : QK_K // 8 + QK_K // 4]  # [n, 64]
    lscales = blocks[:, 96:104]  # [n, 8]
    hscales = blocks[:, 104:108]  # [n, 4]
    d = _f16(blocks, 108, 110)  # [n, 1]
    lo = _nibbles(lscales)  # [n, 16]
    hi = (hscales.unsqueeze(1) >> _shifts([0, 2, 4, 6], dev).view(1, 4, 1)) & 3  # [n, 4, 4]
    sc = (lo | (hi.view(n, 16) << 4)).view(torch.int8) - 32  # [n, 16] int8 in [-32, 31]
    dl = (d * sc).unsqueeze(-1)  # [n, 16, 1]
    ql = (qs.reshape(n, 2, 1, 32) >> _shifts([0, 2, 4, 6], dev).view(1, 1, 4, 1)) & 3  # [n, 2, 4, 32]
    qh = (hmask.reshape(n, 1, 1, 32) >> _shifts(range(8), dev).view(1, 1, 8, 1)) & 1  # [n, 1, 8, 32]
    # q = ql - 4 when the hmask bit is clear, ql when it is set
    low = ((qh.view(n, 16, 16) ^ 1) << 2).view(torch.int8)  # [n, 16, 16]
    q = ql.view(n, 16, 16).view(torch.int8) - low  # [n, 16, 16]
    return (dl * q).view(n, QK_K)


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 packed bytes of Q4_K/Q5_K -> eight 6-bit scales and eight 6-bit mins, each [n, 8] uint8."""
    d = scales[:, 0:4]
    m = scales[:, 4:8]
    m_d = scales[:, 8:12]
    sc = torch.cat((d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mn = torch.cat((m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return sc, mn


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d = _f16(blocks, 0, 2)  # [n, 1]
    dmin = _f16(blocks, 2, 4)  # [n, 1]
    sc, mn = _k_scale_min(blocks[:, 4:16])
    ds = (d * sc).unsqueeze(-1)  # [n, 8, 1]
    dm = (dmin * mn).unsqueeze(-1)  # [n, 8, 1]
    q = _nibbles(blocks[:, 16:].reshape(n, 4, 32)).view(n, 8, 32)  # [n, 8, 32] uint8
    return (ds * q).sub_(dm).view(n, QK_K)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d = _f16(blocks, 0, 2)  # [n, 1]
    dmin = _f16(blocks, 2, 4)  # [n, 1]
    sc, mn = _k_scale_min(blocks[:, 4:16])
    ds = (d * sc).unsqueeze(-1)  # [n, 8, 1]
    dm = (dmin * mn).unsqueeze(-1)  # [n, 8, 1]
    qh = blocks[:, 16:48]  # [n, 32]
    ql = _nibbles(blocks[:, 48:].reshape(n, 4, 32)).view(n, 8, 32)  # [n, 8, 32]
    hb = (qh.reshape(n, 1, 32) >> _shifts(range(8), blocks.device).view(1, 8, 1)) & 1  # [n, 8, 32]
    q = ql | (hb << 4)
    return (ds * q).sub_(dm).view(n, QK_K)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    ql = blocks[:, : QK_K // 2]  # [n, 128]
    qh = blocks[:, QK_K // 2 : QK_K // 2 + QK_K // 4]  # [n, 64]
    scales = blocks[:, 192:208].view(torch.int8)  # [n, 16]
    d = _f16(blocks, 208, 210)  # [n, 1]
    ds = (d * scales).unsqueeze(-1)  # [n, 16, 1]
    lo = _nibbles(ql.reshape(n, 2, 64)).view(n, 8, 32)  # [n, 8, 32]
    shifts = _shifts([0, 2, 4, 6], blocks.device).view(1, 1, 4, 1)
    hi = (qh.reshape(n, 2, 1, 32) >> shifts) & 3  # [n, 2, 4, 32]
    q = (lo | (hi.view(n, 8, 32) << 4)).view(torch.int8) - 32  # [n, 8, 32] int8 in [-32, 31]
    return (ds * q.view(n, 16, 16)).view(n, QK_K)


_BLOCK_KERNELS: dict[GGMLQuantizationType, Callable[[torch.Tensor], torch.Tensor]] = {
    T.Q4_0: _q4_0,
    T.Q4_1: _q4_1,
    T.Q5_0: _q5_0,
    T.Q5_1: _q5_1,
    T.Q8_0: _q8_0,
    T.Q2_K: _q2_k,
    T.Q3_K: _q3_k,
    T.Q4_K: _q4_k,
    T.Q5_K: _q5_k,
    T.Q6_K: _q6_k,
}
_FLOAT_TYPES = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}
_SUPPORTED = frozenset(_BLOCK_KERNELS) | frozenset(_FLOAT_TYPES)


def supported_types() -> frozenset[GGMLQuantizationType]:
    """The ggml tensor types `dequantize` accepts."""
    return _SUPPORTED


def _as_uint8(raw: RawBytes) -> torch.Tensor:
    """A flat uint8 CPU tensor over `raw`, not a copy (read-only bytes are fine: nothing writes to it)."""
    if isinstance(raw, torch.Tensor):
        return raw.contiguous().view(-1).view(torch.uint8)
    if isinstance(raw, np.ndarray):
        raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    mv = memoryview(raw).cast("B")
    if mv.nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "buffer is not writable": we only read it
        return torch.frombuffer(mv, dtype=torch.uint8)


def _check_type(ggml_type: GGMLQuantizationType | int, name: str) -> GGMLQuantizationType:
    try:
        qtype = T(int(ggml_type))
    except ValueError:
        raise UnsupportedModel(f"tensor {name!r}: unknown ggml type {int(ggml_type)}") from None
    if qtype not in _SUPPORTED:
        supported = ", ".join(sorted(t.name for t in _SUPPORTED))
        raise UnsupportedModel(
            f"tensor {name!r}: ggml type {qtype.name} is not supported (supported: {supported})"
        )
    return qtype


def dequantize(
    raw: RawBytes,
    ggml_type: GGMLQuantizationType | int,
    shape: Sequence[int],
    *,
    name: str = "?",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Dequantize one GGUF tensor's bytes to a `dtype` tensor on `device`.

    `shape` is in ggml order; the result has torch order (reversed), so a ggml (in, out) weight comes back as
    [out, in]. Values are computed in float32 (bit-exact with `gguf.quants.dequantize`) and cast to `dtype`.
    Raises `UnsupportedModel` for a type not in `supported_types()`, `GGUFFormatError` when the byte length
    or the row length does not fit the shape and type.
    """
    qtype = _check_type(ggml_type, name)
    dims = tuple(int(x) for x in shape)
    if any(x < 0 for x in dims):
        raise GGUFFormatError(f"tensor {name!r}: negative dimension in shape {dims}")
    n_elements = 1
    for x in dims:
        n_elements *= x
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if dims and dims[0] % block_size != 0:
        raise GGUFFormatError(
            f"tensor {name!r}: row length {dims[0]} is not a multiple of "
            f"the {qtype.name} block size {block_size}"
        )
    n_blocks = n_elements // block_size
    data = _as_uint8(raw)
    if data.numel() != n_blocks * type_size:
        raise GGUFFormatError(
            f"tensor {name!r}: {data.numel()} bytes, "
            f"but {qtype.name} of shape {dims} needs {n_blocks * type_size}"
        )
    dev = torch.device(device)
    out_shape = tuple(reversed(dims))

    float_dtype = _FLOAT_TYPES.get(qtype)
    if float_dtype is not None:
        # float16/bfloat16 -> float32 is exact, so a direct cast equals "float32, then dtype"
        values = data.view(float_dtype).to(dev)
        out = values.to(dtype, copy=values.data_ptr() == data.data_ptr())
        return out.view(out_shape)

    kernel = _BLOCK_KERNELS[qtype]
    blocks = data.view(n_blocks, type_size)  # [n_blocks, type_size]
    out = torch.empty(n_blocks, block_size, dtype=dtype, device=dev)  # [n_blocks, block_size]
    chunk_elements = CUDA_CHUNK_ELEMENTS if dev.type == "cuda" else CPU_CHUNK_ELEMENTS
    step = max(1, chunk_elements // block_size)
    for a in range(0, n_blocks, step):
        chunk = blocks[a : a + step].to(dev)  # [k, type_size]
        out[a : a + step] = kernel(chunk)  # [k, block_size] float32, cast to dtype on store
    return out.view(out_shape)
