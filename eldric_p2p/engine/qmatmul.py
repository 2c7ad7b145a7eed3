"""Linear layers computed directly on GGUF weight blocks, with llama.cpp's CPU arithmetic.

`qlinear(x, w)` is `x @ dequantize(w).T` the way llama.cpp computes it on an x86 CPU with AVX2: each
activation row is quantized to the weight's ggml "vec_dot type" (Q8_0, Q8_1, Q8_K or F16), every output is a
sum of exact integer block dot products scaled by the block scales, and the float32 operations happen in
llama.cpp's order, so the results are llama.cpp's to the last bit (for every type but Q2_K, Q3_K, F16, F32;
see docs/kernels.md). That reads 4-8 bits per weight instead of 32. The work is done by the C extension
`eldric_p2p.engine._qkernels` (built by `pip install`, optional): check `kernels_available()` and fall back to
the dequantized torch path when it is False. docs/kernels.md describes the arithmetic and the measured speeds.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from eldric_p2p.errors import InvalidInput, UnsupportedModel

try:
    from eldric_p2p.engine import _qkernels
except ImportError:  # built without a C compiler: the engine uses dequantized weights instead
    _qkernels = None

log = logging.getLogger(__name__)
KERNEL_SETS = ("avx512", "avx2", "portable")  # widest first; every one computes the same bits

if _qkernels is not None and os.environ.get("ELDRIC_KERNELS"):
    # ELDRIC_KERNELS=avx2 (or portable): run a narrower kernel set than this CPU allows, e.g. to time one
    # against another; the results are the same bits either way
    if os.environ["ELDRIC_KERNELS"] in KERNEL_SETS:
        _qkernels.set_simd(os.environ["ELDRIC_KERNELS"])
    else:
        log.warning("ELDRIC_KERNELS=%s is none of %s; ignored", os.environ["ELDRIC_KERNELS"], KERNEL_SETS)

RawBytes = bytes | bytearray | memoryview | np.ndarray | torch.Tensor


def kernels_available() -> bool:
    """True when the compiled kernels are importable."""
    return _qkernels is not None


def supports(ggml_type: int) -> bool:
    """True when `qlinear` can run weights of this ggml type (False whenever the kernels are not built)."""
    return _qkernels is not None and int(ggml_type) in _qkernels.supported_types()


def simd() -> str:
    """Which kernel set runs: 'avx512', 'avx2', 'portable', or 'none' when the extension is not built."""
    return _qkernels.simd() if _qkernels is not None else "none"


@dataclass(frozen=True, eq=False)
class QuantWeight:
    """A GGUF weight kept as its raw blocks: `data` is uint8 [out_features, row_bytes] (may view an mmap).

    `repacked` says whether llama.cpp would repack the weight for its x86 AVX2 kernels, which changes the
    order of its float arithmetic: None means "as llama.cpp decides for a weight it loads into its repack
    buffer" (every Q4_K weight with a multiple of 8 rows); False is for a weight it keeps as is although it
    could repack it (one it places by another use, such as a token embedding that is also the output head).
    """

    data: torch.Tensor
    ggml_type: GGMLQuantizationType
    in_features: int
    out_features: int
    repacked: bool | None = None

    @classmethod
    def from_raw(
        cls, raw: RawBytes, ggml_type: int, in_features: int, out_features: int, repacked: bool | None = None
    ) -> QuantWeight:
        """Wrap a tensor's raw bytes (shape in ggml order is [in_features, out_features]) without copying.

        A read-only buffer (an mmap view) is wrapped as is; torch warns about non-writable numpy arrays, but
        the kernels only read it. Raises `UnsupportedModel` for a type without a kernel and `InvalidInput`
        when the byte count does not match the shape, or `repacked=True` names a weight llama.cpp cannot
        repack (only Q4_K with a multiple of 8 rows).
        """
        qtype = GGMLQuantizationType(int(ggml_type))
        if not supports(qtype):
            raise UnsupportedModel(f"no quantized matmul kernel for {qtype.name}")
        block, type_size = GGML_QUANT_SIZES[qtype]
        if in_features <= 0 or out_features <= 0 or in_features % block:
            raise InvalidInput(
                f"{qtype.name} weight [{out_features}, {in_features}]: rows must be a multiple of {block}"
            )
        if repacked and not (qtype == GGMLQuantizationType.Q4_K and out_features % 8 == 0):
            raise InvalidInput(f"llama.cpp does not repack a {qtype.name} weight with {out_features} rows")
        row_bytes = in_features // block * type_size
        if isinstance(raw, torch.Tensor):
            data = raw.detach().contiguous().view(torch.uint8).reshape(-1)
        else:
            arr = np.frombuffer(raw, dtype=np.uint8) if not isinstance(raw, np.ndarray) else raw
            arr = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
            data = _uint8_tensor(arr)
        if data.numel() != out_features * row_bytes:
            raise InvalidInput(
                f"{qtype.name} weight [{out_features}, {in_features}] needs "
                f"{out_features * row_bytes} bytes, got {data.numel()}"
            )
        return cls(data.reshape(out_features, row_bytes), qtype, in_features, out_features, repacked)

    @property
    def nbytes(self) -> int:
        return self.data.numel()


def _uint8_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 numpy array -> torch tensor sharing its memory, read-only buffers included."""
    if arr.flags.writeable:
        return torch.from_numpy(arr)
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(arr)


