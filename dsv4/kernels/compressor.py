"""Softmax pooling of the token compressor (SPEC.md 6).

For each completing window, each channel is a softmax-weighted sum over the window's items:
`c = sum_t softmax_t(g_t) * a_t`; absent items (before window 0) get weight 0.
The Triton kernel reads each input element once: one CTA holds all items of a window for a
block of channels, so the softmax and the sum stay in registers.

`compress_windows` also gathers the items: each comes from this step's projected rows or from
the slot's state ring, and with overlapping windows (k = 2) the previous window's items use
channels [:C] and this window's [C:]. The kernel reads them where they are (no gathered copy),
and adds the positional bias `ape[pos % m]` to this step's gate rows as it reads them (item j of
a window sits at position j mod m).

`ring_write` keeps the raw rows of the last positions of every sequence in the state rings
(the gate rows with their positional bias): one kernel instead of two gathers, two scatters
and the bias's three ops.

`compress_finish` turns pooled rows into cache rows: the working-dtype cast, RMSNorm, RoPE at
the entry's first position, and the QAT rounding (FP8 per 64 for attention rows, Hadamard +
FP4 per 32 for indexer keys), each rounded to the working dtype as the reference chain rounds
(`compress_finish_ref`); one kernel instead of four or five.
"""
from __future__ import annotations

import torch

from ..quant.sim import hadamard_matrix
from . import HAS_TRITON, use_triton
from .pdl import pdl
from .qat import FP8_BLOCK, fp8_round_ref_, hadamard_fp4_ref
from .rmsnorm import rmsnorm_ref
from .rope import rope_ref_


