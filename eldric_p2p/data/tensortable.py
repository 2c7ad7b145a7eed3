"""Tensor table: a data peer's `/tensors` document (untrusted), checked against the GGUF header.

Owns reading the published sha256 of every tensor, the provisional index `data.fetcher` plans a transfer
from while the real header parses, and the check that the two agree. Every failure is a RemoteProtocolError.
"""

from __future__ import annotations

import re
from typing import Any

from gguf import GGMLQuantizationType

from eldric_p2p.data.gguf_index import MAX_DIMS, MAX_NAME, GGUFIndex, TensorInfo
from eldric_p2p.errors import RemoteProtocolError

_SHA = re.compile(r"^[0-9a-f]{64}$")


def check_tensor_table(index: GGUFIndex, doc: Any) -> tuple[dict[str, str], str | None]:
    """Published hashes from a /tensors document, after checking it agrees with the parsed header."""
    if not isinstance(doc, dict) or not isinstance(doc.get("tensors"), list):
        raise RemoteProtocolError("tensor table is not a JSON object with a 'tensors' list")
    if doc.get("file_size") != index.file_size:
        raise RemoteProtocolError(
            f"tensor table is for a {doc.get('file_size')}-byte file, header says {index.file_size}"
        )
    hashes: dict[str, str] = {}
    for row in doc["tensors"]:
        if not isinstance(row, dict):
            raise RemoteProtocolError("tensor table row is not an object")
        t = index.tensors.get(row.get("name"))  # type: ignore[arg-type]
        if t is None or row.get("offset") != t.offset or row.get("size") != t.nbytes:
            raise RemoteProtocolError(f"tensor table row {str(row)[:200]} disagrees with the GGUF header")
        sha = row.get("sha256")
        if not isinstance(sha, str) or not _SHA.match(sha):
            raise RemoteProtocolError(f"tensor {t.name!r}: no valid sha256 published")
        hashes[t.name] = sha
    missing = set(index.tensors) - set(hashes)
    if missing:
        raise RemoteProtocolError(f"tensor table lacks {len(missing)} tensors, e.g. {sorted(missing)[0]!r}")
    sha = doc.get("sha256")
    return hashes, sha if isinstance(sha, str) and _SHA.match(sha) else None


def is_int(v: Any) -> bool:
    """True for a JSON integer (an int that is not a bool)."""
    return isinstance(v, int) and not isinstance(v, bool)


def index_from_table(doc: Any, data_offset: int, file_size: int) -> GGUFIndex:
    """A provisional index from a peer's /tensors document, to plan the transfer while the header parses.

    Only names, types, shapes, offsets, sizes and the layer count are taken from it; `fetch_assignment` checks
    them against the parsed header before any tensor is recorded as verified. Raises RemoteProtocolError.
    """
    if not isinstance(doc, dict) or not isinstance(doc.get("tensors"), list):
        raise RemoteProtocolError("tensor table is not a JSON object with a 'tensors' list")
    n_layers: Any = doc.get("n_layers")
    alignment: Any = doc.get("alignment")
    if not is_int(n_layers) or not 0 < n_layers <= 1 << 16:
        raise RemoteProtocolError(f"tensor table has no valid n_layers ({n_layers!r})")
    if not is_int(alignment) or not 0 < alignment <= 1 << 20 or alignment & (alignment - 1):
        raise RemoteProtocolError(f"tensor table has no valid alignment ({alignment!r})")
    tensors: dict[str, TensorInfo] = {}
    for row in doc["tensors"]:
        if not isinstance(row, dict):
            raise RemoteProtocolError("tensor table row is not an object")
        fields: list[Any] = [row.get(k) for k in ("name", "type_id", "shape", "offset", "size")]
        name, type_id, shape, offset, size = fields
        ok = (
            isinstance(name, str) and 0 < len(name) <= MAX_NAME and name not in tensors
            and is_int(type_id) and is_int(offset) and is_int(size) and size >= 0
            and data_offset <= offset and offset + size <= file_size
            and isinstance(shape, list) and 1 <= len(shape) <= MAX_DIMS
            and all(is_int(d) and d > 0 for d in shape)
        )  # fmt: skip
        try:
            ggml_type = GGMLQuantizationType(type_id) if ok else None
        except ValueError:
            ggml_type = None
        if ggml_type is None:
            raise RemoteProtocolError(f"tensor table row {str(row)[:200]} is not a valid tensor")
        tensors[name] = TensorInfo(name, ggml_type, tuple(shape), offset, size)
    meta = {"general.architecture": "table", "table.block_count": n_layers}
    return GGUFIndex(0, meta, tensors, alignment, data_offset, file_size=file_size)


def check_against_header(index: GGUFIndex, plan: GGUFIndex, doc: Any, start: int, end: int) -> None:
    """The header parsed while the transfer ran must agree with the table the transfer was planned from."""
    check_tensor_table(index, doc)
    if index.data_offset != plan.data_offset or index.n_layers != plan.n_layers:
        raise RemoteProtocolError(
            f"tensor table (data offset {plan.data_offset}, {plan.n_layers} layers) disagrees with the GGUF "
            f"header (data offset {index.data_offset}, {index.n_layers} layers)"
        )
    got = [t.name for t in index.assignment_tensors(start, end)]
    if got != [t.name for t in plan.assignment_tensors(start, end)]:
        raise RemoteProtocolError("tensor table and GGUF header disagree on the assignment's tensors")
