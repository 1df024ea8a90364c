"""Sparse attention with an attention sink over a shared latent key/value (SPEC.md 5.3-5.4).

Each token attends to its own list of window rows and compressed rows; keys and values are the
same `[D]` row, shared by all H heads; one softmax covers both lists plus the per-head sink.

Caches may be float rows `[N, D]` (bf16 or fp32) or packed FP8 rows `uint8 [N, 584]`
(`kv_fp8.py`); the dtype says which. `win_new` (this step's rows) is always float.

The Triton kernel gives each CTA one token and a block of heads, so a gathered row is loaded
once and used by every head of the block (MQA: all heads share it). Logits and the weighted sum
use the tensor cores with fp32 accumulation; the online softmax starts from the sink, which also
makes an empty list well defined (o = 0). When there are too few tokens to fill the GPU, the row
list is split across CTAs and a second kernel merges the partial softmaxes with the sink.
Where it applies (bf16 queries, D = 512, whole 64-head blocks) the Gluon kernel of
`sparse_attention_wg.py` runs instead, with the same arguments and splits: its explicit layouts
do not repeat Q K^T in both warpgroups, as this kernel's do (1.6-1.9x faster at batch 128).
Packed FP8 rows take its warp-specialised form (`sparse_attention_ws.py`: the decode in load
warps of their own, bit-identical, 5-15% faster) unless DSV4_ATTN_WS=0.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from . import HAS_TRITON, gluon_failed, num_sms, use_triton
from .pdl import pdl
from .kv_fp8 import kv_fp8_row_bytes, store_kv_fp8_, unpack_kv_fp8
from .rope import rope_

_log = logging.getLogger(__name__)
_WG_FAILED: list[str] = []  # set once the Gluon kernel failed to build here: Triton from then on
_WG_PDL_OK = [True]  # emptied if the Gluon kernel cannot be launched with PDL (`pdl.py`)
# FP8 rows in the Gluon kernel: the decode in load warps of its own (`sparse_attention_ws.py`)
# unless DSV4_ATTN_WS=0; set once it failed to build here (the plain Gluon kernel from then on)
ATTN_WS = os.environ.get("DSV4_ATTN_WS", "1") != "0"
_WS_FAILED: list[str] = []
# its decoded bf16 tiles of 32 rows (2: 173 KiB of shared memory with Q and the byte stages;
# 3 measured slower)
WS_TILES = 2


def gather_rows(idx: torch.Tensor, cache: torch.Tensor, new: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of cat(cache, new) at idx (any shape); -1 gives a zero row."""
    n = cache.shape[0]
    safe = idx.clamp(min=0)
    if n == 0:  # everything comes from `new` (or is empty)
        cache = torch.zeros(1, *cache.shape[1:], dtype=cache.dtype, device=cache.device)
        n_idx = (safe - n).clamp(0, max(new.shape[0] - 1, 0)) if new is not None else safe * 0
        return new[n_idx] if new is not None else cache[n_idx]
    if new is None:
        return cache[safe.clamp(max=n - 1)]
    from_new = (safe >= n)[..., None]
    return torch.where(from_new, new[(safe - n).clamp(0, new.shape[0] - 1)],
                       cache[safe.clamp(max=n - 1)])


def _gathered(cache: torch.Tensor, idx: torch.Tensor, head_dim: int, rope_dim: int) -> torch.Tensor:
    """fp32 rows cache[idx] ([..., D]) of a plain or packed-FP8 cache."""
    raw = cache[idx]
    return _as_rows(raw.reshape(-1, raw.shape[-1]), head_dim, rope_dim).float().reshape(
        *idx.shape, head_dim)


def _as_rows(cache: torch.Tensor, head_dim: int, rope_dim: int) -> torch.Tensor:
    """Float rows of a cache that may be packed FP8 (uint8)."""
    if cache.dtype == torch.uint8:
        return unpack_kv_fp8(cache, head_dim, rope_dim, torch.float32)
    return cache


