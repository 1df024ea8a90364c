"""Rotary position embedding on interleaved pairs, with YaRN for compressed layers (SPEC.md 5)."""
from __future__ import annotations

import math

import torch


def rope_frequencies(cfg, ratio: int) -> torch.Tensor:
    """f_i for i < r/2 (fp32). m=0: rope_theta, no YaRN; m>0: compress_rope_theta with YaRN."""
    r = cfg.qk_rope_head_dim
    theta = cfg.rope_theta if ratio == 0 else cfg.compress_rope_theta
    f = theta ** (-torch.arange(0, r, 2, dtype=torch.float64) / r)
    rs = cfg.rope_scaling
    if ratio and rs:
        l0, factor = rs["original_max_position_embeddings"], rs["factor"]

        def cd(beta: float) -> float:
            return r * math.log(l0 / (2 * math.pi * beta)) / (2 * math.log(theta))

        lo = max(math.floor(cd(rs["beta_fast"])), 0)
        hi = min(math.ceil(cd(rs["beta_slow"])), r - 1)
        if lo == hi:
            hi += 0.001
        ramp = ((torch.arange(r // 2, dtype=torch.float64) - lo) / (hi - lo)).clamp(0, 1)
        f = f / factor * ramp + f * (1 - ramp)
    return f.float()


def apply_rope(x: torch.Tensor, pos: torch.Tensor, freqs: torch.Tensor,
               inverse: bool = False) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of x [T, ..., r] by angle pos*f_i (by -pos*f_i if inverse)."""
    ang = pos.float()[:, None] * freqs.to(x.device)[None, :]  # [T, r/2]
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (ang.shape[-1],)
    cos, sin = ang.cos().view(shape), ang.sin().view(shape)
    if inverse:
        sin = -sin
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1).flatten(-2)
    return out.to(x.dtype)
