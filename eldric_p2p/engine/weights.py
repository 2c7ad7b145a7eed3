"""How a stage holds its weights: the format, the linear layers and the token embedding.

`resolve_weights` picks the format. "native" keeps each matrix in its GGUF block format and multiplies it with
the CPU kernels of `qmatmul` (llama.cpp's arithmetic); "f32", "bf16" and "f16" dequantize it to a dense tensor
(the only choice on CUDA). `Linear` holds one matrix either way; `Embedding` keeps the token table in GGUF
form and dequantizes only the rows it looks up.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES

from eldric_p2p.data.gguf_index import GGUFIndex, TensorInfo
from eldric_p2p.engine.dequant import dequantize
from eldric_p2p.errors import UsageError

try:
    from eldric_p2p.engine import qmatmul
except ImportError:  # pragma: no cover - the module ships with the package; the C extension may not
    qmatmul = None  # type: ignore[assignment]


class TensorSource(Protocol):
    """Where a stage reads weights: a local GGUF file or a shard cache (both `GGUFFile`)."""

    index: GGUFIndex

    def tensor_data(self, name: str) -> memoryview: ...


def native_available() -> bool:
    return qmatmul is not None and qmatmul.kernels_available()


def resolve_weights(weights: str, device: torch.device) -> str:
    """Pick the weight format: "native" (GGUF blocks + CPU kernels) or a dense dtype name."""
    if weights == "auto":
        if device.type == "cpu":
            return "native" if native_available() else "f32"
        return "bf16"
    if weights == "native" and (device.type != "cpu" or not native_available()):
        raise UsageError(
            "native GGUF weights need the CPU kernels (eldric_p2p.engine._qkernels) and --device cpu"
        )
    if weights not in ("native", "f32", "bf16", "f16"):
        raise UsageError(f"unknown weight format {weights!r}: use auto, native, f32, bf16 or f16")
    return weights


_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
PAGE = 4096


def map_pages(data: torch.Tensor) -> None:
    """Read one byte of every page of `data` (a view of the mmapped model file): the page faults happen
    at load, as llama.cpp's MAP_POPULATE makes them happen, not in the first forward (~30 ms for Gemma 3
    270M)."""
    flat = data.reshape(-1)
    if flat.numel():
        flat[::PAGE].max()


class Linear:
    """y = x @ W.T (+ b) with x float32 [T, in] -> float32 [T, out]."""

    def __init__(
        self,
        src: TensorSource,
        info: TensorInfo,
        bias: torch.Tensor | None,
        fmt: str,
        device: torch.device,
        *,
        repacked: bool | None = None,
    ):
        self.out_features = info.shape[1] if len(info.shape) > 1 else 1
        self.in_features = info.shape[0]
        self.bias = bias
        raw = src.tensor_data(info.name)
        if fmt == "native" and qmatmul.supports(info.ggml_type):
            self.q = qmatmul.QuantWeight.from_raw(
                raw, info.ggml_type, self.in_features, self.out_features, repacked=repacked
            )
            self.w = None
            self.nbytes = info.nbytes
            map_pages(self.q.data)
        else:
            self.q = None
            dtype = torch.float32 if fmt == "native" else _DTYPES[fmt]
            self.w = dequantize(raw, info.ggml_type, info.shape, name=info.name, dtype=dtype, device=device)
            self.nbytes = self.w.numel() * self.w.element_size()

    threads: int | None = None  # kernel threads; set by the Stage (None: torch's thread count)

    def __call__(self, x: torch.Tensor, *, segments: tuple[int, ...] | None = None) -> torch.Tensor:
        """`segments`: the rows belong to different sessions, this many each; each gets the bits of its own
        call (native weights; dense ones have no such guarantee)."""
        if self.q is not None:
            y = qmatmul.qlinear(x, self.q, n_threads=self.threads, segments=segments)
        else:
            assert self.w is not None
            y = F.linear(x.to(self.w.dtype), self.w).float()
        if self.bias is not None:
            y = y + self.bias
        return y


class Embedding:
    """Token embedding rows dequantized on lookup, so a quantized table is never expanded whole."""

    def __init__(self, src: TensorSource, info: TensorInfo, device: torch.device):
        self.info = info
        self.dim, self.vocab = info.shape[0], info.shape[1]
        block, type_size = GGML_QUANT_SIZES[info.ggml_type]
        self.row_bytes = self.dim // block * type_size
        self.rows = np.frombuffer(src.tensor_data(info.name), dtype=np.uint8).reshape(
            self.vocab, self.row_bytes
        )
        self.device = device

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        raw = self.rows[ids.cpu().numpy()]  # [T, row_bytes]
        out = dequantize(raw, self.info.ggml_type, (self.dim, len(raw)), name=self.info.name)
        return out.to(self.device)  # [T, dim] float32
