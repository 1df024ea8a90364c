"""Triton kernels run by Triton's CPU interpreter against their torch references (no GPU).

Run as a script with TRITON_INTERPRET=1 (tests/test_kernels_interpreted.py does, one check per
process): the flag must be set before dsv4.kernels is imported, which defines the kernels only
when a GPU or the interpreter is there. The interpreter runs programs one after another and
computes in numpy, so these checks cover the kernels' indexing and logic on small shapes; the
compiled code, inline PTX and timing are for tests/gpu on the device.
"""
from __future__ import annotations

import os
import sys

import torch

G = torch.Generator().manual_seed(0)


def fix_interpreter() -> None:
    """Three defects of Triton 3.6's interpreter that our kernels meet: tl.dot multiplies bf16
    operands as their raw 16-bit integers; a one-element tensor used as a loop bound
    (`range(lo, hi)` with loaded bounds) fails to convert to an int; and its float narrowing
    conversions are not torch's (and the GPU's) round to nearest even: fp32 -> bf16 truncates,
    fp32 -> e4m3 rounds half away from zero and lets a rounded-up mantissa overflow into the
    exponent (6% of the FP8 activation codes differed). Conversions to e4m3 and bf16, and from
    e4m3, go through torch."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as ti

    to_fp = ti.InterpreterBuilder.create_fp_to_fp

    def as_f32(h):
        if h.dtype == tl.bfloat16:
            return (h.data.astype(np.uint32) << 16).view(np.float32)
        return h.data.astype(np.float32)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        dst = dst_type.scalar
        narrow = {tl.float8e4nv: (torch.float8_e4m3fn, torch.uint8),
                  tl.bfloat16: (torch.bfloat16, torch.int16)}
        if dst in narrow and src.dtype.scalar in (tl.float32, tl.float16, tl.bfloat16):
            q = torch.from_numpy(np.ascontiguousarray(as_f32(src))).to(narrow[dst][0])
            data = q.view(narrow[dst][1]).numpy().view(ti._get_np_dtype(dst))
            return ti.TensorHandle(data, dst)
        if src.dtype.scalar == tl.float8e4nv and dst == tl.float32:
            v = torch.from_numpy(np.ascontiguousarray(src.data)).view(torch.float8_e4m3fn)
            return ti.TensorHandle(v.float().numpy(), dst)
        return to_fp(self, src, dst_type, rounding_mode)

    cast = ti.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):  # fp32 -> bf16 (`.to(tl.bfloat16)`) truncated
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return create_fp_to_fp(self, src, dst_type, None)
        return cast(self, src, dst_type)

    ti.InterpreterBuilder.create_fp_to_fp = create_fp_to_fp
    ti.InterpreterBuilder.cast_impl = cast_impl

    dot = ti.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, *args):
        def widen(h):
            if h.dtype != tl.bfloat16:
                return h
            return ti.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return dot(self, widen(a), widen(b), d, *args)

    patch_tensor = ti._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    ti.InterpreterBuilder.create_dot = create_dot
    ti._patch_lang_tensor = _patch_lang_tensor


def check_topk() -> None:
    from dsv4.kernels.topk import _topk_cuda, _topk_split_cuda, select_topk_ref
    for T, N, k, ties in ((5, 300, 8, False), (5, 300, 8, True), (3, 700, 512, True),
                          (4, 300, 512, False)):  # no more columns than k: every visible one
        s = torch.randn(T, N, generator=G)
        if ties:  # relu zeros, repeated values, -0.0 beside +0.0
            s = (s * 2).round().clamp(min=0) * torch.where(torch.rand(T, N, generator=G) < 0.5,
                                                           -1.0, 1.0)
        cand = torch.randperm(2 * T * N, generator=G)[:T * N].view(T, N)
        for t, v in enumerate([0, k - 1, k + 1, N, 1][:T]):
            s[t, v:], cand[t, v:] = float("-inf"), -1
        want = select_topk_ref(s, cand, k).sort(1).values
        avail = (cand >= 0).sum(1)
        dirty = torch.where(torch.arange(N)[None] < avail[:, None], s, float("nan"))
        for got in (_topk_cuda(s, cand, k), _topk_cuda(dirty, cand, k, avail),
                    _topk_split_cuda(s, cand, k, chunk=64),
                    _topk_split_cuda(dirty, cand, k, avail, chunk=128),
                    # fewer programs than chunks: each takes every 2nd / 3rd chunk of its row
                    _topk_split_cuda(s, cand, k, chunk=64, programs=2),
                    _topk_split_cuda(dirty, cand, k, avail, chunk=32, programs=3)):
            assert torch.equal(got.sort(1).values, want), "top-k set differs from the reference"
            n = (got >= 0).sum(1)
            assert torch.equal(got >= 0, torch.arange(got.shape[1])[None] < n[:, None]), \
                "top-k picks are not first"


    # the select stops early (the chosen digit holds exactly the entries still needed) with
    # keys equal to the threshold prefix: three 4.0 and two 2.0 above 1.0s, k = 5 (4.0 and 2.0
    # share their top 8 key bits, and 2.0's key is exactly that prefix)
    s = torch.ones(2, 40)
    s[:, [3, 9, 30]], s[:, [5, 17]] = 4.0, 2.0
    cand = torch.arange(80).view(2, 40)
    want = select_topk_ref(s, cand, 5).sort(1).values
    for got in (_topk_cuda(s, cand, 5), _topk_split_cuda(s, cand, 5, chunk=16)):
        assert torch.equal(got.sort(1).values, want), "early-stopped select lost a pick"


def check_candidates() -> None:
    from dsv4.kernels import candidates as c
    T, nb, m, rpb = 6, 6, 4, 32
    N = nb * rpb + 10  # past what the block table reaches: the last block is reused
    bt = torch.randint(0, 50, (3, nb), generator=G)
    tok_seq, pos = torch.tensor([0, 1, 2, 2, 1, 0]), torch.tensor([0, 3, 4, 130, 700, 1000])
    want, want_avail = torch.full((T, N), 7777), torch.zeros(T, dtype=torch.long)
    c.candidates_ref_(want, want_avail, bt, tok_seq, pos, m, rpb)
    # row-major and block-major tables (as graphs hold them); a program a block of columns, and
    # 2 programs each taking every other block
    for table, programs in ((bt, None), (bt.t().contiguous().t(), None), (bt, 2)):
        rows, avail = torch.full((T, N), 7777), torch.zeros(T, dtype=torch.long)
        c._candidates_cuda(rows, avail, table, tok_seq, pos, m, rpb, block=64, programs=programs)
        assert torch.equal(avail, want_avail)
        for t in range(T):
            end = min(N, -(-int(avail[t]) // c.PAD_COLS) * c.PAD_COLS)
            assert torch.equal(rows[t, :end], want[t, :end]), f"token {t}: rows differ"
            assert (rows[t, end:] == 7777).all(), f"token {t}: wrote past its prefix"


def check_indexer_avail() -> None:
    """`avail`, with bf16 keys and with packed FP4 keys of 1 and 2 scale blocks (decoded to
    bf16 in the kernel, their dims in the packed words' order)."""
    from dsv4.kernels.index_fp4 import pack_index_fp4
    from dsv4.kernels.indexer import indexer_scores_ref, indexer_scores_triton
    from dsv4.quant.sim import fp4_sim
    T, N, nI = 4, 300, 16
    avail = torch.tensor([0, 5, 130, 300])
    cand = torch.randperm(400, generator=G)[:N].repeat(T, 1)
    cand = torch.where(torch.arange(N)[None] < avail[:, None], cand, -1)
    w = torch.randn(T, nI, generator=G).bfloat16()
    for c, packed in ((32, False), (32, True), (64, True)):
        keys = fp4_sim(torch.randn(400, c, generator=G), 32).bfloat16()
        keys = pack_index_fp4(keys) if packed else keys
        q = torch.randn(T, nI, c, generator=G).bfloat16()
        ref = indexer_scores_ref(q, w, keys, cand)
        for bn in (64, 128):
            got = indexer_scores_triton(q, w, keys, cand, avail, block_n=bn)
            for t in range(T):
                a, end = int(avail[t]), min(N, -(-int(avail[t]) // bn) * bn)
                assert torch.allclose(got[t, :a], ref[t, :a], rtol=1e-5, atol=1e-5), (c, packed)
                assert (got[t, a:end] == float("-inf")).all()


def check_indexer_fp8() -> None:
    """Packed FP4 keys with FP4-grid queries on the FP8 MMA path (`q_fp4`): the reference's
    scores up to fp32 summation order, with zero and tiny query blocks, invisible candidates
    and `avail`."""
    from dsv4.kernels.index_fp4 import pack_index_fp4
    from dsv4.kernels.indexer import indexer_scores_ref, indexer_scores_triton
    from dsv4.quant.sim import fp4_sim
    T, N, nI, c = 3, 150, 16, 128
    keys = fp4_sim(torch.randn(200, c, generator=G) * torch.rand(200, 1, generator=G) * 4, 32)
    keys[5, :32] = 0.0  # an all-zero scale block
    keys[7, 96:] *= 2.0 ** -20  # blocks 20 binades apart, and keys far from 1 (folded keys:
    keys[9:] *= torch.exp2(torch.randint(-30, 30, (191, 1), generator=G).float())  # neither)
    packed = pack_index_fp4(keys)
    q = torch.randn(T, nI, c, generator=G) * torch.exp2(torch.randint(-12, 8, (T, nI, 1),
                                                                      generator=G).float())
    q[0, 1, 32:64] = 0.0
    q[1, 2, 96:] *= 2.0 ** -40
    q = fp4_sim(q, 32).bfloat16()
    w = torch.randn(T, nI, generator=G).bfloat16()
    cand = torch.randint(0, 200, (T, N), generator=G)
    cand[0, 100:] = -1
    cand[2, ::7] = -1
    ref = indexer_scores_ref(q, w, packed, cand)
    fin = torch.isfinite(ref)
    got = indexer_scores_triton(q, w, packed, cand, q_fp4=True, block_n=64)
    assert torch.equal(torch.isfinite(got), fin), "visibility differs"
    scale = ref[fin].abs().max()
    err = (got[fin] - ref[fin]).abs().max() / scale
    assert err < 1e-6, f"FP8 indexer scores differ from the reference: {err:.2e}"
    # folded query and key scales: bit-identical where the token's queries fold (token 0: a
    # zero block; 2: plain), by 16 heads with per-block scales where they do not (1: 2^-40; 2
    # again with a block of amax 2^-125, which the per-block path rounds to zero codes), and
    # for the keys that do not fold (5: a zero block, 7: blocks 20 binades apart)
    folded = indexer_scores_triton(q, w, packed, cand, q_fp4=True, block_n=64, fold=True)
    assert torch.equal(folded[0], got[0]) and torch.equal(folded[2], got[2])
    q2 = q.clone()  # token 2's heads scaled to amax 2^-113, one block of each to 2^-125
    x = q[2].float()
    q2[2] = (x * 2.0 ** -113 / x.abs().amax(1, keepdim=True).clamp_min(1e-30)).bfloat16()
    q2[2, :, 64:96] = q2[2, :, 64:96].float().sign().bfloat16() * 2.0 ** -125
    tiny = indexer_scores_triton(q2, w, packed, cand, q_fp4=True, block_n=64, fold=True)
    plain = indexer_scores_triton(q2, w, packed, cand, q_fp4=True, block_n=64, fold=False)
    assert torch.allclose(tiny[2][fin[2]], plain[2][fin[2]], rtol=1e-6, atol=0), \
        "a head with a block under 2^-124 must take the per-block scales"
    assert torch.equal(torch.isfinite(folded), fin)
    err = (folded[fin] - ref[fin]).abs().max() / scale
    assert err < 1e-6, f"folded FP8 indexer scores differ from the reference: {err:.2e}"
    avail = torch.tensor([100, 150, 150])
    got = indexer_scores_triton(q, w, packed, cand, avail, q_fp4=True, block_n=64)
    assert torch.equal(got[0, :100], indexer_scores_triton(q, w, packed, cand, q_fp4=True,
                                                           block_n=64)[0, :100])


def check_attention_cmp_len() -> None:
    from dsv4.kernels import rope
    from dsv4.kernels.sparse_attention import (AttnConfig, sparse_attention_ref,
                                               sparse_attention_triton)
    T, H, D, r, Nw, Nc, Kw, Kc, BK = 4, 16, 128, 64, 40, 300, 20, 96, 16
    q = torch.randn(T, H, D, generator=G).bfloat16()
    sink = torch.randn(H, generator=G)
    win, new = torch.randn(Nw, D, generator=G).bfloat16(), torch.randn(T, D, generator=G).bfloat16()
    widx = torch.randint(-1, Nw + T, (T, Kw), generator=G)
    cmp = torch.randn(Nc, D, generator=G).bfloat16()
    n = torch.tensor([0, 5, 17, 96])
    cidx = torch.randint(0, Nc, (T, Kc), generator=G)
    col = torch.arange(Kc)[None]
    clean = torch.where(col < n[:, None], cidx, -1)
    dirty = torch.where(col < n[:, None], cidx, torch.where(col < ((n + BK - 1) // BK * BK)[:, None],
                                                            -1, cidx))
    ref = sparse_attention_ref(q, sink, 0.1, win, new, widx, cmp, clean, r)
    empty = torch.empty

    def nan_empty(*args, **kw):  # fresh buffers hold NaN: an unwritten partial would show
        out = empty(*args, **kw)
        return out.fill_(float("nan")) if out.is_floating_point() else out
    torch.empty = nan_empty
    on_cpu = rope.use_triton
    rope.use_triton = lambda t: True  # rope_ inside and after the op: the same kernel
    try:
        for splits in (1, 3, 8):  # 8: most splits of the short rows are empty (no output)
            cfg = AttnConfig(block_h=16, block_k=BK, num_warps=4, num_stages=1, splits=splits,
                             kernel="triton")
            a = sparse_attention_triton(q, sink, 0.1, win, new, widx, cmp, clean, r, cfg)
            b = sparse_attention_triton(q, sink, 0.1, win, new, widx, cmp, dirty, r, cfg,
                                        cmp_len=n)
            assert torch.equal(a, b), "rows past cmp_len changed the output"
            assert (a.float() - ref.float()).abs().max() < 3e-2
            # the inverse RoPE of the output, in the split merge or by rope_ after it
            pos, freqs = torch.randint(0, 131072, (T,), generator=G), torch.rand(r // 2) * 0.5
            c = sparse_attention_triton(q, sink, 0.1, win, new, widx, cmp, clean, r, cfg,
                                        out_rope=(pos, freqs))
            want = rope.rope_(a.clone(), pos, freqs, r, inverse=True)
            assert torch.equal(c, want), f"out_rope, {splits} splits"
    finally:
        torch.empty = empty
        rope.use_triton = on_cpu


def check_mhc() -> None:
    from dsv4.kernels import mhc
    from dsv4.kernels.rmsnorm import rmsnorm_ref
    n = 4
    for T, d, dt in ((3, 256, torch.bfloat16), (70, 128, torch.float32)):
        x = torch.randn(T, n, d, generator=G).to(dt)
        fn = torch.randn((2 + n) * n, n * d, generator=G) * (n * d) ** -0.5
        scale, base = torch.rand(3, generator=G) + 0.5, torch.randn((2 + n) * n, generator=G)
        yr, pr, cr = mhc.hc_pre_ref(x, fn, scale, base, 1e-6, 1e-6, 20)
        y, p, c = mhc.hc_pre_triton(x, fn, scale, base, 1e-6, 1e-6, 20)
        tol = 2.0 ** -7 * yr.float().abs() + 1e-5 * x.float().abs().sum(1) * 2
        assert ((y.float() - yr.float()).abs() <= tol).all()
        assert torch.allclose(p, pr, atol=1e-5) and torch.allclose(c, cr, atol=1e-5)
        yh = mhc.hc_pre_triton(x, fn[:n], scale[:1], base[:n], 1e-6, 1e-6, 0, head=True)[0]
        yhr = mhc.hc_head_ref(x, fn[:n], scale[:1], base[:n], 1e-6, 1e-6)
        assert ((yh.float() - yhr.float()).abs() <= tol).all()
        # the RMSNorm that follows, fused (whole rows a CTA): the kernel's own y, normalised;
        # post and comb unchanged
        w = torch.rand(d, generator=G) + 0.5
        for head in (False, True):
            f, sc, b = (fn[:n], scale[:1], base[:n]) if head else (fn, scale, base)
            y0, p0, c0 = mhc.hc_pre_triton(x, f, sc, b, 1e-6, 1e-6, 20, head=head)
            yn, pn, cn = mhc.hc_pre_triton(x, f, sc, b, 1e-6, 1e-6, 20, head=head,
                                           norm=(w, 1e-6))
            want = rmsnorm_ref(y0, w, 1e-6).float()
            if dt == torch.bfloat16:  # r may round differently, rarely visible in bf16
                assert (yn.float() == want).float().mean() > 0.99
            assert ((yn.float() - want).abs() <= 1e-6 * want.abs()).float().mean() > 0.99
            assert ((yn.float() - want).abs() <= 2.0 ** -8 * want.abs()).all()
            assert torch.equal(pn, p0) and torch.equal(cn, c0)


def check_mhc_fused() -> None:
    """The one-launch mHC of decode batches (`mhc_fused.py`) against the separate kernels:
    X' bit for bit, the mix's outputs to fp32 rounding (its products summed in another
    order), with and without the post update, the norm and the head's mix."""
    from dsv4.kernels import mhc
    from dsv4.kernels.mhc_fused import hc_fused
    n = 4
    # (the last: a channel block past d)
    for T, d, dt, bc in ((1, 256, torch.bfloat16, 64), (3, 320, torch.float32, 32),
                         (2, 208, torch.bfloat16, 64)):
        x = torch.randn(T, n, d, generator=G).to(dt)
        fn = torch.randn((2 + n) * n, n * d, generator=G) * (n * d) ** -0.5
        scale, base = torch.rand(3, generator=G) + 0.5, torch.randn((2 + n) * n, generator=G)
        w = torch.rand(d, generator=G) + 0.5
        post, comb = torch.rand(T, n, generator=G) * 2, torch.rand(T, n, n, generator=G)
        for f in (torch.randn(T, d, generator=G).to(dt), torch.randn(3, T, d, generator=G),
                  torch.randn(2, T, 5, d, generator=G), None):
            pa = None if f is None else (f, post, comb)
            for head, norm in ((False, None), (False, (w, 1e-6)), (True, (w, 1e-6))):
                fh, sh, bh = (fn[:n], scale[:1], base[:n]) if head else (fn, scale, base)
                xo, y, p2, c2 = hc_fused(x, fh, sh, bh, 1e-6, 1e-6, 20, pa, head, norm,
                                         cfg=(bc, 1))
                xw = x if f is None else mhc.hc_post_triton(x, f, post, comb)
                if f is None or f.dim() != 3:  # (3-D: the 2-D kernel sums partials as a tree)
                    assert torch.equal(xo, xw), "X' off the post kernel's"
                else:
                    want = mhc.hc_post_ref(x, f, post, comb).float()
                    assert ((xo.float() - want).abs() <= want.abs() * 2.0 ** -7 + 1e-6).all()
                yw, pw, cw = (mhc.hc_head_ref(xw, fh, sh, bh, 1e-6, 1e-6), None, None) \
                    if head else mhc.hc_pre_ref(xw, fh, sh, bh, 1e-6, 1e-6, 20)
                if norm is not None:
                    yw = mhc.rmsnorm_ref(yw, *norm)
                tol = 2.0 ** -6 * yw.float().abs() + 1e-5 * xw.float().abs().sum(1) * 4
                assert ((y.float() - yw.float()).abs() <= tol).all(), "y"
                if not head:
                    assert torch.allclose(p2, pw, atol=1e-5) and torch.allclose(c2, cw, atol=1e-5)
                else:
                    assert p2.numel() == 0 and c2.numel() == 0
        # the counters are back to zero: a second launch gives the same
        again = hc_fused(x, fn, scale, base, 1e-6, 1e-6, 20, None, False, (w, 1e-6), cfg=(bc, 1))
        first = hc_fused(x, fn, scale, base, 1e-6, 1e-6, 20, None, False, (w, 1e-6), cfg=(bc, 1))
        assert all(torch.equal(a, b) for a, b in zip(again, first))


def check_grouped_fp8_linear() -> None:
    from dsv4.kernels import grouped_linear as gl
    from dsv4.quant.formats import quantize_fp8
    groups, O, I = 2, 128, 384
    w, sc = quantize_fp8(torch.randn(groups * O, I, generator=G) / I ** 0.5)
    for T in (1, 3, 17, 40, 70):  # 40, 70: `launch_cfg`'s 128-row and 128-token tiles
        x = torch.randn(T, groups, I, generator=G).bfloat16()
        want = gl.grouped_linear_ref(x.double(), w, sc).float()
        for cfg in (dict(gemv=False), dict(gemv=False, split=3), dict(gemv=True)):
            if cfg["gemv"] and T > 1:
                continue
            got = gl._grouped_fp8_cuda(x, w, sc, O, cfg).float()
            err = ((got - want).norm() / want.norm()).item()
            assert err < 1e-2, f"T={T} {cfg}: rel err {err:.2e}"


def check_small_ops() -> None:
    """The one-kernel ops (RMSNorm, RoPE, FP8 rounding, Hadamard + FP4, the compressor's
    pooling, gathers, ring writes and finish, routing, greedy sampling, fp32 GEMV, the FP8 cache
    store, the FP4 index-key store, the mHC post update) through their public entry points,
    made to take the Triton path on the CPU, against their torch references with the GPU
    tests' tolerances."""
    import importlib

    from dsv4.config import ModelConfig
    from dsv4.model.rope import rope_frequencies
    names = ("rmsnorm", "rope", "qat", "compressor", "routing", "greedy", "f32_linear", "kv_fp8",
             "index_fp4", "mhc")
    mods = {n: importlib.import_module(f"dsv4.kernels.{n}") for n in names}
    for m in mods.values():
        m.use_triton = lambda t: True

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    x = (torch.randn(5, 512, generator=G) * 3).bfloat16()
    w = torch.rand(512, generator=G) + 0.5
    ref = mods["rmsnorm"].rmsnorm_ref(x, w, 1e-6).float()
    assert ((mods["rmsnorm"].rmsnorm(x, w, 1e-6).float() - ref).abs()
            <= ref.abs() * 2.0 ** -7 + 1e-6).all(), "rmsnorm"

    # the split-K linear's partials summed, normalised, rotated and FP8-rounded (the kv row)
    freqs = rope_frequencies(ModelConfig.preset("flash"), 4)
    rn = mods["rmsnorm"]
    for S, T, N, rope, fp8w in ((3, 5, 512, True, 448), (1, 4, 512, True, 448),
                                (4, 3, 1024, False, 0), (2, 2, 256, True, 0)):
        parts = torch.randn(S, T, N, generator=G) * 3
        if S == 1:
            parts = parts.bfloat16()
        rp = (torch.randint(0, 131072, (T,), generator=G), freqs, 64) if rope else None
        wn = torch.rand(N, generator=G) + 0.5
        got = rn.rmsnorm_split(parts, wn, 1e-6, torch.bfloat16, rp, fp8w).float()
        want = rn.rmsnorm_split_ref(parts, wn, 1e-6, torch.bfloat16, rp, fp8w).float()
        # within a bf16 ulp, or one FP8 step where a rounding tipped
        tol = want.abs() * (2.0 ** -3 if fp8w else 2.0 ** -7) + 2e-5
        assert ((got - want).abs() <= tol).all(), f"rmsnorm_split {S} {N}"
        close = (got - want).abs() <= want.abs() * 2.0 ** -7 + 2e-5
        assert close.float().mean() > 0.99, f"rmsnorm_split {S} {N}: too many differ"
    # two norms in one launch (the kv row with RoPE and FP8 rounding, the q latent): each as
    # its own launch computes it
    T = 3
    a = (torch.randn(4, T, 512, generator=G) * 3, torch.rand(512, generator=G) + 0.5, 1e-6,
         (torch.randint(0, 131072, (T,), generator=G), freqs, 64), 448)
    b = (torch.randn(4, T, 1024, generator=G) * 3, torch.rand(1024, generator=G) + 0.5, 1e-5,
         None, 0)
    got = rn.rmsnorm_split_pair(a, b, torch.bfloat16)
    for g, (p, wn, eps, rp, fp8w) in zip(got, (a, b)):
        want = rn.rmsnorm_split(p, wn, eps, torch.bfloat16, rp, fp8w)
        assert torch.equal(g, want), "rmsnorm_split_pair"

    for shape, norm, inverse in (((3, 64, 512), True, False), ((37, 512), False, True)):
        q = (torch.randn(*shape, generator=G) * 3).bfloat16()
        pos = torch.randint(0, 131072, (shape[0],), generator=G)
        eps = 1e-6 if norm else None
        got = mods["rope"].rope_(q.clone(), pos, freqs, 64, inverse, eps).float()
        want = mods["rope"].rope_ref_(q.clone(), pos, freqs, 64, inverse, eps).float()
        assert ((got - want).abs() <= want.abs() * 2.0 ** -7 * 1.01 + 2e-5).all(), f"rope {shape}"

    qat = mods["qat"]
    y = (torch.randn(6, 512, generator=G) * 5).bfloat16()
    y[0, :64] = 0
    assert torch.equal(qat.fp8_round_(y.clone(), 448), qat.fp8_round_ref_(y.clone(), 448))
    h = (torch.randn(37, 64, 128, generator=G) * 3).bfloat16()
    for on in (True, False):
        got, want = qat.hadamard_fp4(h, on), qat.hadamard_fp4_ref(h, on)
        assert rel(got, want) < (2e-2 if on else 5e-3), f"hadamard_fp4 qat={on}"
    for S, T, nh in ((1, 5, 4), (3, 2, 4), (2, 3, 16)):  # the indexer's queries, one launch
        parts = torch.randn(S, T, nh * 128, generator=G) * 2  # 16 heads: a token a program
        parts = parts.bfloat16() if S == 1 else parts
        pos = torch.randint(0, 131072, (T,), generator=G)
        before = parts.clone()
        for on in (True, False):
            got = qat.rope_hadamard_fp4(parts, nh, pos, freqs, 64, on, torch.bfloat16)
            want = qat.rope_hadamard_fp4_ref(parts, nh, pos, freqs, 64, on, torch.bfloat16)
            assert torch.equal(parts, before), "rope_hadamard_fp4 changed its input"
            assert got.shape == (T, nh, 128) and got.dtype == torch.bfloat16
            assert rel(got, want) < (2e-2 if on else 5e-3), f"rope_hadamard_fp4 {S} {on}"

    cm = mods["compressor"]
    kv, score = torch.randn(9, 8, 128, generator=G), torch.randn(9, 8, 128, generator=G) * 3
    valid = torch.ones(9, 8, dtype=torch.bool)
    valid[0, :4] = False
    assert rel(cm.compress_pool(kv, score, valid), cm.compress_pool_ref(kv, score, valid)) < 1e-6
    m, k, c, n_win, t, rows = 4, 2, 128, 5, 40, 100
    a, g = (torch.randn(t, k * c, generator=G) for _ in range(2))
    kr, sr = (torch.randn(rows, k * c, generator=G) * 3 for _ in range(2))
    args = (a, g, kr, sr, torch.rand(n_win, k * m, generator=G) < 0.4,
            torch.randint(0, t, (n_win, k * m), generator=G),
            torch.randint(0, rows, (n_win, k * m), generator=G), valid[:n_win],
            m, torch.randn(m, k * c, generator=G))
    assert rel(cm.compress_windows(*args), cm.compress_windows_ref(*args)) < 1e-6
    ape = torch.randn(m, k * c, generator=G)
    pos = torch.randint(0, 10 ** 5, (t,), generator=G)
    tok, dst = torch.randperm(t, generator=G)[:7], torch.randperm(rows, generator=G)[:7]
    rings, want = [kr.clone(), sr.clone()], [kr.clone(), sr.clone()]
    cm.ring_write_(*rings, a, g, ape, pos, tok, dst)
    cm.ring_write_ref_(*want, a, g, ape, pos, tok, dst)
    assert torch.equal(rings[0], want[0]) and torch.equal(rings[1], want[1]), "ring_write_"
    for kind, width, mm in (("attn", 512, 4), ("index", 128, 4)):
        pooled = torch.randn(6, width, generator=G) * 3
        fargs = (pooled, torch.rand(width, generator=G) + 0.5, 1e-6,
                 torch.randint(0, 30000, (6,), generator=G), mm,
                 rope_frequencies(ModelConfig.preset("flash"), mm).float(), 64, kind == "index",
                 True, torch.bfloat16)
        assert rel(cm.compress_finish(*fargs), cm.compress_finish_ref(*fargs)) < 2e-2, kind

    rt = mods["routing"]
    z = torch.randn(9, 256, generator=G) * 3
    bias = torch.randn(256, generator=G) * 0.1
    for func in ("sqrtsoftplus", "sigmoid", "softmax"):
        got, want = rt.route(z, func, 6, 2.5, bias=bias), rt.route_ref(z, func, 6, 2.5, bias=bias)
        assert torch.equal(got[0], want[0]), f"route {func}"
        torch.testing.assert_close(got[1], want[1], rtol=2e-6, atol=1e-7)

    logits = torch.randn(3, 1000, generator=G) * 4
    logits[0, 999] = logits[0, 333] = logits[0].max() + 1  # a tie: the lowest id wins
    ids, lp = mods["greedy"].greedy_logprob(logits)
    want_ids, want_lp = mods["greedy"].greedy_logprob_ref(logits)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(lp, want_lp, rtol=1e-5, atol=1e-4)
    ids2, lp2, rows = mods["greedy"].greedy_logprob(logits, packed=True)
    assert torch.equal(ids2, ids) and torch.equal(lp2, lp), "greedy packed"
    assert torch.equal(rows, torch.stack([ids.double(), lp.double(), torch.ones(3).double()]))

    fl = mods["f32_linear"]
    wf = (torch.randn(256, 512, generator=G) / 512 ** 0.5).bfloat16()
    xf = torch.randn(2, 512, generator=G)
    if fl.gemv_applies(xf, wf):
        assert (fl.linear_f32(xf, wf) - xf.double() @ wf.double().t()).abs().max() < 1e-5
    wh = (torch.randn(fl.GEMV_MAX_N + 40, 256, generator=G) / 16).bfloat16()  # a head, 1 row
    xh1 = torch.randn(1, 256, generator=G)
    assert fl.gemv_applies(xh1, wh) and not fl.gemv_applies(xh1.expand(2, -1), wh)
    assert (fl.linear_f32(xh1, wh) - xh1.double() @ wh.double().t()).abs().max() < 1e-5
    xb = xf.bfloat16()  # a bf16 linear's decode rows: rounded in the GEMV's store
    assert torch.equal(fl.gemv_rounded(xb, wf), fl.linear_f32(xb, wf).bfloat16())
    y = fl.gemv_rounded(xb, wf)  # the indexer's head weights: (x W^T) * c, each rounded
    assert torch.equal(fl.gemv_rounded(xb, wf, 0.0123), y * 0.0123), "scaled GEMV"

    kvm = mods["kv_fp8"]
    rows_in = torch.randn(11, 512, generator=G).bfloat16()
    buf = torch.zeros(40, kvm.kv_fp8_row_bytes(512, 64), dtype=torch.uint8)
    dst = torch.randperm(40, generator=G)[:11]
    kvm.store_kv_fp8_(buf, dst, rows_in)
    assert torch.equal(buf[dst], kvm.pack_kv_fp8(rows_in)), "store_kv_fp8_"
    inorder = torch.zeros(12, kvm.kv_fp8_row_bytes(512, 64), dtype=torch.uint8)
    kvm.store_kv_fp8_(inorder, None, rows_in)  # no destinations: the buffer's rows in order
    assert torch.equal(inorder[:11], kvm.pack_kv_fp8(rows_in)) and not inorder[11].any(), \
        "store_kv_fp8_ in order"
    ifp = mods["index_fp4"]
    keys = torch.randn(11, 128, generator=G).bfloat16()
    kbuf = torch.zeros(40, ifp.index_fp4_row_bytes(128), dtype=torch.uint8)
    ifp.store_index_fp4_(kbuf, dst, keys)
    assert torch.equal(kbuf[dst], ifp.pack_index_fp4(keys)), "store_index_fp4_"

    for T in (7, 20):  # decode batches' row kernel, then the 2-D kernel
        check_hc_post(mods["mhc"], T)


def check_hc_post(mhc, T: int) -> None:
    n = 4
    xh = torch.randn(T, n, 256, generator=G).bfloat16()
    f = torch.randn(T, 256, generator=G).bfloat16()
    post, comb = torch.rand(T, n, generator=G) * 2, torch.rand(T, n, n, generator=G)
    want = mhc.hc_post_ref(xh, f, post, comb).float()
    got = mhc.hc_post(xh, f, post, comb).float()
    assert ((got - want).abs() <= want.abs() * 2.0 ** -7 + 1e-6).all(), "hc_post"
    fp = torch.randn(3, T, 256, generator=G)  # wo_b's split-K partials
    want = mhc.hc_post_ref(xh, fp, post, comb).float()
    got = mhc.hc_post(xh, fp, post, comb).float()
    assert ((got - want).abs() <= want.abs() * 2.0 ** -7 + 1e-6).all(), "hc_post partials"
    assert torch.equal(mhc.hc_post_ref(xh, fp, post, comb),
                       mhc.hc_post_ref(xh, fp.sum(0).to(xh.dtype), post, comb))
    for rows in (torch.randn(1, T, 5, 256, generator=G).bfloat16(),  # the MoE's slot rows
                 torch.randn(2, T, 5, 256, generator=G)):  # each slot as split-K partials
        want = mhc.hc_post_ref(xh, rows, post, comb).float()
        got = mhc.hc_post(xh, rows, post, comb).float()
        assert ((got - want).abs() <= want.abs() * 2.0 ** -7 + 1e-6).all(), "hc_post slots"
        f = rows.float().sum(0).to(xh.dtype).float().sum(1).to(xh.dtype)  # per slot, then all
        assert torch.equal(mhc.hc_post_ref(xh, rows, post, comb),
                           mhc.hc_post_ref(xh, f, post, comb))


def check_quant_linear() -> None:
    """The FP8 / MXFP4 / NVFP4 linear kernel (`quant_linear._qlinear_cuda`) against the torch
    reference: activation quantisation fused or by its own kernel, split K (with the split-sum
    kernel) and not, token tiles past M."""
    from dsv4.kernels import quant_linear as ql
    from dsv4.quant.formats import quantize_fp8, quantize_mxfp4, quantize_nvfp4
    k, n = 384, 256
    w = torch.randn(n, k, generator=G) / k ** 0.5
    fp8, mx, nv = quantize_fp8(w), quantize_mxfp4(w), quantize_nvfp4(w)
    cases = [(ql.FMT_FP8, fp8[0], fp8[1].view(torch.uint8), None,
              lambda x: ql.fp8_linear_ref(x, *fp8)),
             (ql.FMT_MXFP4, mx[0].view(torch.uint8), mx[1].view(torch.uint8), None,
              lambda x: ql.mxfp4_linear_ref(x, *mx)),
             (ql.FMT_NVFP4, nv[0].view(torch.uint8), nv[1].view(torch.uint8),
              nv[2].float().reshape(1), lambda x: ql.nvfp4_linear_ref(x, *nv))]
    for fmt, weight, scale, gscale, ref in cases:
        for m in (1, 5, 40):
            x = torch.randn(m, k, generator=G).bfloat16()
            want = ref(x).float()
            for path, cfg in (("fused", None), ("triton", None), ("triton", dict(split=3)),
                              ("triton", dict(split=1, bt=16, bw=64))):
                got = ql._qlinear_cuda(x, fmt, weight, scale, gscale, path, cfg).float()
                err = ((got - want).norm() / want.norm()).item()
                assert err < 1e-3, f"format {fmt} M={m} {path} {cfg}: rel err {err:.2e}"
    # two FP8 products of one x in one launch (different N, same launch shape): bit for bit
    w2 = quantize_fp8(torch.randn(128, k, generator=G) / k ** 0.5)
    ql.use_triton = lambda t: True
    for m in (1, 5):
        x = torch.randn(m, k, generator=G).bfloat16()
        got = ql.fp8_linear_pair(x, fp8[0], fp8[1], w2[0], w2[1])
        assert got is not None, "fp8_linear_pair did not apply"
        for g, (wq, ws) in zip(got, (fp8, w2)):
            want = ql._qlinear_cuda(x, ql.FMT_FP8, wq, ws.view(torch.uint8), None, parts=True)
            assert torch.equal(g, want), f"fp8_linear_pair M={m}"
    x = torch.randn(5, k, generator=G).bfloat16()  # cuBLAS's scale layout, written directly
    q0, s0 = ql._act_quant_cuda(x, pad_to=4)
    qt, st = ql._act_quant_cuda(x, pad_to=4, scales_t=True)
    assert st.shape == (8, k // 128) and st.stride() == (1, 8)
    assert torch.equal(q0.view(torch.uint8), qt.view(torch.uint8)) and torch.equal(s0, st)


def _random_experts(fmt, shared_fmt, d, inter, n_exp):
    """n_exp routed experts of format fmt and a shared one, random weights of unit-scale
    outputs."""
    from dsv4.model.moe import Expert
    experts = torch.nn.ModuleList(Expert(d, inter, fmt, 10.0, torch.bfloat16)
                                  for _ in range(n_exp))
    shared = Expert(d, inter, shared_fmt, 10.0, torch.bfloat16)
    for m in [*experts, shared]:
        for lin in (m.w1, m.w2, m.w3):
            lin.set_float(torch.randn(lin.out_features, lin.in_features, generator=G)
                          * 3 / lin.in_features ** 0.5)
    return experts, shared


def _finish_swiglu_same(km, fmt, shared_fmt, cfg) -> None:
    """With K split (d = 256: 2 K-blocks), the gate/up's SwiGLU in the GEMM launch
    (`moe.FINISH_SWIGLU`, BW 64 and 128) gives the `_swiglu_kernel` launch's output bit for bit
    and leaves the counters at zero."""
    d, inter, n_exp, k = 256, 256, 6, 2
    experts, shared = _random_experts(fmt, shared_fmt, d, inter, n_exp)
    saved = km.FINISH_SWIGLU
    try:
        for t in (1, 5):
            u = torch.randn(t, d, generator=G).bfloat16()
            idx = torch.stack([torch.randperm(n_exp, generator=G)[:k] for _ in range(t)])
            wgt = torch.rand(t, k, generator=G) + 0.1
            for bw1 in (64, 128):
                c = dict(cfg, bw1=bw1, grouped_mm=False, split1=2, finish=True)
                km.FINISH_SWIGLU = False
                want = km._moe_cuda(u, idx, wgt, experts, shared, c)
                km._COUNTS.clear()
                km.FINISH_SWIGLU = True
                got = km._moe_cuda(u, idx, wgt, experts, shared, c)
                assert torch.equal(got, want), f"finished in the GEMM launch, bw1 {bw1}: differs"
                assert not km._COUNTS[u.device].any(), "counters left non-zero"
    finally:
        km.FINISH_SWIGLU = saved


def _check_moe(*pairs: tuple[str, str]) -> None:
    """The MoE kernels (`moe.py`'s fused GEMMs with each of their decodes, and the grouped-GEMM
    path of `moe_grouped_mm.py`, whose dequantised experts must be the modules' exact weights)
    against the torch reference for routed / shared expert formats `pairs`: small and large
    routing plans, an expert that takes every token and experts that take none, a token sent to
    one expert twice, slots marked for another rank's expert. The formats are spread over
    several checks (each its own process: they run side by side under pytest -n)."""
    from dsv4.kernels import moe as km
    from dsv4.kernels import moe_grouped_mm as gm
    d, inter, n_exp, k = 128, 256, 6, 2
    fused = [dict(bt=16, bw1=64, bw2=64, kc=64, split1=2, split2=2, warps=4, stages=1, dec=1),
             dict(bt=16, bw1=128, bw2=64, kc=64, split1=1, split2=1, warps=4, stages=1, dec=0),
             dict(bt=64, bw1=128, bw2=128, kc=64, split1=1, split2=1, warps=4, stages=1, dec=0,
                  abf=True)]
    for fmt, shared_fmt in pairs:
        experts, shared = _random_experts(fmt, shared_fmt, d, inter, n_exp)
        main, extra = km._tables(experts, shared, torch.device("cpu"))
        grouped = gm.applies(torch.zeros(1, d, dtype=torch.bfloat16), main, extra)
        # NVFP4's scaled weights are not bf16 values; bf16 experts, and a bf16 shared expert
        # (computed by its own linears), run the fused kernels
        assert grouped == (fmt in ("fp4", "fp8") and shared_fmt != "bf16")
        w13, w2 = (gm.dequantize_experts(main, extra, n_exp + 1, d, inter, torch.device("cpu"))
                   if grouped else (None, None))
        for e, m in enumerate([shared, *experts] if grouped else []):
            assert torch.equal(w13[e, :inter].float(), m.w1.dequantize()), f"{fmt} w1 of {e}"
            assert torch.equal(w13[e, inter:].float(), m.w3.dequantize()), f"{fmt} w3 of {e}"
            assert torch.equal(w2[e].float(), m.w2.dequantize()), f"{fmt} w2 of {e}"
        for t in (1, 5, 70, 300):
            u = torch.randn(t, d, generator=G).bfloat16()
            idx = torch.stack([torch.randperm(n_exp, generator=G)[:k] for _ in range(t)])
            if t == 70:
                idx[:, 1] = idx[:, 0]  # a token sent to one expert twice (hash routing can)
                idx[:, 0] = 2  # one expert takes every token, two take none
            wgt = torch.rand(t, k, generator=G) + 0.1
            want = km.moe_forward_ref(u, idx, wgt, experts, shared).float()
            # (the interpreter runs a fused launch's programs one by one: those stop at 70)
            for cfg in [dict(grouped_mm=True)] * grouped + [dict(c, grouped_mm=False)
                                                            for c in fused if t <= 70]:
                got = km._moe_cuda(u, idx, wgt, experts, shared, cfg)
                err = ((got.float() - want).norm() / want.norm()).item()
                assert err < 1e-3, f"{fmt}/{shared_fmt} T={t} {cfg}: rel err {err:.2e}"
                if not cfg["grouped_mm"]:  # the slot rows stand for the combine's sum
                    rows = km._moe_cuda(u, idx, wgt, experts, shared, cfg, parts=True)
                    assert rows.shape == (cfg["split2"], t, k + 1, d), rows.shape
                    summed = km.sum_slots(rows, u.dtype).float()
                    assert ((summed - got.float()).abs()
                            <= got.float().abs() * 2.0 ** -8 + 1e-6).all(), f"slot rows {cfg}"
            if grouped and t == 5:  # out of memory on the way: the fused kernels serve
                _grouped_out_of_memory(km, gm, u, idx, wgt, experts, shared, fused[0])
        if (fmt, shared_fmt) == pairs[0]:  # split gate/up, last CTAs: a format a check
            _finish_swiglu_same(km, fmt, shared_fmt, fused[0])
        if fmt == "fp8":
            _check_route_plan()
        # expert parallelism: other ranks' slots
        if (fmt, shared_fmt) in (("fp4", "fp8"), ("bf16", "bf16")):
            for t in (5, 70, 300):
                u = torch.randn(t, d, generator=G).bfloat16()
                idx = torch.stack([torch.randperm(n_exp, generator=G)[:k] for _ in range(t)])
                idx[torch.rand(t, k, generator=G) < 0.5] = n_exp  # marked: another rank's
                idx[0] = n_exp  # a token with no local expert
                wgt = torch.rand(t, k, generator=G) + 0.1
                want = km.moe_forward_ref(u, idx, wgt, experts, shared).float()
                kept = torch.where(idx < n_exp, idx, 0)
                full = km.moe_forward_ref(u, kept, torch.where(idx < n_exp, wgt, 0.0), experts,
                                          shared).float()
                assert torch.allclose(want, full, atol=1e-2, rtol=1e-2), "reference skips them"
                # and without the shared expert (tensor parallelism: the model adds its slice)
                routed = km.moe_forward_ref(u, idx, wgt, experts, None).float()
                for cfg in [dict(grouped_mm=True)] + [dict(c, grouped_mm=False)
                                                      for c in fused if t <= 70]:
                    for sh, ref in ((shared, want), (None, routed)):
                        got = km._moe_cuda(u, idx, wgt, experts, sh, cfg, total_experts=2 * n_exp)
                        err = ((got.float() - ref).norm() / ref.norm()).item()
                        assert err < 1e-3, (f"other ranks' slots T={t} {cfg} shared "
                                            f"{sh is not None}: rel err {err:.2e}")


def check_moe_fp4() -> None:
    """MXFP4 experts with an FP8 shared expert (the checkpoints' format)."""
    _check_moe(("fp4", "fp8"))


def check_moe_fp8() -> None:
    """FP8 experts, and MXFP4 experts with an MXFP4 shared expert."""
    _check_moe(("fp8", "fp8"), ("fp4", "fp4"))


def check_moe_other() -> None:
    """NVFP4 and bf16 experts (fused kernels only), MXFP4 and NVFP4 experts beside a bf16 shared
    expert; bf16 routed experts beside a quantised shared one stay on the torch path."""
    from dsv4.kernels import moe as km
    assert km._tables(*_random_experts("bf16", "fp8", 128, 256, 2), torch.device("cpu")) is None
    _check_moe(("nvfp4", "fp8"), ("bf16", "bf16"), ("nvfp4", "bf16"), ("fp4", "bf16"))


def check_moe_gate() -> None:
    """The MoE gate of a decode batch in one launch (`moe_gate.gate_route_plan`) against the
    separate launches (the GEMV, the routing, the one-program plan, the activation
    quantisation), bit for bit: biased and hashed routing, each scoring function, 1-4 tokens,
    with and without the shared expert; the counter back at zero; then `moe_gate_forward`
    through the MoE kernels against the reference."""
    from dsv4.kernels import f32_linear, moe as km, moe_gate as mg, quant_linear as ql, routing
    from dsv4.kernels.moe_plan import route_plan
    mg.use_triton = km.use_triton = f32_linear.use_triton = routing.use_triton = lambda t: True
    d, e, k, bt = 256, 16, 3, 16
    w = (torch.randn(e, d, generator=G) / 16).bfloat16()
    bias = torch.randn(e, generator=G) * 0.1
    table = torch.stack([torch.randperm(e, generator=G)[:k] for _ in range(50)]).int()
    for func in ("sqrtsoftplus", "sigmoid", "softmax"):
        for hashed in (False, True):
            for t, shared in ((1, True), (3, False), (4, True)):
                u = torch.randn(t, d, generator=G).bfloat16()
                ids = torch.randint(0, 50, (t,), generator=G)
                gate = mg.GateArgs(w, func, k, 2.5, None if hashed else bias,
                                   table if hashed else None, ids if hashed else None)
                got = mg.gate_route_plan(u, gate, e, bt, shared)
                assert got is not None, "gate_route_plan did not apply"
                idx, wgt, (plan, nb, sb, rb, q, sc) = got
                z = f32_linear._gemv(u, w)
                idx0, wgt0 = routing.route(z, func, k, 2.5, gate.bias, gate.table, gate.ids)
                plan0, _, nb0, sb0, rb0 = route_plan(idx0, t, e, bt, shared)
                q0, s0 = ql._act_quant_cuda(u)
                what = f"{func} hashed={hashed} T={t}"
                assert torch.equal(idx, idx0) and torch.equal(wgt, wgt0), f"routing {what}"
                assert (nb, sb, rb) == (nb0, sb0, rb0), f"block counts {what}"
                assert torch.equal(plan[1], plan0[1]) and torch.equal(plan[2], plan0[2]), \
                    f"blocks {what}"
                valid = (torch.arange(nb * bt) % bt) < plan[2].repeat_interleave(bt)
                assert torch.equal(plan[0][valid], plan0[0][valid]), f"slots {what}"
                assert torch.equal(q.view(torch.uint8), q0.view(torch.uint8)), f"codes {what}"
                assert torch.equal(sc, s0), f"scales {what}"
                assert mg._COUNTER[u.device].item() == 0, "counter left non-zero"
    experts, shared = _random_experts("fp4", "fp8", 128, 256, 6)
    w6 = (torch.randn(6, 128, generator=G) / 16).bfloat16()
    for t in (1, 4):
        u = torch.randn(t, 128, generator=G).bfloat16()
        gate = mg.GateArgs(w6, "sqrtsoftplus", 2, 1.5, torch.zeros(6))
        idx, wgt = routing.route_ref(f32_linear.linear_f32_ref(u, w6), "sqrtsoftplus", 2, 1.5,
                                     torch.zeros(6))
        want = km.moe_forward_ref(u, idx, wgt, experts, shared).float()
        got = km.moe_gate_forward(u, gate, experts, shared).float()
        err = ((got - want).norm() / want.norm()).item()
        assert err < 1e-3, f"moe_gate_forward T={t}: rel err {err:.2e}"


def _check_route_plan() -> None:
    """The routing plan (one-program and two-kernel forms) against one built in torch: each
    block's expert and valid rows, each expert's slots in its rows (in any order), blocks past
    the end empty, other ranks' slots (idx = n_routed) nowhere, and the shared expert's too
    when the plan leaves it out; a shared expert with more blocks than one plan-writing pass
    covers (17000 tokens, 16-row blocks)."""
    from dsv4.kernels.moe_plan import route_plan
    n_routed, k, bt = 6, 2, 16
    for t, shared in ((5, True), (40, True), (17000, True), (5, False), (300, False)):
        idx = torch.stack([torch.randperm(n_routed, generator=G)[:k] for _ in range(t)])
        idx[torch.rand(t, k, generator=G) < 0.2] = n_routed
        (slots, blk_exp, blk_rows), _, n_blocks, _, _ = route_plan(idx, t, n_routed, bt, shared)
        k1 = k + 1
        plan_exp = torch.cat([torch.full((t, 1), 0 if shared else n_routed + 1),
                              idx.long() + 1], 1).reshape(-1)
        b = 0
        for e in range(n_routed + 1):
            want = (plan_exp == e).nonzero().reshape(-1)
            nb = -(-len(want) // bt)
            rows = [min(bt, len(want) - j * bt) for j in range(nb)]
            assert blk_exp[b:b + nb].tolist() == [e] * nb, f"T={t}: blocks of expert {e}"
            assert blk_rows[b:b + nb].tolist() == rows, f"T={t}: rows of expert {e}"
            got = torch.cat([slots[(b + j) * bt:(b + j) * bt + r] for j, r in enumerate(rows)]
                            ) if nb else slots[:0]
            assert sorted(got.tolist()) == want.tolist(), f"T={t}: slots of expert {e}"
            b += nb
        assert blk_rows[b:n_blocks].eq(0).all() and blk_exp[b:n_blocks].eq(n_routed + 1).all()
        assert len(plan_exp) == t * k1


def _grouped_out_of_memory(km, gm, u, idx, wgt, experts, shared, cfg) -> None:
    """A grouped-GEMM call that runs out of memory falls back to the fused kernels (same
    output), and the path stays off afterwards; a forced one raises."""
    def oom(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
    real, env = gm.moe_grouped_mm, os.environ.get("DSV4_MOE_GROUPED_MM")
    gm.moe_grouped_mm, os.environ["DSV4_MOE_GROUPED_MM"] = oom, "1"
    try:
        want = km._moe_cuda(u, idx, wgt, experts, shared, dict(cfg, grouped_mm=False))
        try:
            km._moe_cuda(u, idx, wgt, experts, shared, dict(cfg, grouped_mm=True))
            raise AssertionError("a forced grouped-GEMM call hid its out-of-memory error")
        except torch.OutOfMemoryError:
            pass
        assert gm.takes(len(u), idx.shape[1], len(experts))
        got = km._moe_cuda(u, idx, wgt, experts, shared, dict(cfg))
        assert torch.equal(got, want), "the fallback after running out of memory differs"
        assert not gm.takes(len(u), idx.shape[1], len(experts))
    finally:
        gm.moe_grouped_mm, gm._OUT_OF_MEMORY[0] = real, False
        if env is None:
            del os.environ["DSV4_MOE_GROUPED_MM"]
        else:
            os.environ["DSV4_MOE_GROUPED_MM"] = env


def check_moe_fp8_gemm() -> None:
    """`DSV4_MOE_FP8_GEMM=1`: the grouped FP8 GEMM against its reference (ragged and empty
    groups, a last tile past every group); the experts' FP8 copies (`to_fp8`) exact, codes
    times scales, for MXFP4 and FP8 experts; the MoE through them against the torch
    reference; MXFP4 copies with one scale per row (`row=True`, the GEMM's row scales) exact
    and the MoE on them (a layer's calls after its first) giving the block-scaled products;
    a layer whose MXFP4 scales spread beyond 2^11 in a block falls back to bf16, one whose
    rows' do (and not its blocks') stays on block scales."""
    from dsv4.kernels import grouped_fp8_gemm as gfg
    from dsv4.kernels import moe as km
    from dsv4.kernels import moe_grouped_mm as gm
    gfg.use_triton = lambda t: True
    a = (torch.randn(90, 256, generator=G) * 3).to(torch.float8_e4m3fn)
    sa = 2.0 ** torch.randint(-3, 3, (90, 2), generator=G).float()
    b = (torch.randn(4, 128, 256, generator=G) * 3).to(torch.float8_e4m3fn)
    sb = 2.0 ** torch.randint(-9, -4, (4, 128, 2), generator=G).float()
    ends = torch.tensor([20, 20, 85, 90], dtype=torch.int32)  # group 1 empty
    want = gfg.grouped_fp8_gemm_ref(a, sa, b, sb, ends).float()
    for cfg in (dict(bm=16, bn=64), dict(bm=64, bn=128)):
        got = gfg.grouped_fp8_gemm(a, sa, b, sb, ends, dict(cfg, warps=4, stages=1)).float()
        err = ((got - want).norm() / want.norm()).item()
        assert err < 4e-3, f"grouped FP8 GEMM {cfg}: rel err {err:.2e}"
        # row scales: the same products with each row's block scales equal, applied once
        sb_row = sb[..., 0]
        got = gfg.grouped_fp8_gemm(a, sa, b, sb_row, ends, dict(cfg, warps=4, stages=1))
        want_row = gfg.grouped_fp8_gemm_ref(a, sa, b, sb_row[..., None].expand_as(sb), ends)
        err = ((got.float() - want_row.float()).norm() / want_row.float().norm()).item()
        assert err < 4e-3, f"grouped FP8 GEMM {cfg}, row scales: rel err {err:.2e}"

    d, inter, n_exp, k = 128, 256, 6, 2
    os.environ["DSV4_MOE_FP8_GEMM"] = "1"
    try:
        for fmt, shared_fmt in (("fp4", "fp8"), ("fp8", "fp8"), ("fp4", "fp4")):
            experts, shared = _random_experts(fmt, shared_fmt, d, inter, n_exp)
            main, extra = km._tables(experts, shared, torch.device("cpu"))
            flag = torch.zeros(1, dtype=torch.int32)
            q, sc = gm.to_fp8(main, extra, ("w1", "w3"), n_exp + 1, inter, d,
                              torch.device("cpu"), flag)
            w13 = (q.float().unflatten(2, (-1, 128)) * sc[..., None]).flatten(2)
            for e, m in enumerate([shared, *experts]):
                assert torch.equal(w13[e, :inter], m.w1.dequantize()), f"{fmt} FP8 w1 of {e}"
                assert torch.equal(w13[e, inter:], m.w3.dequantize()), f"{fmt} FP8 w3 of {e}"
            assert int(flag) == 0, f"{fmt}: exact experts flagged"
            if fmt == "fp4" and shared_fmt == "fp4":  # row scales: the same weights
                q, sc = gm.to_fp8(main, extra, ("w1", "w3"), n_exp + 1, inter, d,
                                  torch.device("cpu"), flag, row=True)
                assert sc.shape == (n_exp + 1, 2 * inter) and int(flag) == 0
                assert torch.equal((q.float() * sc[..., None])[1:, :inter],
                                   torch.stack([m.w1.dequantize() for m in experts])), \
                    "row-scaled FP8 copies of w1"
            for t in (5, 70, 300):
                u = torch.randn(t, d, generator=G).bfloat16()
                idx = torch.stack([torch.randperm(n_exp, generator=G)[:k] for _ in range(t)])
                if t == 70:
                    idx[:, 0] = 2  # one expert takes every token, two take none
                wgt = torch.rand(t, k, generator=G) + 0.1
                want = km.moe_forward_ref(u, idx, wgt, experts, shared).float()
                got = km._moe_cuda(u, idx, wgt, experts, shared, dict(grouped_mm=True)).float()
                err = ((got - want).norm() / want.norm()).item()
                assert err < 1e-3, f"{fmt}/{shared_fmt} T={t} FP8 GEMMs: rel err {err:.2e}"
            assert main.fp8_exact, "an exact layer left the FP8 path"
            if fmt == "fp4" and shared_fmt == "fp4":  # calls after the first: row scales
                assert main.fp8_row_exact and gm.row_scales(main, extra, False)
                u = torch.randn(70, d, generator=G).bfloat16()
                idx = torch.stack([torch.randperm(n_exp, generator=G)[:k] for _ in range(70)])
                wgt = torch.rand(70, k, generator=G) + 0.1
                row = km._moe_cuda(u, idx, wgt, experts, shared, dict(grouped_mm=True))
                main.fp8_row_exact = False
                block = km._moe_cuda(u, idx, wgt, experts, shared, dict(grouped_mm=True))
                main.fp8_row_exact = True
                assert torch.equal(row, block), "row and block scales: other products"
            if fmt == "fp4":  # the weights decoded in the GEMM (DSV4_MOE_FP4_GEMM): the copies'
                # products, plan expert g from table entry g - g_off (group 0 empty with
                # an FP8 shared expert apart)
                g_off = 0 if extra is None else 1
                a = (torch.randn(90, d, generator=G) * 3).to(torch.float8_e4m3fn)
                sa = 2.0 ** torch.randint(-3, 3, (90, d // 128), generator=G).float()
                ends = torch.tensor([0, 20, 20, 50, 60, 85, 90], dtype=torch.int32)
                q, sc = gm.to_fp8(main, extra, ("w1", "w3"), n_exp + 1, inter, d,
                                  torch.device("cpu"), flag)
                want = gfg.grouped_fp8_gemm(a, sa, q, sc, ends,
                                            dict(bm=64, bn=128, warps=4, stages=1)).float()
                pt = main.ptrs
                got = gm.grouped_mxfp4_gemm(a, sa, (pt["w1w"], pt["w3w"]), (pt["w1s"], pt["w3s"]),
                                            inter, ends, g_off, stages=1).float()
                err = ((got - want).norm() / want.norm()).item()
                assert err < 1e-6, f"{fmt}/{shared_fmt} MXFP4-decoding GEMM: rel err {err:.2e}"
                got = gm.grouped_mxfp4_gemm(a, sa, (pt["w1w"], pt["w3w"]), (pt["w1s"], pt["w3s"]),
                                            inter, ends, g_off, stages=1, row=True).float()
                err = ((got - want).norm() / want.norm()).item()
                assert err < 1e-6, f"{fmt}/{shared_fmt} MXFP4-decoding GEMM, row scales: " \
                    f"rel err {err:.2e}"
                if extra is None:  # the MoE through it
                    os.environ["DSV4_MOE_FP4_GEMM"] = "1"
                    try:
                        u = torch.randn(300, d, generator=G).bfloat16()
                        idx = torch.stack([torch.randperm(n_exp, generator=G)[:k]
                                           for _ in range(300)])
                        wgt = torch.rand(300, k, generator=G) + 0.1
                        want = km.moe_forward_ref(u, idx, wgt, experts, shared).float()
                        got = km._moe_cuda(u, idx, wgt, experts, shared,
                                           dict(grouped_mm=True)).float()
                        err = ((got - want).norm() / want.norm()).item()
                        assert err < 1e-3, f"MoE on the MXFP4-decoding GEMM: rel err {err:.2e}"
                    finally:
                        del os.environ["DSV4_MOE_FP4_GEMM"]
        # blocks ~2^9 below their row's largest within 128 columns (scale bytes 8-11 apart:
        # the bf16 path before) fold exactly (the copy takes e2m1 values times 2^-5 .. 2^6);
        # ~2^14 apart (12 or more) do not
        w = torch.randn(inter, d, generator=G) / d ** 0.5
        w[:, 32:64] *= 2.0 ** -8
        experts[3].w1.set_float(w)
        km._TABLES.clear()
        main, extra = km._tables(experts, shared, torch.device("cpu"))
        flag = torch.zeros(1, dtype=torch.int32)
        q, sc = gm.to_fp8(main, extra, ("w1",), n_exp + 1, inter, d, torch.device("cpu"), flag)
        w1 = (q.float().unflatten(2, (-1, 128)) * sc[..., None]).flatten(2)
        assert int(flag) == 0 and torch.equal(w1[4], experts[3].w1.dequantize()), \
            "scales 2^8 apart: not exact"
        w[:, 32:64] *= 2.0 ** -6
        experts[3].w1.set_float(w)
        km._TABLES.clear()
        main, extra = km._tables(experts, shared, torch.device("cpu"))
        u = torch.randn(40, d, generator=G).bfloat16()
        idx = torch.stack([torch.randperm(n_exp, generator=G)[:k] for _ in range(40)])
        wgt = torch.rand(40, k, generator=G) + 0.1
        want = km.moe_forward_ref(u, idx, wgt, experts, shared).float()
        got = km._moe_cuda(u, idx, wgt, experts, shared, dict(grouped_mm=True)).float()
        assert main.fp8_exact is False, "scales 2^14 apart were not flagged"
        err = ((got - want).norm() / want.norm()).item()
        assert err < 1e-3, f"the bf16 fallback: rel err {err:.2e}"
        # w2's two K-blocks 2^13 apart (each block's own scales close): blocks exact, rows not
        experts[3].w1.set_float(torch.randn(inter, d, generator=G) / d ** 0.5)
        w = torch.randn(d, inter, generator=G) / inter ** 0.5
        w[:, 128:] *= 2.0 ** -13
        experts[3].w2.set_float(w)
        km._TABLES.clear()
        main, extra = km._tables(experts, shared, torch.device("cpu"))
        want = km.moe_forward_ref(u, idx, wgt, experts, shared).float()
        for _ in range(2):  # the first call finds it out, the second stays on block scales
            got = km._moe_cuda(u, idx, wgt, experts, shared, dict(grouped_mm=True)).float()
            assert main.fp8_exact is True and main.fp8_row_exact is False, \
                "rows with blocks 2^13 apart: not told from exact ones"
            err = ((got - want).norm() / want.norm()).item()
            assert err < 1e-3, f"block scales for a row-inexact layer: rel err {err:.2e}"
    finally:
        del os.environ["DSV4_MOE_FP8_GEMM"]


def check_model() -> None:
    """The tiny model (every attention kind, hash and dense MoE) with every op that has a
    Triton kernel taking it, against the same model on torch ops: prefill of 150 tokens (past
    the window and an HCA entry) and three decode steps. In float32 without QAT, so that no
    rounding boundary can turn summation-order noise into a different token (SPEC.md 10)."""
    import importlib
    import pkgutil

    import dsv4.kernels as kernels
    from model_helpers import make_cache, make_model, run_chunks
    model = make_model(dtype="float32", seed=1, qat=False)
    ids = list(range(5, 5 + 153))
    want = run_chunks(model, make_cache(model), ids, [150, 1, 1, 1])
    for info in pkgutil.iter_modules(kernels.__path__):
        mod = importlib.import_module(f"dsv4.kernels.{info.name}")
        if hasattr(mod, "use_triton"):
            mod.use_triton = lambda t: True
    got = run_chunks(model, make_cache(model), ids, [150, 1, 1, 1])
    err = ((got - want).norm() / want.norm()).item()
    assert err < 1e-4, f"model on the kernels: rel err {err:.2e} against the torch ops"


CHECKS = {f.__name__[len("check_"):]: f for f in (check_topk, check_candidates,
                                                  check_indexer_avail, check_indexer_fp8,
                                                  check_attention_cmp_len,
                                                  check_mhc, check_mhc_fused, check_grouped_fp8_linear,
                                                  check_quant_linear, check_moe_fp4,
                                                  check_moe_fp8, check_moe_other,
                                                  check_moe_gate,
                                                  check_moe_fp8_gemm,
                                                  check_small_ops, check_model)}

if __name__ == "__main__":
    fix_interpreter()
    CHECKS[sys.argv[1]]()
    print("ok", sys.argv[1])
