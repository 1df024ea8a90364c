"""The hyper-connection between two sub-layers of a decode batch in one launch (SPEC.md 4).

At a few tokens mHC is four dependent launches, each a few microseconds of latency over a few
kilobytes: the post update of the sub-layer that ended (`_hc_post*_kernel`), the mixing
product of the one that starts (`_hc_mix_kernel`), its pre / post / Sinkhorn and y
(`_hc_pre_kernel`) and the RMSNorm that follows. `hc_fused` does them in one launch of
(channel blocks + 1) x T CTAs in three phases, each token's CTAs meeting at a barrier
between them:
1. CTA (c, t) forms channels c of token t's X' = post * f + comb^T X (stores them) and their
   share of the mix (fn's columns of those channels in every stream, fp32 products) and of
   sum(X'^2);
2. every channel CTA sums the shares (in CTA order), forms pre and its channels of y =
   sum_j pre_j X'_j, rounded, and their share of sum(y^2); the extra CTA forms post and the
   Sinkhorn-normalised comb, beside the others;
3. each channel CTA scales its y by the RMSNorm's factor and weight.
The barrier is a counter and a generation word a token (`_barrier`): the CTAs that arrive
first spin until the last one bumps the generation. The grid is small (~65-120 CTAs a token
of two warps) and every CTA of it has started before the next launch may place its own
(programmatic dependent launch lets the next kernel go once every CTA has started), so the
CTAs that spin never keep the ones they wait for from running. Under Triton's CPU interpreter,
which runs CTAs one after another, the phases are three launches instead (STAGE 1, 2, 3).

Without `f` the launch is hc_pre's (X' = X: the first layer), with `head` hc_head's (n mix
columns, y only). The values are those of the separate kernels (X' is
`_hc_post_row_kernel`'s, bit for bit: the same fp32 operations in the same order), except
that the mix sums its n*d products in another order (fp32 products of fp32 fn, not the tensor
cores' three bf16 parts of fn): ~1e-7 relative apart. The barrier words (int32, two a token,
left ready for the next launch) are allocated by an eager call: a CUDA graph capture that
would have to allocate them keeps the separate launches. `DSV4_MHC_FUSED=0` keeps them
everywhere.
"""
from __future__ import annotations

import os

import torch

from . import HAS_TRITON
from .pdl import pdl

# decode batches of up to MAX_TOKENS tokens and MAX_CTAS channel CTAs (BC channels each) take
# the one launch. H200, the boundary of two sub-layers in a CUDA-graph loop over cold fn
# (`bench_attention.py --only mhc_step`), against the four launches: d = 4096, 1 / 2 / 4 / 8
# tokens 7.8 / 8.0 / 8.2 / 9.6 us against 10.6-11.1 / 11.1 / 11.2-11.4 / 11.4-13.3, 16 tokens
# 17.1 against 11.8; d = 7168, 1 / 2 / 4 tokens 8.2 / 8.5 / 9.5 against 11.5-15.8, 8 tokens
# 15.9 against 13.0-16.3. (channels, warps) a CTA: (32, 1) 7.4 us at 1 token, (128, 4) 7.9,
# (64, 1) 9.1, (128, 2) 9.8: (64, 2) everywhere
MAX_TOKENS = 16
MAX_CTAS = 512
BC, WARPS = 64, 2
FUSED = os.environ.get("DSV4_MHC_FUSED", "1") != "0"
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_COUNTER: dict[torch.device, torch.Tensor] = {}


