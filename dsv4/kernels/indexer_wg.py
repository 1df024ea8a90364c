"""Indexer scores over packed FP4 keys, written in Gluon for sm_90's FP8 wgmma.

Same contract as `indexer._indexer_scores_fp8_kernel` with folded scales (C = 128, queries on
the FP4 grid): scores [T, N] = sum_h w_h relu(q_h . k) over each token's candidate keys, -inf
where a candidate is not visible; with `avail` the columns past the block holding avail[t] are
left unwritten. The scores are the Triton kernel's up to the order of fp32 sums.

Why a second kernel: the Triton one is issue-bound (Nsight Compute at 32K context: DRAM 23%, the
SM busy on the ALU), at ~444 instructions a warp per 64 keys, most of them byte shuffles that
move decoded keys into the MMA operand's layout. Here the keys are the A operand, in registers:
of the m64nHk32 wgmma's fragment a thread holds, for two key rows, dims 4c..4c+3 and
16+4c..16+4c+3 of each 32-dim block (c = lane % 4), and the packed layout
(`kernels/index_fp4.py`) stores exactly those 8 codes of a block as one 4-byte word, a thread's
4 words of a row contiguous. So each thread loads 16 bytes a row and decodes them where the
operand needs them: two `prmt` lookups in per-key tables and two for the signs a word
(`FOLDED_E2M1_E4M3_PTX`), no shuffles. The queries, folded to e4m3 with one power of two a
head (`_q_folded`), wait in shared memory as the B operand for all of the CTA's key blocks.

Scales: where a token's queries fold (one power of two a head) and a key's 4 scale bytes lie
within 11 binades (`_key_fold`), the 4 blocks' products chain in one accumulator and both scales
leave the loop (`_fast_loop`); keys that do not fold are not written there but rescored in a
second pass with per-block scales (`_slow_loop`: the 4 products apart, each scaled by its key
block's and query block's scales, the queries re-coded per block), which runs only for a CTA
that met one (or for all keys of a token whose queries do not fold). Both paths are exact
products summed in fp32. Two warpgroups a CTA (BN = 128 keys a step, `indexer.GLUON_BLOCK_N`)
share one query preparation.
"""
from __future__ import annotations

from .indexer import FOLDED_E2M1_E4M3_PTX
from .pdl import gluon_pdl_start

try:  # Gluon is experimental; without it (or on an API change) the Triton kernel runs
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared,
                                                                  warpgroup_mma,
                                                                  warpgroup_mma_wait)
    HAS_GLUON = True
except Exception:  # noqa: BLE001
    HAS_GLUON = False


