"""A stage's layers in one C call: `_qkernels.layers` (engine/csrc/qk_layer.h) computes what `Stage._layer`
computes in torch glue around the kernels, in the same order with the same roundings, so the bits are the same
(tests/engine/test_fused.py) without ~20 torch and Python calls per layer.

    plans = layer_plans(cfg, layers)          # at load: None where the layers cannot run fused
    h = run_layers(plans, h, segments, threads, h_is_input=...)

Used with native weights and the exact ops (CPU, f16 caches); `ELDRIC_FUSED=0` in the environment turns it off
(`enabled()`), and `Stage.fused = False` does for one stage.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from eldric_p2p.engine.config import ModelConfig

if TYPE_CHECKING:
    from eldric_p2p.engine.model import Layer, _Segment

try:  # the C extension; without it the layers run in torch glue
    from eldric_p2p.engine import _qkernels
except ImportError:  # pragma: no cover - built by setup.py where a C compiler exists
    _qkernels = None  # type: ignore[assignment]


def enabled() -> bool:
    """False when the environment asks for the torch glue (ELDRIC_FUSED=0)."""
    return os.environ.get("ELDRIC_FUSED", "1") != "0"


def layer_plans(cfg: ModelConfig, layers: Sequence[Layer]) -> tuple[object, ...] | None:
    """One `_qkernels.layer_plan` per layer (holding views of its weights, norms and biases), or None when the
    extension is not built or a matrix has no native kernel. The caller checks the rest (native weights, the
    exact ops)."""
    if _qkernels is None:
        return None
    specs = [_layer_spec(cfg, layer) for layer in layers]
    if any(spec is None for spec in specs):
        return None
    return tuple(_qkernels.layer_plan(spec) for spec in specs)


def run_layers(
    plans: tuple[object, ...],
    h: torch.Tensor,
    segments: Sequence[_Segment],
    threads: int,
    *,
    h_is_input: bool,
) -> torch.Tensor:
    """Every layer over h [N, hidden] float32 (the segments' rows, in order), writing each segment's keys and
    values into its cache; returns the hidden states. `h_is_input`: h is the caller's tensor, which is not
    written to (a copy is)."""
    if h_is_input:
        h = h.clone(memory_format=torch.contiguous_format)
    caches = tuple((seg.cache.k.numpy(), seg.cache.v.numpy(), seg.cache.max_ctx, seg.pos0, seg.T)
                   for seg in segments)  # fmt: skip
    _qkernels.layers(plans, h.numpy(), caches, threads)
    return h


def _layer_spec(cfg: ModelConfig, layer: Layer) -> dict[str, object] | None:
    """What `_qkernels.layer_plan` takes for one layer (its buffers are views, not copies); None when a matrix
    has no native kernel."""
    mats = {"wq": layer.wq, "wk": layer.wk, "wv": layer.wv, "wo": layer.wo, "gate": layer.w_gate,
            "up": layer.w_up, "down": layer.w_down}  # fmt: skip
    spec: dict[str, object] = {}
    for name, m in mats.items():
        if m.q is None:
            return None
        spec[name] = (m.q.data.numpy(), int(m.q.ggml_type), -1 if m.q.repacked is None else int(m.q.repacked))
    vecs = {"bq": layer.wq.bias, "bk": layer.wk.bias, "bv": layer.wv.bias, "attn_norm": layer.attn_norm,
            "ffn_norm": layer.ffn_norm, "q_norm": layer.q_norm, "k_norm": layer.k_norm,
            "post_attn_norm": layer.post_attn_norm, "post_ffn_norm": layer.post_ffn_norm}  # fmt: skip
    for name, vec in vecs.items():
        spec[name] = None if vec is None else vec.float().contiguous().numpy()
    spec.update(
        hidden=cfg.hidden, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, ffn=cfg.ffn,
        rope_dims=cfg.rope_dim, neox=int(cfg.rope_neox), gelu=int(cfg.act == "gelu_tanh"),
        rope_base=layer.rope_base, freq_scale=1.0 / cfg.rope_scale, eps=cfg.norm_eps, q_scale=cfg.attn_scale,
        score_scale=1.0 if cfg.attn_scale else 1.0 / math.sqrt(cfg.head_dim),
        window=(cfg.sliding_window or 0) if layer.sliding else 0,
    )  # fmt: skip
    return spec
