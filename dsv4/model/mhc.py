"""Hyper-connection parameters of one sub-layer (SPEC.md 4); `hc_head` (SPEC.md 8) is a kernel op."""
from __future__ import annotations

import torch
from torch import nn

from ..kernels.mhc import hc_post, hc_pre


def hc_params(module: nn.Module, prefix: str, n: int, d: int, outputs: int) -> None:
    """Registers `{prefix}_fn [outputs, n*d]`, `{prefix}_base [outputs]`, `{prefix}_scale` (fp32)."""
    scales = 3 if outputs == (2 + n) * n else 1
    for name, shape in (("fn", (outputs, n * d)), ("base", (outputs,)), ("scale", (scales,))):
        module.register_parameter(f"{prefix}_{name}",
                                  nn.Parameter(torch.zeros(shape), requires_grad=False))


class HyperConnection:
    """Binds one sub-layer's mHC parameters: `pre(X, norm) -> (norm(y), ctx)`,
    `post(X, f, ctx) -> X'`."""

    def __init__(self, module: nn.Module, prefix: str, cfg):
        self.m, self.prefix = module, prefix
        self.norm_eps, self.hc_eps, self.iters = cfg.rms_norm_eps, cfg.hc_eps, cfg.hc_sinkhorn_iters

    def pre(self, x: torch.Tensor, norm: nn.Module):
        """The sub-layer's input, y through `norm` (the RMSNorm that follows in SPEC.md 4;
        fused into the kernel on the GPU), and the context of `post`."""
        p = self.prefix
        y, post, comb = hc_pre(x, getattr(self.m, f"{p}_fn"), getattr(self.m, f"{p}_scale"),
                               getattr(self.m, f"{p}_base"), self.norm_eps, self.hc_eps, self.iters,
                               norm=(norm.weight, norm.eps))
        return y, (post, comb)

    @staticmethod
    def post(x: torch.Tensor, f: torch.Tensor, ctx) -> torch.Tensor:
        return hc_post(x, f, *ctx)
