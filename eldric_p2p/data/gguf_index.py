"""GGUF index: header key/values, tensor table and layer map, from a local file or a fetched prefix.

The parser is written for hostile input (a file from a peer, or the first bytes of one): every count and
length is checked against a limit and against the bytes present, and every failure is a `GGUFFormatError`.
A prefix that ends inside the header raises `TruncatedHeader`, whose `needed` says how many bytes to fetch
before trying again.

gguf-py supplies the constants (value types, quantization block sizes). Its `GGUFReader` needs the whole file
memory-mapped, so it cannot read a prefix; that is why the header walk is written here.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType, GGUFValueType

from eldric_p2p.errors import GGUFFormatError

# Limits for untrusted headers. Real files: Qwen2.5 has a 151,936-entry vocabulary and ~290 tensors.
MAX_HEADER_BYTES = 256 * 1024 * 1024
MAX_KV = 65_536
MAX_TENSORS = 1_000_000
MAX_STRING = 64 * 1024 * 1024
MAX_ARRAY = 16 * 1024 * 1024
MAX_DIMS = 4
MAX_NAME = 256

_NUMERIC = {
    GGUFValueType.UINT8: np.dtype("<u1"),
    GGUFValueType.INT8: np.dtype("<i1"),
    GGUFValueType.UINT16: np.dtype("<u2"),
    GGUFValueType.INT16: np.dtype("<i2"),
    GGUFValueType.UINT32: np.dtype("<u4"),
    GGUFValueType.INT32: np.dtype("<i4"),
    GGUFValueType.FLOAT32: np.dtype("<f4"),
    GGUFValueType.BOOL: np.dtype("<u1"),
    GGUFValueType.UINT64: np.dtype("<u8"),
    GGUFValueType.INT64: np.dtype("<i8"),
    GGUFValueType.FLOAT64: np.dtype("<f8"),
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.")
HEAD_TENSORS = ("token_embd.weight", "token_embd_norm.weight", "token_embd_norm.bias")
TAIL_TENSORS = ("output_norm.weight", "output_norm.bias", "output.weight", "output.bias")


class TruncatedHeader(GGUFFormatError):
    """The bytes end inside the header; `needed` is a lower bound on the bytes required."""

    def __init__(self, message: str, needed: int) -> None:
        super().__init__(message)
        self.needed = needed


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]  # ggml order: shape[0] is the fastest-varying (row length); numpy's is reversed
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def end(self) -> int:
        return self.offset + self.nbytes

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class GGUFIndex:
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]  # in file order
    alignment: int
    data_offset: int  # absolute offset of the tensor data section (= bytes needed to parse the header)
    file_size: int | None = None
    types: dict[str, int] = field(
        default_factory=dict
    )  # metadata key -> GGUFValueType (arrays: element type)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    @property
    def n_layers(self) -> int:
        key = f"{self.architecture}.block_count"
        if key not in self.metadata:
            raise GGUFFormatError(f"missing {key!r}: not a transformer model file")
        return int(self.metadata[key])

    def get(self, suffix: str, default: Any = None) -> Any:
        """Architecture key `{arch}.{suffix}`, e.g. `get("embedding_length")`."""
        return self.metadata.get(f"{self.architecture}.{suffix}", default)

    def assignment_tensors(self, start: int, end: int) -> list[TensorInfo]:
        """Tensors a stage running layers [start, end) needs, in file order.

        The head (start == 0) gets the embedding; the tail (end == n_layers) gets the final norm and the
        output matrix, or the embedding when `output.weight` is absent (tied embeddings). Global tensors
        that belong to no layer and to neither end (e.g. `rope_freqs.weight`) go to every stage.
        """
        n = self.n_layers
        if not 0 <= start < end <= n:
            raise ValueError(f"layer range [{start}, {end}) is not inside [0, {n})")
        wanted: list[TensorInfo] = []
        tied = "output.weight" not in self.tensors
        for t in self.tensors.values():
            m = _LAYER_RE.match(t.name)
            if m:
                keep = start <= int(m.group(1)) < end
            elif t.name in HEAD_TENSORS:
                keep = start == 0 or (end == n and tied and t.name == "token_embd.weight")
            elif t.name in TAIL_TENSORS:
                keep = end == n
            else:
                keep = True
            if keep:
                wanted.append(t)
        return wanted

    def assignment_ranges(self, start: int, end: int, *, max_gap: int | None = None) -> list[tuple[int, int]]:
        """Half-open absolute byte ranges covering the assignment's tensors, neighbours coalesced.

        Ranges separated by at most `max_gap` bytes (default: the alignment padding) are merged.
        """
        gap = self.alignment if max_gap is None else max_gap
        spans = sorted((t.offset, t.end) for t in self.assignment_tensors(start, end))
        merged: list[tuple[int, int]] = []
        for a, b in spans:
            if merged and a - merged[-1][1] <= gap:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        return merged

    def layer_bytes(self) -> list[int]:
        """Bytes of each layer's `blk.N.*` tensors, index N."""
        sizes = [0] * self.n_layers
        for t in self.tensors.values():
            m = _LAYER_RE.match(t.name)
            if m and int(m.group(1)) < len(sizes):
                sizes[int(m.group(1))] += t.nbytes
        return sizes

    def summary(self) -> dict[str, Any]:
        """Small JSON-able description (no big arrays)."""
        return {
            "architecture": self.architecture,
            "name": self.metadata.get("general.name"),
            "n_layers": self.n_layers,
            "hidden_size": self.get("embedding_length"),
            "n_tensors": len(self.tensors),
            "data_offset": self.data_offset,
            "file_size": self.file_size,
            "file_type": self.metadata.get("general.file_type"),
        }


