"""Linears on quantised weights: per-token FP8 activations times FP8 / MXFP4 / NVFP4 weights.

Reference (SPEC.md 3): quantise x per token in blocks of 128 to e4m3 with power-of-two scales,
multiply by the dequantised weight with fp32 accumulation, return the working dtype.
"""
from __future__ import annotations

import torch

from ..quant.formats import dequant_fp8, dequant_mxfp4, dequant_nvfp4
from ..quant.sim import act_quant_sim


def _ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    y = act_quant_sim(x) @ w.t()
    return y.to(x.dtype)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] (working dtype), weight e4m3 [N, K], scale e8m0 [N/128, K/128] -> [..., N]."""
    return _ref(x, dequant_fp8(weight, scale))


def mxfp4_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., K], weight packed e2m1 [N, K/2], scale e8m0 [N, K/32] -> [..., N]."""
    return _ref(x, dequant_mxfp4(weight, scale))


def nvfp4_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                 weight_scale_2: torch.Tensor) -> torch.Tensor:
    """x [..., K], weight packed e2m1 [N, K/2], e4m3 scale [N, K/16], fp32 global -> [..., N]."""
    return _ref(x, dequant_nvfp4(weight, weight_scale, weight_scale_2))
