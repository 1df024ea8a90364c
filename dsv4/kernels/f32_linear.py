"""`linear_f32(x, w)`: fp32 x times a bf16 (or fp32) weight with fp32 products and sums.

SPEC.md computes the head and the MoE gate as `x.float() @ weight.float()^T`.

Reference (CPU and tests): exactly that.

GPU: upcasting a 1 GB head weight to fp32 every decode step costs more than the whole rest of
a small model's step, so the weight stays bf16 and x is split into three bf16 parts,
x = hi + mid + lo, exactly (fp32 has 24 significant bits, bf16 8, and each remainder is exact
in fp32). Each part times the bf16 weight is an exact fp32 product, so one bf16 GEMM of the
stacked [3T, K] parts with fp32 accumulation and fp32 output (`torch.mm(..., out_dtype=)`),
summed over the parts, equals the reference up to the order and the precision of the fp32
accumulation (tensor cores accumulate a little less exactly than CUDA-core FMAs: on the H200,
max |error| 7-9e-5 on logits up to 16, against 2e-6 to 6e-5; tests/gpu). The weight is read
once. A bf16 x needs no split (one part). `use_triton` is the dispatch rule here too, though
this GPU path is a cuBLAS GEMM.
"""
from __future__ import annotations

import torch

from . import use_triton

_MM_DTYPE_OK: dict = {}


def linear_f32_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.float() @ w.float().t()


def split_bf16(x: torch.Tensor) -> torch.Tensor:
    """fp32 [T, K] -> bf16 [3, T, K] with hi + mid + lo == x exactly (as fp32)."""
    x = x.float()
    hi = x.bfloat16()
    r = x - hi.float()
    mid = r.bfloat16()
    lo = (r - mid.float()).bfloat16()
    return torch.stack((hi, mid, lo))


def linear_f32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [T, K] (any float dtype), w [N, K] -> fp32 [T, N]."""
    if not (use_triton(x) and w.dtype == torch.bfloat16 and _MM_DTYPE_OK.get(x.device, True)):
        return linear_f32_ref(x, w)
    parts = x[None].bfloat16() if x.dtype == torch.bfloat16 else split_bf16(x)
    p, t, k = parts.shape
    try:
        y = torch.mm(parts.reshape(p * t, k), w.t(), out_dtype=torch.float32)
    except torch.cuda.OutOfMemoryError:  # transient: must not switch the path for good
        raise
    except (RuntimeError, TypeError, NotImplementedError):  # torch without mm(out_dtype=)
        _MM_DTYPE_OK[x.device] = False
        return linear_f32_ref(x, w)
    y = y.view(p, t, -1)
    return y[0] if p == 1 else (y[0] + y[1]) + y[2]
