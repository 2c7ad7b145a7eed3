from __future__ import annotations

import struct
from pathlib import Path

import pytest
from gguf import GGUFValueType

from eldric_p2p.data.gguf_index import GGUFFile, TruncatedHeader, parse_gguf_untrusted, read_index
from eldric_p2p.engine.synthetic import write_synthetic_gguf
from eldric_p2p.errors import GGUFFormatError


def header(n_tensors: int, n_kv: int, version: int = 3) -> bytes:
    return struct.pack("<IIQQ", 0x46554747, version, n_tensors, n_kv)


def gstr(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_parse_synthetic_every_arch(tmp_path: Path, arch: str) -> None:
    p = write_synthetic_gguf(tmp_path / "m.gguf", arch=arch, n_layers=3)
    data = p.read_bytes()
    ix = parse_gguf_untrusted(data)
    assert ix.architecture == arch and ix.n_layers == 3
    assert ix.data_offset % ix.alignment == 0
    # every tensor inside the file, none overlapping
    spans = sorted((t.offset, t.end) for t in ix.tensors.values())
    assert all(a >= ix.data_offset for a, _ in spans) and spans[-1][1] <= len(data)
    assert all(b <= c for (_, b), (c, _) in zip(spans, spans[1:]))
    # the layer map: head, middle, tail
    head = {t.name for t in ix.assignment_tensors(0, 1)}
    tail = {t.name for t in ix.assignment_tensors(2, 3)}
    assert "token_embd.weight" in head and "output.weight" not in head
    assert {"output.weight", "output_norm.weight"} <= tail and "token_embd.weight" not in tail
    assert all(n.startswith("blk.1.") for n in (t.name for t in ix.assignment_tensors(1, 2)))


def test_tied_embeddings_go_to_the_tail(tmp_path: Path) -> None:
    ix = read_index(write_synthetic_gguf(tmp_path / "m.gguf", arch="gemma3", tied_embeddings=True))
    assert "token_embd.weight" in {t.name for t in ix.assignment_tensors(3, 4)}


def test_output_first_ranges_are_exact(tmp_path: Path) -> None:
    ix = read_index(write_synthetic_gguf(tmp_path / "m.gguf", arch="qwen2", output_first=True))
    ranges = ix.assignment_ranges(3, 4)
    assert len(ranges) == 2  # output.weight at the front, layer 3 + output_norm at the back
    assert ranges[0][0] == ix.tensors["output.weight"].offset
    mid = ix.assignment_ranges(1, 2)
    assert mid == [(min(t.offset for t in ix.assignment_tensors(1, 2)), max(t.end for t in ix.assignment_tensors(1, 2)))]


def test_prefix_parsing_raises_truncated_then_succeeds(tmp_path: Path) -> None:
    data = write_synthetic_gguf(tmp_path / "m.gguf", arch="qwen2").read_bytes()
    full = parse_gguf_untrusted(data)
    n = 10
    while True:
        try:
            ix = parse_gguf_untrusted(data[:n], file_size=len(data))
            break
        except TruncatedHeader as exc:
            assert exc.needed > n - 1
            n = max(exc.needed, n + 1)
    assert n <= full.data_offset
    assert ix.tensors == full.tensors and ix.data_offset == full.data_offset


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (b"GGUX" + bytes(20), "bad magic"),
        (header(0, 0, version=9), "version"),
        (header(10**9, 0), "over the limits"),
        (header(0, 10**9), "over the limits"),
        (header(0, 1) + gstr(b"k") + struct.pack("<I", 99), "unknown GGUF value type"),
        (header(0, 1) + struct.pack("<Q", 10**12), "limit"),
        (header(0, 1) + gstr(b"k") + struct.pack("<IQ", GGUFValueType.STRING, 2**60), "limit"),
        (header(0, 1) + gstr(b"k") + struct.pack("<IIQ", GGUFValueType.ARRAY, GGUFValueType.UINT8, 2**40), "limit"),
        (header(0, 1) + gstr(b"k") + struct.pack("<IIQ", GGUFValueType.ARRAY, GGUFValueType.STRING, 2)
         + gstr(b"a") + struct.pack("<Q", 2**62), "limit"),
        (header(0, 1) + gstr(b"k") + struct.pack("<IIQ", GGUFValueType.ARRAY, GGUFValueType.ARRAY, 1), "nested"),
        (header(1, 0) + gstr(b"t") + struct.pack("<I", 9), "dimensions"),
        (header(1, 0) + gstr(b"t") + struct.pack("<IQIQ", 1, 32, 1234, 0), "unknown ggml type"),
        (header(1, 0) + gstr(b"t") + struct.pack("<IQIQ", 1, 33, 8, 0), "invalid shape"),  # Q8_0 needs 32s
        (header(1, 0) + gstr(b"t") + struct.pack("<IQIQ", 1, 32, 0, 2**40), "past the file end"),
        (header(1, 0) + gstr(b"t") + struct.pack("<IQIQ", 1, 32, 0, 3), "aligned"),
        (header(2, 0) + (gstr(b"t") + struct.pack("<IQIQ", 1, 1, 0, 0)) * 2 + bytes(64), "duplicate"),
    ],
)
def test_hostile_headers(blob: bytes, match: str) -> None:
    with pytest.raises(GGUFFormatError, match=match) as info:
        parse_gguf_untrusted(blob + bytes(8), file_size=len(blob) + 8)
    assert not isinstance(info.value, TruncatedHeader) or match == "limit"


