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
wkv / wgate, those two in one launch by `linear_f32_pair`; one row at any N: the head at batch
1) take `_gemv_kernel` instead: fp32
CUDA-core products and sums, as the reference, each CTA reading a few whole weight rows in one
go (cuBLAS picks a split-K GEMM and a separate reduction for these shapes, ~7 us for the 2 MB
gate against 4 us).
"""
from __future__ import annotations

import torch

from . import HAS_TRITON, use_triton
from .pdl import pdl

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
    if gemv_applies(x, w):
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
    # one reduction over the parts (two adds read and wrote [T, N] fp32 twice: 48 us a step
    # at batch 64 for the 129280-wide head, H200 profile)
    return y[0] if p == 1 else y.sum(0)


def linear_f32_pair(x: torch.Tensor, w1: torch.Tensor,
                    w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(linear_f32(x, w1), linear_f32(x, w2)); one launch for decode-sized x (the compressors'
    wkv and wgate)."""
    if w1.shape == w2.shape and w1.dtype == w2.dtype and gemv_applies(x, w1):
        return _gemv(x, w1, w2)
    return linear_f32(x, w1), linear_f32(x, w2)


def gemv_applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Up to GEMV_MAX_M rows for N up to GEMV_MAX_N; one row at any N (the vocabulary head of a
    batch-1 decode step: H200, 129280 x 4096, 264.5 us against 268.8 for the three-part GEMM
    with its split and sum, and exact fp32 products)."""
    return (use_triton(x) and 0 < x.shape[0] <= GEMV_MAX_M
            and (w.shape[0] <= GEMV_MAX_N or x.shape[0] == 1)
            and x.shape[1] <= GEMV_MAX_K and w.dtype in (torch.bfloat16, torch.float32))


def gemv_rounded(x: torch.Tensor, w: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """`linear_f32(x, w)` rounded once to x's dtype, in the GEMV's own store (no cast kernel
    after it): a bf16 linear's decode rows (`BF16Linear`); requires `gemv_applies`. `scale`:
    then times scale in fp32, rounded again, as `y * scale` on the rounded y computes it."""
    return _gemv(x, w, out_dtype=x.dtype, scale=scale)


def _gemv(x: torch.Tensor, w: torch.Tensor, w2: torch.Tensor | None = None,
          out_dtype: torch.dtype = torch.float32, scale: float | None = None):
    """x @ w^T (and x @ w2^T, same shape, in the same launch) in fp32, stored as out_dtype
    (and with `scale`, multiplied by it in fp32 and stored again as out_dtype)."""
    m, k = x.shape
    n = w.shape[0]
    if w.shape[1] != k:
        raise ValueError(f"linear_f32: x [{m}, {k}] does not fit weight {tuple(w.shape)}")
    x, w = x.contiguous(), w.contiguous()
    y = torch.empty(m, n, dtype=out_dtype, device=x.device)
    y2 = torch.empty_like(y) if w2 is not None else y
    bk = triton.next_power_of_2(k)
    bn = 2 if n <= 512 else 4  # at least ~128 CTAs for the gate (N=256) and wkv (N=1024)
    warps = max(1, min(16, bn * bk // 2048))  # 64 weight elements a thread
    nb = triton.cdiv(n, bn)
    _gemv_kernel[(nb * (2 if w2 is not None else 1),)](
        x, w, y, w2.contiguous() if w2 is not None else w, y2, nb, m, n, k,
        float(scale) if scale is not None else 1.0, BN=bn, BK=bk, SCALED=scale is not None,
        num_warps=warps, **pdl())
    return y if w2 is None else (y, y2)


if HAS_TRITON:
    import triton
    import triton.language as tl

    from .pdl import pdl_start

    @triton.jit(do_not_specialize=["M"])
    def _gemv_kernel(x_ptr, w_ptr, y_ptr, w2_ptr, y2_ptr, NB, M, N, K, scale,
                     BN: tl.constexpr, BK: tl.constexpr, SCALED: tl.constexpr = False,
                     PDL: tl.constexpr = False):
        """y[:, rows] = x.float() @ w[rows].float()^T for BN whole weight rows (K <= BK), every
        weight byte loaded at once; the few x rows come from L2. Row blocks NB and up belong
        to the second weight (w2 -> y2)."""
        pdl_start(PDL)
        pid = tl.program_id(0)
        if pid >= NB:
            w_ptr, y_ptr, pid = w2_ptr, y2_ptr, pid - NB
        _gemv_rows(x_ptr, w_ptr, y_ptr, pid, M, N, K, BN, BK, scale, SCALED)

    @triton.jit
    def _gemv_rows(x_ptr, w_ptr, y_ptr, pid, M, N, K, BN: tl.constexpr, BK: tl.constexpr,
                   scale, SCALED: tl.constexpr):
        """Row block pid of `_gemv_kernel` (also the MoE gate's, `moe_gate.py`); SCALED: the
        stored y times scale in fp32, stored again."""
        rows = pid * BN + tl.arange(0, BN)
        k = tl.arange(0, BK)
        kok = k < K
        w = tl.load(w_ptr + rows[:, None].to(tl.int64) * K + k[None, :],
                    mask=(rows < N)[:, None] & kok[None, :], other=0.0).to(tl.float32)
        for m in range(M):
            xm = tl.load(x_ptr + m * K + k, mask=kok, other=0.0).to(tl.float32)
            y = tl.sum(w * xm[None, :], 1).to(y_ptr.dtype.element_ty)
            if SCALED:
                y = (y.to(tl.float32) * scale).to(y_ptr.dtype.element_ty)
            tl.store(y_ptr + m * N + rows, y, mask=rows < N)