def compress_pool_ref(kv: torch.Tensor, score: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """kv, score [W, items, C] fp32; valid [W, items] -> [W, C] fp32."""
    s = score.masked_fill(~valid[..., None], float("-inf"))
    return (torch.softmax(s, dim=1) * kv.masked_fill(~valid[..., None], 0.0)).sum(1)


if HAS_TRITON:
    import triton
    import triton.language as tl

    from .pdl import pdl_start
    from .qat import _fp4_sim, _fp8_sim, _hadamard_rows
    from .rope import cos_sin, turn

    @triton.jit(do_not_specialize=["ITEMS"])
    def _compress_pool_kernel(kv_ptr, score_ptr, valid_ptr, out_ptr, ITEMS, C,
                              BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr,
                              PDL: tl.constexpr = False):
        pdl_start(PDL)
        w = tl.program_id(0)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        i = tl.arange(0, BLOCK_I)
        v = tl.load(valid_ptr + w * ITEMS + i, mask=i < ITEMS, other=0) != 0
        mask = v[:, None] & (c < C)[None, :]
        off = (w * ITEMS + i[:, None]).to(tl.int64) * C + c[None, :]
        s = tl.load(score_ptr + off, mask=mask, other=float("-inf"))
        a = tl.load(kv_ptr + off, mask=mask, other=0.0)
        p = tl.exp(s - tl.max(s, 0)[None, :])
        out = tl.sum(p * a, 0) / tl.sum(p, 0)
        tl.store(out_ptr + w.to(tl.int64) * C + c, out, mask=c < C)

    @triton.jit(do_not_specialize=["ITEMS"])
    def _compress_windows_kernel(a_ptr, g_ptr, ape_ptr, kv_ptr, sc_ptr, new_ptr, nidx_ptr,
                                 sidx_ptr, valid_ptr, out_ptr, ITEMS, C, m, K: tl.constexpr,
                                 BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr,
                                 PDL: tl.constexpr = False):
        pdl_start(PDL)
        w = tl.program_id(0)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        i = tl.arange(0, BLOCK_I)
        live = i < ITEMS
        at = w * ITEMS + i
        v = tl.load(valid_ptr + at, mask=live, other=0) != 0
        new = tl.load(new_ptr + at, mask=live, other=0) != 0
        row_new = tl.load(nidx_ptr + at, mask=live & new, other=0).to(tl.int64)
        row_old = tl.load(sidx_ptr + at, mask=live & ~new, other=0).to(tl.int64)
        col = c[None, :]
        if K == 2:  # items of the previous window read channels [:C], this window's [C:]
            col = col + (i >= m).to(tl.int32)[:, None] * C
        ok = v[:, None] & (c < C)[None, :]
        on = ok & new[:, None]
        oo = ok & ~new[:, None]
        rn = row_new[:, None] * (K * C) + col
        ro = row_old[:, None] * (K * C) + col
        bias = tl.load(ape_ptr + (i % m)[:, None] * (K * C) + col, mask=on, other=0.0)
        s = tl.where(on, tl.load(g_ptr + rn, mask=on, other=0.0) + bias,
                     tl.load(sc_ptr + ro, mask=oo, other=0.0))
        s = tl.where(ok, s, float("-inf"))
        x = tl.where(on, tl.load(a_ptr + rn, mask=on, other=0.0),
                     tl.load(kv_ptr + ro, mask=oo, other=0.0))
        p = tl.exp(s - tl.max(s, 0)[None, :])
        out = tl.sum(p * x, 0) / tl.sum(p, 0)
        tl.store(out_ptr + w.to(tl.int64) * C + c, out, mask=c < C)

    @triton.jit(do_not_specialize=["N"])
    def _ring_write_kernel(a_ptr, g_ptr, ape_ptr, pos_ptr, tok_ptr, dst_ptr, kv_ptr, sc_ptr, N,
                           W, m, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
                           PDL: tl.constexpr = False):
        pdl_start(PDL)
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        rok = r < N
        ok = rok[:, None] & (c < W)[None, :]
        t = tl.load(tok_ptr + r, mask=rok, other=0).to(tl.int64)
        d = tl.load(dst_ptr + r, mask=rok, other=0).to(tl.int64)
        j = tl.load(pos_ptr + t, mask=rok, other=0) % m
        src = t[:, None] * W + c[None, :]
        dst = d[:, None] * W + c[None, :]
        tl.store(kv_ptr + dst, tl.load(a_ptr + src, mask=ok, other=0.0), mask=ok)
        g = tl.load(g_ptr + src, mask=ok, other=0.0)
        tl.store(sc_ptr + dst, g + tl.load(ape_ptr + j[:, None] * W + c[None, :], mask=ok,
                                           other=0.0), mask=ok)

    @triton.jit(do_not_specialize=["R"])
    def _compress_finish_kernel(x_ptr, w_ptr, idx_ptr, f_ptr, h_ptr, out_ptr, R, m, eps,
                                C: tl.constexpr, NOPE: tl.constexpr, INDEX: tl.constexpr,
                                QAT: tl.constexpr, BR: tl.constexpr, PDL: tl.constexpr = False):
        """BR pooled rows -> cache rows; the steps and their roundings of the rmsnorm, rope,
        fp8_round and hadamard_fp4 kernels."""
        pdl_start(PDL)
        dt = out_ptr.dtype.element_ty
        rows = tl.program_id(0) * BR + tl.arange(0, BR)
        ok = rows < R
        c = tl.arange(0, C)
        out = out_ptr + rows[:, None].to(tl.int64) * C + c[None, :]
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * C + c[None, :], mask=ok[:, None],
                    other=0.0).to(dt).to(tl.float32)
        r = tl.rsqrt(tl.sum(x * x, 1) / C + eps)
        y = (x * r[:, None] * tl.load(w_ptr + c)[None, :]).to(dt).to(tl.float32)
        # RoPE on the last C - NOPE channels, pairs (2i, 2i+1), at the entry's first position
        p = (tl.load(idx_ptr + rows, mask=ok, other=0) * m).to(tl.float32)
        e, o = tl.split(tl.reshape(y, (BR, C // 2, 2)))
        fi = tl.arange(0, C // 2) - NOPE // 2
        rot = fi >= 0
        ang = p[:, None] * tl.load(f_ptr + fi, mask=rot, other=0.0)[None, :]
        cs, sn = cos_sin(ang, rot[None, :])
        y = tl.reshape(tl.join(*turn(e, o, cs, sn)), (BR, C)).to(dt).to(tl.float32)
        if INDEX:  # Hadamard rows read back from memory in slices, then FP4
            tl.store(out, y.to(dt), mask=ok[:, None])
            tl.debug_barrier()
            y = _hadamard_rows(out_ptr, h_ptr, rows, ok, C, BR).to(dt).to(tl.float32)
            if QAT:
                y = _fp4_sim(y, BR, C)
            tl.debug_barrier()  # every thread has read its slices before any row is rewritten
        elif QAT:  # FP8 per 64 on the no-rope channels
            q = tl.reshape(_fp8_sim(tl.reshape(y, (BR, C // 64, 64))), (BR, C))
            y = tl.where((c < NOPE)[None, :], q.to(dt).to(tl.float32), y)
        tl.store(out, y.to(dt), mask=ok[:, None])

    def compress_pool_triton(kv: torch.Tensor, score: torch.Tensor,
                             valid: torch.Tensor) -> torch.Tensor:
        """Launcher: kv, score fp32 [W, items, C], valid bool [W, items] -> fp32 [W, C]."""
        W, items, C = kv.shape
        if score.shape != kv.shape or valid.shape != (W, items):
            raise ValueError(f"kv {tuple(kv.shape)}, score {tuple(score.shape)}, valid "
                             f"{tuple(valid.shape)} do not fit")
        if kv.dtype != torch.float32 or score.dtype != torch.float32:
            raise TypeError(f"kv and score must be fp32, got {kv.dtype}, {score.dtype}")
        out = torch.empty(W, C, dtype=torch.float32, device=kv.device)
        if W == 0:
            return out
        bi = triton.next_power_of_2(items)
        bc = max(16, min(triton.next_power_of_2(C), 8192 // bi))  # ~8K elements a tensor
        _compress_pool_kernel[(W, triton.cdiv(C, bc))](
            kv.contiguous(), score.contiguous(), valid.contiguous().view(torch.uint8), out,
            items, C, BLOCK_I=bi, BLOCK_C=bc, num_warps=4, **pdl())
        return out


def compress_windows_ref(a, g, kv_ring, sc_ring, is_new, new_idx, state_idx, valid, m, ape):
    """a, g [T, k*C] this step's rows (g without its positional bias); ape [m, k*C]; kv_ring,
    sc_ring [rows, k*C] the state rings (fp32, bias included); is_new, new_idx, state_idx,
    valid [W, k*m] -> pooled [W, C] fp32."""
    new = is_new[..., None]
    bias = ape[torch.arange(is_new.shape[1], device=ape.device) % m]  # item j: position j mod m
    kv = torch.where(new, a[new_idx], kv_ring[state_idx])  # [W, k*m, k*C]
    sc = torch.where(new, g[new_idx] + bias, sc_ring[state_idx])
    if is_new.shape[1] == 2 * m:  # previous window's items use channels [:C], this one's [C:]
        c = a.shape[1] // 2
        kv = torch.cat([kv[:, :m, :c], kv[:, m:, c:]], 1)
        sc = torch.cat([sc[:, :m, :c], sc[:, m:, c:]], 1)
    return compress_pool(kv, sc, valid)


def compress_windows(a, g, kv_ring, sc_ring, is_new, new_idx, state_idx, valid, m, ape):
    w, items = is_new.shape
    k = items // m
    if (use_triton(a) and items <= 1024 and a.dtype == g.dtype == kv_ring.dtype
            == sc_ring.dtype == ape.dtype == torch.float32 and a.is_contiguous()
            and g.is_contiguous() and kv_ring.is_contiguous() and sc_ring.is_contiguous()
            and ape.is_contiguous()):
        c = a.shape[1] // k
        out = torch.empty(w, c, dtype=torch.float32, device=a.device)
        if w == 0:
            return out
        bi = triton.next_power_of_2(items)
        bc = max(16, min(triton.next_power_of_2(c), 8192 // bi))
        _compress_windows_kernel[(w, triton.cdiv(c, bc))](
            a, g, ape, kv_ring, sc_ring, is_new.view(torch.uint8), new_idx, state_idx,
            valid.view(torch.uint8), out, items, c, m, K=k, BLOCK_I=bi, BLOCK_C=bc, num_warps=4,
            **pdl())
        return out
    return compress_windows_ref(a, g, kv_ring, sc_ring, is_new, new_idx, state_idx, valid, m, ape)


def ring_write_ref_(kv_ring, sc_ring, a, g, ape, pos, tok, dst):
    """kv_ring[dst] = a[tok]; sc_ring[dst] = g[tok] + ape[pos[tok] % m] (rings [rows, W])."""
    kv_ring[dst] = a[tok]
    sc_ring[dst] = g[tok] + ape[pos[tok] % ape.shape[0]]


def ring_write_(kv_ring, sc_ring, a, g, ape, pos, tok, dst):
    """In place: this step's raw rows a, g [T, W] (tokens `tok`) into ring rows `dst`."""
    n, width = tok.shape[0], a.shape[1]
    if (use_triton(a) and a.dtype == g.dtype == kv_ring.dtype == sc_ring.dtype == ape.dtype
            == torch.float32 and all(x.is_contiguous() for x in (a, g, ape, kv_ring, sc_ring))):
        if n:
            bw = min(512, triton.next_power_of_2(width))
            _ring_write_kernel[(triton.cdiv(n, 8), triton.cdiv(width, bw))](
                a, g, ape, pos, tok, dst, kv_ring, sc_ring, n, width, ape.shape[0], BLOCK_R=8,
                BLOCK_W=bw, num_warps=4, **pdl())
        return
    ring_write_ref_(kv_ring, sc_ring, a, g, ape, pos, tok, dst)


def compress_pool(kv, score, valid):
    if use_triton(kv) and kv.dtype == torch.float32 and kv.shape[1] <= 1024:
        return compress_pool_triton(kv, score, valid)
    return compress_pool_ref(kv, score, valid)


def compress_finish_ref(pooled, weight, eps, index, m, freqs, rope_dim, index_keys, qat, dtype):
    """pooled [W, C] fp32 -> cache rows [W, C] in `dtype`: RMSNorm, RoPE at position index*m,
    then FP8 per 64 on the no-rope channels (attention rows, `qat`) or Hadamard + FP4 per 32
    (indexer keys; FP4 with `qat`)."""
    c = rmsnorm_ref(pooled.to(dtype), weight, eps)
    c = rope_ref_(c, index * m, freqs, rope_dim)
    if index_keys:
        return hadamard_fp4_ref(c, qat)
    return fp8_round_ref_(c, c.shape[1] - rope_dim) if qat else c


def compress_finish(pooled, weight, eps, index, m, freqs, rope_dim, index_keys, qat, dtype):
    w, C = pooled.shape
    nope = C - rope_dim
    if (use_triton(pooled) and dtype in (torch.bfloat16, torch.float32)
            and 64 <= C <= (256 if index_keys else 512) and C & (C - 1) == 0
            and nope % FP8_BLOCK == 0 and freqs.numel() == rope_dim // 2):
        out = torch.empty(w, C, dtype=dtype, device=pooled.device)
        if w == 0:
            return out
        h = hadamard_matrix(C, torch.float32, pooled.device) if index_keys else pooled
        # (rows, warps) a program: indexer keys at decode sizes in 8-row programs of 2 warps
        # (H200, `scratch/small_sweep.py`, CUDA-graph loop: 1 / 8 / 64 windows 6.5 / 6.4 /
        # 9.6 -> 6.3 / 6.0 / 7.8 us against 16 rows on 4 warps; bit-equal), more in 16-row
        # programs of 4; attention rows one a program
        br, warps = ((8, 2) if w <= 64 else (16, 4)) if index_keys else (1, 4)
        _compress_finish_kernel[(triton.cdiv(w, br),)](
            pooled.contiguous(), weight.float().contiguous(), index,
            freqs.to(device=pooled.device, dtype=torch.float32), h, out, w, m, eps, C=C,
            NOPE=nope, INDEX=index_keys, QAT=qat, BR=br, num_warps=warps, **pdl())
        return out
    return compress_finish_ref(pooled, weight, eps, index, m, freqs, rope_dim, index_keys, qat,
                               dtype)
