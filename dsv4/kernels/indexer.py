"""Lightning indexer scores and top-k selection for CSA layers (SPEC.md 6).

score(p, i) = sum_h w[p, h] * relu(q[p, h] . K[i]) over the entries i visible to p;
the `min(topk, visible)` best entries are returned (exact ties toward older entries).

The Triton kernel computes the scores: each CTA holds one token's `[nI, c]` query block and
streams gathered keys through one tensor-core product per tile, so each key row is read once per
token; the head reduction happens in registers. `kernels/topk.py` then selects (a radix select
on the GPU; the same set as the reference's stable sort).
Keys come in q's dtype or packed (uint8 rows of `kernels/index_fp4.py`, decoded exactly in the
kernel to q's dtype: 80 bytes read per key instead of 256).
"""
from __future__ import annotations

import torch

from . import HAS_TRITON, num_sms, use_triton
from .index_fp4 import index_fp4_row_bytes, unpack_index_fp4
from .topk import select_topk, select_topk_ref


def indexer_scores_ref(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor,
                       cand: torch.Tensor) -> torch.Tensor:
    """fp32 scores [T, N]; -inf where cand < 0. Packed keys (uint8) are unpacked as gathered."""
    k = keys[cand.clamp(min=0)]  # [T, N, c] (or packed bytes)
    if keys.dtype == torch.uint8:
        k = unpack_index_fp4(k.flatten(0, 1), q.shape[-1], torch.float32).view(*cand.shape, -1)
    k = k.float()
    s = torch.relu(torch.einsum("thc,tnc->thn", q.float(), k))
    score = torch.einsum("thn,th->tn", s, w.float())
    return score.masked_fill(cand < 0, float("-inf"))


def indexer_topk_ref(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor,
                     cand: torch.Tensor, topk: int) -> torch.Tensor:
    """q [T, nI, c]; w [T, nI]; keys [Nk, c] (flat cache rows); cand [T, N] rows visible to each
    token (-1 = not visible). Returns [T, min(topk, N)] selected rows, -1 where fewer visible."""
    return select_topk_ref(indexer_scores_ref(q, w, keys, cand), cand, topk)


