"""Manifold-constrained hyper-connections (mHC, SPEC.md 4): mixing, Sinkhorn, pre and post.

Triton path: `hc_pre` is a skinny product (the `(2+n)n` mixing rows against `n*d` inputs) done on
the tensor cores in fp32-exact form (bf16 x times fn's three exact bf16 parts, split once per
parameter by `fn_parts`), then one kernel that finishes the mix, runs Sinkhorn and
forms y; `hc_post` is one pass over X and f.
"""
from __future__ import annotations

import torch

from . import HAS_TRITON, use_triton
from .f32_linear import split_bf16
from .mhc_fused import hc_fused, post_rows
from .moe import sum_slots
from .pdl import pdl
from .quant_linear import sum_parts
from .rmsnorm import rmsnorm, rmsnorm_ref


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
    """X'[:, k] = post[k] * f + sum_j comb[j, k] * X[:, j]  -> [T, n, d] in x's dtype. f may be
    the partials of a split-K linear [S, T, d] (`quant_linear.sum_parts`), or the MoE's slot
    rows [S, T, J, d] (`moe_forward(parts=True)`, `moe.sum_slots`)."""
    f = sum_slots(f, x.dtype) if f.dim() == 4 else sum_parts(f, x.dtype) if f.dim() == 3 else f
    out = post[:, :, None] * f.float()[:, None, :] + torch.einsum("tjk,tjd->tkd", comb, x.float())
    return out.to(x.dtype)


