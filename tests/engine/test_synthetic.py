from __future__ import annotations

import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize

from eldric_p2p.data.gguf_index import GGUFFile, read_index
from eldric_p2p.engine.synthetic import quantize_array, write_synthetic_gguf

Q = gguf.GGMLQuantizationType


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_arch_keys_and_tensor_names_match_real_files(tmp_path: Path, arch: str) -> None:
    ix = read_index(write_synthetic_gguf(tmp_path / "m.gguf", arch=arch, n_layers=3))
    assert ix.architecture == arch
    assert ix.n_layers == 3
    assert ix.get("embedding_length") == 64
    assert ix.get("attention.head_count") == 4 and ix.get("attention.head_count_kv") == 2
    names = set(ix.tensors)
    for i in range(3):
        for part in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate",
                     "ffn_up", "ffn_down"):  # fmt: skip
            assert f"blk.{i}.{part}.weight" in names
    assert {"token_embd.weight", "output_norm.weight", "output.weight"} <= names
    has_bias = "blk.0.attn_q.bias" in names
    assert has_bias == (arch == "qwen2")
    gemma_parts = {"blk.1.attn_q_norm.weight", "blk.1.attn_k_norm.weight", "blk.1.post_attention_norm.weight",
                   "blk.1.post_ffw_norm.weight"}  # fmt: skip
    assert (gemma_parts <= names) == (arch == "gemma3")
    if arch == "gemma3":
        assert ix.get("attention.key_length") == 16 and ix.get("attention.sliding_window") == 64
        assert ix.metadata["tokenizer.ggml.model"] == "llama"
        assert len(ix.metadata["tokenizer.ggml.scores"]) == len(ix.metadata["tokenizer.ggml.tokens"])
    else:
        assert ix.metadata["tokenizer.ggml.model"] == "gpt2"
        assert len(ix.metadata["tokenizer.ggml.merges"]) > 0
    # token_embd rows == vocabulary size
    assert ix.tensors["token_embd.weight"].shape == (64, len(ix.metadata["tokenizer.ggml.tokens"]))


def test_gguf_py_reader_agrees(tmp_path: Path) -> None:
    p = write_synthetic_gguf(tmp_path / "m.gguf", arch="gemma3", hidden=256, ffn=512)
    reader = gguf.GGUFReader(p)
    ix = read_index(p)
    assert [t.name for t in reader.tensors] == list(ix.tensors)
    for t in reader.tensors:
        mine = ix.tensors[t.name]
        assert int(t.data_offset) == mine.offset and int(t.n_bytes) == mine.nbytes
        assert t.tensor_type == mine.ggml_type


def test_deterministic_by_seed_and_fast(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    a = write_synthetic_gguf(tmp_path / "a.gguf", arch="qwen2", seed=3).read_bytes()
    assert time.perf_counter() - t0 < 0.5
    b = write_synthetic_gguf(tmp_path / "b.gguf", arch="qwen2", seed=3).read_bytes()
    c = write_synthetic_gguf(tmp_path / "c.gguf", arch="qwen2", seed=4).read_bytes()
    assert a == b
    assert a != c


def test_k_quants_when_rows_fit(tmp_path: Path) -> None:
    p = write_synthetic_gguf(tmp_path / "m.gguf", arch="llama", hidden=256, ffn=512)
    types = {t.ggml_type for t in read_index(p).tensors.values()}
    assert {Q.F32, Q.F16, Q.Q8_0, Q.Q4_K, Q.Q6_K, Q.Q5_0} <= types


def test_explicit_types_and_misfit(tmp_path: Path) -> None:
    p = write_synthetic_gguf(tmp_path / "m.gguf", tensor_types={"ffn_down": "Q4_0", "*": Q.F16})
    ix = read_index(p)
    assert ix.tensors["blk.0.ffn_down.weight"].ggml_type == Q.Q4_0
    assert ix.tensors["blk.2.attn_q.weight"].ggml_type == Q.F16
    assert ix.tensors["blk.2.attn_norm.weight"].ggml_type == Q.F32
    with pytest.raises(ValueError, match="multiple of 256"):
        write_synthetic_gguf(tmp_path / "bad.gguf", tensor_types=Q.Q6_K)


def test_output_first_tied_and_template(tmp_path: Path) -> None:
    path = write_synthetic_gguf(tmp_path / "a.gguf", arch="qwen2", output_first=True, chat_template="{{x}}")
    ix = read_index(path)
    assert next(iter(ix.tensors)) == "output.weight"
    assert ix.metadata["tokenizer.chat_template"] == "{{x}}"
    tied = read_index(write_synthetic_gguf(tmp_path / "b.gguf", arch="gemma3", tied_embeddings=True))
    assert "output.weight" not in tied.tensors
    assert "tokenizer.chat_template" not in tied.metadata
    padded = read_index(write_synthetic_gguf(tmp_path / "c.gguf", vocab=300))
    assert len(padded.metadata["tokenizer.ggml.tokens"]) == 300
    assert padded.tensors["output.weight"].shape == (64, 300)


def test_weights_are_small_and_norms_near_one(tmp_path: Path) -> None:
    p = write_synthetic_gguf(tmp_path / "m.gguf", arch="llama", hidden=256, ffn=512)
    with GGUFFile(p) as f:
        for name, t in f.index.tensors.items():
            raw = np.frombuffer(f.tensor_data(name), dtype=np.uint8)
            x = dequantize(raw.reshape(t.shape[-1] if len(t.shape) > 1 else 1, -1), t.ggml_type)
            assert np.isfinite(x).all()
            if name.endswith("norm.weight"):
                assert abs(float(x.mean()) - 1.0) < 0.05, name
            else:
                assert float(np.abs(x).max()) < 0.2, name
                assert 0.01 < float(x.std()) < 0.03, name


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K])
def test_k_quantizers_round_trip_through_gguf_py(qtype: Q) -> None:
    x = np.random.default_rng(0).normal(0, 0.02, size=(4, 512)).astype(np.float32)
    y = dequantize(quantize_array(x, qtype), qtype)
    assert y.shape == x.shape
    tol = 0.006 if qtype == Q.Q4_K else 0.0015
    assert float(np.abs(x - y).max()) < tol


def test_bpe_vocab_tokenizes_with_tokenizers(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    md = read_index(write_synthetic_gguf(tmp_path / "m.gguf", arch="qwen2")).metadata
    toks = md["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ")) for m in md["tokenizer.ggml.merges"]]
    tk = Tokenizer(models.BPE({t: i for i, t in enumerate(toks)}, merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    enc = tk.encode("Hello world, the end")
    assert enc.tokens[:3] == ["Hello", "Ġworld", ","]
    assert tk.decode(enc.ids) == "Hello world, the end"
    assert toks[md["tokenizer.ggml.eos_token_id"]] == "<|im_end|>"