def sparse_attention_ref(q: torch.Tensor, sink: torch.Tensor, scale: float,
                         win_cache: torch.Tensor, win_new: torch.Tensor, win_idx: torch.Tensor,
                         cmp_cache: torch.Tensor | None = None,
                         cmp_idx: torch.Tensor | None = None, rope_dim: int = 64) -> torch.Tensor:
    """q [T, H, D]; sink [H] fp32 raw logits; win_idx [T, Kw] into cat(win_cache [Nw, D],
    win_new [T, D]); cmp_idx [T, Kc] into cmp_cache [Nc, D]; -1 marks an empty slot.
    Caches may be packed FP8 rows (uint8, `kv_fp8.py`, `rope_dim` rope dims).
    Returns o [T, H, D] in q's dtype. Scores, softmax and the weighted sum run in fp32."""
    D = q.shape[-1]
    # Gather first, convert after: only the selected rows are unpacked / upcast.
    n = win_cache.shape[0]
    safe = win_idx.clamp(min=0)
    from_cache = _gathered(win_cache, safe.clamp(max=max(n - 1, 0)), D, rope_dim) if n else None
    from_new = win_new.float()[(safe - n).clamp(0, win_new.shape[0] - 1)]
    rows = from_new if from_cache is None else torch.where((safe < n)[..., None], from_cache, from_new)
    valid = win_idx >= 0
    if cmp_idx is not None and cmp_idx.shape[1]:
        cmp_rows = _gathered(cmp_cache, cmp_idx.clamp(0, cmp_cache.shape[0] - 1), D, rope_dim)
        rows = torch.cat([rows, cmp_rows], 1)
        valid = torch.cat([valid, cmp_idx >= 0], 1)
    rows = rows.float()
    logits = torch.einsum("thd,tkd->thk", q.float(), rows) * scale  # [T, H, K]
    logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
    sink_l = sink.float()[None, :, None].expand(q.shape[0], -1, 1)
    probs = torch.softmax(torch.cat([logits, sink_l], -1), -1)[..., :-1]
    return torch.einsum("thk,tkd->thd", probs, rows).to(q.dtype)


@dataclass(frozen=True)
class AttnConfig:
    """Tile shape of the Triton kernel: heads per CTA, rows per step, warps, pipeline depth;
    `splits` = 0 lets the launcher choose how many CTAs share one token's row list. `kernel`:
    "auto" runs the Gluon warpgroup kernel (`sparse_attention_wg.py`) where it applies (bf16
    rows, D = 512, 64 heads a CTA, 8 warps), for FP8 rows its warp-specialised form
    (`sparse_attention_ws.py`, 32-row tiles, unless DSV4_ATTN_WS=0); "gluon" the plain Gluon
    kernel, "ws" the warp-specialised one (`num_stages`: its bf16 tiles), "triton" always the
    Triton kernel."""
    block_h: int = 64
    block_k: int = 32
    num_warps: int = 8
    num_stages: int = 2
    splits: int = 0
    kernel: str = "auto"


def default_config(q: torch.Tensor, fp8: bool = False) -> AttnConfig:
    """Tile shapes measured on an H200 (benchmarks/bench_attention.py --configs)."""
    if q.dtype == torch.float32:  # exact-comparison mode: plain fp32 FMA, small tiles
        return AttnConfig(block_h=16, block_k=16, num_warps=4, num_stages=1)
    if wg_applies(q, fp8):  # the Gluon kernel: 64-row tiles, 32 when a few tokens must be split
        if q.shape[0] * q.shape[1] <= 16 * 64:  # (16 / 32 heads: counted as they are)
            return AttnConfig(block_k=32, num_stages=2 if fp8 else 3)
        return AttnConfig(block_k=64, num_stages=2)
    if fp8:  # rows dequantised to bf16 in registers: 32-row tiles fit
        return AttnConfig(block_k=32, num_stages=2)
    if q.shape[1] >= 128:
        return AttnConfig(block_k=64, num_stages=2)
    return AttnConfig(block_k=32, num_stages=3)


def wg_applies(q: torch.Tensor, fp8: bool = False, rope_dim: int = 64,
               cfg: AttnConfig | None = None) -> bool:
    """Whether the Gluon warpgroup kernel (`sparse_attention_wg.py`) runs for q: bf16 queries
    with D = 512 and whole 64-head blocks, 8 warps, 32- or 64-row tiles, rope_dim 64 for FP8
    rows, and a Gluon that built it (the first failure switches to Triton for good). 16 or 32
    heads (a tensor-parallel rank's: Flash's 64 over 2 or 4 GPUs, Pro's 128 over 4 or 8) run
    in one masked 64-head block: the Triton kernel's tiles of 16-32 heads are below wgmma's
    64 rows (`HMMA`, and 480 bytes of spills a thread at 32 heads with FP8 rows); on an H200
    the masked block is 1.0-2.6x faster (performance log, `bench_attention.py --rank-heads`)."""
    padded = q.shape[1] in (16, 32)
    if (_WG_FAILED or q.dtype != torch.bfloat16 or q.shape[-1] != 512
            or (q.shape[1] % 64 and not padded) or (fp8 and rope_dim != 64)):
        return False
    if cfg is not None and (cfg.kernel == "triton" or cfg.block_h != 64 or cfg.num_warps != 8
                            or cfg.block_k not in (32, 64)):
        return False
    from .sparse_attention_wg import HAS_GLUON
    return HAS_GLUON


