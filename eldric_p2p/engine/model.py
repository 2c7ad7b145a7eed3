"""One pipeline stage: layers [start, end) of a GGUF model, in torch.

A stage embeds token ids when `start == 0` and applies the final norm and LM head when `end == n_layers`;
in between it maps hidden states to hidden states. The residual stream is float32 everywhere, so splitting a
model into any number of stages (passing float32 hidden states between them) gives the same logits as one
stage.

Weights are held as `weights` says (GGUF blocks on the CPU kernels, or dense); norms, GELU and RoPE follow
ggml's arithmetic (`ops`). The KV cache is preallocated per session and indexed by position.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from eldric_p2p.data.gguf_index import GGUFIndex
from eldric_p2p.engine import fused
from eldric_p2p.engine.config import ModelConfig
from eldric_p2p.engine.cuda_graph import DecodeGraph, attend_static, graphs_enabled
from eldric_p2p.engine.dequant import dequantize
from eldric_p2p.engine.ops import apply_rope, gelu_ggml, rms_norm, rope_tables
from eldric_p2p.engine.weights import Embedding, Linear, TensorSource, resolve_weights
from eldric_p2p.errors import InvalidInput, UnsupportedModel, UsageError

T_ = TypeVar("T_")
log = logging.getLogger(__name__)

try:  # rope, attention and SwiGLU with ggml's exact arithmetic (optional C extension)
    from eldric_p2p.engine import _ggmlops
except ImportError:  # pragma: no cover - built by setup.py where a C compiler exists
    _ggmlops = None  # type: ignore[assignment]


@dataclass
class KVCache:
    k: torch.Tensor  # [n_stage_layers, n_kv, max_ctx, head_dim]
    v: torch.Tensor  # [n_stage_layers, n_kv, max_ctx, head_dim]
    length: int = 0

    @property
    def max_ctx(self) -> int:
        return self.k.shape[2]


@dataclass(eq=False)
class _Segment:
    """One session's rows in a forward: its cache, first position, row count, masks and rope tables."""

    cache: KVCache
    pos0: int
    T: int
    masks: dict[bool, torch.Tensor | None]
    ropes: dict[float, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    pos: torch.Tensor | None = None  # a decode step for a CUDA graph: its position as a device tensor [1]


class Layer:
    def __init__(self, src: TensorSource, cfg: ModelConfig, i: int, fmt: str, device: torch.device):
        t = src.index.tensors
        p = f"blk.{i}."

        def vec(name: str, size: int, *, required: bool = False) -> torch.Tensor | None:
            info = t.get(p + name)
            if info is None:
                if required:
                    raise UnsupportedModel(f"model file lacks tensor {p + name}")
                return None
            if info.shape != (size,):
                raise UnsupportedModel(f"{info.name} has shape {info.shape}, expected ({size},)")
            out = dequantize(src.tensor_data(info.name), info.ggml_type, info.shape, name=info.name)
            return out.to(device)

        def lin(name: str, n_in: int, n_out: int, bias: str | None = None) -> Linear:
            info = t.get(p + name)
            if info is None:
                raise UnsupportedModel(f"model file lacks tensor {p + name}")
            if info.shape != (n_in, n_out):
                raise UnsupportedModel(f"{info.name} has shape {info.shape}, expected ({n_in}, {n_out})")
            return Linear(src, info, vec(bias, n_out) if bias else None, fmt, device)

        d, q_dim, kv_dim = cfg.hidden, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.index = i
        self.attn_norm = vec("attn_norm.weight", d, required=True)
        self.wq = lin("attn_q.weight", d, q_dim, "attn_q.bias")
        self.wk = lin("attn_k.weight", d, kv_dim, "attn_k.bias")
        self.wv = lin("attn_v.weight", d, kv_dim, "attn_v.bias")
        self.wo = lin("attn_output.weight", q_dim, d)
        self.q_norm = vec("attn_q_norm.weight", cfg.head_dim, required=cfg.qk_norm)
        self.k_norm = vec("attn_k_norm.weight", cfg.head_dim, required=cfg.qk_norm)
        self.post_attn_norm = vec("post_attention_norm.weight", d, required=cfg.post_norms)
        self.ffn_norm = vec("ffn_norm.weight", d, required=True)
        self.w_gate = lin("ffn_gate.weight", d, cfg.ffn)
        self.w_up = lin("ffn_up.weight", d, cfg.ffn)
        self.w_down = lin("ffn_down.weight", cfg.ffn, d)
        self.post_ffn_norm = vec("post_ffw_norm.weight", d, required=cfg.post_norms)
        self.sliding = cfg.is_sliding(i)
        self.rope_base = cfg.layer_rope_base(i)
        linears = (self.wq, self.wk, self.wv, self.wo, self.w_gate, self.w_up, self.w_down)
        self.nbytes = sum(m.nbytes for m in linears)


class Stage:
    """Layers [start, end) of one model, with per-session KV caches.

    `open_session(sid)`, then `forward(sid, x, start_pos)` where x is int64 token ids [T] (head stage) or
    float32 hidden states [T, hidden] (other stages); returns hidden states [T, hidden], or logits [T, vocab]
    from the tail.
    `truncate(sid, pos)` rewinds a session; `close_session(sid)` frees its cache.
    """

    def __init__(
        self,
        src: TensorSource,
        start: int,
        end: int,
        *,
        device: str | torch.device = "cpu",
        weights: str = "auto",
        max_ctx: int = 4096,
        threads: int | None = None,
    ) -> None:
        self.cfg = cfg = ModelConfig.from_index(src.index)
        self.threads = threads or torch.get_num_threads()
        if not 0 <= start < end <= cfg.n_layers:
            raise UsageError(f"layer range [{start}, {end}) is not inside [0, {cfg.n_layers})")
        self.start, self.end = start, end
        self.device = torch.device(device)
        self.fmt = resolve_weights(weights, self.device)
        self.max_ctx = min(max_ctx, cfg.context_length)
        self.kv_dtype = torch.float16 if self.fmt in ("native", "f16", "f32") else torch.bfloat16
        # rope, attention and SwiGLU through _ggmlops: ggml's exact arithmetic, for f16 caches on the CPU
        self.exact_ops = (
            _ggmlops is not None
            and self.device.type == "cpu"
            and self.kv_dtype == torch.float16
            and cfg.head_dim % 32 == 0  # the exact attention's summation orders need whole 32-element blocks
        )
        t = src.index.tensors
        self.is_head, self.is_tail = start == 0, end == cfg.n_layers
        if t["token_embd.weight"].shape[0] != cfg.hidden:
            raise UnsupportedModel(
                f"token_embd.weight has shape {t['token_embd.weight'].shape}, hidden {cfg.hidden}"
            )
        self.embed = Embedding(src, t["token_embd.weight"], self.device) if self.is_head else None
        self.layers = [Layer(src, cfg, i, self.fmt, self.device) for i in range(start, end)]
        self.out_norm = self.lm_head = None
        if self.is_tail:
            norm = t.get("output_norm.weight")
            head = t["token_embd.weight"] if cfg.tied_embeddings else t["output.weight"]
            if norm is None or norm.shape != (cfg.hidden,) or head.shape != (cfg.hidden, cfg.vocab):
                raise UnsupportedModel("output_norm.weight / output.weight are missing or of the wrong shape")
            self.out_norm = dequantize(src.tensor_data(norm.name), norm.ggml_type, norm.shape).to(self.device)
            # llama.cpp never repacks token_embd.weight (row lookups need the plain layout): a tied head is
            # multiplied in the plain block order
            repacked = False if cfg.tied_embeddings else None
            self.lm_head = Linear(src, head, None, self.fmt, self.device, repacked=repacked)
        for linear in self._linears():
            linear.threads = self.threads
        self.sessions: dict[str, KVCache] = {}
        # native weights with the exact ops: all the layers in one C call (engine/fused.py)
        self._plans = fused.layer_plans(cfg, self.layers) if self.exact_ops and self.fmt == "native" else None
        self.fused = self._plans is not None and fused.enabled()
        # one-token decode steps replayed as CUDA graphs, per session (engine/cuda_graph.py)
        self.graphs: dict[str, DecodeGraph] | None = {} if graphs_enabled(self.device, self.fmt) else None

    def _linears(self) -> list[Linear]:
        out = [
            m
            for layer in self.layers
            for m in (layer.wq, layer.wk, layer.wv, layer.wo, layer.w_gate, layer.w_up, layer.w_down)
        ]
        return out + ([self.lm_head] if self.lm_head is not None else [])

    # ---- sessions ---------------------------------------------------------------------------------------

    def open_session(self, sid: str, max_ctx: int | None = None) -> None:
        n = self.max_ctx if max_ctx is None else min(max_ctx, self.max_ctx)
        shape = (len(self.layers), self.cfg.n_kv_heads, n, self.cfg.head_dim)
        if self.graphs is not None:
            self.graphs.pop(sid, None)  # captured with the old cache's tensors
        self.sessions[sid] = KVCache(
            torch.zeros(shape, dtype=self.kv_dtype, device=self.device),
            torch.zeros(shape, dtype=self.kv_dtype, device=self.device),
        )

    def truncate(self, sid: str, pos: int) -> None:
        cache = self._cache(sid)
        if not 0 <= pos <= cache.length:
            raise InvalidInput(f"cannot truncate session {sid} of length {cache.length} to {pos}")
        cache.length = pos

    def close_session(self, sid: str) -> None:
        self.sessions.pop(sid, None)
        if self.graphs is not None:
            self.graphs.pop(sid, None)

    def session_length(self, sid: str) -> int:
        return self._cache(sid).length

    def _cache(self, sid: str) -> KVCache:
        try:
            return self.sessions[sid]
        except KeyError:
            raise InvalidInput(f"unknown session {sid!r}") from None

    # ---- compute ----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, sid: str, x: torch.Tensor, start_pos: int, *, last_only: bool = False) -> torch.Tensor:
        """Run the stage; the tail returns logits [T, vocab], or [1, vocab] for the last position with
        `last_only` (what generation needs: the LM head is then computed for one row instead of T)."""
        if self.graphs is not None and len(x) == 1:
            return self._graph_step(sid, x, start_pos)
        return self._torch_single_threaded(lambda: self._forward([(sid, x, start_pos)], last_only)[0])

    @torch.inference_mode()
    def forward_batch(
        self, steps: list[tuple[str, torch.Tensor, int]], *, last_only: bool = True
    ) -> list[torch.Tensor]:
        """A step of each of several sessions in one pass: `steps` is [(sid, x, start_pos)], x token ids [T]
        (head) or hidden rows [T, hidden] (a prompt, or one position of a decode), every sid different. The
        weights are read once for all of them (continuous batching across sessions); each session's output
        is `forward`'s for it alone, bit for bit with native weights on the CPU (the kernels compute each
        session's rows as their own batch, rope and attention run per session), within float noise with
        dense weights. Raises InvalidInput as `forward` does."""
        if len({sid for sid, _, _ in steps}) != len(steps):
            raise InvalidInput("a batch holds each session once")
        if self.graphs is not None and len(steps) == 1 and len(steps[0][1]) == 1:
            return [self._graph_step(*steps[0])]
        return self._torch_single_threaded(lambda: self._forward(steps, last_only))

    def _graph_step(self, sid: str, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        """One position of one session through its CUDA graph (captured at the session's first step)."""
        assert self.graphs is not None
        cache = self._cache(sid)
        h = self._input(x)  # [1, hidden]
        self._check_positions(sid, cache, start_pos, 1)
        graph = self.graphs.get(sid)
        if graph is None:
            graph = self.graphs[sid] = DecodeGraph(self, cache)
        try:
            out = graph.step(h, start_pos)
        except RuntimeError as exc:  # a capture this build or driver refuses: decode eagerly from now on
            log.warning("CUDA graph capture failed, decoding without graphs: %s", exc)
            self.graphs = None
            cache.length = start_pos
            return self._torch_single_threaded(lambda: self._forward([(sid, x, start_pos)], True)[0])
        cache.length = start_pos + 1
        return out

    def _torch_single_threaded(self, fn: Callable[[], T_]) -> T_:
        if self.fmt != "native" or self.device.type != "cpu":
            return fn()
        # With native weights the matmuls run on the kernels' own threads; torch only does small element-wise
        # and attention ops here. Its OpenMP workers would keep spinning between those ops and take the core
        # the kernel threads need (measured: 49 ms vs 34 ms per Qwen decode step on 2 cores), so torch runs
        # single-threaded for the duration of the forward.
        saved = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn()
        finally:
            torch.set_num_threads(saved)

    def _forward(self, steps: list[tuple[str, torch.Tensor, int]], last_only: bool) -> list[torch.Tensor]:
        """Every session's rows through every layer at once; [(sid, x [T, ...], start_pos)] -> outputs."""
        segments: list[_Segment] = []
        rows: list[torch.Tensor] = []
        for sid, x, start_pos in steps:
            cache = self._cache(sid)
            h = self._input(x)  # [T, hidden]
            T = h.shape[0]
            self._check_positions(sid, cache, start_pos, T)
            masks = {False: None, True: None} if self.exact_ops else self._masks(start_pos, T)
            segments.append(_Segment(cache, start_pos, T, masks))
            rows.append(h)
        h = torch.cat(rows) if len(rows) > 1 else rows[0]  # [sum T, hidden]
        if self.fused and self._plans is not None:
            h = fused.run_layers(self._plans, h, segments, self.threads, h_is_input=h is steps[0][1])
        else:
            for li, layer in enumerate(self.layers):
                if not self.exact_ops:
                    for seg in segments:
                        if layer.rope_base not in seg.ropes:
                            positions = torch.arange(seg.pos0, seg.pos0 + seg.T, device=self.device)
                            seg.ropes[layer.rope_base] = rope_tables(self.cfg, layer.rope_base, positions)
                h = self._layer(layer, li, h, segments)
        for seg in segments:
            seg.cache.length = seg.pos0 + seg.T
        outs = list(h.split([seg.T for seg in segments]))
        if not self.is_tail:
            return outs
        assert self.out_norm is not None and self.lm_head is not None
        if last_only:
            h = torch.cat([o[-1:] for o in outs]) if len(outs) > 1 else outs[0][-1:]  # [B, hidden]
            rows = (1,) * len(outs) if len(outs) > 1 else None  # each session's last row alone
            logits = self.lm_head(rms_norm(h, self.out_norm, self.cfg.norm_eps), segments=rows)
            return list(logits.split(1))  # [1, vocab] each
        return [self.lm_head(rms_norm(o, self.out_norm, self.cfg.norm_eps)) for o in outs]  # [T, vocab] each

    @staticmethod
    def _check_positions(sid: str, cache: KVCache, start_pos: int, T: int) -> None:
        if start_pos != cache.length:
            raise InvalidInput(
                f"session {sid}: input starts at position {start_pos} but the cache holds {cache.length} "
                "(positions may not skip or go backwards; truncate first)"
            )
        if T == 0:
            raise InvalidInput("empty input")
        if start_pos + T > cache.max_ctx:
            raise InvalidInput(
                f"context overflow: {start_pos} + {T} tokens exceed the {cache.max_ctx}-token context"
            )

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if self.is_head:
            if x.dtype not in (torch.int64, torch.int32) or x.dim() != 1:
                raise InvalidInput(f"head stage takes token ids [T] (int), got {x.dtype} {tuple(x.shape)}")
            if len(x) and (int(x.min()) < 0 or int(x.max()) >= cfg.vocab):
                bad = int(x.max()) if int(x.max()) >= cfg.vocab else int(x.min())
                raise InvalidInput(f"token id {bad} is outside the vocabulary [0, {cfg.vocab})")
            assert self.embed is not None
            h = self.embed(x.long())
            return h * cfg.embed_scale if cfg.embed_scale != 1.0 else h
        if x.dtype != torch.float32:
            raise InvalidInput(f"hidden states must be float32, got {x.dtype}")
        if x.dim() != 2 or x.shape[1] != cfg.hidden:
            raise InvalidInput(f"hidden states must be [T, {cfg.hidden}], got {tuple(x.shape)}")
        return x.to(self.device)

    def _layer(self, layer: Layer, li: int, h: torch.Tensor, segments: list[_Segment]) -> torch.Tensor:
        """One layer over the rows of every segment (a session's positions): the matmuls and norms over all
        the rows at once, rope and attention per segment against its own cache."""
        cfg = self.cfg
        N = h.shape[0]
        # rows of different sessions: each segment keeps the bits of its own call
        sizes = tuple(seg.T for seg in segments) if len(segments) > 1 else None
        x = rms_norm(h, layer.attn_norm, cfg.norm_eps)
        q = layer.wq(x, segments=sizes).view(N, cfg.n_heads, cfg.head_dim)  # [N, nh, hd]
        k = layer.wk(x, segments=sizes).view(N, cfg.n_kv_heads, cfg.head_dim)  # [N, nkv, hd]
        v = layer.wv(x, segments=sizes).view(N, cfg.n_kv_heads, cfg.head_dim)  # [N, nkv, hd]
        if cfg.qk_norm:
            assert layer.q_norm is not None and layer.k_norm is not None
            q = rms_norm(q, layer.q_norm, cfg.norm_eps)
            k = rms_norm(k, layer.k_norm, cfg.norm_eps)
        if cfg.attn_scale:
            score_scale = 1.0
        else:
            score_scale = 1.0 / math.sqrt(cfg.head_dim)
        parts: list[torch.Tensor] = []
        row = 0
        for seg in segments:
            parts.append(self._attend(layer, li, seg, q[row : row + seg.T], k[row : row + seg.T],
                                      v[row : row + seg.T], score_scale))  # fmt: skip
            row += seg.T
        attn = torch.cat(parts) if len(parts) > 1 else parts[0]
        o = layer.wo(attn, segments=sizes)  # [N, hidden]
        if layer.post_attn_norm is not None:
            o = rms_norm(o, layer.post_attn_norm, cfg.norm_eps)
        h = h + o
        x = rms_norm(h, layer.ffn_norm, cfg.norm_eps)
        gate, up = layer.w_gate(x, segments=sizes), layer.w_up(x, segments=sizes)  # [N, ffn]
        if self.exact_ops:
            act = torch.empty_like(gate)
            fused = _ggmlops.geglu if cfg.act == "gelu_tanh" else _ggmlops.swiglu
            fused(gate.numpy(), up.numpy(), act.numpy())
        elif cfg.act == "gelu_tanh":
            act = gelu_ggml(gate) * up
        else:
            act = F.silu(gate) * up
        d = layer.w_down(act, segments=sizes)  # [N, hidden]
        if layer.post_ffn_norm is not None:
            d = rms_norm(d, layer.post_ffn_norm, cfg.norm_eps)
        return h + d

    def _attend(
        self,
        layer: Layer,
        li: int,
        seg: _Segment,
        q: torch.Tensor,  # [T, nh, hd]
        k: torch.Tensor,  # [T, nkv, hd]
        v: torch.Tensor,  # [T, nkv, hd]
        score_scale: float,
    ) -> torch.Tensor:
        """Rope, the cache write and attention of one segment; -> [T, nh * hd]."""
        if seg.pos is not None:
            return attend_static(self, layer, li, seg, q, k, v, score_scale)
        cfg, cache, pos0, T = self.cfg, seg.cache, seg.pos0, seg.T
        end = pos0 + T
        if self.exact_ops:
            q, k = q.contiguous(), k.contiguous()
            positions = np.arange(pos0, end, dtype=np.int64)
            for t in (q, k):
                _ggmlops.rope(t.numpy(), positions, t.shape[1], cfg.head_dim, cfg.rope_dim, layer.rope_base,
                              1.0 / cfg.rope_scale, cfg.rope_neox)  # fmt: skip
        else:
            rope = seg.ropes[layer.rope_base]
            q = apply_rope(q, *rope, cfg)
            k = apply_rope(k, *rope, cfg)
        if cfg.attn_scale:
            q = q * cfg.attn_scale
        cache.k[li, :, pos0:end] = k.transpose(0, 1).to(cache.k.dtype)
        cache.v[li, :, pos0:end] = v.transpose(0, 1).to(cache.v.dtype)
        if self.exact_ops:
            attn = torch.empty(T, cfg.n_heads * cfg.head_dim)
            window = cfg.sliding_window if layer.sliding else 0
            _ggmlops.attention(q.contiguous().numpy(), cache.k[li].numpy(), cache.v[li].numpy(), attn.numpy(),
                               cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, pos0, cache.max_ctx,
                               float(np.float32(score_scale)), window or 0, T > 1)  # fmt: skip
            return attn
        return self._attention_torch(q, cache, li, end, score_scale, seg.masks[layer.sliding])

    def _attention_torch(
        self,
        q: torch.Tensor,
        cache: KVCache,
        li: int,
        end: int,
        score_scale: float,
        masked: torch.Tensor | None,
    ) -> torch.Tensor:
        """Attention in torch ops (CUDA, bf16 caches, or without the C extension): the same rounding points as
        ggml (q and the probabilities rounded to the cache dtype), not its summation order."""
        cfg = self.cfg
        T = q.shape[0]
        keys = cache.k[li, :, :end].float()  # [nkv, S, hd]
        vals = cache.v[li, :, :end].float()  # [nkv, S, hd]
        group = cfg.n_heads // cfg.n_kv_heads
        qh = q.to(cache.k.dtype).float().transpose(0, 1)  # [nh, T, hd], rounded like ggml's f16 K·Q
        qh = qh.reshape(cfg.n_kv_heads, group * T, cfg.head_dim)
        scores = torch.bmm(qh, keys.transpose(1, 2)).view(cfg.n_heads, T, end) * score_scale  # [nh, T, S]
        if masked is not None:
            scores = scores.masked_fill(masked, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(cache.v.dtype).float()  # [nh, T, S]
        probs = probs.reshape(cfg.n_kv_heads, group * T, end)
        attn = torch.bmm(probs, vals).view(cfg.n_heads, T, cfg.head_dim).transpose(0, 1)  # [T, nh, hd]
        return attn.reshape(T, cfg.n_heads * cfg.head_dim)

    def _masks(self, pos0: int, T: int) -> dict[bool, torch.Tensor | None]:
        """Attention masks [T, S] (True = hidden) for global and sliding layers; None hides nothing."""
        end = pos0 + T
        qpos = torch.arange(pos0, end, device=self.device)[:, None]  # [T, 1]
        kpos = torch.arange(end, device=self.device)[None, :]  # [1, S]
        causal = kpos > qpos
        out: dict[bool, torch.Tensor | None] = {False: causal if T > 1 else None, True: None}
        if self.cfg.sliding_window and any(layer.sliding for layer in self.layers):
            window = causal | (qpos - kpos >= self.cfg.sliding_window)
            out[True] = window if bool(window.any()) else None
        return out


def kv_bytes_per_token(cfg: ModelConfig, n_layers: int, kv_dtype_bytes: int = 2) -> int:
    return 2 * n_layers * cfg.n_kv_heads * cfg.head_dim * kv_dtype_bytes


def estimate_stage_bytes(
    index: GGUFIndex, start: int, end: int, *, weights: str = "native", max_ctx: int = 4096, sessions: int = 4
) -> int:
    """Memory a stage needs before loading it: weights in the chosen format, plus KV caches for `sessions`.

    "native" keeps GGUF bytes; dense formats expand every linear weight to 4 (f32) or 2 (bf16/f16) bytes per
    element. The head's embedding stays in GGUF form in every format.
    """
    cfg = ModelConfig.from_index(index)
    elem = {"native": 0, "f32": 4, "bf16": 2, "f16": 2}[weights]
    total = 0
    for t in index.assignment_tensors(start, end):
        is_embed_lookup = t.name == "token_embd.weight" and start == 0
        is_matrix = len(t.shape) > 1
        if elem and is_matrix and not is_embed_lookup:
            total += t.n_elements * elem
        else:
            total += t.nbytes
        if (
            t.name == "token_embd.weight"
            and start == 0
            and end == cfg.n_layers
            and cfg.tied_embeddings
            and elem
        ):
            total += t.n_elements * elem  # tied LM head expanded as well
    total += kv_bytes_per_token(cfg, end - start) * min(max_ctx, cfg.context_length) * sessions
    return total
