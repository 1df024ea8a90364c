"""The MoE's MXFP4 expert GEMM at decode batches, written in Gluon for sm_90's FP8 wgmma.

Same contract and launch grid as `moe._moe_gemm_kernel` with W_FMT MXFP4, the e4m3 decode
(DEC 2), 64-row weight tiles and 16-row plan blocks, in its partial-sum forms: GATE_UP with
SPLIT (g = w1 x or v = w3 x a tile, fp32 partials per K split; FINISH: the last CTA of each
128 channels writes w2's input h) and DOWN (fp32 partials, or y in the working dtype when
unsplit). The results are the Triton kernel's bit for bit: the same 32-deep FP8 products,
promoted to fp32 with each 32-code block's scale and once per K-block with the token scale, in
the same order.

Why a second kernel: at one to a few tokens an expert the Triton kernel is issue-bound (Nsight
Compute: 8 cycles between a warp's instructions, under half of HBM), at ~263 instructions a warp
per 4 KB K-block of weights: 16-column wgmmas, each with a descriptor and a wait, 8 cp.async
pieces and commits, predicated scale loads. Here a thread's packed weight words go straight
from memory into registers one K-block ahead (the kernels' byte order, codes b and b + 16 in
byte b, makes word q of a row exactly the 8 codes of the thread's wgmma A fragment), only the
activations take cp.async (a ring of NUM_BUF K-blocks), and a block of up to 8 tokens runs
64 x 8 wgmmas, with half the accumulator registers to promote: ~213 instructions a K-block.
From two tokens (`WSMEM`) the weight words take a 3-deep cp.async ring too, two 16-byte
pieces a thread and K-block, and are read from it in the A fragments' layout (~200
instructions a K-block): more bytes in flight than registers hold (Nsight Compute at one
token: 7 CTAs an SM by registers), up to 10% faster from 2 tokens; at one token the register
path stays ahead. `mma.sync` would need no shared memory at all, but its FP8 form is not
native on sm_90 (ptxas converts to f16 and HMMA), so the B operand stays in shared memory for
wgmma.
"""
from __future__ import annotations

from . import HAS_TRITON

try:  # Gluon is experimental; without it (or on an API change) the Triton kernel runs
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
    from triton.experimental.gluon.language.nvidia.hopper import (warpgroup_mma,
                                                                  warpgroup_mma_wait)
    HAS_GLUON = HAS_TRITON  # (the Triton kernels' helpers it reuses exist with Triton only)
except Exception:  # noqa: BLE001
    HAS_GLUON = False


