"""Top-k selection of the lightning indexer (SPEC.md 6): per token, the rows of its `min(k, N)`
best scores, ties broken toward older entries (lower column), -1 where fewer are visible.

`select_topk(score, cand, k)`: score [T, N] fp32 (-inf = not visible), cand [T, N] rows ->
[T, min(k, N)] rows, the picks first and -1 after them (the attention kernels stop at the
count of visible entries). Reference: a stable descending sort (the CPU path and the tests).
GPU, up to MAX_KERNEL_N columns: `_topk_kernel`, one program per token, a radix select on the
scores' order-preserving integer keys: one pass counts the visible entries and histograms the
top 8 key bits, three more passes narrow the k-th largest key down 8 bits at a time among the
entries that still match, and a last pass writes every entry above that key plus, in column
order, as many entries equal to it as k still needs. The selected set is exactly the
reference's; the order within a row is the column order (the attention that consumes it does
not depend on order). Wider rows: the same select spread over programs of 4096 columns
(`_topk_split_cuda`, 7 launches). Without Triton, torch.topk (ties broken arbitrarily, which
SPEC.md 6 allows).
"""
from __future__ import annotations

import torch

from . import HAS_TRITON, num_sms, use_triton
from .pdl import pdl

# Columns up to which one program selects a whole row, reading it six times. H200, 32 rows:
# 2K columns 12.9 us against 34.0 for the split select (whose 7 launches set a floor), 8K
# 36.0 against 34.4, 16K 68.9 against 35.6 (torch.topk 21.0 / 53.5 / 47.9). Wider rows go to
# `_topk_split_cuda`, which spreads each row over programs of 4096 columns. Under CUDA graphs
# the width is the static one (the graphs' context length / 4): with a wide graph every row
# takes the split select, whose launches then cost ~18-33 us at short contexts against ~7-21
# for one program (taking the rows with a short visible prefix in one program and the others
# in the split launches, which skip them, measured within 2 us of the split alone: not kept;
# the engine instead captures a graph band of contexts up to 4 x MAX_KERNEL_N, `cuda_graph`).
MAX_KERNEL_N = 8192


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
        if use_triton(score) and score.dtype == torch.float32:
            if cand.shape[1] <= MAX_KERNEL_N:
                return _topk_cuda(score, cand, k, avail)
            return _topk_split_cuda(score, cand, k, avail)
        if avail is not None:  # columns past avail may be unwritten
            score = score.masked_fill(cand < 0, float("-inf"))
        val, order = torch.topk(score, min(k, cand.shape[1]), dim=-1, sorted=False)
        sel = torch.where(torch.isfinite(val), cand.gather(1, order), -1)
        return sel.sort(dim=-1, descending=True).values  # the picks first, as the kernel's
    return select_topk_ref(score, cand, k)


