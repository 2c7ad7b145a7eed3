from __future__ import annotations

import json
from pathlib import Path

import pytest

from eldric_p2p.data.gguf_index import read_index
from eldric_p2p.engine.synthetic import write_synthetic_gguf
from eldric_p2p.engine.tokenizer import Tokenizer, spm_merges
from eldric_p2p.errors import InvalidInput, UnsupportedModel

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("synth")
    out = {}
    for arch in ("qwen2", "gemma3", "llama"):
        path = write_synthetic_gguf(root / f"{arch}.gguf", arch=arch, n_layers=1, hidden=32, ffn=64)
        out[arch] = read_index(path).metadata
    return out


def _tok(metadata: dict, tmp_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(metadata, cache_dir=tmp_path / "tok-cache")


def _texts(tok: Tokenizer, ids: list[int]) -> list[str]:
    return [tok.token_text(i) for i in ids]


def test_byte_level_bpe_merges_and_spaces(synth: dict, tmp_path: Path) -> None:
    tok = _tok(synth["qwen2"], tmp_path)
    ids = tok.encode("Hello world")
    assert _texts(tok, ids) == ["Hello", "Ġworld"]
    assert tok.decode(ids) == "Hello world"
    assert tok.encode("") == []
    assert tok.bos_id is not None and tok.encode("Hello")[0] != tok.bos_id  # qwen2 files ask for no BOS


def test_byte_level_bpe_round_trips_any_text(synth: dict, tmp_path: Path) -> None:
    tok = _tok(synth["qwen2"], tmp_path)
    text = "  the\tworld\n\n日本 Привет 🤖 x=1;  "
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_qwen2_regex_splits_digits_and_keeps_space_runs(synth: dict, tmp_path: Path) -> None:
    tok = _tok(synth["qwen2"], tmp_path)
    # qwen2 pre-tokenizer: one digit per piece; a space run before a word leaves its last space to the word
    assert _texts(tok, tok.encode("123")) == ["1", "2", "3"]
    assert _texts(tok, tok.encode("a   the")) == ["a", "Ġ", "Ġ", "Ġthe"]


def test_control_tokens_are_atomic_only_when_parsing_special(synth: dict, tmp_path: Path) -> None:
    tok = _tok(synth["qwen2"], tmp_path)
    text = "<|im_start|>Hello<|im_end|>"
    ids = tok.encode(text)
    assert _texts(tok, ids) == ["<|im_start|>", "Hello", "<|im_end|>"]
    plain = tok.encode(text, parse_special=False)
    assert len(plain) > 3 and "<|im_start|>" not in _texts(tok, plain)
    assert tok.decode(plain) == text
    assert tok.decode(ids, special=False) == "Hello"


def test_stop_ids(synth: dict, tmp_path: Path) -> None:
    qwen = _tok(synth["qwen2"], tmp_path)
    assert {qwen.token_text(i) for i in qwen.stop_ids} == {"<|im_end|>", "<|endoftext|>"}
    assert qwen.eos_id in qwen.stop_ids
    gemma = _tok(synth["gemma3"], tmp_path)
    assert {gemma.token_text(i) for i in gemma.stop_ids} == {"<eos>", "<end_of_turn>"}
    llama = _tok(synth["llama"], tmp_path)
    assert llama.is_stop(llama.encode("<|eot_id|>", add_bos=False)[0])


def test_llama3_vocab_adds_bos(synth: dict, tmp_path: Path) -> None:
    tok = _tok(synth["llama"], tmp_path)
    ids = tok.encode("Hello world")
    assert ids[0] == tok.bos_id and _texts(tok, ids[1:]) == ["Hello", "Ġworld"]
    assert tok.encode("Hello world", add_bos=False) == ids[1:]


def test_sentencepiece_vocab(synth: dict, tmp_path: Path) -> None:
    tok = _tok(synth["gemma3"], tmp_path)
    ids = tok.encode("Hello world")
    assert ids[0] == tok.bos_id  # the file asks for BOS
    assert _texts(tok, ids[1:]) == ["Hello", "▁world"]  # no dummy prefix: add_space_prefix is False
    assert tok.decode(ids[1:]) == "Hello world"
    # characters outside the vocabulary fall back to UTF-8 byte tokens
    ids = tok.encode("é", add_bos=False)
    assert _texts(tok, ids) == ["<0xC3>", "<0xA9>"]
    assert tok.decode(ids) == "é"
    ids = tok.encode("<start_of_turn>Hello<end_of_turn>", add_bos=False)
    assert _texts(tok, ids) == ["<start_of_turn>", "Hello", "<end_of_turn>"]


def test_spm_merges_follow_scores() -> None:
    tokens = ["a", "b", "c", "ab", "bc", "abc"]
    scores = [0.0, 0.0, 0.0, -2.0, -1.0, -3.0]
    # bc scores higher than ab, so it merges first; abc is reachable from a+bc and ab+c
    assert spm_merges(tokens, scores) == [("b", "c"), ("a", "b"), ("a", "bc"), ("ab", "c")]


def test_stream_decoder_never_splits_a_character(synth: dict, tmp_path: Path) -> None:
    tok = _tok(synth["gemma3"], tmp_path)
    text = "é🤖 Hello 日本"
    ids = tok.encode(text, add_bos=False)
    assert len(ids) > len(text)  # multi-byte characters arrive as several byte tokens
    dec = tok.stream_decoder()
    parts = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(parts) == text
    assert all("\ufffd" not in p for p in parts)
    assert "" in parts  # some tokens completed no character
    # a stream cut inside a character shows a replacement character only when flushed
    dec = tok.stream_decoder()
    assert dec.push(ids[0]) == ""
    assert dec.flush() == "\ufffd"


def test_bad_ids_and_unsupported_vocab(synth: dict, tmp_path: Path) -> None:
    tok = _tok(synth["qwen2"], tmp_path)
    with pytest.raises(InvalidInput):
        tok.decode([tok.vocab_size])
    with pytest.raises(InvalidInput):
        tok.decode([-1])
    with pytest.raises(InvalidInput):
        tok.stream_decoder().push(10**9)
    with pytest.raises(UnsupportedModel, match="tokenizer model"):
        Tokenizer.from_gguf_metadata({**synth["qwen2"], "tokenizer.ggml.model": "bert"}, cache_dir=tmp_path)
    with pytest.raises(UnsupportedModel, match="pre-tokenizer"):
        Tokenizer.from_gguf_metadata({**synth["qwen2"], "tokenizer.ggml.pre": "nope"}, cache_dir=tmp_path)


def test_cache_is_used_and_a_corrupt_entry_is_rebuilt(synth: dict, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = Tokenizer.from_gguf_metadata(synth["gemma3"], cache_dir=cache)
    files = list(cache.glob("*.json"))
    assert len(files) == 1
    files[0].write_text("{ not json")
    again = Tokenizer.from_gguf_metadata(synth["gemma3"], cache_dir=cache)
    assert again.encode("Hello world") == first.encode("Hello world")
    json.loads(files[0].read_text())  # rewritten


def _check_fixture(name: str, path: Path) -> None:
    fixture = json.loads((FIXTURES / f"llamacpp_{name}.json").read_text(encoding="utf-8"))
    assert fixture["model"] == path.name
    tok = Tokenizer.from_gguf_metadata(read_index(path).metadata)
    # (text, add_bos, parse_special, llama.cpp's ids); add_bos None = as the file asks
    cases = [(c["text"], None, c["special"], c["ids"]) for c in fixture["tokenize"]]
    cases += [(p["text"], None if p["add_bos"] else False, True, p["prompt_ids"]) for p in fixture["prompts"]]
    assert len(cases) > 30
    wrong = [(t, b, s) for t, b, s, ids in cases if tok.encode(t, add_bos=b, parse_special=s) != ids]
    assert wrong == []
    for text, add_bos, _special, ids in cases:
        body = ids[1:] if add_bos is None and tok.add_bos and ids[:1] == [tok.bos_id] else ids
        assert tok.decode(body) == text


@pytest.mark.models
def test_qwen_tokenization_equals_llamacpp(qwen_path: Path) -> None:
    _check_fixture("qwen", qwen_path)


@pytest.mark.models
def test_gemma_tokenization_equals_llamacpp(gemma_path: Path) -> None:
    _check_fixture("gemma", gemma_path)


REFERENCE_SHA256 = {
    "qwen": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    "gemma": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
}


@pytest.mark.parametrize("name", sorted(REFERENCE_SHA256))
def test_reference_fixture_is_complete(name: str) -> None:
    """The engine tests rely on these files: the right model, >= 600 positions, consistent greedy/top-5."""
    fixture = json.loads((FIXTURES / f"llamacpp_{name}.json").read_text(encoding="utf-8"))
    assert fixture["sha256"] == REFERENCE_SHA256[name]
    assert fixture["positions"] >= 600
    assert {p["kind"] for p in fixture["prompts"]} == {"raw", "chat"}
    for p in fixture["prompts"]:
        n_prompt, greedy = len(p["prompt_ids"]), p["greedy_ids"]
        assert len(greedy) == fixture["n_predict"] >= 32
        assert len(p["top_ids"]) == len(p["top_logits"]) == n_prompt + len(greedy)
        assert [p["top_ids"][n_prompt - 1 + j][0] for j in range(len(greedy))] == greedy
        assert all(row == sorted(row, reverse=True) for row in p["top_logits"])
