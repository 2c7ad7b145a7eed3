"""Tokenizer built from a GGUF file's own `tokenizer.ggml.*` metadata, tokenizing exactly as llama.cpp does.

Two vocabulary kinds, both run by the `tokenizers` library:

- `gpt2`: byte-level BPE with ranked merges; the pre-tokenizer regexes are picked by `tokenizer.ggml.pre`
  (the same table llama.cpp compiles in: `qwen2`, `llama-bpe`/`llama3`, `gpt2`, `default`).
- `llama`: SentencePiece-style BPE where the merge order comes from token scores (a pair merges when the
  joined piece is in the vocabulary; higher score first), spaces become U+2581, characters outside the
  vocabulary fall back to `<0xNN>` byte tokens. The merge list is derived here as transformers'
  `SentencePieceExtractor` does.

Control tokens (type 3) are matched atomically in text when `parse_special=True`; user-defined tokens
(type 4, e.g. Gemma's whitespace runs and HTML tags) always are — llama.cpp's `tokenizer_st_partition` rule.
Building the `tokenizers` object from a 262k vocabulary takes seconds, so the built JSON is cached under the
data dir, keyed by a hash of everything it was built from.

Decoding does not go through `tokenizers`: each id maps to its bytes (llama.cpp's `token_to_piece`), and text
is the UTF-8 decoding of the joined bytes, so a stream never splits a multi-byte character.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import tempfile
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from eldric_p2p.errors import InvalidInput, UnsupportedModel
from eldric_p2p.paths import default_data_dir

# llama.cpp token types (gguf TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_QWEN2 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# `tokenizer.ggml.pre` -> regexes applied in sequence (each splits the pieces of the previous one).
PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "qwen2": (_QWEN2,),
    "stablelm2": (_QWEN2,),
    "llama-bpe": (_LLAMA3,),
    "llama3": (_LLAMA3,),
    "gpt2": (_GPT2,),
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
}
_IGNORE_MERGES = {"llama-bpe", "llama3"}  # llama.cpp looks a whole pre-token up in the vocabulary first

# Texts llama.cpp treats as end of generation when the file names no EOT id.
STOP_TEXTS = ("<|im_end|>", "<end_of_turn>", "<|endoftext|>", "<|eot_id|>", "<|end|>")

MAX_VOCAB = 4_000_000
_CACHE_FORMAT = "eldric-tokenizer-v1"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


_BYTE_DECODER = {c: b for b, c in bytes_to_unicode().items()}


def _as_list(value: Any, name: str) -> list[Any]:
    if value is None:
        raise UnsupportedModel(f"GGUF metadata has no {name!r}: cannot build a tokenizer")
    return list(value.tolist() if isinstance(value, np.ndarray) else value)


def _opt_id(metadata: Mapping[str, Any], key: str, n: int) -> int | None:
    value = metadata.get(f"tokenizer.ggml.{key}")
    if value is None:
        return None
    value = int(value)
    return value if 0 <= value < n else None  # llama.cpp ignores ids outside the vocabulary


def spm_merges(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """Merge list for a score-ranked (SentencePiece-style) vocabulary, highest-scoring result first.

    Every split of a piece into two pieces of the vocabulary is a merge, ranked by the joined piece's
    score; splits of one piece are ordered by the ids of their halves (transformers' order).
    """
    vocab = {t: i for i, t in enumerate(tokens)}
    found: list[tuple[float, int, int, str, str]] = []
    for piece, score in zip(tokens, scores, strict=True):
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            il, ir = vocab.get(left), vocab.get(right)
            if il is not None and ir is not None:
                found.append((-score, il, ir, left, right))
    found.sort(key=lambda m: (m[0], vocab[m[3] + m[4]], m[1], m[2]))
    return [(m[3], m[4]) for m in found]


class Tokenizer:
    """Text <-> token ids for one model, as llama.cpp tokenizes it.

    Build with `Tokenizer.from_gguf_metadata(index.metadata)`; then `encode`, `decode`, `stream_decoder()`.
    """

    def __init__(
        self,
        hf: HFTokenizer,
        *,
        kind: str,
        tokens: list[str],
        token_types: list[int],
        bos_id: int | None,
        eos_id: int | None,
        stop_ids: frozenset[int],
        add_bos: bool,
    ) -> None:
        self._hf = hf
        self.kind = kind  # "gpt2" or "llama"
        self._tokens = tokens
        self._types = token_types
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.stop_ids = stop_ids
        self.add_bos = add_bos
        self._pieces: list[bytes] | None = None
        self._lock = threading.Lock()

    # --- construction -------------------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any], *, cache_dir: Path | None = None) -> Tokenizer:
        """Build the tokenizer a GGUF file describes. Raises UnsupportedModel for an unknown kind.

        `cache_dir` (default `<data dir>/tokenizers`) holds built tokenizers keyed by a vocabulary hash.
        """
        model = str(metadata.get("tokenizer.ggml.model", ""))
        if model not in ("gpt2", "llama"):
            raise UnsupportedModel(f"tokenizer model {model!r} is not supported (gpt2 and llama are)")
        tokens = [str(t) for t in _as_list(metadata.get("tokenizer.ggml.tokens"), "tokenizer.ggml.tokens")]
        n = len(tokens)
        if not 0 < n <= MAX_VOCAB:
            raise UnsupportedModel(f"vocabulary of {n} tokens is outside (0, {MAX_VOCAB}]")
        raw_types = metadata.get("tokenizer.ggml.token_type")
        types = [NORMAL] * n if raw_types is None else [int(t) for t in _as_list(raw_types, "token_type")]
        if len(types) < n:
            raise UnsupportedModel(f"token_type has {len(types)} entries for {n} tokens")
        types = types[:n]
        pre = str(metadata.get("tokenizer.ggml.pre", "default") or "default")
        if model == "gpt2":
            if pre not in PRE_TOKENIZERS:
                raise UnsupportedModel(f"pre-tokenizer {pre!r} is not supported: {sorted(PRE_TOKENIZERS)}")
            merges_raw = [str(m) for m in _as_list(metadata.get("tokenizer.ggml.merges"), "merges")]
            scores: list[float] = []
        else:
            merges_raw = []
            raw_scores = metadata.get("tokenizer.ggml.scores")
            scores = [0.0] * n if raw_scores is None else [float(s) for s in _as_list(raw_scores, "scores")]
            if len(scores) < n:
                raise UnsupportedModel(f"scores has {len(scores)} entries for {n} tokens")
            scores = scores[:n]
        add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", model == "llama"))

        bos_id = _opt_id(metadata, "bos_token_id", n)
        eos_id = _opt_id(metadata, "eos_token_id", n)
        eot_id = _opt_id(metadata, "eot_token_id", n)
        unk_id = _opt_id(metadata, "unknown_token_id", n)
        add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", model == "llama")) and bos_id is not None
        stop = {i for i in (eos_id, eot_id, _opt_id(metadata, "eom_token_id", n)) if i is not None}
        by_text = {t: i for i, t in enumerate(tokens)}
        stop |= {by_text[t] for t in STOP_TEXTS if t in by_text}

        key = hashlib.sha256()
        for part in (_CACHE_FORMAT, model, pre, str(add_space_prefix), str(unk_id)):
            key.update(part.encode() + b"\0")
        key.update("\0".join(tokens).encode("utf-8", "surrogatepass"))
        key.update(np.asarray(types, dtype=np.int32).tobytes())
        key.update(np.asarray(scores, dtype=np.float32).tobytes())
        key.update("\n".join(merges_raw).encode("utf-8", "surrogatepass"))
        cache = (cache_dir or default_data_dir() / "tokenizers") / f"{key.hexdigest()[:32]}.json"

        hf: HFTokenizer | None = None
        if cache.is_file():
            try:
                hf = HFTokenizer.from_file(str(cache))
            except Exception:  # a corrupt cache entry is rebuilt, never trusted
                hf = None
        if hf is None:
            if model == "gpt2":
                hf = _build_gpt2(tokens, types, merges_raw, pre)
            else:
                hf = _build_spm(tokens, types, scores, add_space_prefix, unk_id)
            _write_cache(cache, hf.to_str())
        return cls(
            hf, kind=model, tokens=tokens, token_types=types, bos_id=bos_id, eos_id=eos_id,
            stop_ids=frozenset(stop), add_bos=add_bos,
        )  # fmt: skip

    # --- encode / decode ----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    def token_text(self, token_id: int) -> str:
        """The vocabulary entry of `token_id` as stored in the file."""
        self._check_ids([token_id])
        return self._tokens[token_id]

    def encode(self, text: str, *, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        """Token ids of `text`. `add_bos=None` follows the file's `add_bos_token` (llama.cpp's add_special).

        With `parse_special`, control tokens written in the text (`<|im_start|>`) become their ids.
        """
        if not isinstance(text, str):
            raise InvalidInput(f"text to encode must be str, not {type(text).__name__}")
        with self._lock:  # encode_special_tokens is tokenizer-wide state
            self._hf.encode_special_tokens = not parse_special
            ids = self._hf.encode(text, add_special_tokens=False).ids if text else []
        want_bos = self.add_bos if add_bos is None else add_bos
        if want_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Iterable[int], *, special: bool = True) -> str:
        """Text of `ids`; invalid UTF-8 becomes U+FFFD. `special=False` drops control tokens' text."""
        ids = list(ids)
        self._check_ids(ids)
        pieces = self.pieces()
        control = self._types
        if special:
            data = b"".join(pieces[i] for i in ids)
        else:
            data = b"".join(pieces[i] for i in ids if control[i] != CONTROL)
        return data.decode("utf-8", errors="replace")

    def stream_decoder(self, *, special: bool = True) -> StreamDecoder:
        """A decoder fed one id at a time that only ever yields whole characters."""
        return StreamDecoder(self, special=special)

    def is_stop(self, token_id: int) -> bool:
        return token_id in self.stop_ids

    def pieces(self) -> list[bytes]:
        """Bytes of every token id (llama.cpp's token_to_piece with special=True)."""
        if self._pieces is None:
            self._pieces = [self._piece(t, ty) for t, ty in zip(self._tokens, self._types, strict=True)]
        return self._pieces

    def _piece(self, text: str, ttype: int) -> bytes:
        if ttype in (CONTROL, USER_DEFINED, UNKNOWN):
            return text.encode("utf-8", "surrogatepass")
        if self.kind == "gpt2":
            try:
                return bytes(_BYTE_DECODER[c] for c in text)
            except KeyError:
                return text.encode("utf-8", "surrogatepass")
        if ttype == BYTE and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            return bytes([int(text[3:5], 16)])
        return text.replace("\u2581", " ").encode("utf-8", "surrogatepass")

    def _check_ids(self, ids: Sequence[int]) -> None:
        n = len(self._tokens)
        for i in ids:
            if not isinstance(i, int | np.integer) or isinstance(i, bool) or not 0 <= i < n:
                raise InvalidInput(f"token id {i!r} is outside the vocabulary [0, {n})")