class _Reader:
    """Bounds-checked cursor over untrusted bytes."""

    def __init__(self, buf: memoryview, limit: int) -> None:
        self.buf = buf
        self.pos = 0
        self.limit = limit

    def need(self, n: int) -> None:
        if self.pos + n > self.limit:
            raise GGUFFormatError(f"GGUF header larger than the {self.limit}-byte limit")
        if self.pos + n > len(self.buf):
            raise TruncatedHeader(
                f"GGUF header truncated at byte {len(self.buf)} (needs at least {self.pos + n})",
                needed=self.pos + n,
            )

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        size = struct.calcsize(fmt)
        self.need(size)
        out = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return out

    def u32(self) -> int:
        return self.unpack("<I")[0]

    def u64(self) -> int:
        return self.unpack("<Q")[0]

    def string(self, max_len: int = MAX_STRING) -> str:
        n = self.u64()
        if n > max_len:
            raise GGUFFormatError(f"GGUF string of {n} bytes exceeds the {max_len}-byte limit")
        self.need(n)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            # Vocabularies sometimes carry invalid UTF-8 pieces; keep them lossless.
            return raw.decode("utf-8", errors="surrogateescape")

    def value_type(self) -> GGUFValueType:
        raw = self.u32()
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise GGUFFormatError(f"unknown GGUF value type {raw}") from None

    def value(self, vtype: GGUFValueType, *, nested: bool = False) -> Any:
        if vtype in _NUMERIC:
            dt = _NUMERIC[vtype]
            v = np.frombuffer(self._take(dt.itemsize), dtype=dt)[0]
            return bool(v) if vtype == GGUFValueType.BOOL else v.item()
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            if nested:
                raise GGUFFormatError("nested GGUF arrays are not supported")
            etype = self.value_type()
            n = self.u64()
            if n > MAX_ARRAY:
                raise GGUFFormatError(f"GGUF array of {n} elements exceeds the {MAX_ARRAY} limit")
            if etype in _NUMERIC:
                dt = _NUMERIC[etype]
                arr = np.frombuffer(self._take(n * dt.itemsize), dtype=dt)
                return arr.astype(bool) if etype == GGUFValueType.BOOL else arr.copy()
            if etype == GGUFValueType.STRING:
                return self._string_array(n)
            return [self.value(etype, nested=True) for _ in range(n)]
        raise GGUFFormatError(f"unhandled GGUF value type {vtype!r}")

    def _string_array(self, n: int) -> list[str]:
        """`n` strings; the same checks as `string()`, inlined because vocabularies hold 100k+ of them."""
        buf, pos = self.buf, self.pos
        hard = min(self.limit, len(buf))
        unpack_len = struct.Struct("<Q").unpack_from
        out: list[str] = []
        append = out.append
        for _ in range(n):
            if pos + 8 > hard:
                self.pos = pos
                self.need(8)
            (k,) = unpack_len(buf, pos)
            pos += 8
            if k > MAX_STRING or pos + k > hard:
                self.pos = pos - 8
                self.string()  # raises the precise error
            try:
                append(str(buf[pos : pos + k], "utf-8"))
            except UnicodeDecodeError:
                append(bytes(buf[pos : pos + k]).decode("utf-8", errors="surrogateescape"))
            pos += k
        self.pos = pos
        return out

    def _take(self, n: int) -> memoryview:
        self.need(n)
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out