if HAS_TRITON:
    import triton
    import triton.language as tl

    from .quant_linear import _e2m1_f32

    @triton.jit
    def _indexer_scores_kernel(q_ptr, w_ptr, keys_ptr, cand_ptr, avail_ptr, out_ptr, N, NI,
                               blocks_per_cta, stride_qt, stride_qh, stride_wt, stride_kn,
                               stride_ct, stride_ot, C: tl.constexpr, BLOCK_H: tl.constexpr,
                               BLOCK_N: tl.constexpr, IEEE: tl.constexpr, PACKED: tl.constexpr,
                               HAS_AVAIL: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)  # T * N passes 2^31 at 8K tokens and 1M context
        first = tl.program_id(1) * blocks_per_cta
        n_end = N
        if HAS_AVAIL:  # only the first avail[t] columns can be visible: skip the rest
            n_end = tl.minimum(N, tl.load(avail_ptr + t).to(tl.int32))
        last = tl.minimum(first + blocks_per_cta, tl.cdiv(n_end, BLOCK_N))
        if first >= last:
            return
        h = tl.arange(0, BLOCK_H)
        c = tl.arange(0, C)
        hmask = h < NI
        q = tl.load(q_ptr + t * stride_qt + h[:, None] * stride_qh + c[None, :],
                    mask=hmask[:, None], other=0.0)  # [nI, c], loaded once for many keys
        w = tl.load(w_ptr + t * stride_wt + h, mask=hmask, other=0.0).to(tl.float32)
        if PACKED:
            # Decoded keys pass through registers, and the compiler's pipelining left their
            # gather latency exposed: load block b+1's bytes before decoding block b, so it
            # overlaps the decode and the dot (32K context: 49.7 -> 39.6 us on an H200)
            n, vis, p, e = _packed_block(cand_ptr + t * stride_ct, keys_ptr, stride_kn, N,
                                         first * BLOCK_N, first < last, C, BLOCK_N)
            for blk in range(first, last):
                n_cur, vis_cur = n, vis
                n, vis, p_next, e_next = _packed_block(cand_ptr + t * stride_ct, keys_ptr,
                                                       stride_kn, N, (blk + 1) * BLOCK_N,
                                                       blk + 1 < last, C, BLOCK_N)
                k = _decode_keys(p, e, C).to(q.dtype)
                _score_block(q, w, k, out_ptr + t * stride_ot, n_cur, vis_cur, N, IEEE)
                p, e = p_next, e_next
        else:
            for blk in range(first, last):
                n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
                nmask = n < N
                row = tl.load(cand_ptr + t * stride_ct + n, mask=nmask, other=-1).to(tl.int64)
                vis = nmask & (row >= 0)
                row = tl.where(vis, row, 0)  # masked lanes' addresses stay inside the cache
                k = tl.load(keys_ptr + row[:, None] * stride_kn + c[None, :], mask=vis[:, None],
                            other=0.0)  # [BN, c]
                _score_block(q, w, k, out_ptr + t * stride_ot, n, vis, N, IEEE)

    @triton.jit
    def _score_block(q, w, k, out_row, n, vis, N, IEEE: tl.constexpr):
        """Scores of one block of keys k [BN, c] for one token: sum_h w_h relu(q_h . k)."""
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))  # [nI, BN] fp32
        score = tl.sum(tl.maximum(s, 0.0) * w[:, None], 0)
        tl.store(out_row + n, tl.where(vis, score, float("-inf")), mask=n < N)

    @triton.jit
    def _packed_block(cand_row, keys_ptr, stride_kn, N, start, live, C: tl.constexpr,
                      BLOCK_N: tl.constexpr):
        """Positions, visibility and raw packed bytes (codes [BN, C/2], scales [BN, C/32]) of
        the block of candidates from `start`; nothing is loaded where `live` is false."""
        n = start + tl.arange(0, BLOCK_N)
        nmask = (n < N) & live
        row = tl.load(cand_row + n, mask=nmask, other=-1).to(tl.int64)
        vis = nmask & (row >= 0)
        row_ptr = keys_ptr + tl.where(vis, row, 0) * stride_kn  # masked lanes stay in the cache
        j = tl.arange(0, C // 2)
        p = tl.load(row_ptr[:, None] + j[None, :], mask=vis[:, None], other=0)
        g = tl.arange(0, C // 32)
        e = tl.load(row_ptr[:, None] + C // 2 + g[None, :], mask=vis[:, None], other=127)
        return n, vis, p, e

    @triton.jit
    def _decode_keys(p, e, C: tl.constexpr):
        """Packed key bytes (codes p [BN, C/2], e8m0 scales e [BN, C/32]) -> exact fp32 [BN, C]:
        the codes' values (`_e2m1_f32`) times their block's e8m0 scale."""
        lo, hi = _e2m1_f32(p)
        f = (e.to(tl.int32) << 23).to(tl.float32, bitcast=True)  # 2^(e-127); the packer keeps e >= 1
        f = tl.reshape(tl.broadcast_to(f[:, :, None], (f.shape[0], C // 32, 16)),
                       (f.shape[0], C // 2))
        v = tl.join(lo * f, hi * f)  # [BN, C/2, 2]: element 2j from the low nibble of byte j
        return tl.reshape(v, (v.shape[0], C))

    def indexer_scores_triton(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor,
                              cand: torch.Tensor, avail: torch.Tensor | None = None,
                              block_n: int | None = None, num_warps: int = 4,
                              num_stages: int = 3) -> torch.Tensor:
        """Launcher: fp32 scores [T, N], -inf where cand < 0. With `avail` [T] (token t's
        visible candidates are its first avail[t] columns, as the batches build them) the
        columns from the end of the block holding column avail[t] on are left unwritten:
        under CUDA graphs N follows the graphs' context length, and the work then follows
        the context."""
        T, NI, C = q.shape
        N = cand.shape[1]
        packed = keys.dtype == torch.uint8
        if (keys.dtype != q.dtype and not packed) or q.dtype not in (torch.bfloat16, torch.float32):
            raise TypeError(f"q ({q.dtype}) and keys ({keys.dtype}) must share bf16 or fp32, or "
                            f"keys be packed (uint8)")
        width = index_fp4_row_bytes(C) if packed else C
        if keys.shape[1] != width or C & (C - 1) or w.shape != (T, NI) or cand.shape[0] != T:
            raise ValueError(f"shapes q {tuple(q.shape)} w {tuple(w.shape)} keys "
                             f"{tuple(keys.shape)} cand {tuple(cand.shape)} do not fit")
        out = torch.empty(T, N, dtype=torch.float32, device=q.device)
        if T == 0 or N == 0:
            return out
        q = q if q.stride(-1) == 1 else q.contiguous()
        keys = keys if keys.stride(-1) == 1 else keys.contiguous()
        cand, w = cand.contiguous(), w.contiguous()
        if block_n is None:  # H200 sweep, 32 tokens: 128 up to 8K columns (32K context: bf16
            # keys 39.1 -> 31.2 us, packed 41.0 -> ~40), 64 beyond (128K context: 128 is slower)
            block_n = 128 if N <= 8192 else 64
        n_blocks = triton.cdiv(N, block_n)
        sms = num_sms(q.device)
        # enough CTAs to fill the GPU, each long enough to amortise its query load
        bpc = max(1, min(n_blocks, (T * n_blocks) // (4 * sms)))
        bh = max(16, triton.next_power_of_2(NI))
        _indexer_scores_kernel[(T, triton.cdiv(n_blocks, bpc))](
            q, w, keys, cand, cand if avail is None else avail.contiguous(), out, N, NI, bpc,
            q.stride(0), q.stride(1), w.stride(0), keys.stride(0), cand.stride(0), out.stride(0),
            C=C, BLOCK_H=bh, BLOCK_N=block_n, IEEE=q.dtype == torch.float32, PACKED=packed,
            HAS_AVAIL=avail is not None,
            num_warps=num_warps, num_stages=num_stages)
        return out


def indexer_scores(q, w, keys, cand, avail=None):
    """Scores [T, N]; with `avail` the kernel may leave columns past avail[t] unwritten (see
    `indexer_scores_triton`), so only a top-k given the same `avail` may read them."""
    if (use_triton(q) and q.dtype in (torch.bfloat16, torch.float32)
            and keys.dtype in (q.dtype, torch.uint8)):
        return indexer_scores_triton(q, w, keys, cand, avail)
    return indexer_scores_ref(q, w, keys, cand)


def indexer_topk(q, w, keys, cand, topk, reduce=None, avail=None):
    """`reduce` (tensor parallelism) sums the partial scores of each rank's heads before the
    selection; `avail` [T]: the number of leading visible columns of each token's candidates
    (the rest are -1), so that the GPU work follows the context, not the width of `cand`."""
    score = indexer_scores(q, w, keys, cand, avail)
    if reduce is not None:
        score = reduce(score)
    return select_topk(score, cand, topk, avail)
