"""Hopper (sm_90) sparse attention written in Gluon, for bf16 rows and 64 heads a CTA.

Same contract and launch as `_sparse_attn_kernel` in `sparse_attention.py`, which stays the
reference kernel and the fallback. Why a second kernel: with 8 warps and 64 heads, Triton lays
out Q K^T (whose result feeds the P V product) with every warp along the head axis, so both
warpgroups compute the whole 64 x BK logit tile and the softmax twice. Here the layouts are
explicit: each warpgroup computes the logits of half the tile's rows, the row statistics are
reduced across the two, and each warpgroup then accumulates half of the D output dims from the
whole P tile (the FlashMLA split). Rows arrive by cp.async gathers into a ring of NUM_BUF shared
buffers; each tile's row slots are read one iteration ahead of their copies.
"""
from __future__ import annotations

try:  # Gluon is experimental; without it (or on an API change) the Triton kernel runs
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
    from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma, warpgroup_mma_wait
    HAS_GLUON = True
except Exception:  # noqa: BLE001
    HAS_GLUON = False

if HAS_GLUON:

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
    def _sparse_attn_wg_kernel(q_ptr, sink_ptr, o_ptr, part_o_ptr, part_ml_ptr,
                               win_cache_ptr, win_new_ptr, win_idx_ptr, cmp_cache_ptr, cmp_idx_ptr,
                               T, H, Nw, Kw, Kc, n_win_tiles, n_tiles, tiles_per_split,
                               stride_qt, stride_qh, stride_ot, stride_oh, stride_wi, stride_ci,
                               row_stride, qk_scale,
                               D: gl.constexpr, BLOCK_H: gl.constexpr, BLOCK_K: gl.constexpr,
                               NUM_BUF: gl.constexpr, SPLIT: gl.constexpr):
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
        ROWS_LOAD: gl.constexpr = gl.SliceLayout(1, LOAD)
        COLS_QK: gl.constexpr = gl.SliceLayout(0, QK)
        HEADS_QK: gl.constexpr = gl.SliceLayout(1, QK)
        HEADS_PV: gl.constexpr = gl.SliceLayout(1, PV)

        pid = gl.program_id(0)
        sid = gl.program_id(1)
        n_hb = gl.cdiv(H, BLOCK_H)
        t = pid // n_hb  # head blocks of one token are adjacent: they share rows through L2
        hb = pid % n_hb

        q_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_H, D], SMEM_Q)
        k_smem = gl.allocate_shared_memory(gl.bfloat16, [NUM_BUF, BLOCK_K, D], SMEM_K)
        hq = hb * BLOCK_H + gl.arange(0, BLOCK_H, ROWS_LOAD)
        dq = gl.arange(0, D, gl.SliceLayout(0, LOAD))
        cp.async_copy_global_to_shared(
            q_smem, q_ptr + t * stride_qt + hq[:, None] * stride_qh + dq[None, :],
            mask=(hq < H)[:, None])
        cp.commit_group()

        lo = sid * tiles_per_split
        hi = gl.minimum(lo + tiles_per_split, n_tiles)
        win_idx_row = win_idx_ptr + t * stride_wi
        cmp_idx_row = cmp_idx_ptr + t * stride_ci
        for j in gl.static_range(NUM_BUF - 1):  # prologue: the first NUM_BUF-1 tiles in flight
            idx = _slots(lo + j, hi, win_idx_row, cmp_idx_row, Kw, Kc, n_win_tiles, BLOCK_K,
                         ROWS_LOAD)
            _gather(k_smem.index(j), idx, lo + j, n_win_tiles, win_cache_ptr, win_new_ptr,
                    cmp_cache_ptr, Nw, row_stride, D, LOAD)
            cp.commit_group()
        nxt = lo + NUM_BUF - 1
        idx_next = _slots(nxt, hi, win_idx_row, cmp_idx_row, Kw, Kc, n_win_tiles, BLOCK_K,
                          ROWS_LOAD)

        h = hb * BLOCK_H + gl.arange(0, BLOCK_H, HEADS_QK)
        if SPLIT:  # the sink is merged by the combine kernel
            m_i = gl.full([BLOCK_H], -1.0e30, gl.float32, HEADS_QK)
            l_i = gl.zeros([BLOCK_H], gl.float32, HEADS_QK)
        else:  # start the online softmax at the sink: exp(sink - m) = 1
            m_i = gl.load(sink_ptr + h, mask=h < H, other=0.0).to(gl.float32) * 1.4426950408889634
            l_i = gl.full([BLOCK_H], 1.0, gl.float32, HEADS_QK)
        acc = gl.zeros([BLOCK_H, D], gl.float32, PV)
        s0 = gl.zeros([BLOCK_H, BLOCK_K], gl.float32, QK)
        for i in range(0, hi - lo):
            tile = lo + i
            # keep NUM_BUF-1 tiles in flight: gather tile i+NUM_BUF-1 into the buffer that
            # tile i-1 used (its products have completed), and fetch the slots after it
            _gather(k_smem.index((i + NUM_BUF - 1) % NUM_BUF), idx_next, tile + NUM_BUF - 1,
                    n_win_tiles, win_cache_ptr, win_new_ptr, cmp_cache_ptr, Nw, row_stride, D,
                    LOAD)
            cp.commit_group()
            idx_next = _slots(tile + NUM_BUF, hi, win_idx_row, cmp_idx_row, Kw, Kc, n_win_tiles,
                              BLOCK_K, ROWS_LOAD)
            valid = _slots(tile, hi, win_idx_row, cmp_idx_row, Kw, Kc, n_win_tiles, BLOCK_K,
                           COLS_QK) >= 0
            cp.wait_group(NUM_BUF - 1)
            kb = k_smem.index(i % NUM_BUF)
            s = warpgroup_mma(q_smem, kb.permute((1, 0)), s0, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
            s = gl.where(valid[None, :], s * qk_scale, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(s, 1))
            alpha = gl.exp2(m_i - m_new)
            p = gl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + gl.sum(p, 1)
            m_i = m_new
            p_op = gl.convert_layout(p.to(gl.bfloat16), P_OP)
            acc = acc * gl.convert_layout(alpha, HEADS_PV)[:, None]
            acc = warpgroup_mma(p_op, kb, acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        cp.wait_group(0)

        ho = hb * BLOCK_H + gl.arange(0, BLOCK_H, HEADS_PV)
        do = gl.arange(0, D, gl.SliceLayout(0, PV))
        hmask = (ho < H)[:, None]
        l_o = gl.convert_layout(l_i, HEADS_PV)
        if SPLIT:
            base = (sid * T + t) * H + ho
            gl.store(part_o_ptr + base[:, None] * D + do[None, :], acc, mask=hmask)
            gl.store(part_ml_ptr + base * 2, gl.convert_layout(m_i, HEADS_PV), mask=ho < H)
            gl.store(part_ml_ptr + base * 2 + 1, l_o, mask=ho < H)
        else:
            o = acc / l_o[:, None]
            gl.store(o_ptr + t * stride_ot + ho[:, None] * stride_oh + do[None, :],
                     o.to(o_ptr.dtype.element_ty), mask=hmask)
