"""Manifold-constrained hyper-connections (mHC, SPEC.md 4): mixing, Sinkhorn, pre and post."""
from __future__ import annotations

import torch


def sinkhorn(c: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """c [..., n, n] logits -> (approximately) doubly stochastic, exactly as SPEC.md 4.3."""
    c = torch.softmax(c, dim=-1) + eps
    c = c / (c.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(-1, keepdim=True) + eps)
        c = c / (c.sum(-2, keepdim=True) + eps)
    return c


def hc_pre_ref(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
               norm_eps: float, hc_eps: float, iters: int):
    """x [T, n, d] -> (y [T, d] in x's dtype, post [T, n] fp32, comb [T, n, n] fp32)."""
    t, n, d = x.shape
    xf = x.flatten(1).float()
    mix = (xf @ fn.float().t()) * torch.rsqrt(xf.square().mean(-1, keepdim=True) + norm_eps)
    pre = torch.sigmoid(mix[:, :n] * scale[0] + base[:n]) + hc_eps
    post = 2 * torch.sigmoid(mix[:, n:2 * n] * scale[1] + base[n:2 * n])
    comb = (mix[:, 2 * n:] * scale[2] + base[2 * n:]).view(t, n, n)
    comb = sinkhorn(comb, iters, hc_eps)
    y = (pre[:, :, None] * x.float()).sum(1).to(x.dtype)
    return y, post, comb


def hc_post_ref(x: torch.Tensor, f: torch.Tensor, post: torch.Tensor, comb: torch.Tensor):
    """X'[:, k] = post[k] * f + sum_j comb[j, k] * X[:, j]  -> [T, n, d] in x's dtype."""
    out = post[:, :, None] * f.float()[:, None, :] + torch.einsum("tjk,tjd->tkd", comb, x.float())
    return out.to(x.dtype)


def hc_pre(x, fn, scale, base, norm_eps, hc_eps, iters):
    return hc_pre_ref(x, fn, scale, base, norm_eps, hc_eps, iters)


def hc_post(x, f, post, comb):
    return hc_post_ref(x, f, post, comb)
