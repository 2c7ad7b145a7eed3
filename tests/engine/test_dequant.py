from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from eldric_p2p.data.gguf_index import GGUFFile
from eldric_p2p.engine import dequant
from eldric_p2p.engine.dequant import dequantize, supported_types
from eldric_p2p.engine.synthetic import F16_FIELDS
from eldric_p2p.errors import GGUFFormatError, UnsupportedModel

T = GGMLQuantizationType

QUANTIZABLE = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.BF16]  # gguf-py quantizes these itself


def _finite_f16_bits(rng: np.random.Generator, n: int) -> np.ndarray:
    """Random float16 bit patterns (normals, subnormals, zeros, both signs), never inf or NaN."""
    bits = rng.integers(0, 1 << 16, size=n, dtype=np.uint16)
    return np.where((bits & 0x7C00) == 0x7C00, bits & np.uint16(0xBFFF), bits).astype(np.uint16)


def _random_blocks(qtype: GGMLQuantizationType, rows: int, blocks_per_row: int, seed: int) -> np.ndarray:
    """[rows, blocks_per_row * type_size] random bytes whose float16 fields are finite."""
    rng = np.random.default_rng(seed)
    _, type_size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows * blocks_per_row, type_size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        raw[:, off : off + 2] = _finite_f16_bits(rng, rows * blocks_per_row).view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, blocks_per_row * type_size)


def _reference(raw: np.ndarray, qtype: GGMLQuantizationType) -> torch.Tensor:
    ref = gguf_quants.dequantize(raw, qtype)
    assert np.isfinite(ref).all()
    return torch.from_numpy(np.array(ref))  # a copy: F32 references are views of read-only bytes


def test_supported_types_cover_the_issue_list() -> None:
    floats = {T.F32, T.F16, T.BF16}
    assert supported_types() == floats | set(F16_FIELDS)


@pytest.mark.parametrize("rows, per_row", [(5, 3), (1, 1)], ids=["5x3", "1x1"])
@pytest.mark.parametrize("qtype", list(F16_FIELDS), ids=lambda t: t.name)
def test_random_blocks_match_gguf_bit_exact(qtype: GGMLQuantizationType, rows: int, per_row: int) -> None:
    block_size, _ = GGML_QUANT_SIZES[qtype]
    raw = _random_blocks(qtype, rows, per_row, seed=int(qtype))
    got = dequantize(memoryview(raw.tobytes()), qtype, (per_row * block_size, rows), name="w")
    assert got.dtype == torch.float32
    assert torch.equal(got, _reference(raw, qtype))


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_quantized_values_round_trip_bit_exact(qtype: GGMLQuantizationType) -> None:
    block_size, _ = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(100 + int(qtype))
    values = (rng.standard_normal((6, 4 * max(block_size, 32))) * 3).astype(np.float32)
    raw = gguf_quants.quantize(values, qtype)
    got = dequantize(raw, qtype, (values.shape[1], values.shape[0]), name="w")
    assert torch.equal(got, _reference(raw, qtype))
    # and the quantization error stays small, so the packing really decoded the values
    assert float((got - torch.from_numpy(values)).abs().max()) < 0.1 * 3 * 4


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16], ids=lambda t: t.name)
def test_float_types_match_gguf(qtype: GGMLQuantizationType) -> None:
    rng = np.random.default_rng(7)
    values = rng.standard_normal((3, 40)).astype(np.float32)
    if qtype == T.F32:
        raw = values.view(np.uint8)
    elif qtype == T.F16:
        raw = values.astype(np.float16).view(np.uint8)
    else:
        raw = gguf_quants.quantize(values, T.BF16)
    got = dequantize(raw.tobytes(), qtype, (40, 3), name="w")
    assert torch.equal(got, _reference(raw, qtype))


def test_chunked_tensor_matches_gguf(monkeypatch: pytest.MonkeyPatch) -> None:
    # more blocks than one chunk holds, with a last chunk of a single block
    monkeypatch.setattr(dequant, "CPU_CHUNK_ELEMENTS", 1000 * 32)
    raw = _random_blocks(T.Q5_0, 1, 3001, seed=3)
    got = dequantize(raw, T.Q5_0, (3001 * 32, 1), name="w")
    assert torch.equal(got, _reference(raw, T.Q5_0))


