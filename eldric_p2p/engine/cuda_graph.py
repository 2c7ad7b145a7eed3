"""A session's one-token decode step on CUDA, captured once as a CUDA graph and replayed.

On a GPU a decode step of a small model is a few thousand tiny kernels; launched one by one from Python the
host is the bottleneck (measured on an H200, Qwen2.5-0.5B bf16: 3.4 ms of GPU work in a 29 ms step). A CUDA
graph launches them all at once. The captured step is the stage's own layer code (`Stage._layer`) with the
position held in a device tensor instead of a Python int, so nothing in it depends on the host between steps:

- rope: rows of cos/sin tables for every position, gathered by the position tensor;
- the KV cache write: `index_copy_` at the position;
- attention over the whole preallocated cache, positions after the current one (and outside a sliding window)
  masked to -inf, so they weigh exactly 0.

Each session has its own graph (its cache tensors are baked into it), captured at its first decode step and
dropped when the session closes or is reopened. Outputs equal the eager torch path within float noise (the
softmax runs over a longer, masked row); `ELDRIC_CUDA_GRAPHS=0` turns graphs off.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from eldric_p2p.engine.ops import apply_rope, rms_norm, rope_tables

if TYPE_CHECKING:
    from eldric_p2p.engine.model import KVCache, Layer, Stage, _Segment


def graphs_enabled(device: torch.device, fmt: str) -> bool:
    """Whether a stage on `device` with weights `fmt` decodes through CUDA graphs."""
    return device.type == "cuda" and fmt != "native" and os.environ.get("ELDRIC_CUDA_GRAPHS", "1") != "0"


def attend_static(
    stage: Stage,
    layer: Layer,
    li: int,
    seg: _Segment,
    q: torch.Tensor,  # [1, nh, hd]
    k: torch.Tensor,  # [1, nkv, hd]
    v: torch.Tensor,  # [1, nkv, hd]
    score_scale: float,
) -> torch.Tensor:
    """`Stage._attend` for a step whose position is the device tensor `seg.pos`: rope from the gathered table
    rows, the cache write at that position, attention over the whole cache with the later rows masked."""
    cfg, cache = stage.cfg, seg.cache
    assert seg.pos is not None and q.shape[0] == 1
    cos, sin = seg.ropes[layer.rope_base]  # [1, rope_dim/2]
    q, k = apply_rope(q, cos, sin, cfg), apply_rope(k, cos, sin, cfg)
    if cfg.attn_scale:
        q = q * cfg.attn_scale
    cache.k[li].index_copy_(1, seg.pos, k.transpose(0, 1).to(cache.k.dtype))  # [nkv, 1, hd] at pos
    cache.v[li].index_copy_(1, seg.pos, v.transpose(0, 1).to(cache.v.dtype))
    return stage._attention_torch(q, cache, li, cache.max_ctx, score_scale, seg.masks[layer.sliding])


class StaticDecode:
    """One session's decode step with every input in a fixed device buffer: `run()` can be captured.

    `h` [1, hidden] is the step's input row (embedded token or the previous stage's hidden state), `pos` [1]
    its position. `run()` returns the stage's output for the row: hidden [1, hidden], or logits [1, vocab]
    from the tail. On the CPU it runs eagerly (what the tests compare with the dynamic path)."""

    def __init__(self, stage: Stage, cache: KVCache) -> None:
        from eldric_p2p.engine.model import _Segment

        self.stage, self.cache = stage, cache
        cfg, dev = stage.cfg, stage.device
        self.h = torch.zeros(1, cfg.hidden, dtype=torch.float32, device=dev)
        self.pos = torch.zeros(1, dtype=torch.int64, device=dev)
        self._kpos = torch.arange(cache.max_ctx, device=dev)  # [S]
        positions = torch.arange(cache.max_ctx, device=dev)
        self._tables = {
            base: rope_tables(cfg, base, positions) for base in {layer.rope_base for layer in stage.layers}
        }  # base -> cos, sin [S, rope_dim/2]
        self._segment = _Segment  # the model's segment type, imported lazily (model imports this module)

    def run(self) -> torch.Tensor:
        stage, cfg = self.stage, self.stage.cfg
        hidden = self._kpos > self.pos  # [S]: positions not written yet
        masks: dict[bool, torch.Tensor | None] = {False: hidden[None, :], True: None}
        if cfg.sliding_window:
            masks[True] = (hidden | (self.pos - self._kpos >= cfg.sliding_window))[None, :]
        ropes = {base: (cos.index_select(0, self.pos), sin.index_select(0, self.pos))
                 for base, (cos, sin) in self._tables.items()}  # fmt: skip
        seg = self._segment(self.cache, -1, 1, masks, ropes, pos=self.pos)
        h = self.h
        for li, layer in enumerate(stage.layers):
            h = stage._layer(layer, li, h, [seg])
        if not stage.is_tail:
            return h
        assert stage.out_norm is not None and stage.lm_head is not None
        return stage.lm_head(rms_norm(h, stage.out_norm, cfg.norm_eps))  # [1, vocab]


class DecodeGraph:
    """`StaticDecode` captured as a CUDA graph at the first step and replayed at every later one."""

    def __init__(self, stage: Stage, cache: KVCache) -> None:
        self.static = StaticDecode(stage, cache)
        self.device = stage.device
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None

    def step(self, h: torch.Tensor, pos: int) -> torch.Tensor:
        """The output for input row `h` [1, hidden] at position `pos` (the cache must hold `pos` rows)."""
        s = self.static
        s.h.copy_(h)
        s.pos.fill_(pos)
        if self.graph is None:
            # The first step runs eagerly on a side stream (which also warms up cuBLAS), then the same step is
            # captured: capturing runs nothing, so the cache holds exactly one write for this position.
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                first = s.run()
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: a node runs forwards in worker threads; another thread's CUDA calls are no error
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.out = s.run()
            self.graph = graph
            return first
        self.graph.replay()
        assert self.out is not None
        return self.out.clone()