def qlinear(
    x: torch.Tensor,
    w: QuantWeight,
    n_threads: int | None = None,
    *,
    rows_alone: bool = False,
    segments: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """x [..., in_features] float32 (CPU) -> [..., out_features] float32 = x @ W.T, llama.cpp's arithmetic.

    All the leading dimensions form one batch of activation rows, as they do in llama.cpp: how many rows a
    call gets decides which of its code paths (and float order) applies, so a prefill of n tokens must be one
    call to match llama.cpp's n-token batch. The result does not depend on the thread count. Threads default
    to `torch.get_num_threads()`. `rows_alone`: each row gets the bits llama.cpp gives a batch of that one row
    (a batch of decode steps of different sessions, each equal to its own step), the weights still read
    once for all the rows. `segments`: row counts summing to the rows, each segment computed as llama.cpp
    computes a batch of that many rows (several sessions' prompts and steps in one call). Raises
    `InvalidInput` for a wrong shape, dtype or device, `ValueError` for segments that do not add up, and
    `UnsupportedModel` when the kernels are not built.
    """
    if _qkernels is None:
        raise UnsupportedModel("the quantized matmul kernels are not built (no C compiler at install time)")
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise InvalidInput(f"qlinear needs float32 CPU activations, got {x.dtype} on {x.device}")
    if x.shape[-1] != w.in_features:
        raise InvalidInput(f"activation width {x.shape[-1]} != weight in_features {w.in_features}")
    lead = x.shape[:-1]
    x2 = x.detach().reshape(-1, w.in_features).contiguous()  # [T, in]
    out = torch.empty((x2.shape[0], w.out_features), dtype=torch.float32)  # [T, out]
    threads = torch.get_num_threads() if n_threads is None else n_threads
    repacked = -1 if w.repacked is None else int(w.repacked)
    _qkernels.qmatmul(
        x2.numpy(),
        w.data.numpy(),
        out.numpy(),
        int(w.ggml_type),
        w.in_features,
        w.out_features,
        threads,
        repacked,
        (1,) * x2.shape[0] if rows_alone and segments is None else segments,
    )
    return out.reshape(*lead, w.out_features)


def set_spin_us(us: int) -> int:
    """How long idle kernel threads spin for the next matmul before sleeping (default 200 µs); returns the old
    value. 0 frees the core at once, e.g. for several pipeline stages sharing one machine."""
    if _qkernels is None:
        return 0
    return int(_qkernels.set_spin_us(int(us)))
