"""Model configuration derived from GGUF metadata: architecture differences are fields, not subclasses.

`ModelConfig.from_index(index)` reads the `{arch}.*` keys once; everything else in the engine reads fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from eldric_p2p.data.gguf_index import GGUFIndex
from eldric_p2p.errors import UnsupportedModel

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma3")


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    context_length: int
    norm_eps: float
    rope_base: float
    rope_dim: int  # leading dims of each head that are rotated
    rope_neox: (
        bool  # True: rotate halves (qwen2, gemma3); False: rotate interleaved pairs (llama's GGUF layout)
    )
    rope_scale: float = 1.0  # linear position scaling (positions are divided by this)
    rope_base_local: float | None = None  # sliding-window layers' own base (gemma3)
    sliding_window: int | None = None
    sliding_pattern: int = 0  # every `sliding_pattern`-th layer is global; 0 = none are sliding
    embed_scale: float = 1.0
    act: str = "silu"  # "silu" | "gelu_tanh"
    qkv_bias: bool = False
    qk_norm: bool = False
    post_norms: bool = False
    attn_scale: float = 0.0  # applied to q before q·k; 0 means 1/sqrt(head_dim) applied to scores
    tied_embeddings: bool = False

    def is_sliding(self, layer: int) -> bool:
        """Whether absolute layer `layer` attends only to the last `sliding_window` positions."""
        return (
            bool(self.sliding_window) and self.sliding_pattern > 0 and (layer + 1) % self.sliding_pattern != 0
        )

    def layer_rope_base(self, layer: int) -> float:
        if self.is_sliding(layer) and self.rope_base_local is not None:
            return self.rope_base_local
        return self.rope_base

    @classmethod
    def from_index(cls, index: GGUFIndex) -> ModelConfig:
        """Read the config of `index`'s model. Raises `UnsupportedModel` for architectures we do not run."""
        arch = index.architecture
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModel(
                f"architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )

        def req(suffix: str) -> int | float:
            value = index.get(suffix)
            if value is None:
                raise UnsupportedModel(f"{arch} model lacks metadata key {arch}.{suffix}")
            return value

        hidden = int(req("embedding_length"))
        n_heads = int(req("attention.head_count"))
        n_kv = index.get("attention.head_count_kv", n_heads)
        if not isinstance(n_kv, int):  # per-layer arrays (e.g. some Llama variants): not supported
            raise UnsupportedModel(f"{arch}: per-layer head_count_kv is not supported")
        head_dim = int(index.get("attention.key_length", hidden // n_heads))
        if int(index.get("attention.value_length", head_dim)) != head_dim:
            raise UnsupportedModel(f"{arch}: key_length != value_length is not supported")
        embd = index.tensors.get("token_embd.weight")
        if embd is None:
            raise UnsupportedModel("model has no token_embd.weight")
        vocab = embd.shape[1]
        scaling = index.get("rope.scaling.type")
        rope_scale = 1.0
        if scaling == "linear":
            rope_scale = float(index.get("rope.scaling.factor", 1.0))
        elif scaling not in (None, "none"):
            raise UnsupportedModel(f"{arch}: rope scaling {scaling!r} is not supported")

        fields: dict = dict(
            arch=arch,
            n_layers=index.n_layers,
            hidden=hidden,
            n_heads=n_heads,
            n_kv_heads=int(n_kv),
            head_dim=head_dim,
            ffn=int(req("feed_forward_length")),
            vocab=vocab,
            context_length=int(index.get("context_length", 4096)),
            norm_eps=float(req("attention.layer_norm_rms_epsilon")),
            rope_base=float(index.get("rope.freq_base", 10000.0)),
            rope_dim=int(index.get("rope.dimension_count", head_dim)),
            rope_neox=arch in ("qwen2", "gemma3"),
            rope_scale=rope_scale,
            qkv_bias="blk.0.attn_q.bias" in index.tensors,
            tied_embeddings="output.weight" not in index.tensors,
        )
        if arch == "gemma3":
            fields.update(
                rope_base_local=10000.0,
                sliding_window=int(index.get("attention.sliding_window", 0)) or None,
                sliding_pattern=6,
                embed_scale=math.sqrt(hidden),
                act="gelu_tanh",
                qk_norm=True,
                post_norms=True,
                attn_scale=1.0 / math.sqrt(head_dim),
            )
        return cls(**fields)
