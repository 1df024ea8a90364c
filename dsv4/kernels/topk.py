"""Top-k selection of the lightning indexer (SPEC.md 6): per token, the rows of its `min(k, N)`
best scores, ties broken toward older entries (lower column), -1 where fewer are visible.

`select_topk(score, cand, k)`: score [T, N] fp32 (-inf = not visible), cand [T, N] rows ->
[T, min(k, N)] rows, the picks first and -1 after them (the attention kernels stop at the
count of visible entries). Reference: a stable descending sort (the CPU path and the tests). GPU:
`_topk_kernel`, one program per token, a radix select on the scores' order-preserving integer
keys: one pass counts the visible entries and histograms the top 8 key bits, three more passes
narrow the k-th largest key down 8 bits at a time among the entries that still match, and a
last pass writes every entry above that key plus, in column order, as many entries equal to it
as k still needs. The selected set is exactly the reference's; the order within a row is the
column order (the attention that consumes it does not depend on order). Rows longer than
MAX_KERNEL_N go to torch.topk (faster there, ties broken arbitrarily).
"""
from __future__ import annotations

import torch

from . import HAS_TRITON, use_triton

# Columns up to which the kernel selects: one program a row reads it six times, which beats
# torch.topk up to 8K columns (H200, 32 rows of 8192: 35.9 against 48.2 us) but not at 32K
# (134 against 58.7 us: torch spreads a row over several CTAs); wider rows go to torch.topk
# (ties then broken arbitrarily, which SPEC.md 6 allows). The width is the static one (under
# CUDA graphs max_model_len / 4), not the context: spreading a row over several programs
# would let the kernel take every width.
MAX_KERNEL_N = 16384


def select_topk_ref(score: torch.Tensor, cand: torch.Tensor, k: int) -> torch.Tensor:
    kk = min(k, cand.shape[1])
    # A stable sort breaks exact ties (frequent: relu zeros) towards older entries, the same
    # way whatever the batch looks like.
    val, order = score.sort(dim=-1, descending=True, stable=True)
    val, order = val[:, :kk], order[:, :kk]
    sel = cand.gather(1, order)
    return torch.where(torch.isfinite(val), sel, -1)