def test_hostile_alignment_and_empty_file(tmp_path: Path) -> None:
    blob = header(0, 1) + gstr(b"general.alignment") + struct.pack("<II", GGUFValueType.UINT32, 3)
    with pytest.raises(GGUFFormatError, match="alignment"):
        parse_gguf_untrusted(blob)
    (tmp_path / "e.gguf").write_bytes(b"")
    with pytest.raises(GGUFFormatError, match="empty"):
        GGUFFile(tmp_path / "e.gguf")


def test_truncated_file_is_a_format_error_naming_it(tmp_path: Path) -> None:
    data = write_synthetic_gguf(tmp_path / "m.gguf").read_bytes()
    for cut in (100, len(data) // 2):
        (tmp_path / "t.gguf").write_bytes(data[:cut])
        with pytest.raises(GGUFFormatError, match="t.gguf"):
            read_index(tmp_path / "t.gguf")


def test_tensor_data_reads_the_bytes(tmp_path: Path) -> None:
    p = write_synthetic_gguf(tmp_path / "m.gguf")
    data = p.read_bytes()
    with GGUFFile(p) as f:
        t = f.index.tensors["blk.2.ffn_up.weight"]
        assert bytes(f.tensor_data(t.name)) == data[t.offset : t.end]


def test_invalid_utf8_string_kept_lossless() -> None:
    blob = header(0, 1) + gstr(b"k") + struct.pack("<IIQ", GGUFValueType.ARRAY, GGUFValueType.STRING, 2)
    blob += gstr(b"ok") + gstr(b"\xff\xfe")
    ix = parse_gguf_untrusted(blob)
    assert ix.metadata["k"][0] == "ok"
    assert ix.metadata["k"][1].encode("utf-8", "surrogateescape") == b"\xff\xfe"


@pytest.mark.models
def test_reference_headers(qwen_path: Path, gemma_path: Path) -> None:
    q, g = read_index(qwen_path), read_index(gemma_path)
    assert (q.architecture, q.n_layers, q.get("embedding_length")) == ("qwen2", 24, 896)
    assert next(iter(q.tensors)) == "output.weight"
    assert (g.architecture, g.n_layers, g.get("embedding_length")) == ("gemma3", 18, 640)
    assert "output.weight" not in g.tensors
    assert "token_embd.weight" in {t.name for t in g.assignment_tensors(17, 18)}