def test_shape_is_reversed_ggml_order() -> None:
    # ggml shape (in=64, out=3): element [o, i] is the i-th value of row o
    values = np.arange(3 * 64, dtype=np.float32).reshape(3, 64)
    raw = gguf_quants.quantize(values / 1000, T.Q8_0)
    got = dequantize(raw, T.Q8_0, (64, 3), name="w")
    assert got.shape == (3, 64)
    assert torch.equal(got.argmax(dim=1), torch.tensor([63, 63, 63]))
    assert bool((got[2] > got[0]).all())
    f32 = dequantize(values.tobytes(), T.F32, (16, 4, 3))
    assert f32.shape == (3, 4, 16)
    assert torch.equal(f32.reshape(3, 64), torch.from_numpy(values))


def test_dtype_is_the_float32_result_cast() -> None:
    raw = _random_blocks(T.Q4_K, 2, 2, seed=11)
    f32 = dequantize(raw, T.Q4_K, (512, 2))
    bf16 = dequantize(raw, T.Q4_K, (512, 2), dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    assert torch.equal(bf16, f32.to(torch.bfloat16))


def test_result_is_a_writable_copy_of_read_only_bytes() -> None:
    values = np.ones((2, 32), dtype=np.float32)
    raw = values.tobytes()
    got = dequantize(memoryview(raw), T.F32, (32, 2))
    got += 1  # must not touch (or crash on) the read-only source
    assert raw == values.tobytes()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("qtype", sorted(supported_types()), ids=lambda t: t.name)
def test_cuda_matches_cpu_bit_exact(qtype: GGMLQuantizationType) -> None:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if qtype in F16_FIELDS:
        raw = _random_blocks(qtype, 9, 700, seed=21)
    else:
        values = np.random.default_rng(21).standard_normal((9, 700 * block_size)).astype(np.float32)
        raw = values.astype(np.float16) if qtype == T.F16 else gguf_quants.quantize(values, qtype)
    shape = (700 * block_size, 9)
    for dtype in (torch.float32, torch.bfloat16):
        cpu = dequantize(raw, qtype, shape, dtype=dtype)
        cuda = dequantize(raw, qtype, shape, dtype=dtype, device="cuda")
        assert cuda.device.type == "cuda"
        assert torch.equal(cuda.cpu(), cpu)


def test_unsupported_type_names_tensor_and_type() -> None:
    _, type_size = GGML_QUANT_SIZES[T.IQ2_XXS]
    with pytest.raises(UnsupportedModel, match=r"blk\.0\.ffn_up\.weight.*IQ2_XXS"):
        dequantize(bytes(type_size), T.IQ2_XXS, (256, 1), name="blk.0.ffn_up.weight")
    with pytest.raises(UnsupportedModel, match="tok.*9999"):
        dequantize(b"", 9999, (1,), name="tok")


def test_wrong_length_names_tensor() -> None:
    raw = _random_blocks(T.Q8_0, 2, 2, seed=5)
    with pytest.raises(GGUFFormatError, match=r"output\.weight"):
        dequantize(raw.tobytes()[:-1], T.Q8_0, (64, 2), name="output.weight")
    with pytest.raises(GGUFFormatError, match=r"output\.weight"):
        dequantize(raw.tobytes(), T.Q8_0, (64, 3), name="output.weight")
    with pytest.raises(GGUFFormatError, match="block size"):
        dequantize(raw.tobytes(), T.Q8_0, (48, 2), name="output.weight")


def _check_whole_file(path: Path) -> None:
    with GGUFFile(path) as f:
        for name, info in f.index.tensors.items():
            raw = np.frombuffer(f.tensor_data(name), dtype=np.uint8)
            ref = gguf_quants.dequantize(raw.reshape(*reversed(info.shape[1:]), -1), info.ggml_type)
            got = dequantize(raw, info.ggml_type, info.shape, name=name)
            assert got.shape == ref.shape, name
            assert torch.equal(got, torch.from_numpy(np.array(ref))), name
            del raw


@pytest.mark.slow
@pytest.mark.models
def test_qwen_every_tensor_bit_exact(qwen_path: Path) -> None:
    _check_whole_file(qwen_path)


@pytest.mark.slow
@pytest.mark.models
def test_gemma_every_tensor_bit_exact(gemma_path: Path) -> None:
    _check_whole_file(gemma_path)
