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

# Output elements per chunk. On the CPU a chunk's float32 temporaries (4 MiB) stay in the L3 cache; on a GPU
# bigger chunks amortize the kernel launches and host-to-device copies.
CPU_CHUNK_ELEMENTS = 1 << 20
CUDA_CHUNK_ELEMENTS = 1 << 24


# Bit tricks work on int64 words of 8 packed bytes: torch is fast on contiguous same-dtype tensors and slow on
# strided, broadcast or byte-wise concatenating ones, so fields are copied out contiguous once, split with
# masks and shifts eight bytes at a time, and only the final int8 -> float32 multiply touches each value.
_LO4 = 0x0F0F0F0F0F0F0F0F
_LO2 = 0x0303030303030303
_LO1 = 0x0101010101010101


def _field(blocks: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Bytes [start, stop) of each block, copied to a fresh contiguous [n, stop-start] tensor.

    Always a copy: a view (a one-block chunk is already "contiguous") may sit at an offset or stride that
    cannot be reinterpreted as a wider dtype.
    """
    return blocks[:, start:stop].clone(memory_format=torch.contiguous_format)


def _f16(blocks: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Little-endian float16 fields at bytes [start, stop) of each block as float32: [n, (stop-start)//2]."""
    return _field(blocks, start, stop).view(torch.float16).to(torch.float32)


def _words(blocks: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Bytes [start, stop) of each block as contiguous int64 words: [n, (stop-start)//8]."""
    return _field(blocks, start, stop).view(torch.int64)


def _nibbles(w: torch.Tensor) -> torch.Tensor:
    """[..., m] words -> [..., 2, m] words: all low nibbles, then all high nibbles (ggml's 4-bit order)."""
    return torch.stack((w & _LO4, (w >> 4) & _LO4), dim=-2)


def _crumbs(w: torch.Tensor) -> torch.Tensor:
    """[..., m] words -> [..., 4, m] words: the 2-bit fields at bit 0, 2, 4 and 6 of every byte."""
    return torch.stack((w & _LO2, (w >> 2) & _LO2, (w >> 4) & _LO2, (w >> 6) & _LO2), dim=-2)


def _bits(w: torch.Tensor) -> torch.Tensor:
    """[..., m] words -> [..., 8, m] words: bit j of every byte, for j = 0..7."""
    return torch.stack([(w >> j) & _LO1 for j in range(8)], dim=-2)


def _as_float(words: torch.Tensor, n: int, *shape: int, signed: bool = False) -> torch.Tensor:
    """Packed words holding one small integer per byte -> float32 [n, *shape]."""
    return words.view(torch.int8 if signed else torch.uint8).view(n, *shape).to(torch.float32)


def _bit_table(set_value: int, clear_value: int) -> torch.Tensor:
    """[256] int64: per byte value, eight bytes; byte j is `set_value` if bit j is set, else `clear_value`."""
    bits = (torch.arange(256).view(256, 1) >> torch.arange(8)) & 1  # [256, 8]
    table = torch.where(bits == 1, set_value, clear_value).to(torch.uint8)  # [256, 8]
    return table.view(torch.int64).view(256)


# Q5_0 stores q + 16 in five bits: with the fifth bit set the int8 value q is the low nibble, with it clear it
# is the low nibble minus 16, i.e. the nibble with 0xF0 on top. Q5_1 keeps the unsigned five-bit value.
_Q5_0_HIGH = _bit_table(0x00, 0xF0)
_Q5_1_HIGH = _bit_table(0x10, 0x00)
_TABLES: dict[tuple[int, torch.device], torch.Tensor] = {}


def _table(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    key = (id(table), device)
    if key not in _TABLES:
        _TABLES[key] = table.to(device)
    return _TABLES[key]


def _q5_high(blocks: torch.Tensor, start: int, table: torch.Tensor) -> torch.Tensor:
    """The 32 fifth bits of a Q5_0/Q5_1 block (little-endian uint32 at `start`) mapped by `table`: [n, 4]."""
    qh = blocks[:, start : start + 4].reshape(-1).to(torch.int32)  # [n * 4]
    return _table(table, blocks.device).index_select(0, qh).view(-1, 4)


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d = _f16(blocks, 0, 2)  # [n, 1]
    q = _nibbles(_words(blocks, 2, 18)).view(torch.int8) - 8  # [n, 2, 2] words = [n, 32] int8 in [-8, 7]
    return _as_float(q, n, 32, signed=True).mul_(d)


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d = _f16(blocks, 0, 2)  # [n, 1]
    m = _f16(blocks, 2, 4)  # [n, 1]
    q = _nibbles(_words(blocks, 4, 20))  # [n, 2, 2] words = [n, 32] uint8
    return _as_float(q, n, 32).mul_(d).add_(m)


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d = _f16(blocks, 0, 2)  # [n, 1]
    q = _nibbles(_words(blocks, 6, 22)).view(n, 4) | _q5_high(blocks, 2, _Q5_0_HIGH)  # [n, 32] int8, -16..15
    return _as_float(q, n, 32, signed=True).mul_(d)


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d = _f16(blocks, 0, 2)  # [n, 1]
    m = _f16(blocks, 2, 4)  # [n, 1]
    q = _nibbles(_words(blocks, 8, 24)).view(n, 4) | _q5_high(blocks, 4, _Q5_1_HIGH)  # [n, 32] uint8, 0..31
    return _as_float(q, n, 32).mul_(d).add_(m)


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks, 0, 2)  # [n, 1]
    return blocks[:, 2:].contiguous().view(torch.int8).to(torch.float32).mul_(d)  # [n, 32]


def _q2_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    scales = blocks[:, 0:16].contiguous()  # [n, 16]
    d = _f16(blocks, 80, 82)  # [n, 1]
    dmin = _f16(blocks, 82, 84)  # [n, 1]
    dl = (d * (scales & 0x0F)).unsqueeze(-1)  # [n, 16, 1]
    ml = (dmin * (scales >> 4)).unsqueeze(-1)  # [n, 16, 1]
    q = _crumbs(_words(blocks, 16, 80).view(n, 2, 4))  # [n, 2, 4, 4] words = [n, 16, 16] uint8
    return _as_float(q, n, 16, 16).mul_(dl).sub_(ml).view(n, QK_K)


def _q3_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    dev = blocks.device
    lscales = blocks[:, 96:104]  # [n, 8]
    hscales = blocks[:, 104:108]  # [n, 4]
    d = _f16(blocks, 108, 110)  # [n, 1]
    lo = torch.cat((lscales & 0x0F, lscales >> 4), dim=-1)  # [n, 16]
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=dev).view(1, 4, 1)
    hi = (hscales.unsqueeze(1) >> shifts) & 3  # [n, 4, 4]
    sc = (lo | (hi.view(n, 16) << 4)).view(torch.int8) - 32  # [n, 16] int8 in [-32, 31]
    dl = (d * sc).unsqueeze(-1)  # [n, 16, 1]
    ql = _crumbs(_words(blocks, 32, 96).view(n, 2, 4))  # [n, 2, 4, 4] words = [n, 16, 16] in [0, 3]
    # q = ql - 4 where the hmask bit is clear
    low = (_bits(_words(blocks, 0, 32)) ^ _LO1) << 2  # [n, 8, 4] words = [n, 16, 16] in {0, 4}
    q = ql.view(torch.int8).view(n, QK_K) - low.view(torch.int8).view(n, QK_K)  # [n, 256] int8 in [-4, 3]
    return _as_float(q, n, 16, 16, signed=True).mul_(dl).view(n, QK_K)


def _k_scale_min(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K blocks (f16 d, f16 dmin, then 12 bytes packing eight 6-bit scales sc and eight 6-bit mins mn)
    -> the sub-block scales d * sc and mins dmin * mn, each [n, 8, 1] float32."""
    d = _f16(blocks, 0, 2)  # [n, 1]
    dmin = _f16(blocks, 2, 4)  # [n, 1]
    scales = blocks[:, 4:16].contiguous()  # [n, 12]
    lo = scales[:, 0:4]
    m = scales[:, 4:8]
    m_d = scales[:, 8:12]
    sc = torch.cat((lo & 0x3F, (m_d & 0x0F) | ((lo >> 2) & 0x30)), dim=-1)  # [n, 8] uint8
    mn = torch.cat((m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)), dim=-1)  # [n, 8] uint8
    return (d * sc).unsqueeze(-1), (dmin * mn).unsqueeze(-1)  # [n, 8, 1] each


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    ds, dm = _k_scale_min(blocks)  # [n, 8, 1] each
    q = _nibbles(_words(blocks, 16, 144).view(n, 4, 4))  # [n, 4, 2, 4] words = [n, 8, 32] uint8
    return _as_float(q, n, 8, 32).mul_(ds).sub_(dm).view(n, QK_K)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    ds, dm = _k_scale_min(blocks)  # [n, 8, 1] each
    high = _bits(_words(blocks, 16, 48)) << 4  # [n, 8, 4] words = [n, 8, 32] in {0, 16}
    low = _nibbles(_words(blocks, 48, 176).view(n, 4, 4))  # [n, 4, 2, 4] words = [n, 8, 32]
    q = low.view(n, 8, 4) | high  # [n, 8, 4] words = [n, 8, 32] uint8 in [0, 31]
    return _as_float(q, n, 8, 32).mul_(ds).sub_(dm).view(n, QK_K)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    scales = _field(blocks, 192, 208).view(torch.int8)  # [n, 16]
    d = _f16(blocks, 208, 210)  # [n, 1]
    ds = (d * scales).unsqueeze(-1)  # [n, 16, 1]
    low = _nibbles(_words(blocks, 0, 128).view(n, 2, 8))  # [n, 2, 2, 8] words = [n, 8, 32]
    high = _crumbs(_words(blocks, 128, 192).view(n, 2, 4)) << 4  # [n, 2, 4, 4] words = [n, 8, 32]
    q = (low.view(n, 32) | high.view(n, 32)).view(torch.int8) - 32  # [n, 256] int8 in [-32, 31]
    return _as_float(q, n, 16, 16, signed=True).mul_(ds).view(n, QK_K)


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
