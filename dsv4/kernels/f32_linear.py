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
once. A bf16 x needs no split (one part).

Decode-sized calls (up to GEMV_MAX_M rows, N up to GEMV_MAX_N: the MoE gate, the compressors'
wkv / wgate) take `_gemv_kernel` instead: fp32 CUDA-core products and sums, as the reference,
each CTA reading a few whole weight rows in one go (cuBLAS picks a split-K GEMM and a separate
reduction for these shapes, ~6 us for the 2 MB gate).
"""
from __future__ import annotations

import torch

from . import HAS_TRITON, use_triton

_MM_DTYPE_OK: dict = {}
GEMV_MAX_M = 4
GEMV_MAX_N = 16384
GEMV_MAX_K = 8192


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
    if (use_triton(x) and 0 < x.shape[0] <= GEMV_MAX_M and w.shape[0] <= GEMV_MAX_N
            and x.shape[1] <= GEMV_MAX_K and w.dtype in (torch.bfloat16, torch.float32)):
        return _gemv(x, w)
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


def _gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    m, k = x.shape
    n = w.shape[0]
    if w.shape[1] != k:
        raise ValueError(f"linear_f32: x [{m}, {k}] does not fit weight {tuple(w.shape)}")
    x, w = x.contiguous(), w.contiguous()
    y = torch.empty(m, n, dtype=torch.float32, device=x.device)
    bk = triton.next_power_of_2(k)
    bn = 2 if n <= 512 else 4  # at least ~128 CTAs for the gate (N=256) and wkv (N=1024)
    warps = max(1, min(16, bn * bk // 2048))  # 64 weight elements a thread
    _gemv_kernel[(triton.cdiv(n, bn),)](x, w, y, m, n, k, BN=bn, BK=bk, num_warps=warps)
    return y


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, y_ptr, M, N, K, BN: tl.constexpr, BK: tl.constexpr):
        """y[:, rows] = x.float() @ w[rows].float()^T for BN whole weight rows (K <= BK), every
        weight byte loaded at once; the few x rows come from L2."""
        rows = tl.program_id(0) * BN + tl.arange(0, BN)
        k = tl.arange(0, BK)
        kok = k < K
        w = tl.load(w_ptr + rows[:, None].to(tl.int64) * K + k[None, :],
                    mask=(rows < N)[:, None] & kok[None, :], other=0.0).to(tl.float32)
        for m in range(M):
            xm = tl.load(x_ptr + m * K + k, mask=kok, other=0.0).to(tl.float32)
            tl.store(y_ptr + m * N + rows, tl.sum(w * xm[None, :], 1), mask=rows < N)
