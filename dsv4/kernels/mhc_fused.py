"""The hyper-connection between two sub-layers of a decode batch in one launch (SPEC.md 4).

At a few tokens mHC is four dependent launches, each a few microseconds of latency over a few
kilobytes: the post update of the sub-layer that ended (`_hc_post*_kernel`), the mixing
product of the one that starts (`_hc_mix_kernel`), its pre / post / Sinkhorn and y
(`_hc_pre_kernel`) and the RMSNorm that follows. `hc_fused` does them in one: CTA (c, t)
forms channels c of token t's X' = post * f + comb^T X (stores them) and their share of the
mix (fn's columns of those channels in every stream, fp32) and of sum(X'^2); the last CTA of
token t to finish, found with an acq_rel counter after a barrier (the pattern of
`moe._finish_swiglu`), sums the shares in CTA order, forms pre, y = sum_j pre_j X'_j (reading
the other CTAs' X' past L1), the RMSNorm of the rounded y, and post and the Sinkhorn-normalised
comb. Without `f` the launch is hc_pre's (X' = X: the first layer), with `head` hc_head's (n
mix columns, y only).

The values are those of the separate kernels (X' is `_hc_post_row_kernel`'s, bit for bit: the
same fp32 operations in the same order), except that the mix sums its n*d products in another
order (fp32 products of fp32 fn, not the tensor cores' three bf16 parts of fn) and the
partials are fewer: ~1e-7 relative apart. The counters (int32 a token, put back to zero by
the last CTA) are allocated by an eager call: a CUDA graph capture that would have to
allocate them keeps the separate launches. `DSV4_MHC_FUSED=0` keeps them everywhere.
"""
from __future__ import annotations

import os

import torch

from . import HAS_TRITON
from .pdl import pdl

# decode batches up to this many tokens take the one launch (see `applies`)
MAX_TOKENS = 16
FUSED = os.environ.get("DSV4_MHC_FUSED", "1") != "0"
_COUNTER: dict[torch.device, torch.Tensor] = {}


def applies(x: torch.Tensor) -> bool:
    T, n, d = x.shape
    return (FUSED and HAS_TRITON and 0 < T <= MAX_TOKENS and n & (n - 1) == 0 and n <= 8
            and x.dtype in (torch.bfloat16, torch.float32) and d % 16 == 0)