if HAS_TRITON:
    import triton
    import triton.language as tl

    from .pdl import pdl_start
    from .rope import cos_sin, turn

    _LOG2E = 1.4426950408889634

    @triton.jit
    def _fp8_load(row_ptr, mask, d, D: tl.constexpr, NOPE: tl.constexpr, ROPE: tl.constexpr,
                  BLOCK_D: tl.constexpr):
        """Raw bytes of packed rows (uint8 row pointers [BK]): e4m3 codes, scale bytes and the
        bf16 rope dims, each [BK, ...] where it lies in the row."""
        G: tl.constexpr = BLOCK_D // 64
        is_nope = d < NOPE
        code = tl.load(row_ptr[:, None] + d[None, :], mask=mask[:, None] & is_nope[None, :], other=0)
        g = tl.arange(0, G)
        sbyte = tl.load(row_ptr[:, None] + (NOPE + 2 * ROPE) + g[None, :],
                        mask=mask[:, None] & (g < NOPE // 64)[None, :], other=127)
        rope_ptr = tl.multiple_of((row_ptr + NOPE).to(tl.pointer_type(tl.bfloat16), bitcast=True),
                                  8)  # the bitcast drops what the compiler knew
        # d % ROPE is d - NOPE on the rope dims (NOPE is a multiple of ROPE) and stays inside
        # the row on the masked ones, in runs of ROPE contiguous elements (wide loads)
        rope = tl.load(rope_ptr[:, None] + (d % ROPE)[None, :],
                       mask=mask[:, None] & ((d >= NOPE) & (d < D))[None, :], other=0.0)
        return code, sbyte, rope

    @triton.jit
    def _fp8_decode(code, sbyte, rope, d, NOPE: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_D: tl.constexpr, DT: tl.constexpr):
        """`_fp8_load`'s bytes -> rows [BK, BLOCK_D] in DT (bf16 or fp32), exactly: an e4m3
        value times a power of two has at most 4 significant bits. (The Gluon kernel decodes
        by bit placement instead, `_e4m3_bf16`; here that measured no faster on an H200.)"""
        G: tl.constexpr = BLOCK_D // 64
        val = code.to(tl.float8e4nv, bitcast=True).to(DT)
        scale = tl.exp2(sbyte.to(tl.float32) - 127.0).to(DT)  # [BK, G], a power of two
        scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (BLOCK_K, G, 64)), (BLOCK_K, BLOCK_D))
        return tl.where((d < NOPE)[None, :], val * scale, rope.to(DT))

    @triton.jit
    def _tile_rows(tile, win_idx_row, cmp_idx_row, win_cache_ptr, win_new_ptr, cmp_cache_ptr,
                   Nw, Kw, Kc, n_win_tiles, row_stride, D: tl.constexpr, BLOCK_K: tl.constexpr,
                   FP8: tl.constexpr):
        """Rows of one tile of a token's list (window tiles first): valid lanes, which come from
        this step's new rows, and each lane's cache and new-row pointer."""
        is_win = tile < n_win_tiles
        kpos = tl.where(is_win, tile, tile - n_win_tiles) * BLOCK_K + tl.arange(0, BLOCK_K)
        kmask = kpos < tl.where(is_win, Kw, Kc)
        idx = tl.load(tl.where(is_win, win_idx_row, cmp_idx_row) + kpos, mask=kmask,
                      other=-1).to(tl.int64)
        valid = kmask & (idx >= 0)
        is_new = is_win & (idx >= Nw)
        # Masked-off lanes still form addresses (the pipelined loads are cp.async with a zero
        # source size): keep them on row 0 instead of up to Nw rows outside an allocation
        off = tl.where(valid & ~is_new, idx, 0) * row_stride
        if FP8:  # packed rows are whole 8-byte words (kv_fp8_row_bytes); without the hint
            # (584 is no multiple of 16) every byte of a row would be its own load
            off = tl.multiple_of(off, 8)
        cache_row = tl.where(is_win, win_cache_ptr, cmp_cache_ptr) + off
        new_row = win_new_ptr + tl.where(valid & is_new, idx - Nw, 0) * D
        return valid, is_new, cache_row, new_row

    @triton.jit
    def _attend(q, k, valid, m_i, l_i, acc, qk_scale, IEEE: tl.constexpr):
        """One tile of the online softmax (log2 units): logits of q [BH, D] against k [BK, D],
        then the running max, sum and weighted sum of k."""
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(valid[None, :], s * qk_scale, float("-inf"))  # [BH, BK]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = tl.dot(p.to(k.dtype), k, acc * alpha[:, None], input_precision="ieee")
        else:
            acc = tl.dot(p.to(k.dtype), k, acc * alpha[:, None])
        return m_new, l_i, acc

    @triton.jit(do_not_specialize=[
        "T", "Kc", "n_win_tiles", "n_tiles", "tiles_per_split"])
    def _sparse_attn_kernel(q_ptr, sink_ptr, o_ptr, part_o_ptr, part_ml_ptr,
                            win_cache_ptr, win_new_ptr, win_idx_ptr, cmp_cache_ptr, cmp_idx_ptr,
                            cmp_len_ptr, T, H, Nw, Kw, Kc, n_win_tiles, n_tiles, tiles_per_split,
                            stride_qt, stride_qh, stride_ot, stride_oh, stride_wi, stride_ci,
                            row_stride, qk_scale,
                            D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
                            BLOCK_K: tl.constexpr, FP8: tl.constexpr, NOPE: tl.constexpr,
                            ROPE: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr,
                            HAS_LEN: tl.constexpr, PDL: tl.constexpr = False):
        pdl_start(PDL)
        pid = tl.program_id(0)
        sid = tl.program_id(1)
        n_hb = tl.cdiv(H, BLOCK_H)
        # head blocks of one token are adjacent: they share rows through L2; int64 offsets, as
        # T * H * D passes 2^31 at 32K tokens a step with 128 heads
        t = (pid // n_hb).to(tl.int64)
        hb = pid % n_hb
        h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        hmask = h < H
        d = tl.arange(0, BLOCK_D)
        dmask = d < D
        q = tl.load(q_ptr + t * stride_qt + h[:, None] * stride_qh + d[None, :],
                    mask=hmask[:, None] & dmask[None, :], other=0.0)
        if SPLIT:  # the sink is merged by the combine kernel
            m_i = tl.full([BLOCK_H], -1.0e30, tl.float32)
            l_i = tl.zeros([BLOCK_H], tl.float32)
        else:  # start the online softmax at the sink: exp(sink - m) = 1
            m_i = tl.load(sink_ptr + h, mask=hmask, other=0.0).to(tl.float32) * 1.4426950408889634
            l_i = tl.full([BLOCK_H], 1.0, tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
        lo = sid * tiles_per_split
        if HAS_LEN:  # the token's compressed rows are the first cmp_len[t] of its list
            n_tiles = n_win_tiles + tl.cdiv(tl.minimum(Kc, tl.load(cmp_len_ptr + t).to(tl.int32)),
                                            BLOCK_K)
        hi = tl.minimum(lo + tiles_per_split, n_tiles)
        win_idx_row = win_idx_ptr + t * stride_wi
        cmp_idx_row = cmp_idx_ptr + t * stride_ci
        nd = d[None, :] < D
        for tile in range(lo, hi):
            valid, is_new, cache_row, new_row = _tile_rows(
                tile, win_idx_row, cmp_idx_row, win_cache_ptr, win_new_ptr, cmp_cache_ptr, Nw, Kw,
                Kc, n_win_tiles, row_stride, D, BLOCK_K, FP8)
            if FP8:
                code, sbyte, rope = _fp8_load(cache_row, valid & ~is_new, d, D, NOPE, ROPE, BLOCK_D)
                kc = _fp8_decode(code, sbyte, rope, d, NOPE, BLOCK_K, BLOCK_D, q.dtype)
                kn = tl.load(new_row[:, None] + d[None, :],
                             mask=(valid & is_new)[:, None] & nd, other=0.0)
                k = tl.where(is_new[:, None], kn.to(q.dtype), kc)
            else:
                ptr = tl.where(is_new[:, None], new_row[:, None], cache_row[:, None]) + d[None, :]
                k = tl.load(ptr, mask=valid[:, None] & nd, other=0.0)
            m_i, l_i, acc = _attend(q, k, valid, m_i, l_i, acc, qk_scale, IEEE)
        if SPLIT:
            base = (sid * T + t) * H + h
            # a split past the token's rows leaves its partial output unwritten (the merge
            # reads only splits with a finite max): under CUDA graphs the splits follow the
            # graphs' width, and at a short context most of them are empty
            tl.store(part_o_ptr + base[:, None] * D + d[None, :], acc,
                     mask=hmask[:, None] & dmask[None, :] & (hi > lo))
            tl.store(part_ml_ptr + base * 2, m_i, mask=hmask)
            tl.store(part_ml_ptr + base * 2 + 1, l_i, mask=hmask)
        else:
            o = acc / l_i[:, None]
            tl.store(o_ptr + t * stride_ot + h[:, None] * stride_oh + d[None, :],
                     o.to(o_ptr.dtype.element_ty), mask=hmask[:, None] & dmask[None, :])

    @triton.jit(do_not_specialize=["T"])
    def _combine_kernel(sink_ptr, part_o_ptr, part_ml_ptr, o_ptr, pos_ptr, f_ptr, T, H, S,
                        stride_ot, stride_oh, D: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_H: tl.constexpr, ROPE: tl.constexpr = 0, PDL: tl.constexpr = False):
        """Merge S partial softmaxes (unnormalised acc, max m, sum l, log2 units) and the sink,
        for one token, BLOCK_H heads and BLOCK_D of the D dims (a slice per CTA: at decode batch
        1 whole rows would leave all but a few SMs idle). ROPE > 0: then the inverse RoPE of
        the last ROPE dims (`out_rope`), as `rope._rope_kernel` computes it."""
        pdl_start(PDL)
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        hmask = h < H
        d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask2 = hmask[:, None] & (d < D)[None, :]
        m = tl.load(sink_ptr + h, mask=hmask, other=0.0).to(tl.float32) * 1.4426950408889634
        l_i = tl.full([BLOCK_H], 1.0, tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
        # 4 splits per iteration, unrolled, so their loads are in flight together; a split past
        # S loads m = -1e30, l = 0, acc = 0, which leaves the merge exactly unchanged
        for s0 in range(0, S, 4):
            for i in tl.static_range(4):
                live = s0 + i < S
                base = ((s0 + i) * T + t) * H + h
                ms = tl.load(part_ml_ptr + base * 2, mask=hmask & live, other=-1.0e30)
                ls = tl.load(part_ml_ptr + base * 2 + 1, mask=hmask & live, other=0.0)
                # a split that saw no row (m = -1e30: an empty one wrote no output) adds 0
                a = tl.load(part_o_ptr + base[:, None] * D + d[None, :],
                            mask=mask2 & live & (ms > -1.0e30)[:, None], other=0.0)
                m_new = tl.maximum(m, ms)
                alpha = tl.exp2(m - m_new)
                beta = tl.exp2(ms - m_new)
                l_i = l_i * alpha + ls * beta
                acc = acc * alpha[:, None] + a * beta[:, None]
                m = m_new
        o = acc / l_i[:, None]
        if ROPE > 0:  # the output rounded, pairs (2i, 2i+1) of the last ROPE dims turned back
            o = o.to(o_ptr.dtype.element_ty).to(tl.float32)
            e, od = tl.split(tl.reshape(o, (BLOCK_H, BLOCK_D // 2, 2)))
            j = tl.program_id(2) * (BLOCK_D // 2) + tl.arange(0, BLOCK_D // 2)
            fi = j - (D - ROPE) // 2
            rot = (fi >= 0) & (j < D // 2)
            ang = tl.load(pos_ptr + t).to(tl.float32) * tl.load(f_ptr + fi, mask=rot, other=0.0)
            cs, sn = cos_sin(ang, rot)
            e2, o2 = turn(e, od, cs[None, :], -sn[None, :])
            o = tl.reshape(tl.join(tl.where(rot[None, :], e2, e), tl.where(rot[None, :], o2, od)),
                           (BLOCK_H, BLOCK_D))
        tl.store(o_ptr + t * stride_ot + h[:, None] * stride_oh + d[None, :],
                 o.to(o_ptr.dtype.element_ty), mask=mask2)

    def sparse_attention_triton(q, sink, scale, win_cache, win_new, win_idx, cmp_cache=None,
                                cmp_idx=None, rope_dim: int = 64,
                                config: AttnConfig | None = None,
                                cmp_len: torch.Tensor | None = None,
                                out_rope: tuple | None = None,
                                pack_new: bool = False) -> torch.Tensor:
        """Launcher: checks shapes and dtypes once, chooses the split, runs 1 or 2 kernels.
        `cmp_len` [T] (optional): token t's valid compressed rows are the first cmp_len[t]
        entries of its cmp_idx row (-1 after them): the kernels stop there. `pack_new`: with
        FP8 rows, win_new's rows lie on the packed rows' grid (the model's FP8 rounding of
        their no-rope dims), so the Gluon kernels may take them packed alike, gathered by
        cp.async with the cached rows (one packing launch first) instead of loading their bf16
        from the decode: for prefill chunks, where most window rows are new."""
        T, H, D = q.shape
        fp8 = win_cache.dtype == torch.uint8
        cfg = config or default_config(q, fp8)
        if q.dtype not in (torch.bfloat16, torch.float32):
            raise TypeError(f"q must be bf16 or fp32, got {q.dtype}")
        if fp8:
            if D % 64 or (D - rope_dim) % 64 or (D - rope_dim) % rope_dim:
                raise ValueError(f"FP8 rows need D and D-r multiples of 64 and of r, got D={D}, "
                                 f"r={rope_dim}")
            for c in (win_cache, cmp_cache):  # the kernel loads packed rows 8 bytes at a time
                if c is not None and (c.data_ptr() % 8 or c.stride(0) % 8):
                    raise ValueError("packed FP8 cache rows must start on 8-byte boundaries")
        elif win_cache.dtype != q.dtype:
            raise TypeError(f"float caches must have q's dtype {q.dtype}, got {win_cache.dtype}")
        if cmp_cache is not None and cmp_cache.dtype != win_cache.dtype:
            raise TypeError(f"cmp_cache dtype {cmp_cache.dtype} != win_cache dtype {win_cache.dtype}")
        if win_idx.shape[0] != T or win_new.shape != (T, D):
            raise ValueError(f"win_idx {tuple(win_idx.shape)} / win_new {tuple(win_new.shape)} "
                             f"do not match q {tuple(q.shape)}")
        o = torch.empty_like(q)
        if T == 0:
            return o
        q = q if q.stride(-1) == 1 else q.contiguous()
        win_cache = win_cache.contiguous()
        win_new = win_new.to(q.dtype).contiguous()
        win_idx = win_idx.contiguous()
        Kw = win_idx.shape[1]
        if cmp_idx is None or cmp_idx.shape[1] == 0 or cmp_cache is None:
            cmp_cache, cmp_idx, Kc = win_cache, win_idx, 0
        else:
            cmp_cache = cmp_cache.contiguous()
            cmp_idx = cmp_idx.to(win_idx.dtype).contiguous()
            Kc = cmp_idx.shape[1]
        if cmp_cache.stride(0) != win_cache.stride(0):
            raise ValueError(f"window and compressed rows differ in width: {win_cache.stride(0)} "
                             f"vs {cmp_cache.stride(0)}")
        if cmp_idx.shape[0] != T:
            raise ValueError(f"cmp_idx has {cmp_idx.shape[0]} rows for {T} tokens")
        if cmp_len is not None and cmp_len.shape != (T,):
            raise ValueError(f"cmp_len {tuple(cmp_len.shape)} does not fit {T} tokens")
        cmp_len = cmp_len.contiguous() if cmp_len is not None and Kc else None
        sink = sink.float().contiguous()
        if out_rope is not None:
            if out_rope[0].shape != (T,) or out_rope[1].numel() != rope_dim // 2:
                raise ValueError(f"out_rope: {tuple(out_rope[0].shape)} positions and "
                                 f"{out_rope[1].numel()} frequencies do not fit {T} tokens and "
                                 f"rope_dim {rope_dim}")
            out_rope = (out_rope[0].contiguous(),
                        out_rope[1].to(device=q.device, dtype=torch.float32).contiguous())
        inputs = (q, sink, o, win_cache, win_new, win_idx, cmp_cache, cmp_idx, cmp_len, Kw, Kc,
                  scale * _LOG2E, rope_dim, out_rope)
        if wg_applies(q, fp8, rope_dim, cfg):
            new_fp8 = None
            if pack_new and fp8 and win_cache.stride(0) == kv_fp8_row_bytes(D, rope_dim):
                new_fp8 = torch.empty(T, win_cache.stride(0), dtype=torch.uint8, device=q.device)
                store_kv_fp8_(new_fp8, None, win_new, rope_dim)
            try:
                return _launch(cfg, True, *inputs, new_fp8=new_fp8)
            except Exception as exc:  # noqa: BLE001
                if cfg.kernel in ("gluon", "ws"):
                    raise
                gluon_failed(_WG_FAILED, exc, "Gluon sparse attention kernel", "Triton kernel")
                cfg = config or default_config(q, fp8)
        return _launch(cfg, False, *inputs)

    def _launch(cfg: AttnConfig, wg: bool, q, sink, o, win_cache, win_new, win_idx, cmp_cache,
                cmp_idx, cmp_len, Kw: int, Kc: int, qk_scale: float,
                rope_dim: int, out_rope: tuple | None = None,
                new_fp8: torch.Tensor | None = None) -> torch.Tensor:
        """Split the row lists, run the Gluon (wg) or Triton kernel, merge the splits (and turn
        the output back by its RoPE: in the merge, or by `rope_` when there is none).
        `new_fp8`: win_new's rows packed (Gluon kernels: gathered as cached rows)."""
        T, H, D = q.shape
        fp8 = win_cache.dtype == torch.uint8
        BK, BH = cfg.block_k, min(cfg.block_h, max(16, triton.next_power_of_2(H)))
        if wg:  # 64-head blocks (fewer heads: one block, masked)
            BH = 64
        ws = wg and fp8 and _ws_applies(cfg)
        if ws:  # 32-row tiles: two byte stages and two bf16 tiles fit beside Q
            BK = 32
        BD = max(64, triton.next_power_of_2(D))
        n_win_tiles = triton.cdiv(Kw, BK)
        n_tiles = n_win_tiles + triton.cdiv(Kc, BK)
        n_hb = triton.cdiv(H, BH)
        # split the row list only when the tokens alone leave most SMs idle: partial results
        # cost H*D*4 bytes each way per split, as much as ~H*2 rows. Two tiles a split; one
        # at decode batches (up to 16 token-head blocks) when a token has few (a window and a
        # short compressed list): H200, H=64, FP8 rows, 5 tiles of 32, batch 1 / 8: 18.4 /
        # 19.6 us in 2 splits, 14.0 / 15.7 in 5. (Applied to prefill chunks too, it moved the
        # FP8-row prompt log-probs of tests/gpu/test_engine_gpu.py further from the bf16 rows'
        # than that test allows, for reasons not yet understood: kept to decode.)
        per = 1 if n_tiles <= 8 and T * n_hb <= 16 else 2
        splits = cfg.splits or max(1, min(num_sms(q.device) // (T * n_hb), n_tiles // per))
        splits = max(1, min(splits, n_tiles))
        tps = triton.cdiv(max(n_tiles, 1), splits)
        splits = triton.cdiv(max(n_tiles, 1), tps)
        if splits > 1:
            part_o = torch.empty(splits, T, H, D, dtype=torch.float32, device=q.device)
            part_ml = torch.empty(splits, T, H, 2, dtype=torch.float32, device=q.device)
        else:
            part_o = part_ml = o
        new_fp8 = new_fp8 if wg else None
        args = (q, sink, o, part_o, part_ml, win_cache, win_new if new_fp8 is None else new_fp8,
                win_idx, cmp_cache, cmp_idx,
                cmp_idx if cmp_len is None else cmp_len,
                T, H, win_cache.shape[0], Kw, Kc, n_win_tiles, n_tiles, tps,
                q.stride(0), q.stride(1), o.stride(0), o.stride(1), win_idx.stride(0),
                cmp_idx.stride(0), win_cache.stride(0), qk_scale)
        if ws and not _ws_launch(cfg, T * n_hb, splits, args, D, BK, rope_dim, cmp_len,
                                 new_fp8 is not None):
            # it failed to build: the plain Gluon kernel with its own tiles
            return _launch(cfg, wg, q, sink, o, win_cache, win_new, win_idx, cmp_cache, cmp_idx,
                           cmp_len, Kw, Kc, qk_scale, rope_dim, out_rope, new_fp8)
        if wg and not ws:
            from .sparse_attention_wg import _sparse_attn_wg_kernel

            def wg_launch(**kw):
                _sparse_attn_wg_kernel[(T * n_hb, splits)](
                    *args, D=D, BLOCK_H=BH, BLOCK_K=BK, NUM_BUF=max(2, cfg.num_stages),
                    SPLIT=splits > 1, FP8=fp8, NOPE=D - rope_dim, ROPE=rope_dim,
                    HAS_LEN=cmp_len is not None, NEW_FP8=new_fp8 is not None, num_warps=8,
                    **kw)
            kw = pdl() if _WG_PDL_OK else {}
            try:
                wg_launch(**kw)
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:  # noqa: BLE001  (Gluon is experimental: PDL may not be)
                if not kw:
                    raise
                _WG_PDL_OK.clear()
                _log.warning("Gluon sparse attention launched without PDL (%s)",
                             (str(exc).splitlines() or [type(exc).__name__])[0][:200])
                wg_launch()
        elif not wg:
            _sparse_attn_kernel[(T * n_hb, splits)](
                *args, D=D, BLOCK_D=BD, BLOCK_H=BH, BLOCK_K=BK, FP8=fp8, NOPE=D - rope_dim,
                ROPE=rope_dim, SPLIT=splits > 1, IEEE=q.dtype == torch.float32,
                HAS_LEN=cmp_len is not None, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages, **pdl())
        if splits > 1:
            cd = min(BD, 128)
            pos, freqs = out_rope if out_rope is not None else (o, o)
            _combine_kernel[(T, triton.cdiv(H, 16), triton.cdiv(D, cd))](
                sink, part_o, part_ml, o, pos, freqs, T, H, splits, o.stride(0), o.stride(1),
                D=D, BLOCK_D=cd, BLOCK_H=16, ROPE=rope_dim if out_rope is not None else 0,
                num_warps=4, **pdl())
        elif out_rope is not None:
            rope_(o, out_rope[0], out_rope[1], rope_dim, inverse=True)
        return o


def _ws_applies(cfg: AttnConfig) -> bool:
    """Whether FP8 rows bound for the Gluon kernel take its warp-specialised form."""
    if cfg.kernel == "ws":
        return True
    return cfg.kernel == "auto" and ATTN_WS and not _WS_FAILED


def _ws_launch(cfg: AttnConfig, ctas: int, splits: int, args: tuple, D: int, BK: int,
               rope_dim: int, cmp_len, new_fp8: bool) -> bool:
    """`_sparse_attn_ws_kernel` over (ctas, splits); False, after a warning, when it does not
    build here (the caller runs the plain Gluon kernel; with kernel="ws" it raises)."""
    try:
        from .sparse_attention_ws import _sparse_attn_ws_kernel
        # 8 MMA warps + 4 load warps at 160 registers a thread: the load warps keep 64, the
        # MMA warps get the rest (208)
        _sparse_attn_ws_kernel[(ctas, splits)](
            *args, D=D, BLOCK_H=64, BLOCK_K=BK,
            NUM_BUF=cfg.num_stages if cfg.kernel == "ws" else WS_TILES, SPLIT=splits > 1,
            NOPE=D - rope_dim, ROPE=rope_dim, HAS_LEN=cmp_len is not None, LOAD_WARPS=4,
            LOAD_REGS=64, NEW_FP8=new_fp8, num_warps=8, maxnreg=160,
            **(pdl() if _WG_PDL_OK else {}))
    except Exception as exc:  # noqa: BLE001
        if cfg.kernel == "ws":
            raise
        gluon_failed(_WS_FAILED, exc, "warp-specialised FP8 attention", "Gluon kernel")
        return False
    return True


def sparse_attention(q, sink, scale, win_cache, win_new, win_idx, cmp_cache=None, cmp_idx=None,
                     rope_dim: int = 64, cmp_len=None, out_rope: tuple | None = None,
                     pack_new: bool = False):
    """`cmp_len` [T] (optional, GPU kernels only): the valid entries of each cmp_idx row are
    its first cmp_len[t] (-1 after): under CUDA graphs the rows are as wide as the graphs'
    context length allows, and the kernels' work then follows the context. `out_rope` (pos
    [T], freqs [r/2]): the output's last rope_dim dims turned back by `rope_(..., inverse=True)`
    (SPEC.md 5, step 5), inside the split merge when there is one. `pack_new`: win_new's rows
    lie on the FP8 rows' grid (`sparse_attention_triton`; the same output, a GPU schedule)."""
    if use_triton(q) and q.dtype in (torch.bfloat16, torch.float32):
        return sparse_attention_triton(q, sink, scale, win_cache, win_new, win_idx, cmp_cache,
                                       cmp_idx, rope_dim, cmp_len=cmp_len, out_rope=out_rope,
                                       pack_new=pack_new)
    o = sparse_attention_ref(q, sink, scale, win_cache, win_new, win_idx, cmp_cache, cmp_idx,
                             rope_dim)
    if out_rope is not None:
        o = rope_(o.contiguous(), out_rope[0], out_rope[1], rope_dim, inverse=True)
    return o
