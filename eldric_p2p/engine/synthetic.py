"""Tiny random GGUF models for tests: real metadata keys and tensor names, random weights, a working vocab.

`write_synthetic_gguf(path, arch=...)` writes a well-formed file of architecture `llama`, `qwen2` or `gemma3`
with the same keys and tensor names the real files of that architecture use (checked against the two
reference files: Qwen2.5 has `attn_{q,k,v}.bias`; Gemma 3 has `attn_{q,k}_norm`, `post_attention_norm`,
`post_ffw_norm`, `key_length`/`value_length`, `sliding_window`, and a SentencePiece-style vocabulary with
scores). Weights are N(0, 0.02) quantized per tensor; norm weights are F32 around 1.

gguf-py quantizes F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 but has no quantizer for the K types, so Q4_K and
Q6_K are quantized here (a plain min/max quantizer; the engine is tested against gguf-py's *dequantizer*,
which is what matters). K types need rows whose length is a multiple of 256: pass `hidden=256` (and `ffn` a
multiple of 256) to get them; with the default 64-wide model the default mix falls back to Q5_0/Q8_0.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, LlamaFileType, TokenType
from gguf.quants import quantize

from eldric_p2p.engine.tokenizer import bytes_to_unicode

Q = GGMLQuantizationType
QK_K = 256
ARCHS = ("llama", "qwen2", "gemma3")

# Default per-role types, roughly a Q4_K_M mix. Roles are tensor names without `blk.N.` and `.weight`.
DEFAULT_TYPES: dict[str, GGMLQuantizationType] = {
    "token_embd": Q.Q8_0,
    "output": Q.Q6_K,
    "attn_q": Q.Q5_0,
    "attn_k": Q.Q5_0,
    "attn_v": Q.Q8_0,
    "attn_output": Q.Q4_K,
    "ffn_gate": Q.Q5_0,
    "ffn_up": Q.F16,
    "ffn_down": Q.Q6_K,
}
# Byte offsets of the float16 fields (scales, mins) inside one block of each quantized type; random block
# bytes (tests, benchmarks) keep these finite.
F16_FIELDS: dict[GGMLQuantizationType, list[int]] = {
    Q.Q4_0: [0],
    Q.Q4_1: [0, 2],
    Q.Q5_0: [0],
    Q.Q5_1: [0, 2],
    Q.Q8_0: [0],
    Q.Q2_K: [80, 82],
    Q.Q3_K: [108],
    Q.Q4_K: [0, 2],
    Q.Q5_K: [0, 2],
    Q.Q6_K: [208],
}
# What a default choice falls back to when the row length does not fit its block size.
_FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_0, Q.Q6_K: Q.Q8_0, Q.Q5_0: Q.F16, Q.Q8_0: Q.F16, Q.Q4_0: Q.F16}

TypeSpec = Mapping[str, "GGMLQuantizationType | str"] | GGMLQuantizationType | str | None

# GPT-2 style byte-level BPE: merges in rank order, written in the byte-to-unicode alphabet (Ġ = space).
_BPE_MERGES = (
    "Ġ t", "h e", "Ġt he", "i n", "e r", "o n", "Ġ a", "n d", "Ġa nd", "r e", "Ġ s", "o r", "e n", "Ġ w",
    "l l", "H e", "He ll", "Hell o", "Ġw or", "Ġwor l", "Ġworl d", "i s", "Ġ i", "Ġi s", "a t", "Ġ c",
    "o u", "i t", "Ġ o",
)  # fmt: skip
_BPE_SPECIALS = {
    "llama": ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"),
    "qwen2": ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
}
# SentencePiece style (Gemma): pieces in merge-priority order (score = -rank), ▁ = space.
_SPM_PIECES = (
    "▁t", "he", "▁the", "in", "er", "on", "▁a", "nd", "▁and", "re", "▁s", "or", "en", "▁w", "ll", "He",
    "Hell", "Hello", "▁wor", "▁world", "is", "▁i", "▁is", "at", "▁c", "ou", "it", "▁o", "Hel", "▁worl",
)  # fmt: skip
_SPM_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>")


def _bpe_vocab(arch: str) -> tuple[list[str], list[int], list[str], dict[str, int]]:
    """tokens, token types, merges, special ids for a byte-level BPE vocabulary."""
    tokens = list(bytes_to_unicode().values())
    for merge in _BPE_MERGES:
        a, b = merge.split(" ")
        assert a in tokens and b in tokens, merge
        tokens.append(a + b)
    types = [int(TokenType.NORMAL)] * len(tokens)
    specials = _BPE_SPECIALS[arch]
    ids = {}
    for s in specials:
        ids[s] = len(tokens)
        tokens.append(s)
        types.append(int(TokenType.CONTROL))
    bos, eos = (specials[0], specials[1]) if arch == "llama" else (specials[0], specials[2])
    return tokens, types, list(_BPE_MERGES), {"bos": ids[bos], "eos": ids[eos], "pad": ids[specials[0]]}


def _spm_vocab() -> tuple[list[str], list[int], list[float]]:
    """tokens, token types, scores for a SentencePiece-style (llama tokenizer model) vocabulary."""
    tokens = list(_SPM_SPECIALS)
    types = [int(TokenType.CONTROL)] * len(tokens)
    types[3] = int(TokenType.UNKNOWN)
    scores = [-1000.0] * len(tokens)
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [int(TokenType.BYTE)] * 256
    scores += [0.0] * 256
    chars = ["▁"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["H", "W", ",", ".", "!"]
    pieces = chars + list(_SPM_PIECES)
    for rank, p in enumerate(pieces):
        tokens.append(p)
        types.append(int(TokenType.NORMAL))
        scores.append(-float(rank))
    return tokens, types, scores


def _pad_vocab(tokens: list[str], types: list[int], vocab: int | None, name: str) -> int:
    """Append control tokens `name.format(i)` to `tokens`/`types` until there are `vocab`; returns how many.

    Raises ValueError when `vocab` is smaller than the built-in vocabulary."""
    if vocab is None:
        return 0
    if vocab < len(tokens):
        raise ValueError(f"vocab {vocab} is smaller than the built-in {len(tokens)}-token vocabulary")
    extra = vocab - len(tokens)
    tokens += [name.format(i) for i in range(extra)]
    types += [int(TokenType.CONTROL)] * extra
    return extra


def _as_type(t: GGMLQuantizationType | str) -> GGMLQuantizationType:
    return t if isinstance(t, GGMLQuantizationType) else Q[str(t).upper()]


def _fits(t: GGMLQuantizationType, row: int) -> bool:
    return row % GGML_QUANT_SIZES[t][0] == 0


def _pick_type(name: str, row: int, spec: TypeSpec) -> GGMLQuantizationType:
    """Type for weight matrix `name` (row length `row`). Explicit choices must fit; defaults fall back."""
    role = name.split(".", 2)[2] if name.startswith("blk.") else name
    role = role.removesuffix(".weight")
    if spec is None or isinstance(spec, Mapping):
        explicit = None
        if isinstance(spec, Mapping):
            for key in (name, role, f"{role}.weight", "*"):
                if key in spec:
                    explicit = _as_type(spec[key])
                    break
        if explicit is None:
            t = DEFAULT_TYPES.get(role, Q.F16)
            while not _fits(t, row):
                t = _FALLBACK[t]
            return t
    else:
        explicit = _as_type(spec)
    if not _fits(explicit, row):
        raise ValueError(f"{name}: {explicit.name} needs rows that are a multiple of "
                         f"{GGML_QUANT_SIZES[explicit][0]}, got {row}")  # fmt: skip
    return explicit


def _quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """[rows, n] float32 -> [rows, n/256 * 210] uint8 Q6_K blocks (ql[128], qh[64], scales[16] i8, d f16)."""
    rows = x.shape[0]
    blocks = x.reshape(-1, QK_K // 16, 16)  # [nb, 16 sub-blocks, 16]
    nb = blocks.shape[0]
    amax = np.abs(blocks).max(axis=-1)  # [nb, 16]
    sub_scale = amax / 31.0
    d = (sub_scale.max(axis=-1) / 127.0).astype(np.float16)  # [nb]
    df = d.astype(np.float32)[:, None]
    sc = np.where(df > 0, np.round(sub_scale / np.where(df > 0, df, 1)), 0).clip(-128, 127).astype(np.int8)
    step = (df * sc.astype(np.float32))[..., None]  # [nb, 16, 1]
    q = np.where(step > 0, np.round(blocks / np.where(step > 0, step, 1)), 0).clip(-32, 31)
    q = (q.astype(np.int16) + 32).astype(np.uint8).reshape(nb, QK_K)  # 6-bit, 0..63
    lo, hi = q & 0x0F, q >> 4
    lo = lo.reshape(nb, 2, 2, 64)  # [nb, half, nibble, 64]
    ql = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(nb, 128)
    hi = hi.reshape(nb, 2, 4, 32)  # [nb, half, 2-bit slot, 32]
    qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(nb, 64)
    out = np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8).reshape(nb, 2)], axis=-1)
    return out.reshape(rows, -1)


def _quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """[rows, n] float32 -> [rows, n/256 * 144] uint8 Q4_K blocks (d f16, dmin f16, scales[12], qs[128])."""
    rows = x.shape[0]
    blocks = x.reshape(-1, 8, 32)  # [nb, 8 sub-blocks, 32]
    nb = blocks.shape[0]
    lo = np.minimum(blocks.min(axis=-1), 0.0)  # [nb, 8]
    sub_scale = (blocks.max(axis=-1) - lo) / 15.0
    sub_min = -lo
    d = (sub_scale.max(axis=-1) / 63.0).astype(np.float16)
    dmin = (sub_min.max(axis=-1) / 63.0).astype(np.float16)
    df, dmf = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    sc = np.where(df > 0, np.round(sub_scale / np.where(df > 0, df, 1)), 0).clip(0, 63).astype(np.uint8)
    mn = np.where(dmf > 0, np.round(sub_min / np.where(dmf > 0, dmf, 1)), 0).clip(0, 63).astype(np.uint8)
    step = (df * sc)[..., None]  # [nb, 8, 1]
    offs = (dmf * mn)[..., None]
    q = np.where(step > 0, np.round((blocks + offs) / np.where(step > 0, step, 1)), 0).clip(0, 15)
    q = q.astype(np.uint8).reshape(nb, 4, 2, 32)  # [nb, chunk, nibble, 32]
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(nb, 128)
    scales = np.concatenate(
        [
            sc[:, :4] | ((sc[:, 4:] >> 4) << 6),
            mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
            (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4),
        ],
        axis=-1,
    )  # [nb, 12]
    halves = [d.view(np.uint8).reshape(nb, 2), dmin.view(np.uint8).reshape(nb, 2)]  # [nb, 2] each
    out = np.concatenate([*halves, scales, qs], axis=-1)
    return out.reshape(rows, -1)


def quantize_array(x: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """numpy-order float32 `[rows, row_len]` -> the bytes GGUFWriter stores for `qtype`."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if qtype == Q.F32:
        return x
    if qtype == Q.F16:
        return x.astype(np.float16)
    if qtype == Q.Q6_K:
        return _quantize_q6_k(x)
    if qtype == Q.Q4_K:
        return _quantize_q4_k(x)
    return quantize(x, qtype)


