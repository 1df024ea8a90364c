"""The model's QAT roundings as single kernels (SPEC.md 5.2 and 6).

- `fp8_round_(x, width)`: x[..., :width] <- FP8 e4m3 round trip with a power-of-two scale per
  64 channels, in place (the no-rope dims of every key/value row).
- `hadamard_fp4(x, qat)`: the indexer's rotation x @ H_C * C^-0.5 in fp32, rounded to x's dtype,
  then (with `qat`) the FP4 e2m1 round trip with a power-of-two scale per 32 (indexer queries
  and keys).

References: `dsv4.quant.sim` (fp8_sim, fp4_sim, hadamard), a few dozen small torch ops per call.
GPU: one Triton launch per call with the same fp32 formulas (IEEE division for the scales,
round-to-nearest-even e4m3 conversion, the e2m1 thresholds of `e2m1_round`); only the
Hadamard product's summation order differs from torch's matmul.
"""
from __future__ import annotations

import torch

from ..quant.sim import fp4_sim, fp8_sim, hadamard, hadamard_matrix
from . import HAS_TRITON, use_triton
from .pdl import pdl

FP8_BLOCK, FP4_BLOCK = 64, 32


def fp8_round_ref_(x: torch.Tensor, width: int) -> torch.Tensor:
    x[..., :width] = fp8_sim(x[..., :width], FP8_BLOCK)
    return x


