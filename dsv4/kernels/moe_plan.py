"""The MoE's routing plan on the GPU (`moe.py`'s step 2), without host synchronisation.

Each token has k+1 slots, `slot = t*(k+1) + j`: j = 0 is the shared expert (plan expert 0),
j >= 1 routed expert idx[t, j-1] (plan expert idx+1). Slots are grouped by plan expert into
blocks of BT rows (each expert's rows padded to a multiple of BT), so every block belongs to one
expert. `_route_count_kernel` counts slots per expert with atomics (the order of rows inside an
expert does not change any result), `_route_scatter_kernel` writes each slot's padded position
and, per block, its expert and number of valid rows: a GEMM CTA learns its expert from one load
(`_block_rows`), so its weight loads start two memory round trips in. Up to SMALL_PLAN_SLOTS
slots (decode batches) `_route_small_kernel` does all of it in one program. The grids of the
GEMMs are upper bounds; blocks past the end exit at once. Slots of another rank's expert
(idx = n_routed, expert parallelism) are left out of the plan.
"""
from __future__ import annotations

import torch

from . import HAS_TRITON
from .pdl import pdl

SMALL_PLAN_SLOTS = 128  # up to this many slots (T * (k+1)) the plan is one single-program launch


def plan_buffers(t: int, k: int, n_routed: int, bt: int, shared: bool, dev: torch.device):
    """The plan's tensors (slots, blk_exp, blk_rows) for t tokens of k routed slots in blocks
    of bt rows, and its block counts (blocks, shared-expert blocks, routed blocks)."""
    shared_blocks = -(-t // bt) if shared else 0
    routed_blocks = min(t * k, -(-(t * k) // bt) + n_routed)
    n_blocks = shared_blocks + routed_blocks
    tensors = (torch.empty(n_blocks * bt, dtype=torch.int32, device=dev),
               torch.empty(n_blocks, dtype=torch.int32, device=dev),
               torch.empty(n_blocks, dtype=torch.int32, device=dev))
    return tensors, n_blocks, shared_blocks, routed_blocks


def route_plan(idx: torch.Tensor, t: int, n_routed: int, bt: int, shared: bool = True):
    """The routing plan (module docstring) for blocks of bt rows: ((slots, blk_exp,
    blk_rows), the slot counts per plan expert (int32 [n_routed + 1], on the device; None for
    the one-program plan of small batches), blocks, shared-expert blocks, routed blocks).
    Without `shared` the shared expert's slots (j = 0) are left out like other ranks'."""
    k = idx.shape[1]
    dev = idx.device
    n_exp, k1 = n_routed + 1, k + 1
    n_slots = t * k1
    (slots, blk_exp, blk_rows), n_blocks, shared_blocks, routed_blocks = plan_buffers(
        t, k, n_routed, bt, shared, dev)
    ep2 = triton.next_power_of_2(n_exp)
    counts = None
    if n_slots <= SMALL_PLAN_SLOTS:  # one launch: counts and ranks by comparison, no atomics
        _route_small_kernel[(1,)](idx, blk_exp, blk_rows, slots, t, k, n_exp, n_blocks, BT=bt,
                                  S2=max(16, triton.next_power_of_2(n_slots)), EP2=ep2,
                                  HAS_SHARED=shared, num_warps=4, **pdl())
    else:
        counts = torch.zeros(n_exp, dtype=torch.int32, device=dev)
        expert = torch.empty(n_slots, dtype=torch.int32, device=dev)
        rank = torch.empty(n_slots, dtype=torch.int32, device=dev)
        grid = (triton.cdiv(n_slots, 1024),)
        _route_count_kernel[grid](idx, counts, expert, rank, t, k, n_exp, BLOCK=1024,
                                  HAS_SHARED=shared, num_warps=4, **pdl())
        _route_scatter_kernel[grid](expert, rank, counts, blk_exp, blk_rows, slots, n_slots,
                                    n_exp, n_blocks, BT=bt, BLOCK=1024, EP2=ep2, num_warps=4,
                                    **pdl())
    return (slots, blk_exp, blk_rows), counts, n_blocks, shared_blocks, routed_blocks


if HAS_TRITON:
    import triton
    import triton.language as tl

    from .pdl import pdl_start

    @triton.jit(do_not_specialize=["T"])
    def _route_count_kernel(idx_ptr, counts_ptr, expert_ptr, rank_ptr, T, k, n_exp,
                            BLOCK: tl.constexpr, HAS_SHARED: tl.constexpr = True,
                            PDL: tl.constexpr = False):
        """Slot -> plan expert (n_exp: another rank's, counted nowhere), and the slot's rank
        among its expert's slots."""
        pdl_start(PDL)
        sl = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        k1 = k + 1
        ok = sl < T * k1
        tok = sl // k1
        j = sl % k1
        routed = ok & (j > 0)
        e = tl.load(idx_ptr + tok * k + j - 1, mask=routed, other=-1) + 1
        if not HAS_SHARED:  # the shared expert's slots go nowhere
            e = tl.where(j == 0, n_exp, e)
        # the shared expert's rank is the token index: no atomics on one hot counter
        r = tl.atomic_add(counts_ptr + e, 1, mask=routed & (e < n_exp))
        r = tl.where(j == 0, tok, r)
        tl.store(expert_ptr + sl, e, mask=ok)
        tl.store(rank_ptr + sl, r, mask=ok)
        if HAS_SHARED and tl.program_id(0) == 0:
            tl.store(counts_ptr, T)

    @triton.jit
    def _write_block_plan(blk_exp_ptr, blk_rows_ptr, c, ee, n_exp, n_blocks, BT: tl.constexpr,
                          BLOCK: tl.constexpr):
        """From the slot counts c [EP2] of the plan experts ee: each block's plan expert
        (n_exp past the end) and number of valid rows. Returns (first block, blocks) per
        expert."""
        nb = (c + BT - 1) // BT
        end = tl.cumsum(nb, 0)
        # the shared expert (plan expert 0: blocks [0, nb0), one per BT tokens) BLOCK blocks at
        # a time; one block of every routed expert per step after that (a loop over the
        # largest expert's blocks was t / BT steps long: 0.1 ms at 8192 tokens and BT = 16)
        c0 = tl.sum(tl.where(ee == 0, c, 0), 0)
        nb0 = (c0 + BT - 1) // BT
        for b0 in range(0, nb0, BLOCK):
            bb = b0 + tl.arange(0, BLOCK)
            tl.store(blk_exp_ptr + bb, bb * 0, mask=bb < nb0)
            tl.store(blk_rows_ptr + bb, tl.minimum(c0 - bb * BT, BT), mask=bb < nb0)
        live = (ee > 0) & (ee < n_exp)
        for j in range(tl.max(tl.where(live, nb, 0), 0)):
            m = live & (j < nb)
            tl.store(blk_exp_ptr + end - nb + j, ee, mask=m)
            tl.store(blk_rows_ptr + end - nb + j, tl.minimum(c - j * BT, BT), mask=m)
        for b0 in range(tl.max(end, 0), n_blocks, BLOCK):
            bb = b0 + tl.arange(0, BLOCK)
            tl.store(blk_exp_ptr + bb, n_exp, mask=bb < n_blocks)
            tl.store(blk_rows_ptr + bb, 0, mask=bb < n_blocks)
        return end - nb

    @triton.jit(do_not_specialize=["T", "n_blocks"])
    def _route_small_kernel(idx_ptr, blk_exp_ptr, blk_rows_ptr, slots_ptr, T, k, n_exp,
                            n_blocks, BT: tl.constexpr, S2: tl.constexpr, EP2: tl.constexpr,
                            HAS_SHARED: tl.constexpr = True, PDL: tl.constexpr = False):
        """The whole plan of a small batch (up to S2 slots) in one program: a slot's rank is the
        number of earlier slots of its expert, an expert's count the number of its slots."""
        pdl_start(PDL)
        _plan_small(idx_ptr, blk_exp_ptr, blk_rows_ptr, slots_ptr, T, k, n_exp, n_blocks, BT,
                    S2, EP2, HAS_SHARED)

    @triton.jit
    def _plan_small(idx_ptr, blk_exp_ptr, blk_rows_ptr, slots_ptr, T, k, n_exp, n_blocks,
                    BT: tl.constexpr, S2: tl.constexpr, EP2: tl.constexpr,
                    HAS_SHARED: tl.constexpr):
        """`_route_small_kernel`'s program (also the MoE gate's last CTA, `moe_gate.py`)."""
        k1 = k + 1
        sl = tl.arange(0, S2)
        ok = sl < T * k1
        j = sl % k1
        e = tl.load(idx_ptr + (sl // k1) * k + j - 1, mask=ok & (j > 0), other=-1) + 1
        if not HAS_SHARED:  # the shared expert's slots go nowhere
            e = tl.where(j == 0, n_exp, e)
        e = tl.where(ok, e, n_exp).to(tl.int32)  # padding lanes count for no expert
        rank = tl.sum(((e[:, None] == e[None, :]) & (sl[None, :] < sl[:, None])).to(tl.int32), 1)
        ee = tl.arange(0, EP2)
        live = ok & (e < n_exp)  # not another rank's expert
        c = tl.histogram(tl.minimum(e, n_exp - 1), EP2, mask=live)  # slots per plan expert
        start = _write_block_plan(blk_exp_ptr, blk_rows_ptr, c, ee, n_exp, n_blocks, BT, 1024)
        tl.store(slots_ptr + tl.gather(start, tl.minimum(e, n_exp - 1), 0) * BT + rank, sl,
                 mask=live)

    @triton.jit(do_not_specialize=["n_slots", "n_blocks"])
    def _route_scatter_kernel(expert_ptr, rank_ptr, counts_ptr, blk_exp_ptr, blk_rows_ptr,
                              slots_ptr, n_slots, n_exp, n_blocks, BT: tl.constexpr,
                              BLOCK: tl.constexpr, EP2: tl.constexpr, PDL: tl.constexpr = False):
        """Padded position of each slot = first row of its expert + rank. Program 0 also writes
        the per-block plan the GEMMs read with one load each."""
        pdl_start(PDL)
        ee = tl.arange(0, EP2)
        c = tl.load(counts_ptr + ee, mask=ee < n_exp, other=0)
        nb = (c + BT - 1) // BT
        start = tl.cumsum(nb, 0) - nb
        if tl.program_id(0) == 0:
            _write_block_plan(blk_exp_ptr, blk_rows_ptr, c, ee, n_exp, n_blocks, BT, BLOCK)
        sl = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = sl < n_slots
        e = tl.load(expert_ptr + sl, mask=ok, other=0)
        r = tl.load(rank_ptr + sl, mask=ok, other=0)
        tl.store(slots_ptr + tl.gather(start, tl.minimum(e, n_exp - 1), 0) * BT + r, sl,
                 mask=ok & (e < n_exp))

    @triton.jit
    def _block_rows(b, slots_ptr, blk_exp_ptr, blk_rows_ptr, BT: tl.constexpr):
        """Block b of the plan: (plan expert, or n_exp past the end; row valid [BT]; padded
        positions [BT]; slots [BT])."""
        e = tl.load(blk_exp_ptr + b)
        offs = tl.arange(0, BT)
        ok = offs < tl.load(blk_rows_ptr + b)
        pos = b * BT + offs
        slot = tl.load(slots_ptr + pos, mask=ok, other=0)
        return e, ok, pos, slot
