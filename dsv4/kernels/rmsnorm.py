"""RMSNorm: x.float() * rsqrt(mean(x^2) + eps) * weight, cast back to x's dtype."""
from __future__ import annotations

import torch


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def rmsnorm(x, weight, eps):
    return rmsnorm_ref(x, weight, eps)