class StreamDecoder:
    """Incremental detokenizer: `push(id)` returns the text that became complete (maybe "")."""

    def __init__(self, tokenizer: Tokenizer, *, special: bool = True) -> None:
        self._tok = tokenizer
        self._special = special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        self._tok._check_ids([token_id])
        if not self._special and self._tok._types[token_id] == CONTROL:
            return ""
        return self._utf8.decode(self._tok.pieces()[token_id])

    def flush(self) -> str:
        """Text still held back (an unfinished character becomes U+FFFD); call once at the end."""
        return self._utf8.decode(b"", final=True)


def _added_tokens(tokens: list[str], types: list[int]) -> list[AddedToken]:
    added = []
    for text, ttype in zip(tokens, types, strict=True):
        if ttype in (CONTROL, USER_DEFINED, UNKNOWN) and text:
            added.append(AddedToken(text, special=ttype != USER_DEFINED, normalized=False))
    return added


def _vocab_dict(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # llama.cpp keeps the last duplicate; real files have none
    return vocab


def _build_gpt2(tokens: list[str], types: list[int], merges_raw: list[str], pre: str) -> HFTokenizer:
    merges = []
    for m in merges_raw:
        pos = m.find(" ", 1)  # llama.cpp's split: the first space after the first character
        if pos > 0:
            merges.append((m[:pos], m[pos + 1 :]))
    bpe = models.BPE(vocab=_vocab_dict(tokens), merges=merges, ignore_merges=pre in _IGNORE_MERGES)
    hf = HFTokenizer(bpe)
    splits: list[pre_tokenizers.PreTokenizer] = [
        pre_tokenizers.Split(Regex(rx), behavior="isolated", invert=False) for rx in PRE_TOKENIZERS[pre]
    ]
    splits.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    hf.pre_tokenizer = pre_tokenizers.Sequence(splits)
    hf.decoder = decoders.ByteLevel()
    hf.add_tokens(_added_tokens(tokens, types))
    return hf


def _build_spm(
    tokens: list[str], types: list[int], scores: list[float], add_space_prefix: bool, unk_id: int | None
) -> HFTokenizer:
    unk = tokens[unk_id] if unk_id is not None else None
    bpe = models.BPE(
        vocab=_vocab_dict(tokens), merges=spm_merges(tokens, scores), unk_token=unk, fuse_unk=True,
        byte_fallback=True,
    )  # fmt: skip
    hf = HFTokenizer(bpe)
    norms: list[normalizers.Normalizer] = []
    if add_space_prefix:
        norms.append(normalizers.Prepend("\u2581"))
    norms.append(normalizers.Replace(" ", "\u2581"))
    hf.normalizer = normalizers.Sequence(norms)
    hf.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    hf.add_tokens(_added_tokens(tokens, types))
    return hf


def _write_cache(path: Path, text: str) -> None:
    """Atomic write; a read-only or full disk only costs the next start its build time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tok-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError:
        pass


__all__ = ["PRE_TOKENIZERS", "STOP_TEXTS", "StreamDecoder", "Tokenizer", "spm_merges"]
