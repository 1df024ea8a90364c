"""Rotary position embedding on interleaved pairs, with YaRN for compressed layers (SPEC.md 5)."""
from __future__ import annotations

import math

import torch

from ..kernels.rope import apply_rope, rope_  # noqa: F401  (the model's RoPE ops)


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