if HAS_GLUON:
    # the Triton kernel's finish (no layouts of its own: Gluon inlines it)
    from .moe import _finish_rows, _last_partial

    from .pdl import gluon_pdl_start
    from .quant_linear import E2M1_E4M3_PTX

    _DECODE_PTX: gl.constexpr = gl.constexpr(E2M1_E4M3_PTX)

    @gluon.jit
    def _acts(buf, a_rows, ok, kb, live, BT: gl.constexpr, LA: gl.constexpr):
        """cp.async of K-block kb's activations into buf [4 BT, 32]: rows c BT .. c BT + BT - 1
        are the block's BT rows' 32 e4m3 bytes of scale block c (nothing unless live)."""
        rr = gl.arange(0, 4 * BT, gl.SliceLayout(1, LA))
        k = gl.arange(0, 32, gl.SliceLayout(0, LA))
        at = a_rows[:, None] + (kb * 128 + (rr // BT) * 32)[:, None] + k[None, :]
        cp.async_copy_global_to_shared(buf, at, mask=(ok & live)[:, None] & (k >= 0)[None, :])

    @gluon.jit
    def _weights(w_at, kb, live):
        """The packed weight words of K-block kb's 4 32-code blocks, each [64 rows, 4 words]
        (zeros unless live)."""
        p0 = gl.load(w_at + kb * 1024, mask=live, other=0)
        p1 = gl.load(w_at + kb * 1024 + 4, mask=live, other=0)
        p2 = gl.load(w_at + kb * 1024 + 8, mask=live, other=0)
        p3 = gl.load(w_at + kb * 1024 + 12, mask=live, other=0)
        return p0, p1, p2, p3

    @gluon.jit
    def _wcopy(buf, w_src, kb, live, LW: gl.constexpr):
        """cp.async of K-block kb's packed weight words [BW rows, 16] into buf (16-byte
        pieces; nothing unless live)."""
        cw = gl.arange(0, 16, gl.SliceLayout(0, LW))
        cp.async_copy_global_to_shared(buf, w_src + kb * 1024,
                                       mask=(cw < 16 * live.to(gl.int32))[None, :])

    @gluon.jit
    def _block(blk, p, buf, sw, c: gl.constexpr, zero, BT: gl.constexpr, P3: gl.constexpr,
               DOT_A: gl.constexpr, BW: gl.constexpr):
        """blk += (decoded 32-code block c) @ (its activations)^T * 2^6 x the rows' block
        scales: one FP8 wgmma, then the fp32 promotion. p [BW, 4]: the rows' packed words."""
        # each word as 4 byte elements (the same register 4 times: the asm reads the first; as
        # uint8 loads the bytes would be unpacked and packed again, ~100 PRMTs a K-block)
        p4 = gl.broadcast(gl.expand_dims(p, 2), gl.full([BW, 4, 4], 0, gl.int32, P3))[0]
        p = gl.reshape(p4, (BW, 16))
        lo, hi = gl.inline_asm_elementwise(
            asm=_DECODE_PTX, constraints="=r,=r,r,r,r,r", args=[p], dtype=(gl.uint8, gl.uint8),
            is_pure=True, pack=4)
        # byte b holds codes b and b + 16: (lo, hi) in code order
        w8 = gl.reshape(gl.permute(gl.join(lo, hi), (0, 2, 1)), (BW, 32))
        w8 = gl.convert_layout(w8.to(gl.float8e4nv, bitcast=True), DOT_A)
        d = warpgroup_mma(w8, buf.slice(c * BT, BT).permute((1, 0)), zero, use_acc=False,
                          is_async=True)
        d = warpgroup_mma_wait(num_outstanding=0, deps=(d, ))
        # 2^6 x the block scale 2^(byte-127), built as a float: exact for every byte
        f = ((((sw >> (8 * c)) & 0xFF) + 6) << 23).to(gl.float32, bitcast=True)
        return d * f[:, None] + blk

    @gluon.jit
    def _finish(part_ptr, count_ptr, h_ptr, hs_ptr, wgt_ptr, slots_ptr, b, tile, n_rows, N, k1,
                limit, part_stride, ROUND: gl.constexpr, HAS_LIMIT: gl.constexpr,
                BT: gl.constexpr, BW: gl.constexpr):
        """After a CTA's gate/up partial of block b: count it for its 128 channels (the g and
        v tiles of every K split); the last one sums the partials in split order and writes
        w2's input h, as `moe._finish_swiglu` (the same `_finish_rows`: bit-equal)."""
        LF: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [4, 1], [1, 0])
        last, cb, splits = _last_partial(count_ptr, b, tile, N, BW)
        if last:
            offs = gl.arange(0, BT, gl.SliceLayout(1, LF))
            ok = offs < n_rows
            pos = b * BT + offs
            slot = gl.load(slots_ptr + pos, mask=ok, other=0)
            g = gl.zeros([BT, 128], gl.float32, LF)
            _finish_rows(part_ptr, h_ptr, hs_ptr, wgt_ptr, pos, ok, slot,
                         cb * 128 + gl.arange(0, 128, gl.SliceLayout(0, LF)), cb, g, g, N, k1,
                         limit, part_stride, splits, ROUND, HAS_LIMIT, False, True)

    @gluon.jit
    def _run(a_ptr, sa_ptr, slots_ptr, w_addr, s_addr, out_ptr, b, tile, up, n_rows, N, K,
             k1, kb0, kb1, part_stride, GATE_UP: gl.constexpr, SPLIT: gl.constexpr,
             BT: gl.constexpr, NB: gl.constexpr, NUM_BUF: gl.constexpr, BW: gl.constexpr,
             WSMEM: gl.constexpr):
        """The CTA's product over K-blocks kb0 .. kb1 - 1 of its BW (64 or 128) weight rows
        with the first NB (8 or 16, at least n_rows) of the plan block's BT rows, and its
        store. The scales, and without WSMEM the weight words, are loaded into registers one
        K-block ahead (two measured slower: H200, Flash, 1 token 45.6 -> 49.2 us)."""
        MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, NB, 32])
        DOT_A: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=4)
        # a thread's packed words of one 32-code block: word l % 4 of rows l // 4 and
        # l // 4 + 8 of its warp's 16 (lane l; and 64 rows on, for 128-row tiles), each seen
        # as 4 byte elements (one register: `_block`), which decode to exactly its A
        # fragment's 16 codes
        REG: gl.constexpr = ([[0, 0, 1], [0, 0, 2], [8, 0, 0]] if BW == 64
                             else [[0, 0, 1], [0, 0, 2], [8, 0, 0], [64, 0, 0]])
        P3: gl.constexpr = gl.DistributedLinearLayout(
            reg_bases=REG, lane_bases=[[0, 1, 0], [0, 2, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
            warp_bases=[[16, 0, 0], [32, 0, 0]], block_bases=[], shape=[BW, 4, 4])
        PK: gl.constexpr = gl.SliceLayout(2, P3)  # [BW rows, 4 words]
        LA: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [4, 1], [1, 0])
        SA: gl.constexpr = gl.NVMMASharedLayout.get_default_for([NB, 32], gl.float8e4nv)
        ROWS: gl.constexpr = gl.SliceLayout(1, MMA)
        COLS: gl.constexpr = gl.SliceLayout(0, MMA)

        # the kernels' layout (mxfp4_to_kernel_layout): per 64-row group and K-block 64 rows x
        # 64 bytes contiguous (16 a row and 32-code block), then the rows' scale words
        # (4 bytes a row, byte c block c's e8m0)
        rp = gl.arange(0, BW, gl.SliceLayout(1, PK))
        cpk = gl.arange(0, 4, gl.SliceLayout(0, PK))
        grp = tile.to(gl.int64) * (BW // 64)
        w_at = (gl.multiple_of(w_addr.to(gl.pointer_type(gl.int32)), 16)
                + (grp + rp[:, None] // 64) * (8 * K) + (rp[:, None] % 64) * 16 + cpk[None, :])
        r = gl.arange(0, BW, ROWS)
        sw_at = (gl.multiple_of(s_addr.to(gl.pointer_type(gl.int32)), 16)
                 + (grp + r // 64) * (K // 2) + r % 64)

        # the block's token rows, for the activation copies and for the accumulator columns
        ta = gl.arange(0, 4 * NB, gl.SliceLayout(1, LA)) % NB
        ok_a = ta < n_rows
        slot_a = gl.load(slots_ptr + b * BT + ta, mask=ok_a, other=0)
        if GATE_UP:
            arow_a = slot_a // k1
        else:
            arow_a = b * BT + ta
        a_rows = a_ptr + arow_a.to(gl.int64) * K
        col = gl.arange(0, NB, COLS)
        ok = col < n_rows
        pos = b * BT + col
        slot = gl.load(slots_ptr + pos, mask=ok, other=0)
        if GATE_UP:
            arow = slot // k1
        else:
            arow = pos
        sa_at = sa_ptr + arow.to(gl.int64) * (K // 128)

        a_smem = gl.allocate_shared_memory(gl.float8e4nv, [NUM_BUF, 4 * NB, 32], SA)
        if WSMEM:  # the weight words through a ring of shared buffers too (cp.async, 16-byte
            # pieces: two a thread and 64 rows), read from it in the A fragments' layout
            LW: gl.constexpr = gl.BlockedLayout([1, 4], [8, 4], [4, 1], [1, 0])
            rw = gl.arange(0, BW, gl.SliceLayout(1, LW))
            cw = gl.arange(0, 16, gl.SliceLayout(0, LW))
            w_src = (gl.multiple_of(w_addr.to(gl.pointer_type(gl.int32)), 16)
                     + (grp + rw[:, None] // 64) * (8 * K) + (rw[:, None] % 64) * 16
                     + cw[None, :])
            w_smem = gl.allocate_shared_memory(
                gl.int32, [NUM_BUF, BW, 16], gl.SwizzledSharedLayout(4, 1, 4, order=[1, 0]))
        for j in gl.static_range(NUM_BUF - 1):  # prologue: NUM_BUF - 1 K-blocks in flight
            _acts(a_smem.index(j), a_rows, ok_a, kb0 + j, kb0 + j < kb1, NB, LA)
            if WSMEM:
                _wcopy(w_smem.index(j), w_src, kb0 + j, kb0 + j < kb1, LW)
            cp.commit_group()
        zero = gl.zeros([BW, NB], gl.float32, MMA)
        acc = zero
        # registers one K-block ahead: the weight words, scale words, token scales
        if not WSMEM:
            pn = _weights(w_at, kb0, kb0 < kb1)
        swn = gl.load(sw_at + kb0 * 64, mask=kb0 < kb1, other=0)
        san = gl.load(sa_at + kb0, mask=ok & (kb0 < kb1), other=0.0)
        for i in range(0, kb1 - kb0):
            kb = kb0 + i
            if not WSMEM:
                p0, p1, p2, p3 = pn
            sw = swn
            sa = san
            live = kb + 1 < kb1
            if not WSMEM:
                pn = _weights(w_at, kb + 1, live)
            swn = gl.load(sw_at + (kb + 1) * 64, mask=live, other=0)
            san = gl.load(sa_at + kb + 1, mask=ok & live, other=0.0)
            _acts(a_smem.index((i + NUM_BUF - 1) % NUM_BUF), a_rows, ok_a, kb + NUM_BUF - 1,
                  kb + NUM_BUF - 1 < kb1, NB, LA)
            if WSMEM:
                _wcopy(w_smem.index((i + NUM_BUF - 1) % NUM_BUF), w_src, kb + NUM_BUF - 1,
                       kb + NUM_BUF - 1 < kb1, LW)
            cp.commit_group()
            cp.wait_group(NUM_BUF - 1)
            buf = a_smem.index(i % NUM_BUF)
            if WSMEM:
                wb = w_smem.index(i % NUM_BUF)
                p0 = wb.slice(0, 4, 1).load(PK)
                p1 = wb.slice(4, 4, 1).load(PK)
                p2 = wb.slice(8, 4, 1).load(PK)
                p3 = wb.slice(12, 4, 1).load(PK)
            blk = _block(zero, p0, buf, sw, 0, zero, NB, P3, DOT_A, BW)
            blk = _block(blk, p1, buf, sw, 1, zero, NB, P3, DOT_A, BW)
            blk = _block(blk, p2, buf, sw, 2, zero, NB, P3, DOT_A, BW)
            blk = _block(blk, p3, buf, sw, 3, zero, NB, P3, DOT_A, BW)
            acc = blk * sa[None, :] + acc
        cp.wait_group(0)

        rows = tile * BW + r
        mask = (rows < N)[:, None] & ok[None, :]
        if SPLIT:
            part = out_ptr + gl.program_id(2).to(gl.int64) * part_stride
            if GATE_UP:  # rows [pos, 2N]: g then v
                c2 = rows + up.to(gl.int32) * N
                gl.store(part + pos[None, :].to(gl.int64) * (2 * N) + c2[:, None], acc,
                         mask=mask)
            else:
                gl.store(part + slot[None, :].to(gl.int64) * N + rows[:, None], acc, mask=mask)
        else:
            gl.store(out_ptr + slot[None, :].to(gl.int64) * N + rows[:, None],
                     acc.to(out_ptr.dtype.element_ty), mask=mask)

    @gluon.jit(do_not_specialize=["e_lo", "e_hi", "blk_lo", "kb_per"])
    def _moe_mx_wg_kernel(a_ptr, sa_ptr, slots_ptr, blk_exp_ptr, blk_rows_ptr,
                          w_tab, s_tab, w3_tab, s3_tab, out_ptr, N, K, e_lo, e_hi, blk_lo,
                          k1, kb_per, part_stride, wgt_ptr, count_ptr, h_ptr, hs_ptr, limit,
                          GATE_UP: gl.constexpr, SPLIT: gl.constexpr, BT: gl.constexpr,
                          NUM_BUF: gl.constexpr, MAX8: gl.constexpr = False,
                          BW: gl.constexpr = 64, WSMEM: gl.constexpr = False,
                          FINISH: gl.constexpr = False, ROUND: gl.constexpr = True,
                          HAS_LIMIT: gl.constexpr = True, PDL: gl.constexpr = False):
        """One (BW-row weight tile, plan block of BT = 16 rows, K split); grid (N/BW (x2 for
        GATE_UP: tiles past N/BW are w3's), blocks of this launch, splits); 4 warps; BW 64 or
        128 (two 64-row groups of the kernels' layout, two wgmmas a 32-code block sharing the
        activations). Writes acc [BW, n] as fp32 partials (SPLIT: [split, pos, 2N] for
        GATE_UP, [split, slot, N] for DOWN) or, DOWN unsplit, y rows [slot, N] in out's dtype.
        A block of up to 8 rows takes 8-column products (half the accumulator registers to
        promote); MAX8 (no block has more than 8 rows: batches of up to 8 tokens) compiles
        only those, which leaves the kernel fewer registers. WSMEM: the weight words reach the
        registers through a ring of NUM_BUF shared buffers (cp.async, as the activations)
        instead of loads one K-block ahead. FINISH (GATE_UP, SPLIT): the last CTA of each
        (block, 128 channels) writes h and its scales (h_ptr, hs_ptr) from the partials,
        counted in count_ptr, as the Triton kernel's FINISH (routing weights wgt_ptr, clamp
        `limit`)."""
        gluon_pdl_start(PDL)
        b = blk_lo + gl.program_id(1)
        e = gl.load(blk_exp_ptr + b)
        if (e < e_lo) | (e >= e_hi):
            return
        n_rows = gl.load(blk_rows_ptr + b)
        tile = gl.program_id(0)
        wi = e - e_lo
        w_addr = gl.load(w_tab + wi)
        s_addr = gl.load(s_tab + wi)
        up = False
        if GATE_UP:
            up = tile >= N // BW
            tile = tile - up.to(gl.int32) * (N // BW)
            w_addr = gl.where(up, gl.load(w3_tab + wi), w_addr)
            s_addr = gl.where(up, gl.load(s3_tab + wi), s_addr)
        kb0 = gl.program_id(2) * kb_per
        kb1 = gl.minimum(kb0 + kb_per, K // 128)
        if MAX8 or n_rows <= 8:
            _run(a_ptr, sa_ptr, slots_ptr, w_addr, s_addr, out_ptr, b, tile, up, n_rows, N, K,
                 k1, kb0, kb1, part_stride, GATE_UP, SPLIT, BT, 8, NUM_BUF, BW, WSMEM)
        else:
            _run(a_ptr, sa_ptr, slots_ptr, w_addr, s_addr, out_ptr, b, tile, up, n_rows, N, K,
                 k1, kb0, kb1, part_stride, GATE_UP, SPLIT, BT, BT, NUM_BUF, BW, WSMEM)
        if FINISH:
            _finish(out_ptr, count_ptr, h_ptr, hs_ptr, wgt_ptr, slots_ptr, b, tile, n_rows, N,
                    k1, limit, part_stride, ROUND, HAS_LIMIT, BT, BW)