if HAS_TRITON:
    import triton
    import triton.language as tl

    from .mhc_fused import post_f_row
    from .pdl import pdl_start


    @triton.jit(do_not_specialize=["T"])
    def _hc_mix_kernel(x_ptr, fn_ptr, part_ptr, sq_ptr, T, K, NOUT, k_per_split,
                       BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, NPAD: tl.constexpr,
                       X_BF16: tl.constexpr, PARTS: tl.constexpr = False,
                       PDL: tl.constexpr = False):
        """Partial mix = x @ fn^T and sum(x^2) over one K range of a block of tokens. PARTS
        (bf16 x): fn_ptr holds fn's exact bf16 parts [3, NOUT, K] (`fn_parts`), loaded
        straight into the tensor-core products instead of split from fp32 each step."""
        pdl_start(PDL)
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        sp = tl.program_id(1)
        r = tl.arange(0, NPAD)
        tmask = t < T
        acc = tl.zeros([BLOCK_T, NPAD], tl.float32)
        sq = tl.zeros([BLOCK_T], tl.float32)
        k_lo = sp * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        kb = tl.arange(0, BLOCK_K)
        f_rows = fn_ptr + r[:, None] * K
        rmask = (r < NOUT)[:, None]
        if PARTS:
            part = NOUT * K
            sq2 = tl.zeros([BLOCK_T, BLOCK_K], tl.float32)  # summed across threads once
            for k0 in range(k_lo, k_hi, BLOCK_K):
                k = k0 + kb
                kmask = k < k_hi
                x = tl.load(x_ptr + t[:, None].to(tl.int64) * K + k[None, :],
                            mask=tmask[:, None] & kmask[None, :], other=0.0)
                fm = rmask & kmask[None, :]
                hi = tl.load(f_rows + k[None, :], mask=fm, other=0.0)
                mid = tl.load(f_rows + part + k[None, :], mask=fm, other=0.0)
                lo = tl.load(f_rows + 2 * part + k[None, :], mask=fm, other=0.0)
                xf = x.to(tl.float32)
                sq2 += xf * xf
                acc = tl.dot(x, tl.trans(hi), acc)
                acc = tl.dot(x, tl.trans(mid), acc)
                acc = tl.dot(x, tl.trans(lo), acc)
            sq = tl.sum(sq2, 1)
            base = sp * T + t
            tl.store(part_ptr + base[:, None].to(tl.int64) * NPAD + r[None, :], acc,
                     mask=tmask[:, None])
            tl.store(sq_ptr + base, sq, mask=tmask)
            return
        # fn's block one ahead: converted before the MMA, Triton does not prefetch it
        # (H200, 8192 tokens: 251 -> 224 us Flash, 435 -> 386 us Pro)
        fnext = tl.load(f_rows + k_lo + kb[None, :], mask=rmask & (k_lo + kb < k_hi)[None, :],
                        other=0.0)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k = k0 + kb
            kmask = k < k_hi
            x = tl.load(x_ptr + t[:, None].to(tl.int64) * K + k[None, :],
                        mask=tmask[:, None] & kmask[None, :], other=0.0)
            f = fnext  # [NPAD, BK] fp32
            fnext = tl.load(f_rows + k[None, :] + BLOCK_K,
                            mask=rmask & (k + BLOCK_K < k_hi)[None, :], other=0.0)
            xf = x.to(tl.float32)
            sq += tl.sum(xf * xf, 1)
            if X_BF16:
                # x is exact in bf16; fn = hi + mid + lo in bf16 keeps fn's 24 bits, so three
                # tensor-core products with fp32 accumulation give the fp32 result.
                hi = f.to(tl.bfloat16)
                r1 = f - hi.to(tl.float32)
                mid = r1.to(tl.bfloat16)
                lo = (r1 - mid.to(tl.float32)).to(tl.bfloat16)
                acc = tl.dot(x, tl.trans(hi), acc)
                acc = tl.dot(x, tl.trans(mid), acc)
                acc = tl.dot(x, tl.trans(lo), acc)
            else:
                acc = tl.dot(xf, tl.trans(f), acc, input_precision="ieee")
        base = sp * T + t
        tl.store(part_ptr + base[:, None].to(tl.int64) * NPAD + r[None, :], acc,
                 mask=tmask[:, None])
        tl.store(sq_ptr + base, sq, mask=tmask)

    @triton.jit
    def _sum_splits(ptr, T, t, tmask, col0, S, W: tl.constexpr, NPAD: tl.constexpr,
                    SP: tl.constexpr):
        """Sum over the S (<= SP) split partials of columns col0 .. col0+W of tokens t, loaded
        at once (a loop over splits would wait on each load in turn)."""
        s = tl.arange(0, SP)
        w = tl.arange(0, W)
        v = tl.load(ptr + (s[:, None, None] * T + t[None, :, None]).to(tl.int64) * NPAD + col0
                    + w[None, None, :], mask=(s < S)[:, None, None] & tmask[None, :, None],
                    other=0.0)
        return tl.sum(v, 0)

    @triton.jit(do_not_specialize=["T", "S"])
    def _hc_pre_kernel(x_ptr, part_ptr, sq_ptr, scale_ptr, base_ptr, y_ptr, post_ptr, comb_ptr,
                       nw_ptr, T, D, S, norm_eps, hc_eps, iters, y_eps,
                       N: tl.constexpr, NPAD: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_D: tl.constexpr, SP: tl.constexpr, HEAD: tl.constexpr = False,
                       NORM: tl.constexpr = False, PDL: tl.constexpr = False):
        """Finish the mix (sum of partials, RMS scale), y = sum_j pre_j X_j; the d-block-0 CTAs
        also write post and the Sinkhorn-normalised comb (not for HEAD, `hc_head`'s mix of
        n columns only). NORM (BLOCK_D >= D: whole rows): y rounded to its dtype, then the
        RMSNorm of weight nw and epsilon y_eps that follows it in the model."""
        pdl_start(PDL)
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        db = tl.program_id(1)
        tmask = t < T
        j = tl.arange(0, N)
        sp = tl.arange(0, SP)
        sq = tl.sum(tl.load(sq_ptr + sp[:, None] * T + t[None, :],
                            mask=(sp < S)[:, None] & tmask[None, :], other=0.0), 0)
        mix_pre = _sum_splits(part_ptr, T, t, tmask, 0, S, N, NPAD, SP)
        rs = tl.rsqrt(sq / (N * D) + norm_eps)
        scale0 = tl.load(scale_ptr)
        pre = tl.sigmoid(mix_pre * rs[:, None] * scale0 + tl.load(base_ptr + j)[None, :]) + hc_eps
        dcol = db * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = dcol < D
        x = tl.load(x_ptr + t[:, None, None].to(tl.int64) * (N * D) + j[None, :, None] * D
                    + dcol[None, None, :], mask=tmask[:, None, None] & dmask[None, None, :],
                    other=0.0)  # [BT, N, BD]
        y = tl.sum(x.to(tl.float32) * pre[:, :, None], 1)
        if NORM:  # as `rmsnorm_ref` on the rounded y
            y = y.to(y_ptr.dtype.element_ty).to(tl.float32)
            r = tl.rsqrt(tl.sum(y * y, 1) / D + y_eps)
            y = y * r[:, None] * tl.load(nw_ptr + dcol, mask=dmask, other=0.0)[None, :]
        tl.store(y_ptr + t[:, None].to(tl.int64) * D + dcol[None, :],
                 y.to(y_ptr.dtype.element_ty), mask=tmask[:, None] & dmask[None, :])
        if not HEAD:  # hc_head has no post / comb (and base holds only n entries)
            if db == 0:
                jk = tl.arange(0, N * N)
                mix_post = _sum_splits(part_ptr, T, t, tmask, N, S, N, NPAD, SP)
                mix_comb = _sum_splits(part_ptr, T, t, tmask, 2 * N, S, N * N, NPAD, SP)
                scale1 = tl.load(scale_ptr + 1)
                scale2 = tl.load(scale_ptr + 2)
                post = 2 * tl.sigmoid(mix_post * rs[:, None] * scale1 + tl.load(base_ptr + N + j)[None, :])
                tl.store(post_ptr + t[:, None] * N + j[None, :], post, mask=tmask[:, None])
                c = mix_comb * rs[:, None] * scale2 + tl.load(base_ptr + 2 * N + jk)[None, :]
                c = tl.reshape(c, (BLOCK_T, N, N))  # [t, j (row), k (column)]
                c = tl.exp(c - tl.max(c, 2)[:, :, None])
                c = c / tl.sum(c, 2)[:, :, None] + hc_eps
                c = c / (tl.sum(c, 1)[:, None, :] + hc_eps)
                for _ in range(iters - 1):
                    c = c / (tl.sum(c, 2)[:, :, None] + hc_eps)
                    c = c / (tl.sum(c, 1)[:, None, :] + hc_eps)
                tl.store(comb_ptr + t[:, None] * (N * N) + jk[None, :],
                         tl.reshape(c, (BLOCK_T, N * N)), mask=tmask[:, None])

    @triton.jit(do_not_specialize=["T", "S"])
    def _hc_post_kernel(x_ptr, f_ptr, post_ptr, comb_ptr, out_ptr, T, D, S,
                        N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                        SP: tl.constexpr = 1, ROUND_F: tl.constexpr = False,
                        J: tl.constexpr = 1, PDL: tl.constexpr = False):
        """out[:, k] = post[k] * f + sum_j comb[j, k] * X[:, j]: one read of X and f. f: J rows
        a token of S partials [S, T, J, D]: each row's partials summed in fp32 (rounded to out's
        dtype with ROUND_F), the J rows summed in fp32 and rounded (J > 1: the MoE's slots)."""
        pdl_start(PDL)
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        dcol = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        tmask = t < T
        mask2 = tmask[:, None] & (dcol < D)[None, :]
        kk = tl.arange(0, N)
        t64 = t.to(tl.int64)
        mix = tl.zeros([BLOCK_T, N, BLOCK_D], tl.float32)
        for j in tl.static_range(N):
            xj = tl.load(x_ptr + t64[:, None] * (N * D) + j * D + dcol[None, :], mask=mask2,
                         other=0.0).to(tl.float32)
            cj = tl.load(comb_ptr + t[:, None] * (N * N) + j * N + kk[None, :],
                         mask=tmask[:, None], other=0.0)  # [BT, N]: comb[t, j, :]
            mix += cj[:, :, None] * xj[:, None, :]
        sp = tl.arange(0, SP)  # every partial's load of a row in flight at once
        f = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
        for j in tl.static_range(J):
            fj = tl.sum(tl.load(f_ptr + ((sp[:, None, None] * T + t64[None, :, None]) * J + j) * D
                                + dcol[None, None, :], mask=(sp < S)[:, None, None] & mask2[None],
                                other=0.0).to(tl.float32), 0)
            if ROUND_F:
                fj = fj.to(out_ptr.dtype.element_ty).to(tl.float32)
            f += fj
        if J > 1:
            f = f.to(out_ptr.dtype.element_ty).to(tl.float32)
        post = tl.load(post_ptr + t[:, None] * N + kk[None, :], mask=tmask[:, None], other=0.0)
        out = post[:, :, None] * f[:, None, :] + mix
        tl.store(out_ptr + t64[:, None, None] * (N * D) + kk[None, :, None] * D
                 + dcol[None, None, :], out.to(out_ptr.dtype.element_ty),
                 mask=tmask[:, None, None] & (dcol < D)[None, None, :])

    @triton.jit(do_not_specialize=["T", "S"])
    def _hc_post_row_kernel(x_ptr, f_ptr, post_ptr, comb_ptr, out_ptr, T, D, S,
                            N: tl.constexpr, BLOCK_D: tl.constexpr, SMAX: tl.constexpr,
                            ROUND_F: tl.constexpr, J: tl.constexpr, PDL: tl.constexpr = False):
        """`_hc_post_kernel`'s sums for one token a CTA with every value a row of BLOCK_D
        channels, so no value changes layout between its load and its sum (decode batches:
        the 2-D kernel's broadcasts and partial reductions cost more than the bytes). The
        same fp32 operations in the same order; S <= SMAX partials."""
        pdl_start(PDL)
        t = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        ok = c < D
        f = post_f_row(f_ptr, out_ptr, t, c, ok, T, D, S, SMAX, ROUND_F, J)
        for k in tl.static_range(N):
            mix = tl.zeros([BLOCK_D], tl.float32)
            for j in tl.static_range(N):  # X's rows: read from memory once, then from L1
                xj = tl.load(x_ptr + (t * N + j) * D + c, mask=ok, other=0.0).to(tl.float32)
                mix += tl.load(comb_ptr + t * (N * N) + j * N + k) * xj
            out = tl.load(post_ptr + t * N + k) * f + mix
            tl.store(out_ptr + (t * N + k) * D + c, out.to(out_ptr.dtype.element_ty), mask=ok)

    def fn_parts(fn: torch.Tensor) -> torch.Tensor:
        """fn's exact split into three bf16 parts [3, *fn.shape] (hi + mid + lo == fn in fp32:
        `f32_linear.split_bf16`), built once per parameter and kept with it while its data and
        version stay the same. After an in-place update of fn the split is redone into the same
        buffer (CUDA graphs captured earlier read that buffer). Under graph capture an unbuilt
        split is made in the graph, not kept."""
        key = (fn.data_ptr(), fn._version, tuple(fn.shape), tuple(fn.stride()))
        hit = getattr(fn, "_dsv4_bf16_parts", None)  # lives and dies with the parameter
        if hit is not None and hit[0] == key:
            return hit[1]
        parts = split_bf16(fn).contiguous()
        if fn.is_cuda and torch.cuda.is_current_stream_capturing():
            return parts
        if hit is not None and hit[1].shape == parts.shape:
            parts = hit[1].copy_(parts)
        fn._dsv4_bf16_parts = (key, parts)
        return parts

    def hc_pre_triton(x, fn, scale, base, norm_eps: float, hc_eps: float, iters: int,
                      splits: int = 0, pre_cfg: tuple[int, int, int] | None = None,
                      head: bool = False, norm: tuple[torch.Tensor, float] | None = None,
                      mix_cfg: tuple[int, int, int, int] | None = None):
        """Launcher: x [T, n, d] -> (y [T, d], post [T, n], comb [T, n, n]).

        Two kernels: the mix product (split along n*d when few tokens, so that the GPU fills),
        then y, post and comb. fn [(2+n)n, n*d] is read once per 64 tokens. `head`: the
        `hc_head` reduction (fn [n, n*d], one scale): y only, post and comb empty. `norm`
        (weight [d] fp32, eps): y comes out RMS-normalised (`rmsnorm_ref` of the rounded y),
        each CTA of the second kernel then taking whole rows. `mix_cfg` (tokens, K columns,
        warps, stages) a CTA of the mix kernel: a benchmark's override (default 64, 64, 4, 3)."""
        T, n, d = x.shape
        K = n * d
        nout = n if head else (2 + n) * n
        if fn.shape != (nout, K) or n & (n - 1):
            raise ValueError(f"fn {tuple(fn.shape)} does not fit x {tuple(x.shape)} "
                             f"(n must be a power of two)")
        x = x.contiguous()
        parts = x.dtype == torch.bfloat16
        fn = fn_parts(fn) if parts else fn.float().contiguous()
        y = torch.empty(T, d, dtype=x.dtype, device=x.device)
        post = torch.empty(0 if head else T, n, dtype=torch.float32, device=x.device)
        comb = torch.empty(0 if head else T, n, n, dtype=torch.float32, device=x.device)
        if T == 0:
            return y, post, comb
        bt, bk, warps1, stages1 = mix_cfg or (64, 64, 4, 3)
        npad = max(16, triton.next_power_of_2(nout))
        t_blocks = triton.cdiv(T, bt)
        if not splits:  # ~512 CTAs, at least two K-blocks each (H200: 8192 tokens 225 -> 204
            # us and 1 token 9.1 -> 8.2 us against the former ~256 CTAs, Flash)
            splits = max(1, min(K // (2 * bk), 128, 512 // t_blocks))
        kps = triton.cdiv(triton.cdiv(K, splits), bk) * bk
        splits = triton.cdiv(K, kps)
        part = torch.empty(splits, T, npad, dtype=torch.float32, device=x.device)
        sq = torch.empty(splits, T, dtype=torch.float32, device=x.device)
        _hc_mix_kernel[(t_blocks, splits)](
            x, fn, part, sq, T, K, nout, kps, BLOCK_T=bt, BLOCK_K=bk, NPAD=npad,
            X_BF16=parts, PARTS=parts, num_warps=warps1, num_stages=stages1, **pdl())
        # (tokens, channels, warps) per CTA of the second kernel, measured on an H200: one
        # token on one warp keeps the Sinkhorn's reductions in shuffles (T=1: 9.2 against
        # 14.4 us, T=64: 12.0 against 17.6); 4 tokens on 4 warps for prefill (T=8192: the
        # alternatives re-measured in the seventh session were within 2%)
        if norm is None:
            bt2, bd2, warps2 = pre_cfg or ((1, 256, 1) if T <= 64 else (4, 512, 4))
        else:
            if norm[0].shape != (d,):
                raise ValueError(f"norm weight {tuple(norm[0].shape)} does not fit d = {d}")
            bt2, bd2, warps2 = pre_cfg or norm_cfg(T, d)
            bd2 = max(bd2, triton.next_power_of_2(d))
        _hc_pre_kernel[(triton.cdiv(T, bt2), triton.cdiv(d, bd2))](
            x, part, sq, scale.float().contiguous(), base.float().contiguous(), y, post, comb,
            y if norm is None else norm[0].float().contiguous(), T, d, splits, norm_eps, hc_eps,
            iters, 0.0 if norm is None else norm[1], N=n, NPAD=npad, BLOCK_T=bt2,
            BLOCK_D=bd2, SP=triton.next_power_of_2(splits), HEAD=head, NORM=norm is not None,
            num_warps=warps2, **pdl())
        return y, post, comb

    def norm_cfg(T: int, d: int) -> tuple[int, int, int]:
        """(tokens, channels, warps) a CTA of the pre kernel with the RMSNorm fused: one whole
        row; H200, hc_pre + RMSNorm (`scratch`-style A/B, graph-timed): 8192 tokens, d = 4096,
        4 warps 205.6 us (8: 215.4; separate launches 215.4), d = 7168, 8 warps 359.0 (4:
        421.4; separate 368.5); 64 tokens, 4 warps 10.8 / 13.4 us (separate 13.5 / 14.2)."""
        return 1, triton.next_power_of_2(d), 4 if T <= 64 or d <= 4096 else 8

    def hc_post_triton(x, f, post, comb):
        """Launcher: X' [T, n, d] in x's dtype; f [T, d], partials [S, T, d] or slot rows
        [S, T, J, d] (`hc_post_ref`)."""
        T, n, d = x.shape
        f, round_f = post_rows(x, f, post, comb)
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        if T:
            args = (x.contiguous(), f.contiguous(), post.float().contiguous(),
                    comb.float().contiguous(), out, T, d, f.shape[0])
            if T <= 16 and f.shape[2] > 1:
                # the MoE's slot rows at decode batches: one token a CTA, 1-D rows (batch 1,
                # 7 slots x 4 partials, H200, the kernel alone in a CUDA-graph loop: 2.95 us
                # against 3.79 / 3.90 for the 2-D kernel at 32 / 8 CTAs a token; in a decode
                # step 4.0 against 4.4 us). One row of f a token: the 2-D kernel (1.34 us
                # against 1.51)
                _hc_post_row_kernel[(T, triton.cdiv(d, 256))](
                    *args, N=n, BLOCK_D=256, SMAX=f.shape[0], ROUND_F=round_f, J=f.shape[2],
                    num_warps=4, **pdl())
            else:
                _hc_post_kernel[(triton.cdiv(T, 2), triton.cdiv(d, 512))](
                    *args, N=n, BLOCK_T=2, BLOCK_D=512, SP=triton.next_power_of_2(f.shape[0]),
                    ROUND_F=round_f, J=f.shape[2], num_warps=4, **pdl())
        return out


# tokens from which the GPU fuses the RMSNorm after hc_pre / hc_head into its kernel; under
# them whole-row CTAs are too few (H200, d = 4096: 1 token 9.3 us fused against 8.6 for the
# split-row kernel and a norm launch, 8 tokens 9.8 against 9.9, 64 tokens 10.8 against 13.5)
FUSE_NORM_FROM = 16


def hc_pre(x, fn, scale, base, norm_eps, hc_eps, iters, norm=None):
    """(y, post, comb); `norm` (weight, eps): y through the RMSNorm that follows it in the
    model (SPEC.md 4), fused into the kernel on the GPU."""
    return hc_post_pre(x, None, fn, scale, base, norm_eps, hc_eps, iters, norm)[1:]


def hc_post_pre(x, post_args, fn, scale, base, norm_eps, hc_eps, iters, norm=None,
                head: bool = False):
    """The post update of the sub-layer that ended, then the pre of the next one: (X', y,
    post', comb'). post_args: (f, post, comb) of `hc_post` (X' = post * f + comb^T X), or
    None (X' is x). `norm` as in `hc_pre`; `head`: hc_head's mix (y only, post' and comb'
    empty). On the GPU decode batches take one launch (`mhc_fused.py`); larger ones the post
    kernel, the mix and pre kernels, and the RMSNorm, fused into the pre kernel from
    FUSE_NORM_FROM tokens."""
    T, n, d = x.shape
    if use_triton(x) and x.dtype in (torch.bfloat16, torch.float32) and _pow2(n):
        got = hc_fused(x, fn, scale, base, norm_eps, hc_eps, iters, post_args, head, norm)
        if got is not None:
            return got
        if post_args is not None:
            x = hc_post_triton(x, *post_args)
        fuse = norm is not None and T >= FUSE_NORM_FROM
        y, post, comb = hc_pre_triton(x, fn, scale, base, norm_eps, hc_eps, iters, head=head,
                                      norm=norm if fuse else None)
        return x, (rmsnorm(y, *norm) if norm is not None and not fuse else y), post, comb
    if post_args is not None:
        x = hc_post(x, *post_args)
    if head:
        y = hc_head_ref(x, fn, scale, base, norm_eps, hc_eps)
        post, comb = x.new_empty(0, n, dtype=torch.float32), x.new_empty(0, n, n, dtype=torch.float32)
    else:
        y, post, comb = hc_pre_ref(x, fn, scale, base, norm_eps, hc_eps, iters)
    return x, (y if norm is None else rmsnorm_ref(y, *norm)), post, comb


def hc_head_ref(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
                norm_eps: float, hc_eps: float) -> torch.Tensor:
    """Reduce the n streams to one (SPEC.md 8): y = sum_j pre[j] X[:, j], pre from the
    RMS-scaled mix."""
    xf = x.flatten(1).float()
    mix = (xf @ fn.float().t()) * torch.rsqrt(xf.square().mean(-1, keepdim=True) + norm_eps)
    pre = torch.sigmoid(mix * scale + base) + hc_eps  # [T, n]
    return (pre[:, :, None] * x.float()).sum(1).to(x.dtype)


def hc_head(x, fn, scale, base, norm_eps, hc_eps, norm=None):
    """hc_pre's kernels with the n mix columns of the head (one launch pair, or one launch
    for decode batches, instead of a matmul, a mean, a sigmoid and a sum); `norm` as in
    `hc_pre` (the final norm)."""
    return hc_post_pre(x, None, fn, scale, base, norm_eps, hc_eps, 0, norm, head=True)[1]


def hc_post(x, f, post, comb):
    if use_triton(x) and _pow2(x.shape[1]):
        return hc_post_triton(x, f, post, comb)
    return hc_post_ref(x, f, post, comb)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0