def applies(x: torch.Tensor) -> bool:
    T, n, d = x.shape
    return (FUSED and HAS_TRITON and 0 < T <= MAX_TOKENS and T * -(-d // BC) <= MAX_CTAS
            and n & (n - 1) == 0 and n <= 8 and x.dtype in (torch.bfloat16, torch.float32)
            and d % 16 == 0)


def _counter(dev: torch.device) -> torch.Tensor | None:
    have = _COUNTER.get(dev)
    if have is None and not (dev.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        have = _COUNTER[dev] = torch.zeros(2 * MAX_TOKENS, dtype=torch.int32, device=dev)
    return have


def post_rows(x: torch.Tensor, f: torch.Tensor, post: torch.Tensor, comb: torch.Tensor):
    """f as the post kernels read it, [S, T, J, d] (a tensor [T, d], wo_b's split-K partials
    [S, T, d] or the MoE's slot rows [S, T, J, d]), and whether each row's sum of partials is
    rounded to x's dtype (`mhc.hc_post_ref`); ValueError when the shapes do not fit."""
    T, n, d = x.shape
    round_f = f.dim() >= 3 and (f.shape[0] > 1 or f.dtype != x.dtype)
    if f.dim() == 2:
        f = f[None]
    if f.dim() == 3:
        f = f[:, :, None]
    if (f.dim() != 4 or f.shape[1] != T or f.shape[3] != d or post.shape != (T, n)
            or comb.shape != (T, n, n) or n & (n - 1)):
        raise ValueError(f"x {tuple(x.shape)}, f {tuple(f.shape)}, post {tuple(post.shape)}, "
                         f"comb {tuple(comb.shape)} do not fit")
    return f, round_f


def hc_fused(x, fn, scale, base, norm_eps: float, hc_eps: float, iters: int,
             post_args: tuple | None = None, head: bool = False,
             norm: tuple[torch.Tensor, float] | None = None, cfg: tuple[int, int] | None = None):
    """(X', y, post', comb') in one launch, or None where it does not apply (`applies`, or no
    counter under capture). post_args: (f, post, comb) of the sub-layer that ended (X' =
    post * f + comb^T X, stored in a new tensor), or None (X' is x). head: hc_head's mix (fn
    [n, n*d]: y only, post' and comb' empty). norm (weight [d], eps): y through the RMSNorm
    that follows. cfg: (channels, warps) a CTA, a benchmark's override."""
    T, n, d = x.shape
    cnt = _counter(x.device) if applies(x) else None
    if cnt is None:
        return None
    nout = n if head else (2 + n) * n
    if fn.shape != (nout, n * d):
        raise ValueError(f"fn {tuple(fn.shape)} does not fit x {tuple(x.shape)}")
    x = x.contiguous()
    dev = x.device
    if post_args is not None:
        f, round_f = post_rows(x, *post_args)
        f = f.contiguous()
        pp, cc = post_args[1].float().contiguous(), post_args[2].float().contiguous()
        xo = torch.empty_like(x)
    else:
        f, round_f, pp, cc, xo = x, False, x, x, x
    bc, warps = cfg or (BC, WARPS)
    nc = triton.cdiv(d, bc)
    npad = max(16, triton.next_power_of_2(nout))
    part = torch.empty(T, nc, npad, dtype=torch.float32, device=dev)
    sq = torch.empty(2, T, nc, dtype=torch.float32, device=dev)  # sum(X'^2), sum(y^2) shares
    y = torch.empty(T, d, dtype=x.dtype, device=dev)
    post2 = torch.empty(0 if head else T, n, dtype=torch.float32, device=dev)
    comb2 = torch.empty(0 if head else T, n, n, dtype=torch.float32, device=dev)
    if norm is not None and norm[0].shape != (d,):
        raise ValueError(f"norm weight {tuple(norm[0].shape)} does not fit d = {d}")
    nw = y if norm is None else norm[0].float().contiguous()
    args = (x, f, pp, cc, xo, fn.float().contiguous(), part, sq, cnt, scale.float().contiguous(),
            base.float().contiguous(), y, post2, comb2, nw, T, d, f.shape[0], nc, norm_eps,
            hc_eps, iters, 0.0 if norm is None else norm[1])
    meta = dict(N=n, NOUT=nout, NPAD=npad, BC=bc, CP2=triton.next_power_of_2(nc),
                HAS_POST=post_args is not None, SMAX=f.shape[0] if post_args is not None else 1,
                ROUND_F=round_f, J=f.shape[2] if post_args is not None else 1, HEAD=head,
                NORM=norm is not None, num_warps=warps)
    grid = (nc + (0 if head else 1), T)  # the extra CTA: post and comb
    if _INTERPRET:  # CTAs run one after another: a launch a phase
        for stage in (1, 2, 3):
            _hc_fused_kernel[grid](*args, STAGE=stage, **meta)
    else:
        _hc_fused_kernel[grid](*args, STAGE=0, **meta, **pdl())
    return xo, y, post2, comb2


if HAS_TRITON:
    import triton
    import triton.language as tl

    from .pdl import pdl_start

    @triton.jit(do_not_specialize=["T", "S", "NCH"])
    def _hc_fused_kernel(x_ptr, f_ptr, post_ptr, comb_ptr, xo_ptr, fn_ptr, part_ptr, sq_ptr,
                         bar_ptr, scale_ptr, base_ptr, y_ptr, post2_ptr, comb2_ptr, nw_ptr,
                         T, D, S, NCH, norm_eps, hc_eps, iters, y_eps,
                         N: tl.constexpr, NOUT: tl.constexpr, NPAD: tl.constexpr,
                         BC: tl.constexpr, CP2: tl.constexpr, HAS_POST: tl.constexpr,
                         SMAX: tl.constexpr, ROUND_F: tl.constexpr, J: tl.constexpr,
                         HEAD: tl.constexpr, NORM: tl.constexpr, STAGE: tl.constexpr,
                         PDL: tl.constexpr = False):
        """Grid (NCH channel blocks [+ 1 for post and comb], T): the three phases of the
        module docstring, all of them (STAGE 0, with barriers) or one (STAGE 1, 2, 3)."""
        pdl_start(PDL)
        cb = tl.program_id(0)
        t = tl.program_id(1).to(tl.int64)
        bar = bar_ptr + 2 * t
        if STAGE <= 1:
            if cb < NCH:
                _phase_mix(x_ptr, f_ptr, post_ptr, comb_ptr, xo_ptr, fn_ptr, part_ptr, sq_ptr,
                           t, cb, T, D, S, NCH, N, NOUT, NPAD, BC, HAS_POST, SMAX, ROUND_F, J)
        if STAGE == 0:
            _barrier(bar, NCH + (0 if HEAD else 1))
        if STAGE == 0 or STAGE == 2:
            rs = tl.rsqrt(_shares(sq_ptr, t, NCH, 0, 1, 1, CP2) / (N * D) + norm_eps)
            if cb < NCH:
                j = tl.arange(0, N)
                pre = tl.sigmoid(_shares(part_ptr, t, NCH, 0, N, NPAD, CP2) * rs
                                 * tl.load(scale_ptr) + tl.load(base_ptr + j)) + hc_eps
                c = cb * BC + tl.arange(0, BC)
                ok = c < D
                xv = tl.load((xo_ptr if HAS_POST else x_ptr) + (t * N + j[:, None]) * D
                             + c[None, :], mask=ok[None, :], other=0.0)
                y = tl.sum(xv.to(tl.float32) * pre[:, None], 0).to(y_ptr.dtype.element_ty)
                tl.store(y_ptr + t * D + c, y, mask=ok)
                if NORM:
                    yf = y.to(tl.float32)
                    tl.store(sq_ptr + (T + t) * NCH + cb, tl.sum(yf * yf, 0))
                    if STAGE == 0:
                        _barrier(bar, NCH)
                        _phase_norm(sq_ptr, y_ptr, nw_ptr, t, cb, T, D, NCH, y_eps, BC, CP2)
            elif not HEAD:
                _post_comb(part_ptr, scale_ptr, base_ptr, post2_ptr, comb2_ptr, rs, t, NCH,
                           hc_eps, iters, N, NPAD, CP2)
        if STAGE == 3 and NORM:
            if cb < NCH:
                _phase_norm(sq_ptr, y_ptr, nw_ptr, t, cb, T, D, NCH, y_eps, BC, CP2)

    @triton.jit
    def _barrier(bar, n):
        """The n CTAs of a token meet: bar[0] counts the arrivals, the last one puts it back
        to zero and bumps the generation bar[1], which the others wait for. Stores before it
        are visible to loads after it (past L1: `.cg`) in every CTA."""
        tl.debug_barrier()
        g = tl.atomic_add(bar + 1, 0, sem="acquire", scope="gpu")
        if tl.atomic_add(bar, 1, sem="acq_rel", scope="gpu") == n - 1:
            tl.atomic_xchg(bar, 0, sem="relaxed", scope="gpu")
            tl.atomic_add(bar + 1, 1, sem="release", scope="gpu")
        else:
            while tl.atomic_add(bar + 1, 0, sem="acquire", scope="gpu") == g:
                pass
        tl.debug_barrier()

    @triton.jit
    def _phase_mix(x_ptr, f_ptr, post_ptr, comb_ptr, xo_ptr, fn_ptr, part_ptr, sq_ptr, t, cb,
                   T, D, S, NCH, N: tl.constexpr, NOUT: tl.constexpr, NPAD: tl.constexpr,
                   BC: tl.constexpr, HAS_POST: tl.constexpr, SMAX: tl.constexpr,
                   ROUND_F: tl.constexpr, J: tl.constexpr):
        """Phase 1: channels cb of token t's X' [N, BC] (stored with HAS_POST) and their
        shares of the mix and of sum(X'^2). Every load is issued before the first result is
        needed (fn's [NOUT, N, BC] block first): one memory round trip."""
        c = cb * BC + tl.arange(0, BC)
        ok = c < D
        r = tl.arange(0, NPAD)
        k = tl.arange(0, N)
        w = tl.load(fn_ptr + r[:, None, None] * (N * D) + k[None, :, None] * D + c[None, None, :],
                    mask=(r < NOUT)[:, None, None] & ok[None, None, :], other=0.0)
        if HAS_POST:  # as `_hc_post_row_kernel`: the same operations in the same order
            f = post_f_row(f_ptr, xo_ptr, t, c, ok, T, D, S, SMAX, ROUND_F, J)
            mix = tl.zeros([N, BC], tl.float32)
            for j in tl.static_range(N):
                xj = tl.load(x_ptr + (t * N + j) * D + c, mask=ok, other=0.0).to(tl.float32)
                mix += tl.load(comb_ptr + t * (N * N) + j * N + k)[:, None] * xj[None, :]
            xk = (tl.load(post_ptr + t * N + k)[:, None] * f[None, :] + mix).to(
                xo_ptr.dtype.element_ty)
            tl.store(xo_ptr + (t * N + k[:, None]) * D + c[None, :], xk, mask=ok[None, :])
            xk = xk.to(tl.float32)
        else:
            xk = tl.load(x_ptr + (t * N + k[:, None]) * D + c[None, :], mask=ok[None, :],
                         other=0.0).to(tl.float32)
        acc = tl.sum(tl.sum(w * xk[None, :, :], 2), 1)
        tl.store(part_ptr + (t * NCH + cb) * NPAD + r, acc)
        tl.store(sq_ptr + t * NCH + cb, tl.sum(tl.sum(xk * xk, 1), 0))

    @triton.jit
    def post_f_row(f_ptr, out_ptr, t, c, ok, T, D, S, SMAX: tl.constexpr,
                   ROUND_F: tl.constexpr, J: tl.constexpr):
        """f of the post update at channels c of token t, from rows [S, T, J, D]: each of the
        J rows' S partials summed in fp32 (rounded to out's dtype with ROUND_F), the J rows
        summed in fp32 and rounded (J > 1: the MoE's slots). The loads are unrolled: every
        row's in flight at once."""
        f = tl.zeros(c.shape, tl.float32)
        for j in tl.static_range(J):
            fj = tl.zeros(c.shape, tl.float32)
            for s in tl.static_range(SMAX):
                fj += tl.load(f_ptr + ((s * T + t) * J + j) * D + c, mask=ok & (s < S),
                              other=0.0).to(tl.float32)
            if ROUND_F:
                fj = fj.to(out_ptr.dtype.element_ty).to(tl.float32)
            f += fj
        if J > 1:
            f = f.to(out_ptr.dtype.element_ty).to(tl.float32)
        return f

    @triton.jit
    def _shares(ptr, t, nch, col0, W: tl.constexpr, NPAD: tl.constexpr, CP2: tl.constexpr):
        """[W]: columns col0 .. col0+W of token t's rows [nch, NPAD], summed over the nch
        CTAs' shares (read past L1: other CTAs wrote them)."""
        cc = tl.arange(0, CP2)
        w = tl.arange(0, W)
        v = tl.load(ptr + (t * nch + cc[:, None]) * NPAD + col0 + w[None, :],
                    mask=(cc < nch)[:, None], other=0.0, cache_modifier=".cg")
        return tl.sum(v, 0)

    @triton.jit
    def _phase_norm(sq_ptr, y_ptr, nw_ptr, t, cb, T, D, NCH, y_eps, BC: tl.constexpr,
                    CP2: tl.constexpr):
        """Phase 3: channels cb of y (this CTA's, rounded) times the RMSNorm's factor and
        weight, as `rmsnorm_ref`."""
        ss = _shares(sq_ptr + T * NCH, t, NCH, 0, 1, 1, CP2)
        rr = tl.rsqrt(ss / D + y_eps)
        c = cb * BC + tl.arange(0, BC)
        ok = c < D
        y = tl.load(y_ptr + t * D + c, mask=ok, other=0.0).to(tl.float32)
        y = y * rr * tl.load(nw_ptr + c, mask=ok, other=0.0)
        tl.store(y_ptr + t * D + c, y.to(y_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _post_comb(part_ptr, scale_ptr, base_ptr, post_ptr, comb_ptr, rs, t, nch, hc_eps,
                   iters, N: tl.constexpr, NPAD: tl.constexpr, CP2: tl.constexpr):
        """post and the Sinkhorn-normalised comb of token t (`_hc_pre_kernel`'s operations)."""
        j = tl.arange(0, N)
        jk = tl.arange(0, N * N)
        post = 2 * tl.sigmoid(_shares(part_ptr, t, nch, N, N, NPAD, CP2) * rs
                              * tl.load(scale_ptr + 1) + tl.load(base_ptr + N + j))
        tl.store(post_ptr + t * N + j, post)
        c = (_shares(part_ptr, t, nch, 2 * N, N * N, NPAD, CP2) * rs * tl.load(scale_ptr + 2)
             + tl.load(base_ptr + 2 * N + jk))
        c = tl.reshape(c, (N, N))  # [j (row), k (column)]
        c = tl.exp(c - tl.max(c, 1)[:, None])
        c = c / tl.sum(c, 1)[:, None] + hc_eps
        c = c / (tl.sum(c, 0)[None, :] + hc_eps)
        for _ in range(iters - 1):
            c = c / (tl.sum(c, 1)[:, None] + hc_eps)
            c = c / (tl.sum(c, 0)[None, :] + hc_eps)
        tl.store(comb_ptr + t * (N * N) + jk, tl.reshape(c, (N * N,)))
