"""Hopper (sm_90) sparse attention written in Gluon: bf16 or packed FP8 rows, 64 heads a CTA.

Same contract and launch as `_sparse_attn_kernel` in `sparse_attention.py`, which stays the
reference kernel and the fallback. Why a second kernel: with 8 warps and 64 heads, Triton lays
out Q K^T (whose result feeds the P V product) with every warp along the head axis, so both
warpgroups compute the whole 64 x BK logit tile and the softmax twice. Here the layouts are
explicit: each warpgroup computes the logits of half the tile's rows, the row statistics are
reduced across the two, and each warpgroup then accumulates half of the D output dims from the
whole P tile (the FlashMLA split). Rows arrive by cp.async gathers into a ring of NUM_BUF shared
buffers; each tile's row slots are read one iteration ahead of their copies. Packed FP8 rows
(`kv_fp8.py`) are staged as bytes and decoded into one bf16 tile before the products, by
integer bit placement and bf16 products by powers of two (`_e4m3_bf16`: no conversion-unit
instructions, which issue at 16 lanes a clock; 5-8% faster than e4m3 -> f16 -> bf16
conversions at batch 32-128 on an H200, performance log).

Each step takes turns: Q K^T, the softmax, P V (and for FP8 rows the decode first). Overlapping
them with the P V product (the next tile's decode into a second bf16 tile, or the next tile's
Q K^T and softmax as in FlashAttention-3) measured slower at every shape (performance log).
"""
from __future__ import annotations

try:  # Gluon is experimental; without it (or on an API change) the Triton kernel runs
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
    from triton.experimental.gluon.language.nvidia.hopper import (warpgroup_mma,
                                                                  warpgroup_mma_wait)
    HAS_GLUON = True
except Exception:  # noqa: BLE001
    HAS_GLUON = False