def parse_gguf_untrusted(data: bytes | memoryview, *, file_size: int | None = None) -> GGUFIndex:
    """Parse a GGUF header from `data`: the whole file or a prefix of it.

    `file_size` is the full file's size when `data` is a prefix; tensors must lie inside it.
    Raises `TruncatedHeader` (fetch at least `.needed` bytes and retry) or `GGUFFormatError`.
    """
    buf = memoryview(data).cast("B")
    size = len(buf) if file_size is None else file_size
    r = _Reader(buf, min(MAX_HEADER_BYTES, size))
    magic, version = r.unpack("<II")
    if magic != GGUF_MAGIC:
        raise GGUFFormatError("not a GGUF file (bad magic)")
    if version not in (2, 3):
        raise GGUFFormatError(f"unsupported GGUF version {version}")
    n_tensors, n_kv = r.unpack("<QQ")
    if n_tensors > MAX_TENSORS or n_kv > MAX_KV:
        raise GGUFFormatError(f"GGUF header claims {n_tensors} tensors and {n_kv} keys: over the limits")

    metadata: dict[str, Any] = {}
    types: dict[str, int] = {}
    for _ in range(n_kv):
        key = r.string(MAX_NAME)
        vtype = r.value_type()
        if vtype == GGUFValueType.ARRAY:
            # Peek the element type for the record without consuming it.
            (etype,) = struct.unpack_from("<I", buf, r.pos) if r.pos + 4 <= len(buf) else (None,)
            types[key] = etype if etype is not None else int(vtype)
        else:
            types[key] = int(vtype)
        metadata[key] = r.value(vtype)

    alignment = metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1) or alignment > 1 << 20:
        raise GGUFFormatError(f"invalid general.alignment {alignment!r}")

    raw_tensors: list[tuple[str, tuple[int, ...], GGMLQuantizationType, int]] = []
    for _ in range(n_tensors):
        name = r.string(MAX_NAME)
        n_dims = r.u32()
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFFormatError(f"tensor {name!r} has {n_dims} dimensions")
        shape = tuple(int(d) for d in r.unpack(f"<{n_dims}Q"))
        raw_type = r.u32()
        try:
            ggml_type = GGMLQuantizationType(raw_type)
        except ValueError:
            raise GGUFFormatError(f"tensor {name!r} has unknown ggml type {raw_type}") from None
        (rel_offset,) = r.unpack("<Q")
        raw_tensors.append((name, shape, ggml_type, rel_offset))

    data_offset = -(-r.pos // alignment) * alignment
    tensors: dict[str, TensorInfo] = {}
    for name, shape, ggml_type, rel_offset in raw_tensors:
        if name in tensors:
            raise GGUFFormatError(f"duplicate tensor name {name!r}")
        if ggml_type not in GGML_QUANT_SIZES:
            raise GGUFFormatError(f"tensor {name!r}: no block size known for {ggml_type.name}")
        block, type_size = GGML_QUANT_SIZES[ggml_type]
        if any(d <= 0 or d > 1 << 40 for d in shape) or shape[0] % block:
            raise GGUFFormatError(f"tensor {name!r} has invalid shape {shape} for {ggml_type.name}")
        n_el = 1
        for d in shape:
            n_el *= d
        nbytes = n_el // block * type_size
        offset = data_offset + rel_offset
        if rel_offset % alignment:
            raise GGUFFormatError(f"tensor {name!r} offset {rel_offset} is not {alignment}-aligned")
        if offset + nbytes > size:
            raise GGUFFormatError(
                f"tensor {name!r} [{offset}, {offset + nbytes}) lies past the file end {size}"
            )
        tensors[name] = TensorInfo(name, ggml_type, shape, offset, nbytes)

    return GGUFIndex(
        version=version,
        metadata=metadata,
        tensors=tensors,
        alignment=alignment,
        data_offset=data_offset,
        file_size=size,
        types=types,
    )


class GGUFFile:
    """A local GGUF file (or a sparse shard-cache copy of one), memory-mapped, with its index.

    `tensor_data(name)` returns the tensor's raw bytes as a read-only memoryview without copying.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise GGUFFormatError(f"{self.path}: empty file")
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self.index = parse_gguf_untrusted(memoryview(self._mmap), file_size=size)
        except TruncatedHeader as exc:
            self.close()
            raise GGUFFormatError(f"{self.path}: truncated GGUF header") from exc
        except GGUFFormatError as exc:
            self.close()
            raise GGUFFormatError(f"{self.path}: {exc}") from exc

    def tensor_data(self, name: str) -> memoryview:
        t = self.index.tensors[name]
        return memoryview(self._mmap)[t.offset : t.end]

    def close(self) -> None:
        try:
            self._mmap.close()
        except BufferError:
            pass  # a caller still holds a view; the map is freed when it is dropped

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_index(path: str | os.PathLike[str]) -> GGUFIndex:
    """Index of a local GGUF file. Raises `GGUFFormatError` naming the file."""
    with GGUFFile(path) as f:
        return f.index
