"""ggml's arithmetic in torch: RMS norm, tanh GELU and RoPE, rounded where llama.cpp's CPU backend rounds.

`rms_norm` is one C call where the optional `_ggmlops` extension is built; the rest are torch ops, used by a
stage wherever it does not run `_ggmlops` (CUDA, bf16 caches, no C compiler).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from eldric_p2p.engine.config import ModelConfig

try:  # RMS norm with ggml's exact arithmetic (optional C extension)
    from eldric_p2p.engine import _ggmlops
except ImportError:  # pragma: no cover - built by setup.py where a C compiler exists
    _ggmlops = None  # type: ignore[assignment]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS norm with ggml's arithmetic: squares in float32 summed in float64, the mean rounded to float32,
    scale = 1/sqrt(mean + eps) in float32 (eps a float32), y = (x * scale) * weight.

    One C call where _ggmlops is built (CPU float32); otherwise torch ops. torch's float32 sqrt is not always
    correctly rounded (ggml's sqrtf is); a float64 sqrt rounded to float32 is, hence a float64 root."""
    if _ggmlops is not None and x.device.type == "cpu" and x.dtype == torch.float32 and x.numel():
        out = torch.empty_like(x)
        _ggmlops.rms_norm(x.contiguous().numpy(), weight.numpy(), out.numpy(), eps)
        return out
    mean = ((x * x).double().sum(-1, keepdim=True) / x.shape[-1]).float()  # [..., 1]
    root = torch.sqrt((mean + _f32(eps)).double()).float()
    return (x * (1.0 / root)) * weight


def _f32(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def gelu_ggml(x: torch.Tensor) -> torch.Tensor:
    """GELU (tanh form) as ggml's CPU backend computes it: through an f16 table, so input and output are
    rounded to f16; inputs <= -10 give 0 and inputs >= 10 pass through."""
    y = F.gelu(x.half().float(), approximate="tanh").half().float()
    return torch.where(x <= -10.0, torch.zeros_like(x), torch.where(x >= 10.0, x, y))


def rope_tables(cfg: ModelConfig, base: float, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [T, rope_dim/2] for `positions`, theta built by repeated float32 products as ggml does."""
    half = cfg.rope_dim // 2
    theta_scale = torch.tensor(base, dtype=torch.float32) ** torch.tensor(
        -2.0 / cfg.rope_dim, dtype=torch.float32
    )
    steps = torch.full((half,), float(theta_scale), dtype=torch.float32, device=positions.device)
    steps[0] = 1.0
    pos = positions.to(torch.float32)[:, None] / cfg.rope_scale  # [T, 1]
    theta = torch.cumprod(torch.cat([pos, steps[None, 1:].expand(len(pos), -1)], dim=1), dim=1)  # [T, half]
    return torch.cos(theta), torch.sin(theta)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    # x: [T, H, head_dim]; cos/sin: [T, half]
    half = cfg.rope_dim // 2
    rot, rest = x[..., : cfg.rope_dim], x[..., cfg.rope_dim :]
    c, s = cos[:, None, :], sin[:, None, :]  # [T, 1, half]
    if cfg.rope_neox:
        x0, x1 = rot[..., :half], rot[..., half:]
        out = torch.cat([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1)
    else:
        x0, x1 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2)
    return torch.cat([out, rest], dim=-1) if rest.numel() else out
