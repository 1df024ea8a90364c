"""Softmax pooling of the token compressor (SPEC.md 6).

For each completing window, each channel is a softmax-weighted sum over the window's items:
`c = sum_t softmax_t(g_t) * a_t`; absent items (before window 0) get weight 0.
"""
from __future__ import annotations

import torch


def compress_pool_ref(kv: torch.Tensor, score: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """kv, score [W, items, C] fp32; valid [W, items] -> [W, C] fp32."""
    s = score.masked_fill(~valid[..., None], float("-inf"))
    return (torch.softmax(s, dim=1) * kv.masked_fill(~valid[..., None], 0.0)).sum(1)


def compress_pool(kv, score, valid):
    return compress_pool_ref(kv, score, valid)
