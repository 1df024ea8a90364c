"""Hopper sparse attention over packed FP8 rows with the decode in warps of its own (Gluon).

Same contract, launch and splits as `_sparse_attn_wg_kernel` (`sparse_attention_wg.py`), FP8
rows only. There, every warp takes turns: wait for a tile's bytes, decode them to bf16, Q K^T,
the softmax, P V; the decode is a serial phase of a latency-bound loop, and FP8 rows ran 1.8x
slower than bf16 rows for 43% fewer bytes. Here the CTA's warps are split (`gl.warp_specialize`):
four load warps gather each tile's packed bytes by cp.async into two byte buffers
and decode them (`_decode_fp8`, exact) into a ring of NUM_BUF bf16 tiles, while the eight MMA
warps run Q K^T, the softmax and P V on the previous tile. Two mbarriers a bf16 tile hand it
over: `ready` (decoded: the MMA warps may read it) and `empty` (its P V product completed: the
load warps may overwrite it). The arithmetic is the plain kernel's, in the same order, so the
outputs are bit-identical to it (with its 32-row tiles).

H200, `bench_attention.py --only attn --quick --ws`: H=64 top-k 512 + 128, batch 1 / 32 / 128,
21.5 / 35.1 / 77.3 -> 20.0 / 29.9 / 67.9 us; H=128 top-k 1024 + 128, 25.3 / 69.5 / 231.5 ->
24.1 / 63.2 / 211.4 us. What held the first version at the plain kernel's speed was latency in
the load warps (one warp a scheduler): each tile's row slots loaded just before its gather and
again before its decode; they now arrive one and two iterations ahead. Measured and dropped:
more byte stages (3 or 4 tiles in flight: no faster), three bf16 tiles (slower), and decoding
in 128-column chunks with the scale bytes staged beside the codes (fewer barriers among the
load warps, 20 -> 9 a tile, but 7% slower).
"""
from __future__ import annotations

from .sparse_attention_wg import HAS_GLUON

