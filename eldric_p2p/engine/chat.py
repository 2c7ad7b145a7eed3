"""Chat prompts: `tokenizer.chat_template` rendered with jinja2 the way Hugging Face renders it.

The environment is transformers' (`apply_chat_template`): an immutable sandbox with `trim_blocks` and
`lstrip_blocks`, the `loopcontrols` extension, a `tojson` filter that keeps non-ASCII text, and the globals
`raise_exception` and `strftime_now`; the template sees `messages`, `add_generation_prompt`, `tools`,
`documents` and the special-token strings (`bos_token`, `eos_token`, ...).

A file without a template gets a fallback: Gemma's own template for `gemma*` architectures (a system
message is folded into the first user turn), ChatML otherwise.

BOS: like HF, a template that wants BOS writes `bos_token` itself, so encode the result with
`Tokenizer.encode(text, add_bos=False)`. A caller that lets the tokenizer add BOS as the file asks
(llama.cpp's way) passes `strip_bos=True` to drop a leading BOS text from the rendering.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from eldric_p2p.errors import InvalidInput, UnsupportedModel

MAX_TEMPLATE = 1024 * 1024
MAX_MESSAGES = 10_000

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Gemma 3's published template (text parts only).
GEMMA_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {{- message['content'] | trim }}
    {{- '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\n' }}
{%- endif -%}
"""


class _TemplateRaised(Exception):
    """`raise_exception(...)` called by a template (a problem with the messages)."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """Compile a chat template in HF's sandboxed environment; UnsupportedModel if it does not compile."""
    if len(source) > MAX_TEMPLATE:
        raise UnsupportedModel(f"chat template of {len(source)} characters is over the {MAX_TEMPLATE} limit")
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols], undefined=jinja2.Undefined
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise UnsupportedModel(
            f"the model's chat template does not compile: line {exc.lineno}: {exc}"
        ) from exc


def template_source(metadata: Mapping[str, Any]) -> str:
    """The file's `tokenizer.chat_template`, else the fallback for its architecture."""
    source = metadata.get("tokenizer.chat_template")
    if isinstance(source, str) and source.strip():
        return source
    arch = str(metadata.get("general.architecture", ""))
    return GEMMA_TEMPLATE if arch.startswith("gemma") else CHATML_TEMPLATE


def special_token_strings(metadata: Mapping[str, Any]) -> dict[str, str]:
    """`bos_token`, `eos_token`, `unk_token`, `pad_token` texts from the vocabulary ("" when absent)."""
    tokens = metadata.get("tokenizer.ggml.tokens")
    out: dict[str, str] = {}
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
                      ("pad", "padding_token_id")):  # fmt: skip
        tid = metadata.get(f"tokenizer.ggml.{key}")
        ok = tokens is not None and tid is not None and 0 <= int(tid) < len(tokens)
        out[f"{name}_token"] = str(tokens[int(tid)]) if ok else ""  # type: ignore[index]
    return out


def _check_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
        raise InvalidInput("messages must be a list of {role, content} objects")
    if not 0 < len(messages) <= MAX_MESSAGES:
        raise InvalidInput(f"messages must hold 1 to {MAX_MESSAGES} entries, not {len(messages)}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise InvalidInput(f"messages[{i}] is not an object")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise InvalidInput(f"messages[{i}].role must be a non-empty string")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise InvalidInput(f"messages[{i}].content must be a string")
        out.append({**m, "role": role, "content": content})
    return out


def render_chat(
    metadata: Mapping[str, Any],
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    strip_bos: bool = False,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """Prompt text for `messages` ([{role, content}, ...]); encode it with `add_bos=False`.

    Raises InvalidInput for malformed messages or when the template rejects them (`raise_exception`),
    UnsupportedModel when the file's template does not compile or fails on well-formed messages.
    """
    msgs = _check_messages(messages)
    template = compile_template(template_source(metadata))
    specials = special_token_strings(metadata)
    try:
        text = template.render(
            messages=msgs, add_generation_prompt=add_generation_prompt, tools=tools, documents=None,
            **specials,
        )  # fmt: skip
    except _TemplateRaised as exc:
        raise InvalidInput(f"the chat template rejected the messages: {exc}") from exc
    except jinja2.TemplateError as exc:
        raise UnsupportedModel(f"the model's chat template failed: {exc}") from exc
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
        raise UnsupportedModel(f"the model's chat template failed: {type(exc).__name__}: {exc}") from exc
    bos = specials["bos_token"]
    if strip_bos and bos and text.startswith(bos):
        text = text[len(bos) :]
    return text