def _counter(dev: torch.device) -> torch.Tensor | None:
    have = _COUNTER.get(dev)
    if have is None and not (dev.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        have = _COUNTER[dev] = torch.zeros(MAX_TOKENS, dtype=torch.int32, device=dev)
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
    bc, warps = cfg or (64, 1)
    nc = triton.cdiv(d, bc)
    npad = max(16, triton.next_power_of_2(nout))
    part = torch.empty(T, nc, npad, dtype=torch.float32, device=dev)
    sq = torch.empty(T, nc, dtype=torch.float32, device=dev)
    y = torch.empty(T, d, dtype=x.dtype, device=dev)
    post2 = torch.empty(0 if head else T, n, dtype=torch.float32, device=dev)
    comb2 = torch.empty(0 if head else T, n, n, dtype=torch.float32, device=dev)
    if norm is not None and norm[0].shape != (d,):
        raise ValueError(f"norm weight {tuple(norm[0].shape)} does not fit d = {d}")
    nw = y if norm is None else norm[0].float().contiguous()
    _hc_fused_kernel[(nc, T)](
        x, f, pp, cc, xo, fn.float().contiguous(), part, sq, cnt, scale.float().contiguous(),
        base.float().contiguous(), y, post2, comb2, nw, T, d, f.shape[0], norm_eps, hc_eps,
        iters, 0.0 if norm is None else norm[1], N=n, NOUT=nout, NPAD=npad, BC=bc,
        CP2=triton.next_power_of_2(nc), HAS_POST=post_args is not None,
        SMAX=f.shape[0] if post_args is not None else 1, ROUND_F=round_f,
        J=f.shape[2] if post_args is not None else 1, HEAD=head, NORM=norm is not None,
        BD=min(triton.next_power_of_2(d), 512 * warps), num_warps=warps, **pdl())
    return xo, y, post2, comb2


if HAS_TRITON:
    import triton
    import triton.language as tl

    from .pdl import pdl_start

    @triton.jit(do_not_specialize=["T", "S"])
    def _hc_fused_kernel(x_ptr, f_ptr, post_ptr, comb_ptr, xo_ptr, fn_ptr, part_ptr, sq_ptr,
                         count_ptr, scale_ptr, base_ptr, y_ptr, post2_ptr, comb2_ptr, nw_ptr,
                         T, D, S, norm_eps, hc_eps, iters, y_eps,
                         N: tl.constexpr, NOUT: tl.constexpr, NPAD: tl.constexpr,
                         BC: tl.constexpr, CP2: tl.constexpr, HAS_POST: tl.constexpr,
                         SMAX: tl.constexpr, ROUND_F: tl.constexpr, J: tl.constexpr,
                         HEAD: tl.constexpr, NORM: tl.constexpr, BD: tl.constexpr,
                         PDL: tl.constexpr = False):
        """Grid (channel blocks, T): X' of BC channels of one token and their mix and
        sum-of-squares shares; the token's last CTA finishes it (module docstring)."""
        pdl_start(PDL)
        cb = tl.program_id(0)
        nc = tl.num_programs(0)
        t = tl.program_id(1).to(tl.int64)
        c = cb * BC + tl.arange(0, BC)
        ok = c < D
        r = tl.arange(0, NPAD)
        wmask = (r < NOUT)[:, None] & ok[None, :]
        acc = tl.zeros([NPAD], tl.float32)
        sq = tl.zeros([BC], tl.float32)
        if HAS_POST:  # as `_hc_post_row_kernel`: the same operations in the same order
            f = tl.zeros([BC], tl.float32)
            for j in tl.static_range(J):
                fj = tl.zeros([BC], tl.float32)
                for s in tl.static_range(SMAX):
                    fj += tl.load(f_ptr + ((s * T + t) * J + j) * D + c, mask=ok & (s < S),
                                  other=0.0).to(tl.float32)
                if ROUND_F:
                    fj = fj.to(xo_ptr.dtype.element_ty).to(tl.float32)
                f += fj
            if J > 1:
                f = f.to(xo_ptr.dtype.element_ty).to(tl.float32)
        for k in tl.static_range(N):
            if HAS_POST:
                mix = tl.zeros([BC], tl.float32)
                for j in tl.static_range(N):
                    xj = tl.load(x_ptr + (t * N + j) * D + c, mask=ok, other=0.0).to(tl.float32)
                    mix += tl.load(comb_ptr + t * (N * N) + j * N + k) * xj
                xk = (tl.load(post_ptr + t * N + k) * f + mix).to(xo_ptr.dtype.element_ty)
                tl.store(xo_ptr + (t * N + k) * D + c, xk, mask=ok)
                xk = xk.to(tl.float32)
            else:
                xk = tl.load(x_ptr + (t * N + k) * D + c, mask=ok, other=0.0).to(tl.float32)
            sq += xk * xk
            w = tl.load(fn_ptr + r[:, None] * (N * D) + k * D + c[None, :], mask=wmask, other=0.0)
            acc += tl.sum(w * xk[None, :], 1)
        tl.store(part_ptr + (t * nc + cb) * NPAD + r, acc)
        tl.store(sq_ptr + t * nc + cb, tl.sum(sq, 0))
        tl.debug_barrier()
        if tl.atomic_add(count_ptr + t, 1, sem="acq_rel", scope="gpu") == nc - 1:
            tl.atomic_xchg(count_ptr + t, 0, sem="relaxed", scope="gpu")  # for the next launch
            _finish_token(part_ptr, sq_ptr, xo_ptr if HAS_POST else x_ptr, scale_ptr, base_ptr,
                          y_ptr, post2_ptr, comb2_ptr, nw_ptr, t, nc, D, norm_eps, hc_eps,
                          iters, y_eps, N, NPAD, CP2, HEAD, NORM, BD)

    @triton.jit
    def _shares(part_ptr, t, nc, col0, W: tl.constexpr, NPAD: tl.constexpr, CP2: tl.constexpr):
        """Columns col0 .. col0+W of token t's mix, its nc CTAs' shares summed (read past L1:
        the other CTAs wrote them)."""
        cc = tl.arange(0, CP2)
        w = tl.arange(0, W)
        v = tl.load(part_ptr + (t * nc + cc[:, None]) * NPAD + col0 + w[None, :],
                    mask=(cc < nc)[:, None], other=0.0, cache_modifier=".cg")
        return tl.sum(v, 0)

    @triton.jit
    def _finish_token(part_ptr, sq_ptr, x_ptr, scale_ptr, base_ptr, y_ptr, post_ptr, comb_ptr,
                      nw_ptr, t, nc, D, norm_eps, hc_eps, iters, y_eps, N: tl.constexpr,
                      NPAD: tl.constexpr, CP2: tl.constexpr, HEAD: tl.constexpr,
                      NORM: tl.constexpr, BD: tl.constexpr):
        """pre, y (rounded, then the RMSNorm of weight nw), post and comb of token t from
        the shares of its mix and its X' (x_ptr) (`_hc_pre_kernel`'s operations)."""
        cc = tl.arange(0, CP2)
        sq = tl.sum(tl.load(sq_ptr + t * nc + cc, mask=cc < nc, other=0.0, cache_modifier=".cg"), 0)
        rs = tl.rsqrt(sq / (N * D) + norm_eps)
        j = tl.arange(0, N)
        pre = tl.sigmoid(_shares(part_ptr, t, nc, 0, N, NPAD, CP2) * rs * tl.load(scale_ptr)
                         + tl.load(base_ptr + j)) + hc_eps
        ss = tl.zeros([BD], tl.float32)
        for d0 in range(0, D, BD):
            dc = d0 + tl.arange(0, BD)
            dm = dc < D
            xv = tl.load(x_ptr + (t * N + j[:, None]) * D + dc[None, :], mask=dm[None, :],
                         other=0.0, cache_modifier=".cg")
            y = tl.sum(xv.to(tl.float32) * pre[:, None], 0)
            if NORM:
                y = y.to(y_ptr.dtype.element_ty).to(tl.float32)
                ss += y * y
            tl.store(y_ptr + t * D + dc, y.to(y_ptr.dtype.element_ty), mask=dm)
        if NORM:  # as `rmsnorm_ref` on the rounded y, which this CTA stored above
            tl.debug_barrier()
            rr = tl.rsqrt(tl.sum(ss, 0) / D + y_eps)
            for d0 in range(0, D, BD):
                dc = d0 + tl.arange(0, BD)
                dm = dc < D
                y = tl.load(y_ptr + t * D + dc, mask=dm, other=0.0).to(tl.float32)
                y = y * rr * tl.load(nw_ptr + dc, mask=dm, other=0.0)
                tl.store(y_ptr + t * D + dc, y.to(y_ptr.dtype.element_ty), mask=dm)
        if not HEAD:
            jk = tl.arange(0, N * N)
            mix_post = _shares(part_ptr, t, nc, N, N, NPAD, CP2)
            mix_comb = _shares(part_ptr, t, nc, 2 * N, N * N, NPAD, CP2)
            post = 2 * tl.sigmoid(mix_post * rs * tl.load(scale_ptr + 1) + tl.load(base_ptr + N + j))
            tl.store(post_ptr + t * N + j, post)
            c = mix_comb * rs * tl.load(scale_ptr + 2) + tl.load(base_ptr + 2 * N + jk)
            c = tl.reshape(c, (N, N))  # [j (row), k (column)]
            c = tl.exp(c - tl.max(c, 1)[:, None])
            c = c / tl.sum(c, 1)[:, None] + hc_eps
            c = c / (tl.sum(c, 0)[None, :] + hc_eps)
            for _ in range(iters - 1):
                c = c / (tl.sum(c, 1)[:, None] + hc_eps)
                c = c / (tl.sum(c, 0)[None, :] + hc_eps)
            tl.store(comb_ptr + t * (N * N) + jk, tl.reshape(c, (N * N,)))