def _topk_split_cuda(score, cand, k, avail=None, chunk: int = 4096,
                     programs: int | None = None):
    """Rows spread over chunks of `chunk` columns: four histogram passes (each program adds
    its chunks' counts to the row's global histogram, and re-derives the digits fixed so far
    from the earlier passes' histograms, so no launch in between), a pass counting each
    chunk's entries above and at the threshold, and a pass writing them at offsets summed over
    the preceding chunks. 7 launches (with the zeroing) whatever the width. A program takes
    every G-th chunk of its row, G such that a launch is about 4 CTAs an SM: under CUDA graphs
    the width is static and most chunks lie past the visible prefix, and a program a chunk
    made the empty ones cost waves of launches (64 rows of 262144 columns: 6 x 4096 CTAs).
    `programs` sets G (tests)."""
    T, N = score.shape
    kk = min(k, N)
    score, cand = score.contiguous(), cand.contiguous()
    out = torch.empty(T, kk, dtype=cand.dtype, device=cand.device)
    n_chunks = triton.cdiv(N, chunk)
    # per row: 4 histograms of 256, the visible count, and per chunk (above, equal) counts
    work = torch.zeros(T, 4 * 256 + 1 + 2 * n_chunks, dtype=torch.int32, device=score.device)
    av = cand if avail is None else avail.contiguous()
    common = dict(HAS_AVAIL=avail is not None, CHUNK=chunk, num_warps=8)
    grid = (T, min(n_chunks, programs or max(1, 4 * num_sms(score.device) // T)))
    for p in range(4):
        _topk_hist_kernel[grid](score, av, work, N, kk, work.stride(0), PASS=p, **common, **pdl())
    # one compiled variant for every width up to 64 chunks (a million tokens at ratio 4), not
    # one a power of two of context met on the way
    ncp = max(64, triton.next_power_of_2(n_chunks))
    for count in (True, False):
        _topk_write_kernel[grid](score, cand, av, out, work, N, kk, work.stride(0), n_chunks,
                                 COUNT=count, NCP=ncp, **common, **pdl())
    return out


def _topk_cuda(score, cand, k, avail=None):
    T, N = score.shape
    kk = min(k, N)
    score, cand = score.contiguous(), cand.contiguous()
    out = torch.empty(T, kk, dtype=cand.dtype, device=cand.device)
    # Prefill-sized calls take small programs, several resident an SM, which beat one wide
    # program a row (H200, `benchmarks/bench_topk.py --only prefill`: 2048 rows of 8K 394 ->
    # 240 us, 8192 rows of 8K 1493 -> 811 us, 2048 rows of 2K 106 -> 69 us); fewer rows one
    # wide program each (64 rows of 8K: 38 us against 57 with 512-column blocks), its blocks
    # no wider than the row, at least 1024 (H200, one row, CUDA-graph loop: 1024 columns 7.3 /
    # 10.3 us with 4096-wide blocks against 4.6 / 6.0 with 1024, for 261 / 1000 visible
    # entries; 2048 columns 13.2 against 9.0 with 2048; 8192 columns 28.4 with 4096, 33.3 with
    # 2048). Under CUDA graphs the width is static; eager steps compile at most four variants
    # (a new band met inside a request is a compile of a second or two there).
    block, warps = ((512, 4) if T >= 4 * num_sms(score.device)
                    else (min(4096, max(1024, triton.next_power_of_2(N))), 8))
    _topk_kernel[(T,)](score, cand, cand if avail is None else avail.contiguous(), out, N, kk,
                       HAS_AVAIL=avail is not None, BLOCK=block, num_warps=warps, **pdl())
    return out


if HAS_TRITON:
    import triton
    import triton.language as tl

    from .pdl import pdl_start

    @triton.jit
    def _keys(score_ptr, n, N):
        """Order-preserving unsigned keys of fp32 scores (as int64 in [0, 2^32)); visible =
        in range and finite."""
        s = tl.load(score_ptr + n, mask=n < N, other=float("-inf"))
        s = tl.where(s == 0.0, 0.0, s)  # -0.0 ties with +0.0, as in the sort
        b = s.to(tl.int32, bitcast=True)
        key = (b ^ ((b >> 31) & 0x7FFFFFFF)).to(tl.int64) + 2147483648
        return key, (n < N) & (s > float("-inf"))

    @triton.jit(do_not_specialize=["N", "K"])
    def _topk_kernel(score_ptr, cand_ptr, avail_ptr, out_ptr, N, K, HAS_AVAIL: tl.constexpr,
                     BLOCK: tl.constexpr, PDL: tl.constexpr = False):
        pdl_start(PDL)
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
        # no more than K columns: every visible entry is taken, and the passes read nothing
        # (visible stays 0, so the threshold below is 0)
        n_sel = tl.where(N > K, N, 0)
        done = tl.zeros([], tl.int32)  # (`_select_digit`): later passes read nothing
        for p in tl.static_range(4):
            shift = 24 - 8 * p
            hist = tl.zeros([256], tl.int32)
            for off in range(0, tl.where(done > 0, 0, n_sel), BLOCK):
                key, vis = _keys(score_ptr, off + col, N)
                if p == 0:
                    visible += tl.sum(vis.to(tl.int32), 0)
                    m = vis
                else:
                    m = vis & ((key >> (shift + 8)) == (prefix >> (shift + 8)))
                hist += tl.histogram(((key >> shift) & 0xFF).to(tl.int32), 256, mask=m)
            prefix, need, done = _select_digit(hist, bins, prefix, need, done, shift)
        prefix, need = _final_threshold(prefix, need, done, visible, K)
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
        taken = base_gt + tl.minimum(base_eq, need)
        for off in range(0, K, BLOCK):
            n = off + col
            tl.store(out_ptr + n, tl.full([BLOCK], -1, tl.int64).to(out_ptr.dtype.element_ty),
                     mask=(n >= taken) & (n < K))

    @triton.jit
    def _select_digit(hist, bins, prefix, need, done, shift):
        """One radix pass from its histogram of the entries matching the digits fixed so far:
        the K-th largest has the highest digit whose count from the top reaches `need`; that
        digit joins prefix and `need` drops by the entries above it. `done` once the digit's
        entries are exactly those still needed: every key at or above prefix is taken, and the
        later passes change nothing (with continuous scores, usually after the third)."""
        above = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist
        digit = tl.max(tl.where(above >= need, bins, 0), 0)
        left = need - tl.sum(tl.where(bins > digit, hist, 0), 0)
        in_digit = tl.sum(tl.where(bins == digit, hist, 0), 0)
        prefix = tl.where(done > 0, prefix, prefix + (digit.to(tl.int64) << shift))
        need = tl.where(done > 0, need, left)
        return prefix, need, tl.where((done > 0) | (in_digit == left), 1, 0)

    @triton.jit
    def _final_threshold(prefix, need, done, visible, K):
        """The write pass's (prefix, need): take the keys above prefix and `need` equal to it.
        After `done`, every key at or above prefix (prefix - 1, none equal); with no more than
        K visible, every visible entry (visible keys are above 0)."""
        prefix = tl.where(done > 0, prefix - 1, prefix)
        need = tl.where(done > 0, 0, need)
        return tl.where(visible <= K, 0, prefix), tl.where(visible <= K, 0, need)

    @triton.jit
    def _threshold(work_row, K, PASSES: tl.constexpr):
        """(prefix, need, done) after the first PASSES digits, from the row's histograms (a
        pass after `done` left its histogram empty)."""
        bins = tl.arange(0, 256)
        prefix = tl.zeros([], tl.int64)
        need = K
        done = tl.zeros([], tl.int32)
        for p in tl.static_range(PASSES):
            hist = tl.load(work_row + p * 256 + bins, cache_modifier=".cg")
            prefix, need, done = _select_digit(hist, bins, prefix, need, done, 24 - 8 * p)
        return prefix, need, done

    @triton.jit
    def _row_avail(avail_ptr, t, N, HAS_AVAIL: tl.constexpr):
        """Row t's visible width (bounded by avail[t])."""
        n_t = N
        if HAS_AVAIL:
            n_t = tl.minimum(N, tl.load(avail_ptr + t).to(tl.int32))
        return n_t

    @triton.jit
    def _topk_hist_kernel(score_ptr, avail_ptr, work_ptr, N, K, stride_w, PASS: tl.constexpr,
                          HAS_AVAIL: tl.constexpr, CHUNK: tl.constexpr, PDL: tl.constexpr = False):
        """Pass PASS of the split select: this chunk's histogram of digit PASS among the
        entries matching the digits fixed so far, added to the row's (pass 0 also counts the
        visible entries)."""
        pdl_start(PDL)
        t = tl.program_id(0).to(tl.int64)
        n_t = _row_avail(avail_ptr, t, N, HAS_AVAIL)
        # rows of no more than K columns take every visible entry: no select (visible stays 0)
        if (tl.program_id(1) * CHUNK >= n_t) | (n_t <= K):
            return
        work_row = work_ptr + t * stride_w
        shift: tl.constexpr = 24 - 8 * PASS
        prefix = tl.zeros([], tl.int64)
        if PASS > 0:
            prefix, need, done = _threshold(work_row, K, PASS)
            if done > 0:  # the select finished before this pass
                return
        hist = tl.zeros([256], tl.int32)
        visible = tl.zeros([], tl.int32)
        for c in range(tl.program_id(1), tl.cdiv(n_t, CHUNK), tl.num_programs(1)):
            n = c * CHUNK + tl.arange(0, CHUNK)
            key, vis = _keys(score_ptr + t * N, n, n_t)
            if PASS == 0:
                m = vis
                visible += tl.sum(vis.to(tl.int32), 0)
            else:
                m = vis & ((key >> (shift + 8)) == (prefix >> (shift + 8)))
            hist += tl.histogram(((key >> shift) & 0xFF).to(tl.int32), 256, mask=m)
        if PASS == 0:
            tl.atomic_add(work_row + 4 * 256, visible, sem="relaxed")
        tl.atomic_add(work_row + PASS * 256 + tl.arange(0, 256), hist, mask=hist > 0,
                      sem="relaxed")

    @triton.jit(do_not_specialize=["n_chunks"])
    def _topk_write_kernel(score_ptr, cand_ptr, avail_ptr, out_ptr, work_ptr, N, K, stride_w,
                           n_chunks, COUNT: tl.constexpr, NCP: tl.constexpr,
                           HAS_AVAIL: tl.constexpr, CHUNK: tl.constexpr, PDL: tl.constexpr = False):
        """COUNT: each chunk's entries above and at the threshold key, into the row's work.
        Else: write them, a chunk's offsets being the counts of the chunks before it; the
        row's first program also fills the slots past the picks with -1."""
        pdl_start(PDL)
        t = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1)
        n_t = _row_avail(avail_ptr, t, N, HAS_AVAIL)
        if (g > 0) & (g * CHUNK >= n_t):  # program 0 also writes the -1 tail
            return
        work_row = work_ptr + t * stride_w
        visible = tl.load(work_row + 4 * 256, cache_modifier=".cg")
        prefix, need, done = _threshold(work_row, K, 4)
        prefix, need = _final_threshold(prefix, need, done, visible, K)
        n_above = tl.minimum(visible, K) - need
        cnt_ptr = work_row + 4 * 256 + 1
        for c in range(g, tl.cdiv(n_t, CHUNK), tl.num_programs(1)):
            n = c * CHUNK + tl.arange(0, CHUNK)
            key, vis = _keys(score_ptr + t * N, n, n_t)
            gt = vis & (key > prefix)
            eq = vis & (key == prefix) & (need > 0)
            if COUNT:
                tl.store(cnt_ptr + 2 * c, tl.sum(gt.to(tl.int32), 0))
                tl.store(cnt_ptr + 2 * c + 1, tl.sum(eq.to(tl.int32), 0))
            else:
                before = tl.arange(0, NCP)
                ok = before < c
                base_gt = tl.sum(tl.load(cnt_ptr + 2 * before, mask=ok, other=0,
                                         cache_modifier=".cg"), 0)
                base_eq = tl.sum(tl.load(cnt_ptr + 2 * before + 1, mask=ok, other=0,
                                         cache_modifier=".cg"), 0)
                at_gt = base_gt + tl.cumsum(gt.to(tl.int32), 0) - 1
                at_eq = base_eq + tl.cumsum(eq.to(tl.int32), 0) - 1
                take_eq = eq & (at_eq < need)
                cv = tl.load(cand_ptr + t * N + n, mask=gt | take_eq, other=-1)
                tl.store(out_ptr + t * K + at_gt, cv, mask=gt)
                tl.store(out_ptr + t * K + n_above + at_eq, cv, mask=take_eq)
        if not COUNT:
            if g == 0:  # the picks: every chunk's entries above, and `need` equal ones
                ch = tl.arange(0, NCP)
                ok = ch < n_chunks
                taken = tl.sum(tl.load(cnt_ptr + 2 * ch, mask=ok, other=0, cache_modifier=".cg"),
                               0)
                taken += tl.minimum(need, tl.sum(tl.load(cnt_ptr + 2 * ch + 1, mask=ok, other=0,
                                                         cache_modifier=".cg"), 0))
                for off in range(0, K, CHUNK):
                    j = off + tl.arange(0, CHUNK)
                    tl.store(out_ptr + t * K + j,
                             tl.full([CHUNK], -1, tl.int64).to(out_ptr.dtype.element_ty),
                             mask=(j >= taken) & (j < K))
