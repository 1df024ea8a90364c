"""Lightning indexer scores and top-k selection for CSA layers (SPEC.md 6).

score(p, i) = sum_h w[p, h] * relu(q[p, h] . K[i]) over the entries i visible to p;
the `min(topk, visible)` best entries are returned (exact ties toward older entries).

On sm_90 the FP8 case (packed keys, FP4-grid queries) runs on a Gluon kernel that decodes the
keys in place as the wgmma's A operand (`kernels/indexer_wg.py`, `indexer_scores_triton`'s
`gluon`); otherwise the Triton kernels below. The Triton kernel computes the scores: each CTA
holds one token's `[nI, c]` query block and
streams gathered keys through one tensor-core product per tile, so each key row is read once per
token; the head reduction happens in registers. `kernels/topk.py` then selects (a radix select
on the GPU; the same set as the reference's stable sort).
Keys come in q's dtype or packed (uint8 rows of `kernels/index_fp4.py`, decoded exactly in the
kernel to q's dtype: 80 bytes read per key instead of 256). Packed keys with queries on the
FP4 grid (`q_fp4`: e2m1 x a power of two per 32 dims, as the model's QAT makes them) can take
FP8 tensor cores instead (`_indexer_scores_fp8_kernel`): the key codes decode to e4m3 with a
few integer instructions per 4 codes, the queries are re-coded as e4m3 x a per-32 power of
two, and each 32-dim block is one exact FP8 MMA (sums of 32 products of e2m1 codes) scaled by
both blocks' scales in fp32.
"""
from __future__ import annotations

import os

import torch

from . import HAS_TRITON, gluon_failed, num_sms, use_triton
from .pdl import pdl
from .index_fp4 import index_fp4_row_bytes, unpack_index_fp4
from .topk import select_topk, select_topk_ref

# FP8 scores on the Gluon kernel (`indexer_wg.py`) unless DSV4_INDEXER_GLUON=0, with its
# registers capped at 128 (16 warps an SM; uncapped, 156: 12 warps and 1.2-1.4x slower; the
# rare per-block pass may spill, the key loop does not); set once it failed to build here
# (the Triton kernel from then on)
INDEXER_GLUON = (os.environ.get("DSV4_INDEXER_GLUON", "1") != "0"
                 and os.environ.get("TRITON_INTERPRET") != "1")
GLUON_MAXNREG = 128
# keys a step of the Gluon kernel's CTAs: 64 (4 warps) or 128 (8, two warpgroups sharing the
# queries: half the CTAs, so half the query preparation). H200, 32 tokens, 8K / 32K / 128K
# context (`bench_attention.py --only indexer --quick`): 6.7 / 14.5 / 45.8 -> 5.9 / 12.9 / 42.0 us
GLUON_BLOCK_N = 128
_GLUON_FAILED: list[str] = []


