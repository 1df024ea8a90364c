"""The grouped output projection `wo_a` (SPEC.md 5.5): z[t, g] = o[t, g] @ W[g]^T.

`grouped_linear(x, weight, scale)`: x [T, G, I] in the working dtype, weight [G*O, I] (row
g*O + o is output o of group g) -> [T, G, O] in x's dtype. Official checkpoints store `wo_a` as
FP8 (e4m3 with 128x128 e8m0 block scales) and the reference applies it as the dequantised
working-dtype weight with no activation quantisation. An e4m3 value times a power of two is
exactly a bf16 value, so keeping the FP8 bytes changes no product: `scale=None` means `weight`
is already in a float dtype.

Reference (CPU, tests): dequantise (exact) and `einsum` in x's dtype.

GPU, bf16 x, FP8 weight, up to SMALL_T tokens (decode) read the e4m3 bytes, half the bf16
weight's: `_grouped_gemv_kernel` for one token (CUDA-core products, a few whole weight rows a
CTA, every byte requested at once), else `_grouped_fp8_kernel`, which widens each 128-deep
K-block to bf16 in registers and runs one bf16 MMA per block, scaled once by the block's
power-of-two scale ("swap AB": weight rows fill the MMA's wide side, tokens the narrow one), K
split across CTAs until about four share an SM (fp32 partials, summed in split order by
`quant_linear.sum_splits_`). Products are the reference's; only the fp32 summation order
differs.
H200, Flash wo_a (8 x 1024 x 4096): 14.3 us at T = 1, 18.7 us at T = 4-16, 22.3 us at T = 64,
51.1 us at T = 256, against 22.6-24.4 us for the bf16 einsum on a bf16 copy at T <= 64 and
59.4 us for the dequantised copy and bmm at T = 256 (benchmarks/bench_linear_moe.py --only
wo_a; `launch_cfg`). Beyond SMALL_T tokens (prefill) `_dequant_kernel` writes a transient bf16
copy (read 1 byte, write 2 a weight) for cuBLAS's batched bf16 GEMM.
"""
from __future__ import annotations

import torch

from . import HAS_TRITON, num_sms, use_triton
from .pdl import pdl
from ..quant.formats import dequant_fp8
from .quant_linear import sum_splits_

SMALL_T = 256  # past it the dequantised copy and cuBLAS's bmm win (H200, Flash wo_a: 384 tokens
# 107.0 against 70.7 us; 256 tokens 51.1 against 59.4)
GEMV_MAX_T = 1  # CUDA cores for one token (no MMA tile to fill), GEMV_ROWS weight rows a CTA
GEMV_ROWS = 8


def grouped_linear_ref(x: torch.Tensor, weight: torch.Tensor,
                       scale: torch.Tensor | None = None) -> torch.Tensor:
    G = x.shape[1]
    w = dequant_fp8(weight, scale) if scale is not None else weight
    return torch.einsum("tgi,goi->tgo", x, w.to(x.dtype).view(G, -1, x.shape[2]))


