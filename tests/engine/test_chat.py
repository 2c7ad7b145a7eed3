from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from eldric_p2p.data.gguf_index import read_index
from eldric_p2p.engine.chat import render_chat
from eldric_p2p.engine.synthetic import write_synthetic_gguf
from eldric_p2p.engine.tokenizer import Tokenizer
from eldric_p2p.errors import InvalidInput, UnsupportedModel

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "More"},
]


@pytest.fixture(scope="module")
def gemma_meta(tmp_path_factory: pytest.TempPathFactory) -> dict:
    path = tmp_path_factory.mktemp("chat") / "g.gguf"
    return read_index(write_synthetic_gguf(path, arch="gemma3", n_layers=1, hidden=32, ffn=64)).metadata


@pytest.fixture(scope="module")
def qwen_meta(tmp_path_factory: pytest.TempPathFactory) -> dict:
    path = tmp_path_factory.mktemp("chat") / "q.gguf"
    return read_index(write_synthetic_gguf(path, arch="qwen2", n_layers=1, hidden=32, ffn=64)).metadata


def _with_template(meta: dict, template: str) -> dict:
    return {**meta, "tokenizer.chat_template": template}


def test_gemma_fallback_folds_system_into_first_user_turn(gemma_meta: dict) -> None:
    assert "tokenizer.chat_template" not in gemma_meta
    text = render_chat(gemma_meta, CONVERSATION)
    assert text == (
        "<bos><start_of_turn>user\nYou are terse.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nMore<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    # for callers that let the tokenizer add BOS as the file asks
    assert render_chat(gemma_meta, CONVERSATION, strip_bos=True) == text.removeprefix("<bos>")
    assert not render_chat(gemma_meta, CONVERSATION[:2], add_generation_prompt=False).endswith("model\n")


def test_rendered_chat_tokenizes_with_exactly_one_bos(gemma_meta: dict, tmp_path: Path) -> None:
    tok = Tokenizer.from_gguf_metadata(gemma_meta, cache_dir=tmp_path)
    ids = tok.encode(render_chat(gemma_meta, CONVERSATION[1:2]), add_bos=False)
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id
    assert ids == tok.encode(render_chat(gemma_meta, CONVERSATION[1:2], strip_bos=True))


def test_gemma_fallback_rejects_non_alternating_roles(gemma_meta: dict) -> None:
    with pytest.raises(InvalidInput, match="alternate"):
        render_chat(gemma_meta, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_chatml_fallback(qwen_meta: dict) -> None:
    text = render_chat(qwen_meta, CONVERSATION[1:2])
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_hf_environment_trims_blocks_and_keeps_unicode_in_tojson(qwen_meta: dict) -> None:
    template = (
        "{% for m in messages %}\n"
        "    {% if m.role == 'user' %}\n"
        "U:{{ m.content | tojson }}\n"
        "    {% endif %}\n"
        "{% endfor %}"
        "{{ strftime_now('%Y') }}"
    )
    text = render_chat(_with_template(qwen_meta, template), [{"role": "user", "content": "héllo"}])
    assert text == f'U:"héllo"\n{datetime.now().year}'


def test_bad_templates_are_clear_errors(qwen_meta: dict) -> None:
    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(UnsupportedModel, match="does not compile"):
        render_chat(_with_template(qwen_meta, "{% for m in messages %}"), msgs)
    with pytest.raises(InvalidInput, match="no users"):
        render_chat(_with_template(qwen_meta, "{{ raise_exception('no users') }}"), msgs)
    with pytest.raises(UnsupportedModel, match="failed"):  # the sandbox refuses attribute escapes
        render_chat(_with_template(qwen_meta, "{{ ''.__class__.__mro__[1].__subclasses__() }}"), msgs)


def test_malformed_messages(qwen_meta: dict) -> None:
    for bad in ([], "hi", [{"content": "no role"}], [{"role": "user", "content": 5}], [None]):
        with pytest.raises(InvalidInput):
            render_chat(qwen_meta, bad)  # type: ignore[arg-type]


@pytest.mark.models
def test_qwen_template_renders_as_hugging_face(qwen_path: Path) -> None:
    meta = read_index(qwen_path).metadata
    # the output of transformers' apply_chat_template for Qwen2.5-Coder-Instruct
    assert render_chat(meta, CONVERSATION) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nMore<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert render_chat(meta, CONVERSATION[1:2], add_generation_prompt=False) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
    )


@pytest.mark.models
def test_gemma_reference_file_uses_the_fallback(gemma_path: Path) -> None:
    meta = read_index(gemma_path).metadata
    text = render_chat(meta, [{"role": "user", "content": "Hi"}])
    assert text == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
