"""Greedy sampling with the sampled token's log-probability, in one pass over the logits.

`greedy_logprob(logits [B, V])` -> (ids int64 [B], logprob fp32 [B]): the argmax of each row
(the lowest id among equal maxima, as torch.argmax) and its raw log-softmax value,
max - logsumexp. `packed=True` adds a third result, [3, B] float64 rows of the ids, the
logprobs and the ranks (1), which the engine copies to the host in one go. Reference: torch's
log_softmax and argmax (two full passes, each one CTA per row: about 30 us for one
129K-vocabulary row on an H200). GPU: the row is split across CTAs,
each writes (max, first argmax, sum of exp(x - max)) of its slice, and a second launch merges
the slices of each row.
"""
from __future__ import annotations

import torch

from . import HAS_TRITON, use_triton
from .pdl import pdl

CHUNK = 4096  # vocabulary entries per CTA


def greedy_logprob_ref(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = logits.float()
    ids = x.argmax(-1)
    return ids, torch.log_softmax(x, -1).gather(1, ids[:, None])[:, 0]


def greedy_logprob(logits: torch.Tensor, packed: bool = False) -> tuple[torch.Tensor, ...]:
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"greedy_logprob needs [B, V] logits with V > 0, got {tuple(logits.shape)}")
    if use_triton(logits) and logits.shape[0]:
        return _greedy_cuda(logits, packed)
    ids, lp = greedy_logprob_ref(logits)
    if not packed:
        return ids, lp
    ranks = torch.ones_like(lp, dtype=torch.float64)
    return ids, lp, torch.stack([ids.double(), lp.double(), ranks])


def _greedy_cuda(logits, packed: bool = False):
    x = logits.contiguous()
    b, v = x.shape
    ns = triton.cdiv(v, CHUNK)
    part_m = torch.empty(b, ns, dtype=torch.float32, device=x.device)
    part_s = torch.empty_like(part_m)
    part_i = torch.empty(b, ns, dtype=torch.int32, device=x.device)
    _slice_kernel[(b, ns)](x, part_m, part_s, part_i, v, ns, CH=CHUNK, num_warps=8, **pdl())
    ids = torch.empty(b, dtype=torch.int64, device=x.device)
    lp = torch.empty(b, dtype=torch.float32, device=x.device)
    # the packed rows in the same launch (a fill, three casts and a stack otherwise)
    rows = torch.empty(3, b if packed else 0, dtype=torch.float64, device=x.device)
    _merge_kernel[(b,)](part_m, part_s, part_i, ids, lp, rows, b, ns,
                        NS=triton.next_power_of_2(ns), PACKED=packed, num_warps=1, **pdl())
    return (ids, lp, rows) if packed else (ids, lp)


if HAS_TRITON:
    import triton
    import triton.language as tl

    from .pdl import pdl_start

    @triton.jit
    def _slice_kernel(x_ptr, m_ptr, s_ptr, i_ptr, V, ns, CH: tl.constexpr,
                      PDL: tl.constexpr = False):
        pdl_start(PDL)
        row = tl.program_id(0)
        sl = tl.program_id(1)
        c = sl * CH + tl.arange(0, CH)
        x = tl.load(x_ptr + row.to(tl.int64) * V + c, mask=c < V, other=float("-inf"))
        x = x.to(tl.float32)
        m = tl.max(x, 0)
        first = tl.min(tl.where(x == m, c, 2147483647), 0)
        s = tl.sum(tl.where(x == float("-inf"), 0.0, tl.exp(x - m)), 0)
        tl.store(m_ptr + row * ns + sl, m)
        tl.store(s_ptr + row * ns + sl, s)
        tl.store(i_ptr + row * ns + sl, first)

    @triton.jit(do_not_specialize=["B"])  # one variant whatever the batch size
    def _merge_kernel(m_ptr, s_ptr, i_ptr, ids_ptr, lp_ptr, rows_ptr, B, ns, NS: tl.constexpr,
                      PACKED: tl.constexpr, PDL: tl.constexpr = False):
        pdl_start(PDL)
        row = tl.program_id(0)
        j = tl.arange(0, NS)
        ok = j < ns
        m = tl.load(m_ptr + row * ns + j, mask=ok, other=float("-inf"))
        s = tl.load(s_ptr + row * ns + j, mask=ok, other=0.0)
        i = tl.load(i_ptr + row * ns + j, mask=ok, other=2147483647)
        big = tl.max(m, 0)
        first = tl.min(tl.where(m == big, i, 2147483647), 0)
        total = tl.sum(tl.where(m == float("-inf"), 0.0, s * tl.exp(m - big)), 0)
        lp = -tl.log(total)
        tl.store(ids_ptr + row, first.to(tl.int64))
        tl.store(lp_ptr + row, lp)
        if PACKED:  # [3, B] float64: ids, logprobs, ranks
            tl.store(rows_ptr + row, first.to(tl.float64))
            tl.store(rows_ptr + B + row, lp.to(tl.float64))
            tl.store(rows_ptr + 2 * B + row, tl.full([], 1.0, tl.float64))
