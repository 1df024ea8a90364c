"""The compressed-cache rows each token may attend to or index (SPEC.md 5.3, 6), from the block
tables: entry i of a sequence lives in block i // rpb at row i % rpb (rpb = entries a block),
and token p sees entries i < (p + 1) // m.

`candidates_(rows, avail, block_tables, tok_seq, positions, m, rpb)` fills rows [T, N]
(-1 past the visible entries) and avail [T] in place. Reference: torch ops over the whole
width. GPU: one kernel that writes each token's visible prefix and -1 only up to the next
multiple of 128 columns. Under CUDA graphs N is the graphs' context length / m whatever the
context; every GPU consumer (the indexer's scores and top-k kernels, the sparse attention
kernels) stops at `avail`, so the rest is never read.
"""
from __future__ import annotations

import torch

from . import HAS_TRITON, num_sms, use_triton
from .pdl import pdl

PAD_COLS = 128  # -1 is written up to this multiple past the visible entries (consumer tiles)


def candidates_ref_(rows: torch.Tensor, avail: torch.Tensor, block_tables: torch.Tensor,
                    tok_seq: torch.Tensor, positions: torch.Tensor, m: int, rpb: int) -> None:
    i = torch.arange(rows.shape[1], device=rows.device)[None, :]
    blk = (i // rpb).clamp(max=block_tables.shape[1] - 1)
    avail.copy_((positions + 1) // m)
    full = block_tables[tok_seq[:, None], blk] * rpb + i % rpb
    rows.copy_(torch.where(i < avail[:, None], full, -1))


def candidates_(rows, avail, block_tables, tok_seq, positions, m: int, rpb: int) -> None:
    """See the module docstring; the GPU kernel leaves columns past the padded prefix as they
    were (only the kernels that honour `avail` may read these rows)."""
    if use_triton(rows) and rows.shape[0]:
        _candidates_cuda(rows, avail, block_tables, tok_seq, positions, m, rpb)
        return
    candidates_ref_(rows, avail, block_tables, tok_seq, positions, m, rpb)


def _candidates_cuda(rows, avail, block_tables, tok_seq, positions, m, rpb, block: int = 1024,
                     programs: int | None = None):
    """block_tables may be strided (CUDA graphs keep it block-major, `StaticBatch`). A program
    takes every G-th block of columns of its token, G such that a launch is about 4 CTAs an SM
    (a program a block made a 1M-wide graph's batch of 64 launch 16384 CTAs, nearly all past
    their token's prefix); `programs` sets G (tests)."""
    T, N = rows.shape
    n_blocks = triton.cdiv(N, block)
    g = min(n_blocks, programs or max(1, 4 * num_sms(rows.device) // T))
    _candidates_kernel[(T, g)](
        rows, avail, block_tables, tok_seq, positions, N, block_tables.shape[1], m, rpb,
        rows.stride(0), block_tables.stride(0), block_tables.stride(1), PAD=PAD_COLS,
        BLOCK=block, num_warps=4, **pdl())


if HAS_TRITON:
    import triton
    import triton.language as tl

    from .pdl import pdl_start

    # one compiled variant for every context, ratio, block table and slice of the positions
    # (a sliced `positions` starts anywhere): the kernel is a few integer ops a column
    @triton.jit(do_not_specialize=["N", "max_blocks", "m", "rpb", "stride_r", "stride_bs",
                                   "stride_bb"],
                do_not_specialize_on_alignment=["pos_ptr"])
    def _candidates_kernel(rows_ptr, avail_ptr, bt_ptr, tok_seq_ptr, pos_ptr, N, max_blocks, m,
                           rpb, stride_r, stride_bs, stride_bb, PAD: tl.constexpr,
                           BLOCK: tl.constexpr, PDL: tl.constexpr = False):
        pdl_start(PDL)
        t = tl.program_id(0).to(tl.int64)
        a = ((tl.load(pos_ptr + t) + 1) // m).to(tl.int32)
        if tl.program_id(1) == 0:
            tl.store(avail_ptr + t, a.to(avail_ptr.dtype.element_ty))
        end = tl.minimum(N, (a + PAD - 1) // PAD * PAD)
        seq = tl.load(tok_seq_ptr + t)
        for c in range(tl.program_id(1), tl.cdiv(end, BLOCK), tl.num_programs(1)):
            i = c * BLOCK + tl.arange(0, BLOCK)
            vis = i < a
            blk = tl.minimum(i // rpb, max_blocks - 1)
            b = tl.load(bt_ptr + seq * stride_bs + blk * stride_bb, mask=vis, other=0)
            r = tl.where(vis, b * rpb + i % rpb, -1)
            tl.store(rows_ptr + t * stride_r + i, r.to(rows_ptr.dtype.element_ty), mask=i < end)