if HAS_GLUON:
    # the word in $2 (4 copies: $2..$5), the key's tables in $6 and $10
    _PTX: gl.constexpr = gl.constexpr(FOLDED_E2M1_E4M3_PTX.format(p="$2", t0="$6", t1="$10"))

    @gluon.jit
    def _rows(cand_row, N, start, live, ROWS: gl.constexpr, BN: gl.constexpr):
        """The cache rows of the key block from candidate column `start` (-1 where not
        visible, and everywhere unless live)."""
        n = start + gl.arange(0, BN, ROWS)
        return gl.load(cand_row + n, mask=(n < N) & live, other=-1)

    @gluon.jit
    def _key_words(keys_ptr, stride_kn, row, ROWS: gl.constexpr, P3: gl.constexpr):
        """The packed words [BN, 4, 4] (row, lane c, block b: bytes 16c + 4b; a thread's 16
        bytes of a row contiguous) and the 4 scale bytes as one int32 of key rows `row` (zeros
        where not visible: row < 0)."""
        vis = row >= 0
        base = keys_ptr + gl.where(vis, row, 0).to(gl.int64) * stride_kn
        c = gl.arange(0, 4, gl.SliceLayout(0, gl.SliceLayout(2, P3)))
        b = gl.arange(0, 4, gl.SliceLayout(0, gl.SliceLayout(1, P3)))
        wp = base.to(gl.pointer_type(gl.int32))
        at = (gl.expand_dims(gl.expand_dims(wp, 1), 2) + gl.expand_dims(gl.expand_dims(c * 4, 0), 2)
              + gl.expand_dims(gl.expand_dims(b, 0), 1))
        m3 = gl.expand_dims(gl.expand_dims(vis, 1), 2)
        words = gl.load(at, mask=m3, other=0)
        e = gl.load((base + 64).to(gl.pointer_type(gl.int32)), mask=vis, other=0)
        return words, e

    @gluon.jit
    def _as16(v, P3: gl.constexpr, BN: gl.constexpr):
        """A per-row-and-lane int32 [BN, 4] (or [BN, 1]: per row) as the decode's [BN, 16]:
        each value 4 times, one register element group (the asm reads the first)."""
        v3 = gl.broadcast(gl.expand_dims(v, 2), gl.full([BN, 4, 4], 0, gl.int32, P3))[0]
        return gl.reshape(v3, (BN, 16))

    @gluon.jit
    def _decode(word, t0, t1, P3: gl.constexpr, DOT_A: gl.constexpr, BN: gl.constexpr):
        """A block's words [BN, 4 lanes] -> its A operand [BN, 32] e4m3: code k of the block
        -> the table byte of its magnitude (t0: 0..3, t1: 4..7), sign copied."""
        lo, hi = gl.inline_asm_elementwise(
            asm=_PTX, constraints="=r,=r,r,r,r,r,r,r,r,r,r,r,r,r",
            args=[_as16(word, P3, BN), _as16(gl.expand_dims(t0, 1), P3, BN),
                  _as16(gl.expand_dims(t1, 1), P3, BN)],
            dtype=(gl.uint8, gl.uint8), is_pure=True, pack=4)
        # lo: codes 4c..4c+3 of the block, hi: 16+4c..16+4c+3 (each [BN, 16] in lane order)
        a = gl.reshape(gl.permute(gl.join(lo, hi), (0, 2, 1)), (BN, 32))
        return gl.convert_layout(a.to(gl.float8e4nv, bitcast=True), DOT_A)

    @gluon.jit
    def _block_words(words, P3: gl.constexpr, BN: gl.constexpr):
        """[BN, 4, 4] words -> the 4 blocks' [BN, 4] (register splits, no data movement)."""
        x = gl.reshape(words, (BN, 4, 2, 2))
        even, odd = gl.split(x)
        w0, w2 = gl.split(even)
        w1, w3 = gl.split(odd)
        PK: gl.constexpr = gl.SliceLayout(2, P3)
        return (gl.convert_layout(w0, PK), gl.convert_layout(w1, PK),
                gl.convert_layout(w2, PK), gl.convert_layout(w3, PK))

    @gluon.jit
    def _tables(d):
        """The e4m3 codes of the e2m1 magnitudes 0, 0.5, 1, 1.5 (t0) and 2, 3, 4, 6 (t1) times
        2^(d - 6) (d in 1..12), one byte each."""
        return 0x0C080000 + d * 0x08080800, 0x1C181410 + d * 0x08080808

    @gluon.jit
    def _q_block(q_row, hmask, b: gl.constexpr, LQ: gl.constexpr):
        """Dims 32b..32b+31 of the token's queries, fp32 [BH, 32]."""
        k = gl.arange(0, 32, gl.SliceLayout(0, LQ))
        return gl.load(q_row + 32 * b + gl.expand_dims(k, 0), mask=gl.expand_dims(hmask, 1),
                       other=0.0).to(gl.float32)

    @gluon.jit
    def _amax_exp(x):
        """Biased exponent of each row's amax (0 for an all-zero row)."""
        return (gl.max(gl.abs(x), 1).to(gl.int32, bitcast=True) >> 23) & 0xFF

    @gluon.jit
    def _q_folded(q_smem, q_row, hmask, BH: gl.constexpr, LQ: gl.constexpr):
        """The token's queries as 4 e4m3 blocks sharing one power of two a head, into q_smem
        [4 BH, 32]; returns that power sq [BH] and whether every head folds (`indexer._q_folded`:
        the same rule and codes)."""
        x0 = _q_block(q_row, hmask, 0, LQ)
        x1 = _q_block(q_row, hmask, 1, LQ)
        x2 = _q_block(q_row, hmask, 2, LQ)
        x3 = _q_block(q_row, hmask, 3, LQ)
        e0, e1, e2, e3 = _amax_exp(x0), _amax_exp(x1), _amax_exp(x2), _amax_exp(x3)
        eb = gl.maximum(gl.maximum(e0, e1), gl.maximum(e2, e3))
        lo = gl.minimum(gl.minimum(gl.where(e0 > 0, e0, 255), gl.where(e1 > 0, e1, 255)),
                        gl.minimum(gl.where(e2 > 0, e2, 255), gl.where(e3 > 0, e3, 255)))
        live = eb >= 9
        # a nonzero block of amax below 2^-124 (zero codes per block): such a head does not fold
        tiny = (((e0 < 3) & (gl.max(gl.abs(x0), 1) > 0.0))
                | ((e1 < 3) & (gl.max(gl.abs(x1), 1) > 0.0))
                | ((e2 < 3) & (gl.max(gl.abs(x2), 1) > 0.0))
                | ((e3 < 3) & (gl.max(gl.abs(x3), 1) > 0.0)))
        ok = gl.max(gl.where(live & ~tiny, eb - lo, gl.where((eb >= 3) | tiny, 15, 0)), 0) <= 14
        sq = gl.where(live, ((eb - 8) << 23).to(gl.float32, bitcast=True), 0.0)
        inv = gl.where(live, ((262 - eb) << 23).to(gl.float32, bitcast=True), 0.0)  # 1 / sq
        inv = gl.expand_dims(inv, 1)
        q_smem.slice(0, BH).store((x0 * inv).to(gl.float8e4nv))
        q_smem.slice(BH, BH).store((x1 * inv).to(gl.float8e4nv))
        q_smem.slice(2 * BH, BH).store((x2 * inv).to(gl.float8e4nv))
        q_smem.slice(3 * BH, BH).store((x3 * inv).to(gl.float8e4nv))
        return sq, ok

    @gluon.jit
    def _slow_block(words, e, q_row, hmask, w, q2_smem, P3: gl.constexpr, DOT_A: gl.constexpr,
                    MMA: gl.constexpr, LQ: gl.constexpr, BN: gl.constexpr, BH: gl.constexpr):
        """Scores of a key block with per-block scales (keys or queries that do not fold): per
        32-dim block b, the keys' exact e2m1 values (tables at d = 6) times the queries' block
        re-coded to e4m3 with its own power of two sq_b a head (`indexer._q_block_e4m3`), then
        times 2^(e_b - 127) and sq_b in fp32."""
        w0, w1, w2, w3 = _block_words(words, P3, BN)
        t0, t1 = _tables(gl.full([BN], 6, gl.int32, gl.SliceLayout(1, gl.SliceLayout(2, P3))))
        ROWS_M: gl.constexpr = gl.SliceLayout(1, MMA)
        COLS_M: gl.constexpr = gl.SliceLayout(0, MMA)
        zero = gl.zeros([BN, BH], gl.float32, MMA)
        acc = zero
        for b in gl.static_range(4):
            if b == 0:
                wb = w0
            elif b == 1:
                wb = w1
            elif b == 2:
                wb = w2
            else:
                wb = w3
            x = _q_block(q_row, hmask, b, LQ)
            eb = _amax_exp(x)
            live = eb >= 3
            sq = gl.where(live, ((eb - 2) << 23).to(gl.float32, bitcast=True), 0.0)
            inv = gl.where(live, ((256 - eb) << 23).to(gl.float32, bitcast=True), 0.0)
            gl.thread_barrier()  # every warp's earlier reads of q2_smem are done
            q2_smem.store((x * gl.expand_dims(inv, 1)).to(gl.float8e4nv))
            fence_async_shared()
            gl.thread_barrier()
            a = _decode(wb, t0, t1, P3, DOT_A, BN)
            d = warpgroup_mma(a, q2_smem.permute((1, 0)), zero, use_acc=False, is_async=True)
            d = warpgroup_mma_wait(num_outstanding=0, deps=(d, ))
            sk = gl.convert_layout((((e >> (8 * b)) & 0xFF) << 23).to(gl.float32, bitcast=True),
                                   ROWS_M)
            acc = acc + d * gl.expand_dims(sk, 1) * gl.expand_dims(gl.convert_layout(sq, COLS_M), 0)
        return gl.sum(gl.maximum(acc, 0.0) * gl.expand_dims(w, 0), axis=1)

    @gluon.jit
    def _key_fold(e):
        """Per key (e: its 4 scale bytes as one int32): the 4 bytes, the largest (emax), and
        whether the key folds (`indexer._key_fold`: blocks within 11 binades, emax >= 7)."""
        b0, b1 = e & 0xFF, (e >> 8) & 0xFF
        b2, b3 = (e >> 16) & 0xFF, (e >> 24) & 0xFF
        emax = gl.maximum(gl.maximum(b0, b1), gl.maximum(b2, b3))
        lo = gl.minimum(gl.minimum(b0, b1), gl.minimum(b2, b3))
        return b0, b1, b2, b3, emax, (emax - lo <= 11) & (emax >= 7)

    @gluon.jit
    def _fast_block(q_smem, wq, words, e, row, blk, N, out_row, P3: gl.constexpr,
                    DOT_A: gl.constexpr, MMA: gl.constexpr, BN: gl.constexpr,
                    BH: gl.constexpr):
        """Scores of key block blk (its words, scale words e and rows, -1 where not visible)
        with folded scales: the 4 blocks' products chained in one accumulator (queries
        q_smem, their power of two in wq), each key's decoded at 2^(6 - emax + e_b) and
        scaled by 2^(emax - 133) after the head sum. Keys that do not fold are not written;
        returns which visible ones did not."""
        ROWS_M: gl.constexpr = gl.SliceLayout(1, MMA)
        zero = gl.zeros([BN, BH], gl.float32, MMA)
        b0, b1, b2, b3, emax, kok = _key_fold(e)
        w0, w1, w2, w3 = _block_words(words, P3, BN)
        t0, t1 = _tables(b0 - emax + 12)
        a0 = _decode(w0, t0, t1, P3, DOT_A, BN)
        acc = warpgroup_mma(a0, q_smem.slice(0, BH).permute((1, 0)), zero, use_acc=False,
                            is_async=True)
        t0, t1 = _tables(b1 - emax + 12)
        a1 = _decode(w1, t0, t1, P3, DOT_A, BN)
        acc = warpgroup_mma(a1, q_smem.slice(BH, BH).permute((1, 0)), acc, is_async=True)
        t0, t1 = _tables(b2 - emax + 12)
        a2 = _decode(w2, t0, t1, P3, DOT_A, BN)
        acc = warpgroup_mma(a2, q_smem.slice(2 * BH, BH).permute((1, 0)), acc, is_async=True)
        t0, t1 = _tables(b3 - emax + 12)
        a3 = _decode(w3, t0, t1, P3, DOT_A, BN)
        acc = warpgroup_mma(a3, q_smem.slice(3 * BH, BH).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        sk = gl.convert_layout(((emax - 6) << 23).to(gl.float32, bitcast=True), ROWS_M)
        score = gl.sum(gl.maximum(acc, 0.0) * gl.expand_dims(wq, 0), axis=1) * sk
        n_m = blk * BN + gl.arange(0, BN, ROWS_M)
        vis_m = gl.convert_layout(row, ROWS_M) >= 0
        gl.store(out_row + n_m, gl.where(vis_m, score, float("-inf")),
                 mask=(n_m < N) & (gl.convert_layout(kok, ROWS_M) | ~vis_m))
        return ((row >= 0) & ~kok).to(gl.int32)

    @gluon.jit
    def _fast_loop(q_smem, wq, cand_row, keys_ptr, stride_kn, N, out_row, first, last,
                   words, e, row, row1, P3: gl.constexpr, DOT_A: gl.constexpr,
                   MMA: gl.constexpr, BN: gl.constexpr, BH: gl.constexpr):
        """`_fast_block` over key blocks [first, last), keys one block ahead in registers,
        their rows two; returns whether a visible key did not fold (its score is not
        written). The first block's keys (words, e, rows) and the second's rows come loaded.
        (Two blocks a trip, so that no loop-carried copy waits on a load, measured no
        faster.)"""
        ROWS: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, P3))
        stray = gl.zeros([BN], gl.int32, ROWS)
        for blk in range(first, last):
            words_cur, e_cur, row_cur = words, e, row
            row = row1
            words, e = _key_words(keys_ptr, stride_kn, row1, ROWS, P3)
            row1 = _rows(cand_row, N, (blk + 2) * BN, blk + 2 < last, ROWS, BN)
            stray = stray | _fast_block(q_smem, wq, words_cur, e_cur, row_cur, blk, N, out_row,
                                        P3, DOT_A, MMA, BN, BH)
        return gl.max(stray, 0) > 0

    @gluon.jit
    def _slow_loop(q_row, hmask, w, q2_smem, cand_row, keys_ptr, stride_kn, N, out_row, first,
                   last, only_left, P3: gl.constexpr, DOT_A: gl.constexpr, MMA: gl.constexpr,
                   LQ: gl.constexpr, BN: gl.constexpr, BH: gl.constexpr):
        """Key blocks [first, last) with per-block scales (`_slow_block`): every key, or
        (only_left) the visible keys that do not fold; rare, so a block is skipped unless one
        of its keys needs it."""
        ROWS: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, P3))
        ROWS_M: gl.constexpr = gl.SliceLayout(1, MMA)
        for blk in range(first, last):
            n = blk * BN + gl.arange(0, BN, ROWS)
            row = _rows(cand_row, N, blk * BN, True, ROWS, BN)
            vis = row >= 0
            words, e = _key_words(keys_ptr, stride_kn, row, ROWS, P3)
            kok = _key_fold(e)[5]
            todo = (n < N) & (~only_left | (vis & ~kok))
            if gl.max(todo.to(gl.int32), 0) > 0:
                score = _slow_block(words, e, q_row, hmask, w, q2_smem, P3, DOT_A, MMA, LQ, BN,
                                    BH)
                n_m = gl.convert_layout(n, ROWS_M)
                gl.store(out_row + n_m,
                         gl.where(gl.convert_layout(vis, ROWS_M), score, float("-inf")),
                         mask=gl.convert_layout(todo, ROWS_M))

    @gluon.jit(do_not_specialize=["N", "blocks_per_cta"])
    def _indexer_fp8_wg_kernel(q_ptr, w_ptr, keys_ptr, cand_ptr, avail_ptr, out_ptr, N, NI,
                               blocks_per_cta, stride_qt, stride_qh, stride_wt, stride_kn,
                               stride_ct, stride_ot, BH: gl.constexpr, HAS_AVAIL: gl.constexpr,
                               BN: gl.constexpr = 64, PDL: gl.constexpr = False):
        """Grid (T, CTAs a token), BN / 16 warps (BN 64: one warpgroup, or 128: two, each its
        64 keys of a step, sharing the queries): the CTA's key blocks of BN of token t."""
        W: gl.constexpr = BN // 16
        MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[W, 1],
                                                      instr_shape=[16, BH, 32])
        DOT_A: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=4)
        # [BN rows, 4 lanes c, 4]: a thread holds rows r and r + 8 of its warp's 16, lane c's
        # 4 elements (the 4 blocks' words as loaded; each word's 4 copies in the decode)
        WB: gl.constexpr = [[16, 0, 0], [32, 0, 0]] if BN == 64 else [[16, 0, 0], [32, 0, 0],
                                                                      [64, 0, 0]]
        P3: gl.constexpr = gl.DistributedLinearLayout(
            reg_bases=[[0, 0, 1], [0, 0, 2], [8, 0, 0]],
            lane_bases=[[0, 1, 0], [0, 2, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
            warp_bases=WB, block_bases=[], shape=[BN, 4, 4])
        ROWS: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, P3))
        COLS_M: gl.constexpr = gl.SliceLayout(0, MMA)
        LQ: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [W, 1], [1, 0])
        SQ: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BH, 32], gl.float8e4nv)

        gluon_pdl_start(PDL)
        t = gl.program_id(0).to(gl.int64)
        first = gl.program_id(1) * blocks_per_cta
        n_end = N
        if HAS_AVAIL:  # only the first avail[t] columns can be visible: skip the rest
            n_end = gl.minimum(N, gl.load(avail_ptr + t).to(gl.int32))
        last = gl.minimum(first + blocks_per_cta, gl.cdiv(n_end, BN))
        if first >= last:
            return
        cand_row = cand_ptr + t * stride_ct
        out_row = out_ptr + t * stride_ot
        # the first key block and the second's rows, in flight while the queries are prepared
        row = _rows(cand_row, N, first * BN, True, ROWS, BN)
        words, e = _key_words(keys_ptr, stride_kn, row, ROWS, P3)
        row1 = _rows(cand_row, N, (first + 1) * BN, first + 1 < last, ROWS, BN)

        hq = gl.arange(0, BH, gl.SliceLayout(1, LQ))
        hmask = hq < NI
        q_row = gl.expand_dims(q_ptr + t * stride_qt + hq * stride_qh, 1)
        q_smem = gl.allocate_shared_memory(gl.float8e4nv, [4 * BH, 32], SQ)
        q2_smem = gl.allocate_shared_memory(gl.float8e4nv, [BH, 32], SQ)
        sq, q_ok = _q_folded(q_smem, q_row, hmask, BH, LQ)
        fence_async_shared()
        gl.thread_barrier()
        hw = gl.arange(0, BH, COLS_M)
        w = gl.load(w_ptr + t * stride_wt + hw, mask=hw < NI, other=0.0).to(gl.float32)
        wq = w * gl.convert_layout(sq, COLS_M)  # the queries' power of two, out of the relu

        left = True  # keys left to the per-block pass: all of them unless the queries fold
        if q_ok:
            left = _fast_loop(q_smem, wq, cand_row, keys_ptr, stride_kn, N, out_row, first,
                              last, words, e, row, row1, P3, DOT_A, MMA, BN, BH)
        if left:
            _slow_loop(q_row, hmask, w, q2_smem, cand_row, keys_ptr, stride_kn, N, out_row,
                       first, last, q_ok, P3, DOT_A, MMA, LQ, BN, BH)