def grouped_linear(x: torch.Tensor, weight: torch.Tensor,
                   scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, G, I], weight [G*O, I] (FP8 with `scale` [G*O/128, I/128], or a float dtype)."""
    T, G, I = x.shape
    if weight.shape[0] % G or weight.shape[1] != I:
        raise ValueError(f"grouped linear: weight {tuple(weight.shape)} does not fit {G} groups "
                         f"of {I} inputs")
    O = weight.shape[0] // G
    if (scale is not None and use_triton(x) and x.dtype == torch.bfloat16 and T
            and O % 128 == 0 and I % 128 == 0):
        if T <= SMALL_T:
            return _grouped_fp8_cuda(x, weight, scale, O)
        w = _dequant_bf16(weight, scale)  # [G*O, I], transient
        # written [T, G, O] row-major by cuBLAS (ldc G*O): the caller's flatten stays a view
        # (the einsum's [G, T, O] result cost a 170 us copy at 8192 tokens)
        y = torch.empty(T, G, O, dtype=x.dtype, device=x.device)
        torch.bmm(x.transpose(0, 1), w.view(G, O, I).transpose(1, 2), out=y.transpose(0, 1))
        return y
    return grouped_linear_ref(x, weight, scale)


def launch_cfg(T: int, N: int, I: int, sms: int) -> dict:
    """`_grouped_fp8_kernel`'s launch past 32 tokens, from a sweep on an H200 (`scratch`,
    graph-timed; tiles of 64 weight rows and 16-32 tokens, ~4 CTAs an SM, stay best up to 32
    tokens). 33-64 tokens: 128-row tiles and K in two, 4 stages when that makes about one CTA
    an SM (Flash wo_a 26.7-27.6 -> 21.3-22.3 us), else 3 (Pro: 44.7-47.3 -> 33.0-34.3 us); past
    64, 128 tokens a tile on 8 warps and K split to about one CTA an SM (Flash / Pro, 128
    tokens 46.1 -> 29.4 / 98.9 -> 51.1 us, 256 tokens 98.4 -> 51.1 / 155.2 -> 100.1 us)."""
    if T <= 32:
        return {}
    if T <= 64:
        return dict(bw=128, split=2, stages=4 if 2 * (N // 128) <= sms else 3)
    tiles = N // 128 * -(-T // 128)
    return dict(bw=128, bt=128, warps=8, split=max(1, min(I // 512, sms // tiles)))


def _dequant_bf16(weight, scale):
    n, k = weight.shape
    w = torch.empty(n, k, dtype=torch.bfloat16, device=weight.device)
    _dequant_kernel[(n // 32, k // 128)](weight, scale.view(torch.uint8), w, k, num_warps=4,
                                         **pdl())
    return w


def _grouped_fp8_cuda(x, weight, scale, O, cfg: dict | None = None):
    """`cfg` (gemv, bw, bt, stages, warps, split) overrides the launch for tests and
    benchmarks."""
    T, G, I = x.shape
    x = x.contiguous()
    y = torch.empty(T, G, O, dtype=x.dtype, device=x.device)
    nkb = I // 128
    c = dict(gemv=T <= GEMV_MAX_T and I <= 8192, bw=64, bt=None, stages=3, warps=4, split=None)
    c.update(launch_cfg(T, G * O, I, num_sms(x.device)))
    c.update(cfg or {})
    if c["gemv"]:
        _grouped_gemv_kernel[(G * O // GEMV_ROWS,)](
            x, weight, scale.view(torch.uint8), y, T, G * O, O, I, BW=GEMV_ROWS,
            NKB=triton.next_power_of_2(nkb), TM=triton.next_power_of_2(T), num_warps=8, **pdl())
        return y
    bt = c["bt"] or (16 if T <= 16 else 32 if T <= 32 else 64 if T <= 64 else 128)
    tiles = G * O // c["bw"] * triton.cdiv(T, bt)
    # split K until ~4 CTAs an SM: one CTA an SM leaves each K-block waiting on memory
    split = c["split"] or max(1, min(nkb // 4, 4 * num_sms(x.device) // tiles))
    per = triton.cdiv(nkb, split)
    split = triton.cdiv(nkb, per)
    part = torch.empty(split, T, G * O, dtype=torch.float32, device=x.device) if split > 1 else y
    _grouped_fp8_kernel[(G * O // c["bw"], triton.cdiv(T, bt), split)](
        x, weight, scale.view(torch.uint8), part, T, G * O, O, I, per, BW=c["bw"], BT=bt,
        num_warps=c["warps"], num_stages=c["stages"], **pdl())
    if split > 1:
        sum_splits_(part, y)
    return y


if HAS_TRITON:
    import triton
    import triton.language as tl

    from .pdl import pdl_start
    from .quant_linear import _e8m0_f32

    @triton.jit(do_not_specialize=["T", "kb_per_split"])
    def _grouped_fp8_kernel(x_ptr, w_ptr, s_ptr, y_ptr, T, N, O, I, kb_per_split,
                            BW: tl.constexpr, BT: tl.constexpr, PDL: tl.constexpr = False):
        """y[split, t, rows] for BW weight rows (one group, one 128-row scale block), BT tokens
        and this split's K-blocks; grid (G*O/BW, T/BT, splits)."""
        pdl_start(PDL)
        r0 = tl.program_id(0) * BW
        rows = r0 + tl.arange(0, BW)
        g = r0 // O
        toks = tl.program_id(1) * BT + tl.arange(0, BT)
        tok_ok = toks < T
        k = tl.arange(0, 128)
        nkb = I // 128
        kb0 = tl.program_id(2) * kb_per_split
        kb1 = tl.minimum(kb0 + kb_per_split, nkb)
        s_at = s_ptr + (r0 // 128) * nkb
        w_at = w_ptr + rows[:, None].to(tl.int64) * I + k[None, :]
        x_at = x_ptr + toks[:, None].to(tl.int64) * (N // O * I) + g * I + k[None, :]
        acc = tl.zeros((BW, BT), dtype=tl.float32)
        # the block scale one K-block ahead: Triton prefetches only the loads that feed the dot
        sn = tl.load(s_at + kb0).to(tl.int32)
        for kb in range(kb0, kb1):
            sb = sn
            sn = tl.load(s_at + kb + 1, mask=kb + 1 < kb1, other=0).to(tl.int32)
            # e4m3 x 2^k is exactly bf16: scaling the weight, not the partial sum, lets the MMA
            # accumulate in place, so Triton keeps several wgmma in flight (H200: 8-10% faster
            # up to 32 tokens than scaling each block's product)
            w = (tl.load(w_at + kb * 128).to(tl.float32) * _e8m0_f32(sb)).to(tl.bfloat16)
            xv = tl.load(x_at + kb * 128, mask=tok_ok[:, None], other=0.0)
            acc = tl.dot(w, tl.trans(xv), acc)
        y = (y_ptr + tl.program_id(2).to(tl.int64) * T * N + toks[None, :].to(tl.int64) * N
             + rows[:, None])
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=tok_ok[None, :])

    @triton.jit(do_not_specialize=["T"])
    def _grouped_gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, T, N, O, I, BW: tl.constexpr,
                             NKB: tl.constexpr, TM: tl.constexpr, PDL: tl.constexpr = False):
        """One token (TM > 1 works, but re-reduces per token: slower than the MMA kernel from
        T = 2 on the H200): BW whole weight rows a CTA as [BW, K-blocks, 128], all their bytes
        loaded at once, products on CUDA cores. x is scaled by each K-block's power-of-two
        scale instead of the weight: the same exact products, one multiply per input."""
        pdl_start(PDL)
        r0 = tl.program_id(0) * BW
        rows = r0 + tl.arange(0, BW)
        g = r0 // O
        kb = tl.arange(0, NKB)
        kk = tl.arange(0, 128)
        nkb = I // 128
        k = kb[:, None] * 128 + kk[None, :]  # [NKB, 128]
        kok = (kb < nkb)[:, None]
        w = tl.load(w_ptr + rows[:, None, None].to(tl.int64) * I + k[None, :, :],
                    mask=kok[None, :, :], other=0.0).to(tl.float32)
        s = _e8m0_f32(tl.load(s_ptr + (r0 // 128) * nkb + kb, mask=kb < nkb, other=0).to(tl.int32))
        for t in tl.static_range(TM):
            ok = t < T
            xv = tl.load(x_ptr + t * (N // O * I) + g * I + k, mask=kok & ok, other=0.0)
            yt = tl.sum(tl.sum(w * (xv.to(tl.float32) * s[:, None])[None, :, :], 2), 1)
            tl.store(y_ptr + t * N + rows, yt.to(y_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _dequant_kernel(w_ptr, s_ptr, out_ptr, K, PDL: tl.constexpr = False):
        """out = e4m3 weight x its 128x128 block scale, exactly, in bf16: a [32, 128] tile."""
        pdl_start(PDL)
        rows = tl.program_id(0) * 32 + tl.arange(0, 32)
        kb = tl.program_id(1)
        at = rows[:, None].to(tl.int64) * K + kb * 128 + tl.arange(0, 128)[None, :]
        s = _e8m0_f32(tl.load(s_ptr + (tl.program_id(0) * 32 // 128) * (K // 128) + kb)
                      .to(tl.int32))
        tl.store(out_ptr + at, (tl.load(w_ptr + at).to(tl.float32) * s).to(tl.bfloat16))