if HAS_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier,
                                                                  warpgroup_mma,
                                                                  warpgroup_mma_wait)

    from .sparse_attention_wg import (_cta_rows, _cta_token, _decode_fp8, _gather_fp8,
                                      _load_q, _slots, _softmax_start, _softmax_step,
                                      _write_out)

    @gluon.jit
    def _ws_load(c_smem, r_smem, s_smem, k_smem, ready, empty, win_idx_row, cmp_idx_row,
                 win_cache_ptr, win_new_ptr, cmp_cache_ptr, Nw, Kw, Kc, n_win_tiles, lo, hi,
                 row_stride, D: gl.constexpr, BLOCK_K: gl.constexpr, NOPE: gl.constexpr,
                 ROPE: gl.constexpr, NUM_BUF: gl.constexpr, LOAD_WARPS: gl.constexpr,
                 NEW_FP8: gl.constexpr):
        """The load warps: tile i + 1's packed bytes in flight (byte stage (i + 1) % 2) while
        tile i is decoded into bf16 tile i % NUM_BUF, once the MMA warps have released it.
        Each tile's row slots are loaded two iterations before its decode, one before its
        gather, so no global load's latency is waited for in the loop."""
        LC: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [LOAD_WARPS, 1], [1, 0])
        LR: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [LOAD_WARPS, 1], [1, 0])
        LS: gl.constexpr = gl.BlockedLayout([1, 8], [32, 1], [LOAD_WARPS, 1], [1, 0])
        ROWS: gl.constexpr = gl.SliceLayout(1, LC)
        idx_dec = _slots(lo, hi, win_idx_row, cmp_idx_row, Kw, Kc, n_win_tiles, BLOCK_K, ROWS)
        idx_gat = _slots(lo + 1, hi, win_idx_row, cmp_idx_row, Kw, Kc, n_win_tiles, BLOCK_K, ROWS)
        _gather_fp8(c_smem.index(0), r_smem.index(0), s_smem.index(0), idx_dec, lo, n_win_tiles,
                    win_cache_ptr, win_new_ptr, cmp_cache_ptr, Nw, row_stride, NOPE, ROPE, LC, LR,
                    LS, NEW_FP8)
        cp.commit_group()
        for i in range(0, hi - lo):
            tile = lo + i
            idx_nxt = _slots(tile + 2, hi, win_idx_row, cmp_idx_row, Kw, Kc, n_win_tiles,
                             BLOCK_K, ROWS)
            st = (i + 1) % 2
            _gather_fp8(c_smem.index(st), r_smem.index(st), s_smem.index(st), idx_gat, tile + 1,
                        n_win_tiles, win_cache_ptr, win_new_ptr, cmp_cache_ptr, Nw, row_stride,
                        NOPE, ROPE, LC, LR, LS, NEW_FP8)
            cp.commit_group()
            cp.wait_group(1)
            b = i % NUM_BUF
            mbarrier.wait(empty.index(b), ((i // NUM_BUF) & 1) ^ 1)
            _decode_fp8(k_smem.index(b), c_smem.index(i % 2), r_smem.index(i % 2),
                        s_smem.index(i % 2), idx_dec, tile, n_win_tiles, win_new_ptr, Nw, D, NOPE,
                        ROPE, LC, NEW_FP8)
            fence_async_shared()
            mbarrier.arrive(ready.index(b))
            idx_dec = idx_gat
            idx_gat = idx_nxt
        cp.wait_group(0)

    @gluon.jit
    def _ws_mma(q_smem, k_smem, ready, empty, q_ptr, sink_ptr, o_ptr, part_o_ptr, part_ml_ptr,
                win_idx_row, cmp_idx_row, t, hb, sid, T, H, Kw, Kc, n_win_tiles, lo, hi,
                stride_qt, stride_qh, stride_ot, stride_oh, qk_scale, D: gl.constexpr,
                BLOCK_H: gl.constexpr, BLOCK_K: gl.constexpr, NUM_BUF: gl.constexpr,
                SPLIT: gl.constexpr):
        """The MMA warps (8, the default partition): Q K^T, the softmax and P V of each decoded
        tile, as `_sparse_attn_wg_kernel`'s loop, then the output or the split's partials."""
        LOAD: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [8, 1], [1, 0])
        QK: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                     instr_shape=[16, BLOCK_K // 2, 16])
        PV: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                     instr_shape=[16, D // 2, 16])
        P_OP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=PV, k_width=2)
        COLS_QK: gl.constexpr = gl.SliceLayout(0, QK)
        HEADS_QK: gl.constexpr = gl.SliceLayout(1, QK)
        HEADS_PV: gl.constexpr = gl.SliceLayout(1, PV)

        m_i, l_i = _softmax_start(sink_ptr, hb * BLOCK_H + gl.arange(0, BLOCK_H, HEADS_QK), H,
                                  BLOCK_H, HEADS_QK, SPLIT)
        _load_q(q_smem, q_ptr, t, hb, H, stride_qt, stride_qh, D, BLOCK_H, LOAD)
        cp.wait_group(0)
        fence_async_shared()

        acc = gl.zeros([BLOCK_H, D], gl.float32, PV)
        s0 = gl.zeros([BLOCK_H, BLOCK_K], gl.float32, QK)
        valid_nxt = _slots(lo, hi, win_idx_row, cmp_idx_row, Kw, Kc, n_win_tiles, BLOCK_K,
                           COLS_QK) >= 0
        for i in range(0, hi - lo):
            tile = lo + i
            valid = valid_nxt  # loaded an iteration ahead
            valid_nxt = _slots(tile + 1, hi, win_idx_row, cmp_idx_row, Kw, Kc, n_win_tiles,
                               BLOCK_K, COLS_QK) >= 0
            b = i % NUM_BUF
            mbarrier.wait(ready.index(b), (i // NUM_BUF) & 1)
            kb = k_smem.index(b)
            s = warpgroup_mma(q_smem, kb.permute((1, 0)), s0, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
            p_op, alpha, m_i, l_i = _softmax_step(s, valid, qk_scale, m_i, l_i, P_OP, HEADS_PV)
            acc = warpgroup_mma(p_op, kb, acc * alpha[:, None], is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(empty.index(b))
        _write_out(acc, m_i, l_i, o_ptr, part_o_ptr, part_ml_ptr, t, hb, sid, T, H, lo, hi,
                   stride_ot, stride_oh, D, BLOCK_H, PV, SPLIT)

    @gluon.jit(do_not_specialize=[
        "T", "Kc", "n_win_tiles", "n_tiles", "tiles_per_split"])
    def _sparse_attn_ws_kernel(q_ptr, sink_ptr, o_ptr, part_o_ptr, part_ml_ptr,
                               win_cache_ptr, win_new_ptr, win_idx_ptr, cmp_cache_ptr, cmp_idx_ptr,
                               cmp_len_ptr, T, H, Nw, Kw, Kc, n_win_tiles, n_tiles,
                               tiles_per_split,
                               stride_qt, stride_qh, stride_ot, stride_oh, stride_wi, stride_ci,
                               row_stride, qk_scale,
                               D: gl.constexpr, BLOCK_H: gl.constexpr, BLOCK_K: gl.constexpr,
                               NUM_BUF: gl.constexpr, SPLIT: gl.constexpr,
                               NOPE: gl.constexpr, ROPE: gl.constexpr, HAS_LEN: gl.constexpr,
                               LOAD_WARPS: gl.constexpr, LOAD_REGS: gl.constexpr,
                               NEW_FP8: gl.constexpr = False, PDL: gl.constexpr = False):
        SMEM_Q: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, D], gl.bfloat16)
        SMEM_K: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_K, D], gl.bfloat16)
        RAW: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0])
        t, hb, sid = _cta_token(H, BLOCK_H, PDL)
        lo, hi, win_idx_row, cmp_idx_row = _cta_rows(t, sid, Kc, n_win_tiles, n_tiles,
                                                     tiles_per_split, cmp_len_ptr, win_idx_ptr,
                                                     cmp_idx_ptr, stride_wi, stride_ci, BLOCK_K,
                                                     HAS_LEN)

        q_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_H, D], SMEM_Q)
        k_smem = gl.allocate_shared_memory(gl.bfloat16, [NUM_BUF, BLOCK_K, D], SMEM_K)
        c_smem = gl.allocate_shared_memory(gl.uint8, [2, BLOCK_K, 512], RAW)
        r_smem = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_K, ROPE], RAW)
        s_smem = gl.allocate_shared_memory(gl.uint8, [2, BLOCK_K, 8], RAW)
        ready = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
        for j in gl.static_range(NUM_BUF):
            mbarrier.init(ready.index(j), count=1)
            mbarrier.init(empty.index(j), count=1)

        gl.warp_specialize([
            (_ws_mma, (q_smem, k_smem, ready, empty, q_ptr, sink_ptr, o_ptr, part_o_ptr,
                       part_ml_ptr, win_idx_row, cmp_idx_row, t, hb, sid, T, H, Kw, Kc,
                       n_win_tiles, lo, hi, stride_qt, stride_qh, stride_ot, stride_oh, qk_scale,
                       D, BLOCK_H, BLOCK_K, NUM_BUF, SPLIT)),
            (_ws_load, (c_smem, r_smem, s_smem, k_smem, ready, empty, win_idx_row, cmp_idx_row,
                        win_cache_ptr, win_new_ptr, cmp_cache_ptr, Nw, Kw, Kc, n_win_tiles, lo,
                        hi, row_stride, D, BLOCK_K, NOPE, ROPE, NUM_BUF, LOAD_WARPS, NEW_FP8)),
        ], [LOAD_WARPS], [LOAD_REGS])
