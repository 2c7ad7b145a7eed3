"""Turning sampled token ids into streamed text, and the one-process generation loop.

`TextStream` is sans-IO: feed it each sampled id, it returns the text that may be shown now and whether the
generation is over (stop token, stop string, or token budget). The local loop below and the distributed
pipeline's head both drive it, so both stop and cut text identically.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from eldric_p2p.data.gguf_index import GGUFFile
from eldric_p2p.engine.chat import render_chat
from eldric_p2p.engine.model import Stage
from eldric_p2p.engine.sampling import Sampler, SamplingParams
from eldric_p2p.engine.tokenizer import Tokenizer
from eldric_p2p.errors import InvalidInput


class TextStream:
    """Stop handling and incremental text for one generation."""

    def __init__(
        self, tokenizer: Tokenizer, *, max_tokens: int, stop: Sequence[str] = (), ignore_eos: bool = False
    ) -> None:
        self.tokenizer = tokenizer
        self.decoder = tokenizer.stream_decoder(special=False)
        self.max_tokens = max_tokens
        self.stop = [s for s in stop if s]
        self.ignore_eos = ignore_eos  # benchmarks: generate exactly max_tokens
        self.token_ids: list[int] = []
        self.text = ""  # text released so far
        self._pending = ""  # decoded text held back while it could still be the start of a stop string
        self.finish_reason: str | None = None

    def push(self, token_id: int) -> str:
        """Account for one sampled token; return the text that can be shown now."""
        if self.finish_reason is not None:
            return ""
        if self.tokenizer.is_stop(token_id) and not self.ignore_eos:
            self.finish_reason = "stop"
            return self._release(self._pending + self.decoder.flush(), final=True)
        self.token_ids.append(token_id)
        out = self._release(self._pending + self.decoder.push(token_id))
        if self.finish_reason is None and len(self.token_ids) >= self.max_tokens:
            self.finish_reason = "length"
            out += self._release(self._pending + self.decoder.flush(), final=True)
        return out

    def _release(self, text: str, *, final: bool = False) -> str:
        self._pending = ""
        for s in self.stop:
            cut = text.find(s)
            if cut >= 0:
                self.finish_reason = "stop"
                text = text[:cut]
                self.text += text
                return text
        if not final and self.stop:
            hold = 0
            for s in self.stop:  # keep back the longest suffix that is a prefix of a stop string
                for n in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:n]):
                        hold = max(hold, n)
                        break
            if hold:
                text, self._pending = text[:-hold], text[-hold:]
        self.text += text
        return text

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


def prompt_token_ids(
    tokenizer: Tokenizer, metadata: dict, prompt: str | list[dict], *, raw: bool
) -> list[int]:
    """Token ids for a prompt: raw text (BOS as the model asks) or chat messages through the chat template."""
    if raw:
        if not isinstance(prompt, str):
            raise InvalidInput("a raw prompt must be a string")
        return tokenizer.encode(prompt)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    text = render_chat(metadata, messages, add_generation_prompt=True)
    # The template writes BOS itself when the model wants one.
    return tokenizer.encode(text, add_bos=False, parse_special=True)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str
    prefill_s: float
    decode_s: float
    decode_steps: int  # forward passes after the prefill (the first token comes out of the prefill)
    extra: dict = field(default_factory=dict)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s > 0 else 0.0

    def as_json(self) -> dict:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "prompt_token_ids": self.prompt_token_ids,
            "finish_reason": self.finish_reason,
            "prefill_s": round(self.prefill_s, 4),
            "decode_s": round(self.decode_s, 4),
            "prefill_tokens_per_s": round(len(self.prompt_token_ids) / self.prefill_s, 2)
            if self.prefill_s
            else 0,
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 2),
            **self.extra,
        }


class LocalModel:
    """A whole model in one process, optionally split into several stages (to check split invariance)."""

    def __init__(
        self,
        path: str | Path,
        *,
        device: str = "cpu",
        weights: str = "auto",
        max_ctx: int = 4096,
        splits: Sequence[int] = (),
    ) -> None:
        self.file = GGUFFile(path)
        index = self.file.index
        self.metadata = index.metadata
        self.tokenizer = Tokenizer.from_gguf_metadata(index.metadata)
        bounds = [0, *splits, index.n_layers]
        self.stages = [
            Stage(self.file, a, b, device=device, weights=weights, max_ctx=max_ctx)
            for a, b in zip(bounds, bounds[1:], strict=False)
        ]
        self._next_sid = 0

    def forward(self, sid: str, ids: list[int], pos: int, *, last_only: bool = False) -> torch.Tensor:
        x: torch.Tensor = torch.tensor(ids, dtype=torch.int64)
        for stage in self.stages:
            x = stage.forward(sid, x, pos, last_only=last_only)
        return x  # [T, vocab], or [1, vocab] with last_only

    def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        on_text: Callable[[str], None] | None = None,
        *,
        ignore_eos: bool = False,
    ) -> GenerationResult:
        if not prompt_ids:
            raise InvalidInput("empty prompt")
        ctx = self.stages[0].max_ctx
        if len(prompt_ids) + params.max_tokens > ctx:
            raise InvalidInput(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) "
                f"exceed the {ctx}-token context"
            )
        sid = f"local-{self._next_sid}"
        self._next_sid += 1
        for stage in self.stages:
            stage.open_session(sid)
        sampler = Sampler(params)
        stream = TextStream(
            self.tokenizer, max_tokens=params.max_tokens, stop=params.stop, ignore_eos=ignore_eos
        )
        history = list(prompt_ids)
        steps = 0
        try:
            t0 = time.perf_counter()
            logits = self.forward(sid, prompt_ids, 0, last_only=True)
            token = sampler.sample(logits[-1], history)
            t1 = time.perf_counter()
            while True:
                text = stream.push(token)
                if text and on_text:
                    on_text(text)
                if stream.done:
                    break
                history.append(token)
                logits = self.forward(sid, [token], len(history) - 1, last_only=True)
                steps += 1
                token = sampler.sample(logits[-1], history)
            t2 = time.perf_counter()
        finally:
            for stage in self.stages:
                stage.close_session(sid)
        return GenerationResult(
            text=stream.text,
            token_ids=stream.token_ids,
            prompt_token_ids=list(prompt_ids),
            finish_reason=stream.finish_reason or "stop",
            prefill_s=t1 - t0,
            decode_s=t2 - t1,
            decode_steps=steps,
        )