def write_synthetic_gguf(
    path: str | os.PathLike[str],
    *,
    arch: str = "llama",
    n_layers: int = 4,
    hidden: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    ffn: int = 128,
    vocab: int | None = None,
    head_dim: int | None = None,
    tensor_types: TypeSpec = None,
    tied_embeddings: bool = False,
    output_first: bool = False,
    seed: int = 0,
    chat_template: str | None = None,
    context_length: int = 2048,
    rope_freq_base: float = 10000.0,
) -> Path:
    """Write a tiny random model of `arch` to `path` and return the path. Deterministic for a given seed.

    `vocab=None` uses the natural size of the built-in vocabulary (288 tokens for llama/qwen2, 324 for
    gemma3); a larger `vocab` pads with reserved control tokens. `tensor_types` is one type for every weight
    matrix, or a mapping from tensor name / role (`"ffn_down"`, `"attn_q.weight"`, `"token_embd"`, `"*"`)
    to a type (`GGMLQuantizationType` or its name); roles not named use `DEFAULT_TYPES`. Norms and biases are
    F32. `output_first=True` stores `output.weight` before every other tensor, as the Qwen2.5 file does.
    Raises ValueError for an unknown arch, inconsistent sizes, or a type whose block does not fit a row.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")
    if n_heads % n_kv_heads:
        raise ValueError(f"n_heads {n_heads} is not a multiple of n_kv_heads {n_kv_heads}")
    hd = head_dim if head_dim is not None else hidden // n_heads
    rng = np.random.default_rng(seed)
    path = Path(path)

    w = GGUFWriter(path, arch)
    w.add_name(f"synthetic-{arch}")
    w.add_type("model")
    w.add_block_count(n_layers)
    w.add_context_length(context_length)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_rope_freq_base(rope_freq_base)
    w.add_layer_norm_rms_eps(1e-6)
    if arch == "llama":
        w.add_rope_dimension_count(hd)
    if arch == "gemma3":
        w.add_key_length(hd)
        w.add_value_length(hd)
        w.add_sliding_window(64)
    w.add_file_type(LlamaFileType.MOSTLY_Q4_K_M)
    w.add_quantization_version(2)

    if arch == "gemma3":
        tokens, types, scores = _spm_vocab()
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        scores += [-1000.0] * _pad_vocab(tokens, types, vocab, "<unused{}>")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(2)
        w.add_eos_token_id(1)
        w.add_unk_token_id(3)
        w.add_pad_token_id(0)
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
        w.add_add_space_prefix(False)
    else:
        tokens, types, merges, ids = _bpe_vocab(arch)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2" if arch == "qwen2" else "llama-bpe")
        _pad_vocab(tokens, types, vocab, "<|reserved_{}|>")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(ids["bos"])
        w.add_eos_token_id(ids["eos"])
        w.add_pad_token_id(ids["pad"])
        w.add_add_bos_token(arch == "llama")
    if chat_template is not None:
        w.add_chat_template(chat_template)
    n_vocab = len(tokens)

    def matrix(name: str, rows: int, cols: int) -> None:
        # ggml shape (cols, rows): numpy [rows, cols], each row `cols` long.
        qtype = _pick_type(name, cols, tensor_types)
        x = rng.normal(0.0, 0.02, size=(rows, cols)).astype(np.float32)
        w.add_tensor(name, quantize_array(x, qtype), raw_dtype=qtype)

    def vector(name: str, n: int, *, around: float) -> None:
        x = (around + rng.normal(0.0, 0.02, size=(n,))).astype(np.float32)
        w.add_tensor(name, x, raw_dtype=Q.F32)

    has_output = not tied_embeddings
    if has_output and output_first:
        matrix("output.weight", n_vocab, hidden)
    matrix("token_embd.weight", n_vocab, hidden)
    for i in range(n_layers):
        p = f"blk.{i}."
        vector(p + "attn_norm.weight", hidden, around=1.0)
        matrix(p + "attn_q.weight", n_heads * hd, hidden)
        matrix(p + "attn_k.weight", n_kv_heads * hd, hidden)
        matrix(p + "attn_v.weight", n_kv_heads * hd, hidden)
        if arch == "qwen2":
            vector(p + "attn_q.bias", n_heads * hd, around=0.0)
            vector(p + "attn_k.bias", n_kv_heads * hd, around=0.0)
            vector(p + "attn_v.bias", n_kv_heads * hd, around=0.0)
        if arch == "gemma3":
            vector(p + "attn_q_norm.weight", hd, around=1.0)
            vector(p + "attn_k_norm.weight", hd, around=1.0)
        matrix(p + "attn_output.weight", hidden, n_heads * hd)
        if arch == "gemma3":
            vector(p + "post_attention_norm.weight", hidden, around=1.0)
        vector(p + "ffn_norm.weight", hidden, around=1.0)
        matrix(p + "ffn_gate.weight", ffn, hidden)
        matrix(p + "ffn_up.weight", ffn, hidden)
        matrix(p + "ffn_down.weight", hidden, ffn)
        if arch == "gemma3":
            vector(p + "post_ffw_norm.weight", hidden, around=1.0)
    vector("output_norm.weight", hidden, around=1.0)
    if has_output and not output_first:
        matrix("output.weight", n_vocab, hidden)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