# A register p of 8 e2m1 codes (nibble order) -> two registers of e4m3 bytes: codes 0..3 ($0)
# and 4..7 ($1), each the byte of its magnitude in the key's tables t0 (magnitudes 0..3) / t1
# (4..7), one `prmt` for 4 codes; the signs by one `prmt` in sign-replicate mode over p and
# p << 4 (whose bytes' top bits are the odd and the even codes' signs) and a `lop3`
# (`_keys_folded`, `indexer_wg._decode`)
FOLDED_E2M1_E4M3_PTX = """{{
    .reg .b32 m, s;
    and.b32 m, {p}, 0x77777777;
    prmt.b32 $0, {t0}, {t1}, m;
    shr.b32 m, m, 16;
    prmt.b32 $1, {t0}, {t1}, m;
    shl.b32 s, {p}, 4;
    prmt.b32 m, s, {p}, 0xD9C8;
    lop3.b32 $0, $0, m, 0x80808080, 0xF8;
    prmt.b32 m, s, {p}, 0xFBEA;
    lop3.b32 $1, $1, m, 0x80808080, 0xF8;
    }}"""


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

    from .index_fp4 import _code_byte_offsets, _key_dims
    from .pdl import pdl_start
    from .quant_linear import _e2m1_e4m3_nibbles, _e2m1_f32

    _INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # runs no inline PTX
    # the packed bytes in $2, the key's tables in $3 and $7 (4 copies each: $3..$6, $7..$10)
    _FOLDED_PTX = tl.constexpr(FOLDED_E2M1_E4M3_PTX.format(p="$2", t0="$3", t1="$7"))
    # candidate columns (tokens x width) from which the FP8 scores kernel folds the query and
    # key scales by default (H200, `scratch`-style A/B): under 256 key blocks of 64 a CTA has
    # one block and the fold's query preparation shows (1 token at 32K context 3.7 against
    # 4.4 us, 8 tokens at 8K 4.3 against 5.0); from 512 it pays (1 token at 128K 7.4 -> 6.3,
    # 4 at 32K 7.4 -> 6.3, 32 at 32K 33.3 -> 24.4, 32 at 128K 100.3 -> 66.6)
    FOLD_FROM_COLUMNS = 32768

    @triton.jit
    def _cta_blocks(t, avail_ptr, N, blocks_per_cta, HAS_AVAIL: tl.constexpr,
                    BLOCK_N: tl.constexpr):
        """The key blocks [first, last) of this CTA of token t."""
        first = tl.program_id(1) * blocks_per_cta
        n_end = N
        if HAS_AVAIL:  # only the first avail[t] columns can be visible: skip the rest
            n_end = tl.minimum(N, tl.load(avail_ptr + t).to(tl.int32))
        return first, tl.minimum(first + blocks_per_cta, tl.cdiv(n_end, BLOCK_N))

    @triton.jit(do_not_specialize=["N", "blocks_per_cta"])
    def _indexer_scores_kernel(q_ptr, w_ptr, keys_ptr, cand_ptr, avail_ptr, out_ptr, N, NI,
                               blocks_per_cta, stride_qt, stride_qh, stride_wt, stride_kn,
                               stride_ct, stride_ot, C: tl.constexpr, BLOCK_H: tl.constexpr,
                               BLOCK_N: tl.constexpr, IEEE: tl.constexpr, PACKED: tl.constexpr,
                               HAS_AVAIL: tl.constexpr, PDL: tl.constexpr = False):
        pdl_start(PDL)
        t = tl.program_id(0).to(tl.int64)  # T * N passes 2^31 at 8K tokens and 1M context
        first, last = _cta_blocks(t, avail_ptr, N, blocks_per_cta, HAS_AVAIL, BLOCK_N)
        if first >= last:
            return
        h = tl.arange(0, BLOCK_H)
        c = tl.arange(0, C)
        hmask = h < NI
        qc = _key_dims(c) if PACKED else c  # packed keys decode with their dims in word order
        q = tl.load(q_ptr + t * stride_qt + h[:, None] * stride_qh + qc[None, :],
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
        j = _code_byte_offsets(tl.arange(0, C // 2), C // 32)  # blocks of 16 bytes
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

    @triton.jit(do_not_specialize=["N", "blocks_per_cta"])
    def _indexer_scores_fp8_kernel(q_ptr, w_ptr, keys_ptr, cand_ptr, avail_ptr, out_ptr, N, NI,
                                   blocks_per_cta, stride_qt, stride_qh, stride_wt, stride_kn,
                                   stride_ct, stride_ot, BLOCK_H: tl.constexpr,
                                   BLOCK_N: tl.constexpr, HAS_AVAIL: tl.constexpr,
                                   ASM: tl.constexpr, FOLD: tl.constexpr = False,
                                   PDL: tl.constexpr = False):
        """Packed keys (C = 128: 4 scale blocks) and FP4-grid queries on FP8 tensor cores.
        FOLD: each head's 4 query blocks share one power of two (`_q_folded`) when they can,
        and so do each key's 4 blocks (`_key_fold`): the 4 MMAs of a key block then chain in
        one accumulator and both scales leave the loop (the query's into w, the key's after
        the head sum). The products are the per-block path's scaled by powers of two; the
        scores came out bit-identical in every GPU test and A/B (the 4 blocks' sums then
        accumulate in the MMA instead of fp32 adds), with fewer instructions and registers
        (sm_90 offline: the loop 421 instructions for 64 keys against 488 with only the
        queries folded and 653 with neither; 92 registers without the second pass, 127 with
        it, 4 CTAs an SM either way). Keys that do not fold are left to a second pass over
        the CTA's blocks (`_scores_by_16_heads`), which runs only when there is one."""
        pdl_start(PDL)
        t = tl.program_id(0).to(tl.int64)
        first, last = _cta_blocks(t, avail_ptr, N, blocks_per_cta, HAS_AVAIL, BLOCK_N)
        if first >= last:
            return
        h = tl.arange(0, BLOCK_H)
        hmask = h < NI
        q_row = q_ptr + t * stride_qt + h[:, None] * stride_qh
        cand_row = cand_ptr + t * stride_ct
        out_row = out_ptr + t * stride_ot
        if FOLD:
            q0, q1, q2, q3, sq, ok = _q_folded(q_row, hmask)
            left = ~ok  # keys left to the per-block pass: all of them if q does not fold
            if ok:  # one power of two per head, taken out of the relu into w
                w = tl.load(w_ptr + t * stride_wt + h, mask=hmask, other=0.0).to(tl.float32)
                left = _scores(q0, q1, q2, q3, sq, sq, sq, sq, w * sq, cand_row, keys_ptr,
                               stride_kn, N, out_row, first, last, BLOCK_H, BLOCK_N, ASM, True)
            if left:
                _scores_by_16_heads(q_ptr + t * stride_qt, stride_qh, NI,
                                    w_ptr + t * stride_wt, cand_row, keys_ptr, stride_kn, N,
                                    out_row, first, last, BLOCK_H, BLOCK_N, ASM, ok)
            return
        q0, s0 = _q_block_e4m3(q_row, hmask, 0)
        q1, s1 = _q_block_e4m3(q_row, hmask, 1)
        q2, s2 = _q_block_e4m3(q_row, hmask, 2)
        q3, s3 = _q_block_e4m3(q_row, hmask, 3)
        w = tl.load(w_ptr + t * stride_wt + h, mask=hmask, other=0.0).to(tl.float32)
        _scores(q0, q1, q2, q3, s0, s1, s2, s3, w, cand_row, keys_ptr, stride_kn, N, out_row,
                first, last, BLOCK_H, BLOCK_N, ASM, False)

    @triton.jit
    def _q_folded(q_row, hmask):
        """A token's FP4-grid queries [BH, 128] -> 4 e4m3 blocks [BH, 32] that share one power
        of two per head, sq [BH], with q = codes * sq exactly, and whether that holds for every
        head (ok): the head's largest block has its amax at 256-384 (2^(floor(log2 amax) - 8)),
        and a block k binades lower keeps every e2m1 value of its grid (down to 0.5 x 2^(e - 2),
        e its amax exponent) on e4m3's grid while k <= 14 (its smallest step, 2^-9, is then
        still a step of that grid). Zero blocks do not count; a head with a nonzero block of
        amax below 2^-124 (zero codes in `_q_block_e4m3`) does not fold, so that both paths
        give the same codes."""
        x0 = _q_dims(q_row, hmask, 0)
        x1 = _q_dims(q_row, hmask, 1)
        x2 = _q_dims(q_row, hmask, 2)
        x3 = _q_dims(q_row, hmask, 3)
        e0, e1, e2, e3 = _amax_exp(x0), _amax_exp(x1), _amax_exp(x2), _amax_exp(x3)
        eb = tl.maximum(tl.maximum(e0, e1), tl.maximum(e2, e3))
        lo = tl.minimum(tl.minimum(tl.where(e0 > 0, e0, 255), tl.where(e1 > 0, e1, 255)),
                        tl.minimum(tl.where(e2 > 0, e2, 255), tl.where(e3 > 0, e3, 255)))
        live = eb >= 9  # else zero codes (heads of amax 2^-124 to 2^-118 take the other path)
        tiny = _tiny(x0) | _tiny(x1) | _tiny(x2) | _tiny(x3)
        ok = tl.max(tl.where(live & ~tiny, eb - lo, tl.where((eb >= 3) | tiny, 15, 0))) <= 14
        sq = tl.where(live, ((eb - 8) << 23).to(tl.float32, bitcast=True), 0.0)
        inv = tl.where(live, ((262 - eb) << 23).to(tl.float32, bitcast=True), 0.0)  # 1 / sq
        return ((x0 * inv[:, None]).to(tl.float8e4nv), (x1 * inv[:, None]).to(tl.float8e4nv),
                (x2 * inv[:, None]).to(tl.float8e4nv), (x3 * inv[:, None]).to(tl.float8e4nv),
                sq, ok)

    @triton.jit
    def _q_dims(q_row, hmask, b: tl.constexpr):
        """Dims 32b..32b+31 of the heads' queries in the packed keys' word order, fp32 [BH, 32]."""
        return tl.load(q_row + _key_dims(b * 32 + tl.arange(0, 32))[None, :],
                       mask=hmask[:, None], other=0.0).to(tl.float32)

    @triton.jit
    def _tiny(x):
        """Rows with a nonzero amax below 2^-124 (biased exponent under 3)."""
        a = tl.max(tl.abs(x), 1)
        return (a > 0.0) & (_amax_exp(x) < 3)

    @triton.jit
    def _amax_exp(x):
        """Biased exponent of each row's amax (0 for an all-zero row)."""
        return (tl.max(tl.abs(x), 1).to(tl.int32, bitcast=True) >> 23) & 0xFF

    @triton.jit
    def _scores(q0, q1, q2, q3, s0, s1, s2, s3, w, cand_row, keys_ptr, stride_kn, N, out_row,
                first, last, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, ASM: tl.constexpr,
                FOLDED: tl.constexpr):
        """Scores of key blocks [first, last) of one token: the queries' 4 e4m3 blocks q0..q3
        with their per-head scales s0..s3, or (FOLDED) `_q_folded` queries and w times their
        scales (s0..s3 unused) with the keys folded too (`_key_fold`); returns whether a
        visible key did not fold (its score is not written). Block b+1's bytes are loaded
        before block b is decoded (as in the bf16 decode path)."""
        n, vis, p0, p1, p2, p3, e = _packed_block8(cand_row, keys_ptr, stride_kn, N,
                                                   first * BLOCK_N, first < last, BLOCK_N)
        left = tl.zeros((BLOCK_N,), dtype=tl.int32)
        for blk in range(first, last):
            n_cur, vis_cur, c0, c1, c2, c3, e_cur = n, vis, p0, p1, p2, p3, e
            n, vis, p0, p1, p2, p3, e = _packed_block8(cand_row, keys_ptr, stride_kn, N,
                                                       (blk + 1) * BLOCK_N, blk + 1 < last,
                                                       BLOCK_N)
            acc = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
            if FOLDED:
                emax, kok = _key_fold(e_cur)
                acc = tl.dot(_keys_folded(c0, e_cur, emax, 0, ASM), tl.trans(q0), acc)
                acc = tl.dot(_keys_folded(c1, e_cur, emax, 1, ASM), tl.trans(q1), acc)
                acc = tl.dot(_keys_folded(c2, e_cur, emax, 2, ASM), tl.trans(q2), acc)
                acc = tl.dot(_keys_folded(c3, e_cur, emax, 3, ASM), tl.trans(q3), acc)
                sk = ((emax - 6) << 23).to(tl.float32, bitcast=True)  # 2^(emax - 127 - 6)
                score = tl.sum(tl.maximum(acc, 0.0) * w[None, :], 1) * sk  # [BN]
                store = (n_cur < N) & (kok | ~vis_cur)  # a visible key that did not fold: later
                left = left | (vis_cur & ~kok).to(tl.int32)
            else:
                acc = _key_block_mma8(acc, c0, e_cur, q0, s0, 0, ASM)
                acc = _key_block_mma8(acc, c1, e_cur, q1, s1, 1, ASM)
                acc = _key_block_mma8(acc, c2, e_cur, q2, s2, 2, ASM)
                acc = _key_block_mma8(acc, c3, e_cur, q3, s3, 3, ASM)
                score = tl.sum(tl.maximum(acc, 0.0) * w[None, :], 1)  # [BN]
                store = n_cur < N
            tl.store(out_row + n_cur, tl.where(vis_cur, score, float("-inf")), mask=store)
        return tl.max(left) > 0

    @triton.jit
    def _key_fold(e):
        """Per key (e [BN]: its 4 e8m0 scale bytes as one int32): the largest scale byte emax,
        and whether the key folds (kok): each block's e2m1 values times 2^(e_b - emax + 6),
        down to 0.5 x 2^-5, are normal e4m3 numbers while e_b >= emax - 11, and the key's
        remaining scale 2^(emax - 133) a normal fp32 while emax >= 7. Zero blocks (e_b = 1)
        of a larger key do not fold: rare, the keys come out of a Hadamard."""
        b0, b1 = e & 0xFF, (e >> 8) & 0xFF
        b2, b3 = (e >> 16) & 0xFF, (e >> 24) & 0xFF
        emax = tl.maximum(tl.maximum(b0, b1), tl.maximum(b2, b3))
        lo = tl.minimum(tl.minimum(b0, b1), tl.minimum(b2, b3))
        return emax, (emax - lo <= 11) & (emax >= 7)

    @triton.jit
    def _keys_folded(p, e, emax, b: tl.constexpr, ASM: tl.constexpr):
        """Scale block b of folding keys (codes p [BN, 16]: byte j holds dims 2j and 2j + 1)
        -> e4m3 [BN, 32]: value x 2^(6 - emax + e_b) through two byte tables a key (the e4m3
        codes of the magnitudes 0, 0.5, 1, 1.5 and 2, 3, 4, 6 times 2^(d - 6), d = e_b -
        emax + 12 in 1..12: their exponent fields are d's plus a constant), one `prmt` for
        every 2 codes on the GPU; the sign bit is copied."""
        d = ((e >> (8 * b)) & 0xFF) - emax + 12
        t0 = 0x0C080000 + d * 0x08080800
        t1 = 0x1C181410 + d * 0x08080808
        BN: tl.constexpr = p.shape[0]
        if ASM:  # pack=4: the 4 bytes of a register lie in one key row
            a, c = tl.inline_asm_elementwise(
                asm=_FOLDED_PTX,
                constraints="=r,=r,r,r,r,r,r,r,r,r,r",
                args=[p, tl.broadcast_to(t0[:, None], p.shape),
                      tl.broadcast_to(t1[:, None], p.shape)],
                dtype=(tl.uint8, tl.uint8), is_pure=True, pack=4)
            # a: codes of bytes 4i, 4i + 1 (4 dims), c: of bytes 4i + 2, 4i + 3
            x = tl.reshape(tl.permute(tl.join(tl.reshape(a, (BN, 4, 4)),
                                              tl.reshape(c, (BN, 4, 4))), (0, 1, 3, 2)),
                           (BN, 32))
        else:
            code = tl.reshape(tl.join(p & 0xF, p >> 4), (BN, 32)).to(tl.int32)
            m = code & 7
            tab = tl.where(m < 4, t0[:, None], t1[:, None])
            x = (((tab >> (8 * (m & 3))) & 0xFF) | ((code & 8) << 4)).to(tl.uint8)
        return x.to(tl.float8e4nv, bitcast=True)

    @triton.jit
    def _scores_by_16_heads(q_tok, stride_qh, NI, w_tok, cand_row, keys_ptr, stride_kn, N,
                            out_row, first, last, BLOCK_H: tl.constexpr,
                            BLOCK_N: tl.constexpr, ASM: tl.constexpr, only_left):
        """`_scores` with per-block scales, 16 heads at a time (few registers; the keys are
        decoded once per group), for a token whose queries do not fold (a head's blocks more
        than 14 binades apart), or (only_left) for the keys that did not fold. Rare: a block
        is skipped unless one of its keys needs it."""
        for blk in range(first, last):
            n, vis, c0, c1, c2, c3, e = _packed_block8(cand_row, keys_ptr, stride_kn, N,
                                                       blk * BLOCK_N, True, BLOCK_N)
            todo = (n < N) & (~only_left | (vis & ~_key_fold(e)[1]))
            if tl.max(todo.to(tl.int32)) > 0:
                score = tl.zeros((BLOCK_N,), dtype=tl.float32)
                for g in range(BLOCK_H // 16):
                    h = g * 16 + tl.arange(0, 16)
                    hmask = h < NI
                    q_row = q_tok + h[:, None] * stride_qh
                    acc = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
                    q8, sq = _q_block_e4m3(q_row, hmask, 0)
                    acc = _key_block_mma8(acc, c0, e, q8, sq, 0, ASM)
                    q8, sq = _q_block_e4m3(q_row, hmask, 1)
                    acc = _key_block_mma8(acc, c1, e, q8, sq, 1, ASM)
                    q8, sq = _q_block_e4m3(q_row, hmask, 2)
                    acc = _key_block_mma8(acc, c2, e, q8, sq, 2, ASM)
                    q8, sq = _q_block_e4m3(q_row, hmask, 3)
                    acc = _key_block_mma8(acc, c3, e, q8, sq, 3, ASM)
                    w = tl.load(w_tok + h, mask=hmask, other=0.0).to(tl.float32)
                    score += tl.sum(tl.maximum(acc, 0.0) * w[None, :], 1)
                tl.store(out_row + n, tl.where(vis, score, float("-inf")), mask=todo)

    @triton.jit
    def _q_block_e4m3(q_row, hmask, b: tl.constexpr):
        """Dims 32b..32b+31 of a token's queries (q_row [BH, 1] head row pointers) -> e4m3
        codes [BH, 32] and per-head powers of two sq [BH] with q = codes * sq exactly, for
        queries on the FP4 grid (e2m1 x 2^k): sq = 2^(floor(log2 amax) - 2) puts the block's
        largest at 4 or 6 and every other value on e2m1's grid, which e4m3 holds."""
        x = _q_dims(q_row, hmask, b)
        eb = (tl.max(tl.abs(x), 1).to(tl.int32, bitcast=True) >> 23) & 0xFF  # biased exponent
        live = eb >= 3  # else all zero (or below 2^-124: zero codes)
        sq = tl.where(live, ((eb - 2) << 23).to(tl.float32, bitcast=True), 0.0)
        inv = tl.where(live, ((256 - eb) << 23).to(tl.float32, bitcast=True), 0.0)  # 1 / sq
        return (x * inv[:, None]).to(tl.float8e4nv), sq

    @triton.jit
    def _packed_block8(cand_row, keys_ptr, stride_kn, N, start, live, BLOCK_N: tl.constexpr):
        """`_packed_block` for C = 128, split by scale block: positions, visibility, the codes
        of each 32-dim block (4 x [BN, 16] bytes) and the 4 scale bytes as one int32 [BN]."""
        n = start + tl.arange(0, BLOCK_N)
        nmask = (n < N) & live
        row = tl.load(cand_row + n, mask=nmask, other=-1).to(tl.int64)
        vis = nmask & (row >= 0)
        row_ptr = keys_ptr + tl.where(vis, row, 0) * stride_kn  # masked lanes stay in the cache
        j = _code_byte_offsets(tl.arange(0, 16), 4)[None, :]  # block 0's bytes in word order
        m = vis[:, None]
        p0 = tl.load(row_ptr[:, None] + j, mask=m, other=0)
        p1 = tl.load(row_ptr[:, None] + 4 + j, mask=m, other=0)
        p2 = tl.load(row_ptr[:, None] + 8 + j, mask=m, other=0)
        p3 = tl.load(row_ptr[:, None] + 12 + j, mask=m, other=0)
        e = tl.load((row_ptr + 64).to(tl.pointer_type(tl.int32)), mask=vis, other=0)
        return n, vis, p0, p1, p2, p3, e

    @triton.jit
    def _key_block_mma8(acc, p, e, q8, sq, b: tl.constexpr, ASM: tl.constexpr):
        """acc [BN, BH] += scale block b of the keys (codes p [BN, 16]: byte j holds dims 2j
        and 2j + 1; scale byte b of e) times the queries' block (q8 [BH, 32], sq [BH]): one
        FP8 MMA of exact products (keys decoded as value * 2^-6), then both scales in fp32."""
        lo, hi = _e2m1_e4m3_nibbles(p, ASM)
        k8 = tl.reshape(tl.join(lo, hi), (p.shape[0], 32)).to(tl.float8e4nv, bitcast=True)
        sk = ((((e >> (8 * b)) & 0xFF) + 6) << 23).to(tl.float32, bitcast=True)  # 2^6 x scale
        s = tl.dot(k8, tl.trans(q8))  # [BN, BH]
        return acc + s * sk[:, None] * sq[None, :]


    def _gluon_scores(q, w, keys, cand, avail, out, bpc, bh, maxnreg, bn) -> bool:
        """Launch `_indexer_fp8_wg_kernel` with BN keys a step (`bpc` of them a CTA, or
        enough CTAs for one wave of 4 warpgroups an SM); False (and the Triton kernel from
        then on) if it does not build here."""
        from .indexer_wg import HAS_GLUON
        if not HAS_GLUON or _GLUON_FAILED:
            return False
        from .indexer_wg import _indexer_fp8_wg_kernel
        T, NI, _ = q.shape
        n_blocks = triton.cdiv(cand.shape[1], bn)
        bpc = bpc or max(1, min(n_blocks, -(-T * n_blocks // (4 * 64 // bn * num_sms(q.device)))))
        try:
            _indexer_fp8_wg_kernel[(T, triton.cdiv(n_blocks, bpc))](
                q, w, keys, cand, cand if avail is None else avail.contiguous(), out,
                cand.shape[1], NI, bpc, q.stride(0), q.stride(1), w.stride(0), keys.stride(0),
                cand.stride(0), out.stride(0), BH=bh, HAS_AVAIL=avail is not None, BN=bn,
                num_warps=bn // 16, **(dict(maxnreg=maxnreg) if maxnreg else {}), **pdl())
        except Exception as exc:  # noqa: BLE001
            gluon_failed(_GLUON_FAILED, exc, "Gluon indexer kernel", "Triton kernel")
            return False
        return True

    def indexer_scores_triton(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor,
                              cand: torch.Tensor, avail: torch.Tensor | None = None,
                              block_n: int | None = None, num_warps: int | None = None,
                              num_stages: int = 3, q_fp4: bool = False,
                              fold: bool | None = None,
                              blocks_per_cta: int | None = None, gluon: bool | None = None,
                              maxnreg: int | None = GLUON_MAXNREG,
                              gluon_block_n: int | None = None) -> torch.Tensor:
        """Launcher: fp32 scores [T, N], -inf where cand < 0. With `avail` [T] (token t's
        visible candidates are its first avail[t] columns, as the batches build them) the
        columns from the end of the block holding column avail[t] on are left unwritten:
        under CUDA graphs N follows the graphs' context length, and the work then follows
        the context. `q_fp4`: q is on the FP4 grid (e2m1 x a power of two per 32 dims), so
        packed keys of C = 128 may take the FP8 kernel (exact products; only the fp32 sums
        of the 4 blocks' partial products round, in another order than the bf16 MMA's).
        `fold` (FP8 kernel; None: from FOLD_FROM_COLUMNS columns T x N): the query and key
        scales taken out of the MMA loop (`_q_folded`, `_key_fold`; the same scores with fewer
        instructions and registers): on an H200, 32 tokens, 64 heads, 8K / 32K / 128K context
        13.4 / 33.3 / 100.3 -> 10.9 / 24.4 / 66.6 us; one token at 32K 3.7 -> 4.4 us (one key
        block a CTA: the longer query preparation shows). Under CUDA graphs N is the graph's
        width, so the choice follows the captured context band, not the batch's context.
        `blocks_per_cta` overrides the key blocks a CTA scores (benchmarks' launch sweeps).
        The FP8 case runs the Gluon kernel (`indexer_wg.py`: the same scores up to the head
        sum's order, fewer instructions) where it builds, unless `fold` is given, `gluon` is
        False or DSV4_INDEXER_GLUON=0; `maxnreg` caps its registers (16 warps an SM at 128),
        `gluon_block_n` sets its keys a step (64 or 128; `GLUON_BLOCK_N`)."""
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
        fp8 = packed and q_fp4 and C == 128 and q.dtype == torch.bfloat16
        if fp8:  # 64 keys a block, 4 warps (H200 launch sweep, 32 tokens: 32K context
            # 32.6 us against 36.5 with 8 warps and ~40 for the bf16 decode of packed keys;
            # 128K 95.8 against 114.4)
            block_n, num_warps = block_n or 64, num_warps or 4
        elif block_n is None:  # H200 sweep, 32 tokens: 128 up to 8K columns (32K context: bf16
            # keys 39.1 -> 31.2 us, packed 41.0 -> ~40), 64 beyond (128K context: 128 is slower)
            block_n = 128 if N <= 8192 else 64
        num_warps = num_warps or 4
        n_blocks = triton.cdiv(N, block_n)
        sms = num_sms(q.device)
        # enough CTAs to fill the GPU in one wave of 4 an SM, each long enough to amortise its
        # query load: rounding the blocks a CTA up, not down (which left a second, short wave).
        # H200, FP8 kernel, 32 tokens (`bench_attention.py --only indexer --indexer-waves`,
        # twenty-ninth session): 8K / 32K / 128K context 10.4 / 23.8 / 65.3 -> 7.7 / 19.2 / 64.4 us
        bpc = blocks_per_cta or max(1, min(n_blocks, -(-T * n_blocks // (4 * sms))))
        bh = max(16, triton.next_power_of_2(NI))
        if (fp8 and fold is None and block_n == 64 and bh <= 128
                and (INDEXER_GLUON if gluon is None else gluon)
                and _gluon_scores(q, w, keys, cand, avail, out, blocks_per_cta, bh, maxnreg,
                                  gluon_block_n or GLUON_BLOCK_N)):
            return out
        if fp8:
            _indexer_scores_fp8_kernel[(T, triton.cdiv(n_blocks, bpc))](
                q, w, keys, cand, cand if avail is None else avail.contiguous(), out, N, NI,
                bpc, q.stride(0), q.stride(1), w.stride(0), keys.stride(0), cand.stride(0),
                out.stride(0), BLOCK_H=bh, BLOCK_N=block_n, HAS_AVAIL=avail is not None,
                ASM=not _INTERPRET,
                FOLD=T * N >= FOLD_FROM_COLUMNS if fold is None else fold,
                num_warps=num_warps, num_stages=num_stages, **pdl())
            return out
        _indexer_scores_kernel[(T, triton.cdiv(n_blocks, bpc))](
            q, w, keys, cand, cand if avail is None else avail.contiguous(), out, N, NI, bpc,
            q.stride(0), q.stride(1), w.stride(0), keys.stride(0), cand.stride(0), out.stride(0),
            C=C, BLOCK_H=bh, BLOCK_N=block_n, IEEE=q.dtype == torch.float32, PACKED=packed,
            HAS_AVAIL=avail is not None,
            num_warps=num_warps, num_stages=num_stages, **pdl())
        return out


def indexer_scores(q, w, keys, cand, avail=None, q_fp4=False):
    """Scores [T, N]; with `avail` the kernel may leave columns past avail[t] unwritten (see
    `indexer_scores_triton`), so only a top-k given the same `avail` may read them."""
    if (use_triton(q) and q.dtype in (torch.bfloat16, torch.float32)
            and keys.dtype in (q.dtype, torch.uint8)):
        return indexer_scores_triton(q, w, keys, cand, avail, q_fp4=q_fp4)
    return indexer_scores_ref(q, w, keys, cand)


def indexer_topk(q, w, keys, cand, topk, reduce=None, avail=None, q_fp4=False):
    """`reduce` (tensor parallelism) sums the partial scores of each rank's heads before the
    selection; `avail` [T]: the number of leading visible columns of each token's candidates
    (the rest are -1), so that the GPU work follows the context, not the width of `cand`;
    `q_fp4`: see `indexer_scores_triton`."""
    score = indexer_scores(q, w, keys, cand, avail, q_fp4)
    if reduce is not None:
        score = reduce(score)
    return select_topk(score, cand, topk, avail)
