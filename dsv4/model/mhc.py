"""Hyper-connection parameters of one sub-layer (SPEC.md 4); `hc_head` (SPEC.md 8) is a kernel op."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..kernels.mhc import hc_post, hc_post_pre


def hc_params(module: nn.Module, prefix: str, n: int, d: int, outputs: int) -> None:
    """Registers `{prefix}_fn [outputs, n*d]`, `{prefix}_base [outputs]`, `{prefix}_scale` (fp32)."""
    scales = 3 if outputs == (2 + n) * n else 1
    for name, shape in (("fn", (outputs, n * d)), ("base", (outputs,)), ("scale", (scales,))):
        module.register_parameter(f"{prefix}_{name}",
                                  nn.Parameter(torch.zeros(shape), requires_grad=False))


class Pending(NamedTuple):
    """A sub-layer's hyper-connection update X' = post * f + comb^T X (SPEC.md 4), not formed
    yet: the next sub-layer's `pre` forms it in the same pass as its own mix (one launch for
    decode batches on the GPU), everything else through `settle`."""
    x: torch.Tensor
    f: torch.Tensor
    post: torch.Tensor
    comb: torch.Tensor


def settle(x: torch.Tensor | Pending) -> torch.Tensor:
    return hc_post(*x) if isinstance(x, Pending) else x


class HyperConnection:
    """Binds one sub-layer's mHC parameters: `pre(X, norm) -> (X, norm(y), ctx)`,
    `post(X, f, ctx) -> Pending X'`."""

    def __init__(self, module: nn.Module, prefix: str, cfg):
        self.m, self.prefix = module, prefix
        self.norm_eps, self.hc_eps, self.iters = cfg.rms_norm_eps, cfg.hc_eps, cfg.hc_sinkhorn_iters

    def pre(self, x: torch.Tensor | Pending, norm: nn.Module):
        """The sub-layer's input: X (formed here if x is the previous sub-layer's Pending
        update), y through `norm` (the RMSNorm that follows in SPEC.md 4) and the context of
        `post`."""
        p = self.prefix
        x, y, post, comb = hc_post_pre(
            x.x if isinstance(x, Pending) else x, x[1:] if isinstance(x, Pending) else None,
            getattr(self.m, f"{p}_fn"), getattr(self.m, f"{p}_scale"),
            getattr(self.m, f"{p}_base"), self.norm_eps, self.hc_eps, self.iters,
            norm=(norm.weight, norm.eps))
        return x, y, (post, comb)

    @staticmethod
    def post(x: torch.Tensor, f: torch.Tensor, ctx) -> Pending:
        return Pending(x, f, *ctx)