def fp8_round_(x: torch.Tensor, width: int) -> torch.Tensor:
    """In place on the first `width` channels (a multiple of 64); returns x."""
    if width % FP8_BLOCK or not 0 < width <= x.shape[-1]:
        raise ValueError(f"fp8_round_: width {width} is not a multiple of {FP8_BLOCK} within "
                         f"rows of {x.shape[-1]}")
    if use_triton(x) and x.is_contiguous() and x.numel():
        d = x.shape[-1]
        rows = x.numel() // d
        nb = triton.next_power_of_2(width // FP8_BLOCK)
        br = max(1, min(64, 64 // nb))
        _fp8_round_kernel[(triton.cdiv(rows, br),)](x, rows, d, width // FP8_BLOCK, BR=br,
                                                     NB=nb, num_warps=4, **pdl())
        return x
    return fp8_round_ref_(x, width)


def hadamard_fp4_ref(x: torch.Tensor, qat: bool) -> torch.Tensor:
    y = hadamard(x.float()).to(x.dtype)
    return fp4_sim(y, FP4_BLOCK) if qat else y


def hadamard_fp4(x: torch.Tensor, qat: bool) -> torch.Tensor:
    """x [..., C] (C a power of two, >= 32) -> same shape and dtype."""
    c = x.shape[-1]
    if use_triton(x) and x.numel() and c >= 32 and c & (c - 1) == 0 and c <= 256:
        x2 = x.contiguous()
        rows = x2.numel() // c
        out = torch.empty_like(x2)
        h = hadamard_matrix(c, torch.float32, x.device)
        # the MMA path (bf16) takes the larger tile for prefill-sized calls; up to 64 tokens
        # of 64 heads, 16 rows a CTA (H200, CUDA-graph loop: 64 / 512 rows 3.0 us against 7.4
        # for 64-row tiles, whose CTAs each build H's signs and round 4x the rows)
        br = 64 if x.dtype == torch.bfloat16 and rows > 4096 else 16
        _hadamard_fp4_kernel[(triton.cdiv(rows, br),)](x2, h, out, rows, C=c, QAT=qat, BR=br,
                                                        num_warps=4, **pdl())
        return out
    return hadamard_fp4_ref(x, qat)


if HAS_TRITON:
    import triton
    import triton.language as tl

    from .pdl import pdl_start
    from .quant_linear import _pow2ceil

    @triton.jit
    def _fp8_sim(x):
        """fp32 [R, B, 64] -> the e4m3 round trip with a power-of-two scale per 64-block
        (SPEC.md 5.2), fp32."""
        amax = tl.maximum(tl.max(tl.abs(x), 2), 1e-4)
        s, inv = _pow2ceil(tl.math.div_rn(amax, 448.0))
        q = tl.minimum(tl.maximum(x * inv[:, :, None], -448.0), 448.0).to(tl.float8e4nv)
        return q.to(tl.float32) * s[:, :, None]

    @triton.jit
    def _fp4_sim(y, BR: tl.constexpr, C: tl.constexpr):
        """fp32 [BR, C] -> the e2m1 round trip with a power-of-two scale per 32 (SPEC.md 6,
        `e2m1_round`'s thresholds), fp32."""
        yb = tl.reshape(y, (BR, C // 32, 32))
        amax = tl.maximum(tl.max(tl.abs(yb), 2), 6.0 * 1.1754943508222875e-38)
        s, inv = _pow2ceil(tl.math.div_rn(amax, 6.0))
        v = tl.minimum(tl.maximum(yb * inv[:, :, None], -6.0), 6.0)
        a = tl.abs(v)
        code = ((a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32)
                + (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32)
                + (a >= 3.5).to(tl.int32) + (a > 5.0).to(tl.int32))
        e = tl.where(code <= 4, code.to(tl.float32) * 0.5,
                     tl.where(code == 5, 3.0, tl.where(code == 6, 4.0, 6.0)))
        e = tl.where(v < 0, -e, e)
        return tl.reshape(e * s[:, :, None], (BR, C))

    @triton.jit
    def _hadamard_rows(x_ptr, h_ptr, rows, ok, C: tl.constexpr, BR: tl.constexpr):
        """fp32 [BR, C] = rows of x (C wide, read from memory) @ H. bf16 rows: one bf16 MMA
        with the signs of H (Sylvester's: (-1)^popcount(i & j), made here), whose products
        are exact and summed in fp32, then H's scale C^-0.5 (h[0, 0], as the reference's
        fp32 matrix holds it). fp32 rows: FMA dots over H in 32-deep slices (which keep H's
        registers small)."""
        c = tl.arange(0, C)
        if x_ptr.dtype.element_ty == tl.bfloat16:
            x = tl.load(x_ptr + rows[:, None].to(tl.int64) * C + c[None, :], mask=ok[:, None],
                        other=0.0)
            v = c[:, None] & c[None, :]
            v = v ^ (v >> 16)
            v = v ^ (v >> 8)
            v = v ^ (v >> 4)
            v = v ^ (v >> 2)
            v = v ^ (v >> 1)
            sign = tl.where((v & 1) == 0, 1.0, -1.0).to(tl.bfloat16)
            return tl.dot(x, sign) * tl.load(h_ptr)
        kc = tl.arange(0, 32)
        y = tl.zeros((BR, C), dtype=tl.float32)
        for k0 in tl.static_range(0, C, 32):
            x = tl.load(x_ptr + rows[:, None].to(tl.int64) * C + k0 + kc[None, :],
                        mask=ok[:, None], other=0.0).to(tl.float32)
            h = tl.load(h_ptr + (k0 + kc[:, None]) * C + c[None, :])
            y = tl.dot(x, h, y, input_precision="ieee")
        return y

    @triton.jit(do_not_specialize=["R"])
    def _fp8_round_kernel(x_ptr, R, D, nb, BR: tl.constexpr, NB: tl.constexpr,
                          PDL: tl.constexpr = False):
        pdl_start(PDL)
        dt = x_ptr.dtype.element_ty
        rows = tl.program_id(0) * BR + tl.arange(0, BR)
        b = tl.arange(0, NB)
        j = tl.arange(0, 64)
        m = (rows < R)[:, None, None] & (b < nb)[None, :, None] & (j < 64)[None, None, :]
        ptr = (x_ptr + rows[:, None, None].to(tl.int64) * D + b[None, :, None] * 64
               + j[None, None, :])
        x = tl.load(ptr, mask=m, other=0.0).to(tl.float32)
        tl.store(ptr, _fp8_sim(x).to(dt), mask=m)

    @triton.jit(do_not_specialize=["R"])
    def _hadamard_fp4_kernel(x_ptr, h_ptr, out_ptr, R, C: tl.constexpr, QAT: tl.constexpr,
                             BR: tl.constexpr, PDL: tl.constexpr = False):
        pdl_start(PDL)
        dt = x_ptr.dtype.element_ty
        rows = tl.program_id(0) * BR + tl.arange(0, BR)
        ok = rows < R
        y = _hadamard_rows(x_ptr, h_ptr, rows, ok, C, BR).to(dt).to(tl.float32)
        if QAT:
            y = _fp4_sim(y, BR, C)
        c = tl.arange(0, C)
        tl.store(out_ptr + rows[:, None].to(tl.int64) * C + c[None, :], y.to(dt),
                 mask=ok[:, None])