def select_topk(score: torch.Tensor, cand: torch.Tensor, k: int,
                avail: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of the `min(k, N)` best scores per token; -1 where fewer are visible. `avail` [T]
    (optional): only the first avail[t] columns of row t can be visible (cand is -1 past them)
    and the kernel reads no further; score may hold anything there."""
    if score.shape != cand.shape or score.dim() != 2:
        raise ValueError(f"top-k: score {tuple(score.shape)} and candidates "
                         f"{tuple(cand.shape)} must be the same [T, N]")
    if k < 1:
        raise ValueError(f"top-k: k must be positive, got {k}")
    if avail is not None and avail.shape != score.shape[:1]:
        raise ValueError(f"top-k: avail {tuple(avail.shape)} does not fit {score.shape[0]} rows")
    if score.is_cuda and score.numel():
        if use_triton(score) and score.dtype == torch.float32 and cand.shape[1] <= MAX_KERNEL_N:
            return _topk_cuda(score, cand, k, avail)
        # wider rows (max_model_len past 64K): one program a row would be the slower one
        # whenever the context is long, so torch.topk takes the whole width
        if avail is not None:  # columns past avail may be unwritten
            score = score.masked_fill(cand < 0, float("-inf"))
        val, order = torch.topk(score, min(k, cand.shape[1]), dim=-1, sorted=False)
        sel = torch.where(torch.isfinite(val), cand.gather(1, order), -1)
        return sel.sort(dim=-1, descending=True).values  # the picks first, as the kernel's
    return select_topk_ref(score, cand, k)


def _topk_cuda(score, cand, k, avail=None):
    T, N = score.shape
    kk = min(k, N)
    score, cand = score.contiguous(), cand.contiguous()
    out = torch.empty(T, kk, dtype=cand.dtype, device=cand.device)
    block = min(4096, max(256, triton.next_power_of_2(N)))
    _topk_kernel[(T,)](score, cand, cand if avail is None else avail.contiguous(), out, N, kk,
                       HAS_AVAIL=avail is not None, BLOCK=block,
                       num_warps=8 if block >= 2048 else 4)
    return out


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _keys(score_ptr, n, N):
        """Order-preserving unsigned keys of fp32 scores (as int64 in [0, 2^32)); visible =
        in range and finite."""
        s = tl.load(score_ptr + n, mask=n < N, other=float("-inf"))
        s = tl.where(s == 0.0, 0.0, s)  # -0.0 ties with +0.0, as in the sort
        b = s.to(tl.int32, bitcast=True)
        key = (b ^ ((b >> 31) & 0x7FFFFFFF)).to(tl.int64) + 2147483648
        return key, (n < N) & (s > float("-inf"))

    @triton.jit
    def _topk_kernel(score_ptr, cand_ptr, avail_ptr, out_ptr, N, K, HAS_AVAIL: tl.constexpr,
                     BLOCK: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        score_ptr += t * N
        cand_ptr += t * N
        out_ptr += t * K
        if HAS_AVAIL:  # the row's visible columns all lie below avail[t]
            N = tl.minimum(N, tl.load(avail_ptr + t).to(tl.int32))
        col = tl.arange(0, BLOCK)
        bins = tl.arange(0, 256)
        # radix select of the K-th largest key among the visible entries, 8 bits a pass
        prefix = tl.zeros([], tl.int64)
        need = K  # entries still to take at or below the bits fixed so far
        visible = tl.zeros([], tl.int32)
        for p in tl.static_range(4):
            shift = 24 - 8 * p
            hist = tl.zeros([256], tl.int32)
            for off in range(0, N, BLOCK):
                key, vis = _keys(score_ptr, off + col, N)
                if p == 0:
                    visible += tl.sum(vis.to(tl.int32), 0)
                    m = vis
                else:
                    m = vis & ((key >> (shift + 8)) == (prefix >> (shift + 8)))
                hist += tl.histogram(((key >> shift) & 0xFF).to(tl.int32), 256, mask=m)
            # counts of the matching entries in this digit or above; the K-th largest has the
            # highest digit whose count from the top reaches `need`
            above = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist
            digit = tl.max(tl.where(above >= need, bins, 0), 0)
            need -= tl.sum(tl.where(bins > digit, hist, 0), 0)
            prefix += digit.to(tl.int64) << shift
        # with no more than K visible, take them all (every visible key is above 0)
        prefix = tl.where(visible <= K, 0, prefix)
        need = tl.where(visible <= K, 0, need)
        n_above = tl.minimum(visible, K) - need
        # write the entries above the threshold key, then the first `need` equal to it
        base_gt = tl.zeros([], tl.int32)
        base_eq = tl.zeros([], tl.int32)
        for off in range(0, N, BLOCK):
            n = off + col
            key, vis = _keys(score_ptr, n, N)
            gt = vis & (key > prefix)
            eq = vis & (key == prefix) & (need > 0)
            at_gt = base_gt + tl.cumsum(gt.to(tl.int32), 0) - 1
            at_eq = base_eq + tl.cumsum(eq.to(tl.int32), 0) - 1
            take_eq = eq & (at_eq < need)
            c = tl.load(cand_ptr + n, mask=gt | take_eq, other=-1)
            tl.store(out_ptr + at_gt, c, mask=gt)
            tl.store(out_ptr + n_above + at_eq, c, mask=take_eq)
            base_gt += tl.sum(gt.to(tl.int32), 0)
            base_eq += tl.sum(eq.to(tl.int32), 0)
        taken = tl.minimum(visible, K)
        for off in range(0, K, BLOCK):
            n = off + col
            tl.store(out_ptr + n, tl.full([BLOCK], -1, tl.int64).to(out_ptr.dtype.element_ty),
                     mask=(n >= taken) & (n < K))
