"""RMSNorm: x.float() * rsqrt(mean(x^2) + eps) * weight, cast back to x's dtype.

The Triton kernel normalises one row a CTA in a single pass (rows up to 16384 wide fit).
"""
from __future__ import annotations

import torch

from . import HAS_TRITON, use_triton
from .pdl import pdl

MAX_TRITON_WIDTH = 16384


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


if HAS_TRITON:
    import triton
    import triton.language as tl

    from .pdl import pdl_start

    @triton.jit
    def _rmsnorm_kernel(x_ptr, w_ptr, out_ptr, N, stride_x, eps, BLOCK: tl.constexpr,
                        PDL: tl.constexpr = False):
        pdl_start(PDL)
        row = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, BLOCK)
        mask = c < N
        x = tl.load(x_ptr + row * stride_x + c, mask=mask, other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.sum(x * x, 0) / N + eps)
        w = tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * N + c, (x * r * w).to(out_ptr.dtype.element_ty), mask=mask)

    def rmsnorm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """Launcher: x [..., N] (any float dtype), weight [N] -> x's shape and dtype."""
        N = x.shape[-1]
        if weight.shape != (N,) or N > MAX_TRITON_WIDTH:
            raise ValueError(f"x [..., {N}] and weight {tuple(weight.shape)} do not fit "
                             f"(width at most {MAX_TRITON_WIDTH})")
        x2 = x.reshape(-1, N)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
        if x2.shape[0]:
            block = triton.next_power_of_2(N)
            _rmsnorm_kernel[(x2.shape[0],)](x2, weight.contiguous(), out, N, x2.stride(0), eps,
                                            BLOCK=block, num_warps=min(16, max(1, block // 256)),
                                            **pdl())
        return out.view(x.shape)


def rmsnorm(x, weight, eps):
    if use_triton(x) and x.shape[-1] <= MAX_TRITON_WIDTH:
        return rmsnorm_triton(x, weight, eps)
    return rmsnorm_ref(x, weight, eps)