if HAS_GLUON:
    from .kv_fp8 import E4M3_BF16_PTX

    _E4M3_BF16_PTX: gl.constexpr = gl.constexpr(E4M3_BF16_PTX)

    @gluon.jit
    def _slots(tile, hi, win_idx_row, cmp_idx_row, Kw, Kc, n_win_tiles,
               BLOCK_K: gl.constexpr, L: gl.constexpr):
        """Row slots of one tile of a token's list (window tiles first), -1 where empty or past
        this CTA's last tile `hi`."""
        is_win = tile < n_win_tiles
        kpos = gl.where(is_win, tile, tile - n_win_tiles) * BLOCK_K + gl.arange(0, BLOCK_K, L)
        kmask = (kpos < gl.where(is_win, Kw, Kc)) & (tile < hi)
        return gl.load(gl.where(is_win, win_idx_row, cmp_idx_row) + kpos, mask=kmask, other=-1)

    @gluon.jit
    def _gather(buf, idx, tile, n_win_tiles, win_cache_ptr, win_new_ptr, cmp_cache_ptr, Nw,
                row_stride, D: gl.constexpr, LOAD: gl.constexpr):
        """cp.async of the tile's rows into `buf` [BK, D]; empty slots are zero-filled."""
        is_win = tile < n_win_tiles
        idx = idx.to(gl.int64)
        valid = idx >= 0
        is_new = is_win & (idx >= Nw)
        off = gl.where(valid & ~is_new, idx, 0) * row_stride
        cache_row = gl.where(is_win, win_cache_ptr, cmp_cache_ptr) + off
        new_row = win_new_ptr + gl.where(valid & is_new, idx - Nw, 0) * D
        d = gl.arange(0, D, gl.SliceLayout(0, LOAD))
        ptr = gl.where(is_new[:, None], new_row[:, None], cache_row[:, None]) + d[None, :]
        cp.async_copy_global_to_shared(buf, ptr, mask=valid[:, None])

    @gluon.jit
    def _gather_fp8(cbuf, rbuf, sbuf, idx, tile, n_win_tiles, win_cache_ptr, win_new_ptr,
                    cmp_cache_ptr, Nw, row_stride, NOPE: gl.constexpr, ROPE: gl.constexpr,
                    LC: gl.constexpr, LR: gl.constexpr, LS: gl.constexpr,
                    NEW_FP8: gl.constexpr):
        """cp.async of the packed FP8 rows' parts (`kv_fp8.py`): e4m3 codes -> cbuf [BK, 512]
        (the first NOPE bytes), bf16 rope dims -> rbuf [BK, ROPE], scale bytes -> sbuf [BK, 8].
        This step's new rows are copied from win_new packed alike when NEW_FP8, else not
        copied (the decode reads them)."""
        is_win = tile < n_win_tiles
        idx = gl.convert_layout(idx, gl.SliceLayout(1, LC)).to(gl.int64)
        is_new = is_win & (idx >= Nw)
        if NEW_FP8:
            cached = idx >= 0
            off = gl.multiple_of(gl.where(cached, gl.where(is_new, idx - Nw, idx), 0)
                                 * row_stride, 8)
            row = gl.where(is_new, win_new_ptr, gl.where(is_win, win_cache_ptr,
                                                         cmp_cache_ptr)) + off
        else:
            cached = (idx >= 0) & ~is_new
            off = gl.multiple_of(gl.where(cached, idx, 0) * row_stride, 8)  # 8-byte words
            row = gl.where(is_win, win_cache_ptr, cmp_cache_ptr) + off
        d = gl.arange(0, 512, gl.SliceLayout(0, LC))
        cp.async_copy_global_to_shared(cbuf, row[:, None] + d[None, :],
                                       mask=cached[:, None] & (d < NOPE)[None, :])
        rrow = gl.convert_layout(row, gl.SliceLayout(1, LR))
        rptr = gl.multiple_of((rrow + NOPE).to(gl.pointer_type(gl.bfloat16), bitcast=True), 4)
        dr = gl.arange(0, ROPE, gl.SliceLayout(0, LR))
        cp.async_copy_global_to_shared(rbuf, rptr[:, None] + dr[None, :],
                                       mask=gl.convert_layout(cached, gl.SliceLayout(1, LR))[:, None])
        srow = gl.convert_layout(row, gl.SliceLayout(1, LS))
        g = gl.arange(0, 8, gl.SliceLayout(0, LS))
        cp.async_copy_global_to_shared(sbuf, srow[:, None] + (NOPE + 2 * ROPE) + g[None, :],
                                       mask=gl.convert_layout(cached, gl.SliceLayout(1, LS))[:, None])

    @gluon.jit
    def _decode_fp8(kbuf, cbuf, rbuf, sbuf, idx, tile, n_win_tiles, win_new_ptr, Nw,
                    D: gl.constexpr, NOPE: gl.constexpr, ROPE: gl.constexpr, DEC: gl.constexpr,
                    NEW_FP8: gl.constexpr):
        """Staged FP8 rows -> bf16 rows in kbuf [BK, D], exactly (an e4m3 value times a power of
        two); this step's new rows come from win_new instead, unless they were staged packed
        (NEW_FP8)."""
        is_new = (tile < n_win_tiles) & (idx >= Nw)
        new_row = win_new_ptr + gl.where(is_new, idx - Nw, 0).to(gl.int64) * D
        d = gl.arange(0, 64, gl.SliceLayout(0, DEC))
        win_tile = tile < n_win_tiles  # only window tiles can hold new rows
        for g in gl.static_range(NOPE // 64):
            code = cbuf.slice(64 * g, 64, dim=1).load(DEC)
            v = _e4m3_bf16(code, sbuf.slice(g, 1, dim=1).load(DEC).to(gl.int32))
            v = _new_rows(v, new_row, 64 * g, is_new, d, win_tile, NEW_FP8)
            kbuf.slice(64 * g, 64, dim=1).store(v)
        for g in gl.static_range(ROPE // 64):
            r = rbuf.slice(64 * g, 64, dim=1).load(DEC)
            r = _new_rows(r, new_row, NOPE + 64 * g, is_new, d, win_tile, NEW_FP8)
            kbuf.slice(NOPE + 64 * g, 64, dim=1).store(r)

    @gluon.jit
    def _new_rows(v, new_row, col: gl.constexpr, is_new, d, win_tile, NEW_FP8: gl.constexpr):
        """v [BK, 64] (columns col.. of a tile) with this step's new rows read from win_new
        (bf16), unless they were staged packed like the cached ones (NEW_FP8)."""
        if not NEW_FP8:
            if win_tile:
                kn = gl.load(new_row[:, None] + col + d[None, :], mask=is_new[:, None], other=0.0)
                v = gl.where(is_new[:, None], kn, v)
        return v

    @gluon.jit
    def _e4m3_bf16(code, sbyte):
        """e4m3 codes (uint8) times 2^(sbyte - 127) (sbyte int32, broadcast) -> exact bf16, on
        the integer and bf16 pipes rather than the conversion unit (an F2F per value, at 16
        lanes a clock): the 7 magnitude bits go into a bf16's exponent and
        mantissa (the value times 2^-120; e4m3 subnormals land on bf16 subnormals), the sign
        into bit 15; then two products by powers of two, 2^(min(s, 134) - 7) and
        2^(max(s, 134) - 134), each a normal bf16 for every scale byte (`kv_fp8.E4M3_BF16_PTX`)."""
        h = gl.inline_asm_elementwise(
            asm=_E4M3_BF16_PTX,
            constraints="=r,=r,r", args=[code], dtype=gl.bfloat16, is_pure=True, pack=4)
        s1 = gl.minimum(sbyte, 134)
        m1 = ((s1 + 120) << 7).to(gl.uint16).to(gl.bfloat16, bitcast=True)
        m2 = ((sbyte - s1 + 127) << 7).to(gl.uint16).to(gl.bfloat16, bitcast=True)
        return h * m1 * m2

    @gluon.jit
    def _softmax_step(s, valid, qk_scale, m_i, l_i, P_OP: gl.constexpr, HEADS_PV: gl.constexpr):
        """One tile's logits -> (P as the P V product's operand, the rescale of the output
        accumulator, the new running max and sum), in base 2."""
        s = gl.where(valid[None, :], s * qk_scale, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1))
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + gl.sum(p, 1)
        p_op = gl.convert_layout(p.to(gl.bfloat16), P_OP)
        return p_op, gl.convert_layout(alpha, HEADS_PV), m_new, l_i

    @gluon.jit
    def _cta_token(H, BLOCK_H: gl.constexpr, PDL: gl.constexpr):
        """(token t, head block hb, split sid) of this CTA, after PDL's wait and launch."""
        if PDL:  # programmatic dependent launch (`kernels/pdl.py`): wait, then let the next go
            gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32,
                                      is_pure=False, pack=1)
            gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [],
                                      dtype=gl.int32, is_pure=False, pack=1)
        pid = gl.program_id(0)
        n_hb = gl.cdiv(H, BLOCK_H)
        # head blocks of one token are adjacent: they share rows through L2; int64 offsets, as
        # T * H * D passes 2^31 at 32K tokens a step with 128 heads
        return (pid // n_hb).to(gl.int64), pid % n_hb, gl.program_id(1)

    @gluon.jit
    def _cta_rows(t, sid, Kc, n_win_tiles, n_tiles, tiles_per_split, cmp_len_ptr, win_idx_ptr,
                  cmp_idx_ptr, stride_wi, stride_ci, BLOCK_K: gl.constexpr,
                  HAS_LEN: gl.constexpr):
        """This split's tiles [lo, hi) of the token's list and the token's two slot rows."""
        lo = sid * tiles_per_split
        if HAS_LEN:  # the token's compressed rows are the first cmp_len[t] of its list
            n_tiles = n_win_tiles + gl.cdiv(gl.minimum(Kc, gl.load(cmp_len_ptr + t).to(gl.int32)),
                                            BLOCK_K)
        hi = gl.minimum(lo + tiles_per_split, n_tiles)
        return lo, hi, win_idx_ptr + t * stride_wi, cmp_idx_ptr + t * stride_ci

    @gluon.jit
    def _load_q(q_smem, q_ptr, t, hb, H, stride_qt, stride_qh, D: gl.constexpr,
                BLOCK_H: gl.constexpr, LOAD: gl.constexpr):
        """cp.async of the token's block of heads into q_smem [BLOCK_H, D] (committed)."""
        hq = hb * BLOCK_H + gl.arange(0, BLOCK_H, gl.SliceLayout(1, LOAD))
        dq = gl.arange(0, D, gl.SliceLayout(0, LOAD))
        cp.async_copy_global_to_shared(
            q_smem, q_ptr + t * stride_qt + hq[:, None] * stride_qh + dq[None, :],
            mask=(hq < H)[:, None])
        cp.commit_group()

    @gluon.jit
    def _softmax_start(sink_ptr, h, H, BLOCK_H: gl.constexpr, HEADS: gl.constexpr,
                       SPLIT: gl.constexpr):
        """The online softmax's running max and sum (base 2) before the first tile: from the
        sink (exp(sink - m) = 1), or empty in a split, whose partials the combine kernel merges
        with the sink."""
        if SPLIT:
            m_i = gl.full([BLOCK_H], -1.0e30, gl.float32, HEADS)
            l_i = gl.zeros([BLOCK_H], gl.float32, HEADS)
        else:
            m_i = gl.load(sink_ptr + h, mask=h < H, other=0.0).to(gl.float32) * 1.4426950408889634
            l_i = gl.full([BLOCK_H], 1.0, gl.float32, HEADS)
        return m_i, l_i

    @gluon.jit
    def _write_out(acc, m_i, l_i, o_ptr, part_o_ptr, part_ml_ptr, t, hb, sid, T, H, lo, hi,
                   stride_ot, stride_oh, D: gl.constexpr, BLOCK_H: gl.constexpr,
                   PV: gl.constexpr, SPLIT: gl.constexpr):
        """The token's heads' output (acc / l), or in a split its partial output, max and sum."""
        HEADS_PV: gl.constexpr = gl.SliceLayout(1, PV)
        ho = hb * BLOCK_H + gl.arange(0, BLOCK_H, HEADS_PV)
        do = gl.arange(0, D, gl.SliceLayout(0, PV))
        hmask = (ho < H)[:, None]
        l_o = gl.convert_layout(l_i, HEADS_PV)
        if SPLIT:
            base = (sid * T + t) * H + ho
            # an empty split leaves its output unwritten (`_combine_kernel`)
            gl.store(part_o_ptr + base[:, None] * D + do[None, :], acc, mask=hmask & (hi > lo))
            gl.store(part_ml_ptr + base * 2, gl.convert_layout(m_i, HEADS_PV), mask=ho < H)
            gl.store(part_ml_ptr + base * 2 + 1, l_o, mask=ho < H)
        else:
            o = acc / l_o[:, None]
            gl.store(o_ptr + t * stride_ot + ho[:, None] * stride_oh + do[None, :],
                     o.to(o_ptr.dtype.element_ty), mask=hmask)

    @gluon.jit(do_not_specialize=[
        "T", "Kc", "n_win_tiles", "n_tiles", "tiles_per_split"])
    def _sparse_attn_wg_kernel(q_ptr, sink_ptr, o_ptr, part_o_ptr, part_ml_ptr,
                               win_cache_ptr, win_new_ptr, win_idx_ptr, cmp_cache_ptr, cmp_idx_ptr,
                               cmp_len_ptr, T, H, Nw, Kw, Kc, n_win_tiles, n_tiles,
                               tiles_per_split,
                               stride_qt, stride_qh, stride_ot, stride_oh, stride_wi, stride_ci,
                               row_stride, qk_scale,
                               D: gl.constexpr, BLOCK_H: gl.constexpr, BLOCK_K: gl.constexpr,
                               NUM_BUF: gl.constexpr, SPLIT: gl.constexpr, FP8: gl.constexpr,
                               NOPE: gl.constexpr, ROPE: gl.constexpr,
                               HAS_LEN: gl.constexpr, NEW_FP8: gl.constexpr = False,
                               PDL: gl.constexpr = False):
        # 8 warps: warpgroup w computes logits of rows [w*BK/2, (w+1)*BK/2) of each tile and
        # output dims [w*D/2, (w+1)*D/2)
        LOAD: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [8, 1], [1, 0])
        QK: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                     instr_shape=[16, BLOCK_K // 2, 16])
        PV: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                     instr_shape=[16, D // 2, 16])
        P_OP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=PV, k_width=2)
        SMEM_Q: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, D], gl.bfloat16)
        SMEM_K: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_K, D], gl.bfloat16)
        # FP8 rows: packed parts staged by cp.async, decoded into one bf16 tile per step
        LC: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [8, 1], [1, 0])
        LR: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [8, 1], [1, 0])
        LS: gl.constexpr = gl.BlockedLayout([1, 8], [32, 1], [8, 1], [1, 0])
        RAW: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0])
        ROWS_LOAD: gl.constexpr = gl.SliceLayout(1, LOAD)
        COLS_QK: gl.constexpr = gl.SliceLayout(0, QK)
        HEADS_QK: gl.constexpr = gl.SliceLayout(1, QK)
        HEADS_PV: gl.constexpr = gl.SliceLayout(1, PV)

        t, hb, sid = _cta_token(H, BLOCK_H, PDL)

        m_i, l_i = _softmax_start(sink_ptr, hb * BLOCK_H + gl.arange(0, BLOCK_H, HEADS_QK), H,
                                  BLOCK_H, HEADS_QK, SPLIT)
        q_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_H, D], SMEM_Q)
        if FP8:
            k_smem = gl.allocate_shared_memory(gl.bfloat16, [1, BLOCK_K, D], SMEM_K)
            c_smem = gl.allocate_shared_memory(gl.uint8, [NUM_BUF, BLOCK_K, 512], RAW)
            r_smem = gl.allocate_shared_memory(gl.bfloat16, [NUM_BUF, BLOCK_K, ROPE], RAW)
            s_smem = gl.allocate_shared_memory(gl.uint8, [NUM_BUF, BLOCK_K, 8], RAW)
        else:
            k_smem = gl.allocate_shared_memory(gl.bfloat16, [NUM_BUF, BLOCK_K, D], SMEM_K)
        _load_q(q_smem, q_ptr, t, hb, H, stride_qt, stride_qh, D, BLOCK_H, LOAD)

        lo, hi, win_idx_row, cmp_idx_row = _cta_rows(t, sid, Kc, n_win_tiles, n_tiles,
                                                     tiles_per_split, cmp_len_ptr, win_idx_ptr,
                                                     cmp_idx_ptr, stride_wi, stride_ci, BLOCK_K,
                                                     HAS_LEN)
        acc = gl.zeros([BLOCK_H, D], gl.float32, PV)
        s0 = gl.zeros([BLOCK_H, BLOCK_K], gl.float32, QK)
        for j in gl.static_range(NUM_BUF - 1):  # prologue: the first NUM_BUF-1 tiles in flight
            idx = _slots(lo + j, hi, win_idx_row, cmp_idx_row, Kw, Kc, n_win_tiles, BLOCK_K,
                         ROWS_LOAD)
            if FP8:
                _gather_fp8(c_smem.index(j), r_smem.index(j), s_smem.index(j), idx, lo + j,
                            n_win_tiles, win_cache_ptr, win_new_ptr, cmp_cache_ptr, Nw,
                            row_stride, NOPE, ROPE, LC, LR, LS, NEW_FP8)
            else:
                _gather(k_smem.index(j), idx, lo + j, n_win_tiles, win_cache_ptr, win_new_ptr,
                        cmp_cache_ptr, Nw, row_stride, D, LOAD)
            cp.commit_group()
        nxt = lo + NUM_BUF - 1
        idx_next = _slots(nxt, hi, win_idx_row, cmp_idx_row, Kw, Kc, n_win_tiles, BLOCK_K,
                          ROWS_LOAD)

        for i in range(0, hi - lo):
            tile = lo + i
            # keep NUM_BUF-1 tiles in flight: gather tile i+NUM_BUF-1 into the buffer that
            # tile i-1 used (its products have completed), and fetch the slots after it
            nb = (i + NUM_BUF - 1) % NUM_BUF
            if FP8:
                _gather_fp8(c_smem.index(nb), r_smem.index(nb), s_smem.index(nb), idx_next,
                            tile + NUM_BUF - 1, n_win_tiles, win_cache_ptr, win_new_ptr,
                            cmp_cache_ptr, Nw, row_stride, NOPE, ROPE, LC, LR, LS, NEW_FP8)
            else:
                _gather(k_smem.index(nb), idx_next, tile + NUM_BUF - 1, n_win_tiles,
                        win_cache_ptr, win_new_ptr, cmp_cache_ptr, Nw, row_stride, D, LOAD)
            cp.commit_group()
            idx_next = _slots(tile + NUM_BUF, hi, win_idx_row, cmp_idx_row, Kw, Kc, n_win_tiles,
                              BLOCK_K, ROWS_LOAD)
            valid = _slots(tile, hi, win_idx_row, cmp_idx_row, Kw, Kc, n_win_tiles, BLOCK_K,
                           COLS_QK) >= 0
            cp.wait_group(NUM_BUF - 1)
            if FP8:
                kb = k_smem.index(0)
                b = i % NUM_BUF
                _decode_fp8(kb, c_smem.index(b), r_smem.index(b), s_smem.index(b),
                            _slots(tile, hi, win_idx_row, cmp_idx_row, Kw, Kc, n_win_tiles,
                                   BLOCK_K, gl.SliceLayout(1, LC)),
                            tile, n_win_tiles, win_new_ptr, Nw, D, NOPE, ROPE, LC, NEW_FP8)
            else:
                kb = k_smem.index(i % NUM_BUF)
            s = warpgroup_mma(q_smem, kb.permute((1, 0)), s0, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
            p_op, alpha, m_i, l_i = _softmax_step(s, valid, qk_scale, m_i, l_i, P_OP, HEADS_PV)
            acc = warpgroup_mma(p_op, kb, acc * alpha[:, None], is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        cp.wait_group(0)
        _write_out(acc, m_i, l_i, o_ptr, part_o_ptr, part_ml_ptr, t, hb, sid, T, H, lo, hi,
                   stride_ot, stride_oh, D, BLOCK_H, PV, SPLIT)
