"""Grouped FP8 GEMM with 1 x 128 block scales on both sides, for the MoE's large batches.

`grouped_fp8_gemm(a, sa, b, sb, ends)`: rows ends[g-1] .. ends[g] of a (group g) times group
g's weight rows: y[r, n] = sum over 128-deep blocks kb of (a[r, kb] . b[g, n, kb]) * sa[r, kb]
* sb[g, n, kb], with a [M, K] e4m3 codes and sa [M, K/128] fp32 scales (the FP8 activation
quantisation of SPEC.md 3), b [G, N, K] e4m3 and sb [G, N, K/128] fp32 (each weight row's
scale per 128 columns), fp32 accumulation promoted once per block, y [M, N] bf16. `ends` is
int32 on the device (a group may be empty): nothing is read back to the host. With sb [G, N]
(one scale per weight row, "row scales") the weight scale leaves the K loop: each block's
promotion is one multiply-add by sa instead of two multiplies and an add, which is what holds
the block-scaled kernel below the plain FP8 one (H200, Pro shapes at M = 16384: ~830 against
~560 TFLOP/s, `scratch` diagnostic of the thirty-first session). Row scales are the MoE's
MXFP4 copies where a row's per-32 scales all fold into its largest (`moe_grouped_mm.to_fp8`).

Reference: `grouped_fp8_gemm_ref` (fp32 dequantisation, a matmul per group). GPU: a Triton
kernel over (row tile, column tile) pairs, column tiles fastest, so the programs running
together share their activation tile and their group's weight tiles through L2; tiles of
64 x 256 split over clusters of two CTAs (`CONFIG`). The row tiles come from `ends` on the
device (`_tile_map`): a bound of M / BM + G tiles, the ones past the last group's end empty.
Up to 2^17 rows a persistent variant loads the tiles through TMA descriptors.
"""
from __future__ import annotations

import torch

from . import HAS_TRITON, use_triton

BK = 128  # the scales' block: one promotion of the fp32 accumulator per block
# Launches (H200, Flash 8192-token shapes, M = 50976 routed rows over 256 groups, `scratch`
# sweep of the twenty-seventh session): 64 x 256 tiles split over a cluster of 2 CTAs (each a
# 64 x 128 half: the accumulator and the promoted block fit in registers, which a 64 x 256
# tile on one CTA spills), 4 warps: 527 TFLOP/s at w1|w3 (440 with the one-CTA 64 x 128 tiles
# before, 509 for torch's bf16 grouped GEMM). A 64 x 128 tile reads (64 + 128) x 128 bytes per
# 64 x 128 x 128 MACs from L2, about what the L2 can feed at this rate: larger tiles pay.
CONFIG = {"bm": 64, "bn": 256, "warps": 4, "stages": 4, "ctas": 2}
# The persistent TMA variant up to TMA_MAX_M rows, 3 stages for weights past 4096 x 4096 (Pro's).
# H200, `bench_linear_moe.py --only gemm-sweep [--sweep-model pro]` (twenty-ninth session),
# TFLOP/s before -> after: Flash w1|w3 / w2 at 8192 tokens (M ~ 51K) 526 / 486 -> 526 / 529,
# at 32768 (M ~ 199K) 548 / 553 -> 576 / 553; Pro 8192 439 / 410 -> 471 / 468, Pro 32768
# 464 / 528 -> 547 / ~530
TMA_MAX_M = 1 << 17


def grouped_fp8_gemm_ref(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor,
                         ends: torch.Tensor) -> torch.Tensor:
    af = (a.float().unflatten(1, (-1, BK)) * sa[..., None]).flatten(1)
    if sb.dim() == 2:  # row scales
        bf = b.float() * sb[..., None]
    else:
        bf = (b.float().unflatten(2, (-1, BK)) * sb[..., None]).flatten(2)
    y = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float32, device=a.device)
    start = 0
    for g, end in enumerate(ends.tolist()):
        y[start:end] = af[start:end] @ bf[g].t()
        start = end
    return y.to(torch.bfloat16)


def launch_config(m: int, n: int, k: int) -> dict:
    """The default launch for M rows of N x K weights (see TMA_MAX_M), with block or row scales
    (the best of `--only gemm-sweep --sweep-kernel fp8-row` too, thirty-first session: Flash
    w1|w3 / w2 at 8192 tokens 657 / 628 TFLOP/s, Pro at 16384 631 / 641)."""
    return dict(CONFIG, tma=m <= TMA_MAX_M, stages=3 if n * k > 4096 * 4096 else 4)


def grouped_fp8_gemm(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor,
                     ends: torch.Tensor, cfg: dict | None = None) -> torch.Tensor:
    """See the module docstring; `cfg` (bm, bn, warps, stages, ctas, tma) overrides the launch.
    sa and sb may be strided views (e.g. of [K/128, M] and [G, K/128, N] storage: each
    block's scales contiguous, as `_act_quant_cuda(scales_t=True)` and `to_fp8` write them);
    sb [G, N]: row scales."""
    m, k = a.shape
    g, n, kb = b.shape
    row = sb.dim() == 2
    if (kb != k or k % BK or sa.shape != (m, k // BK) or ends.shape != (g,)
            or sb.shape != ((g, n) if row else (g, n, k // BK))):
        raise ValueError(f"grouped FP8 GEMM: a {tuple(a.shape)}, sa {tuple(sa.shape)}, b "
                         f"{tuple(b.shape)}, sb {tuple(sb.shape)}, ends {tuple(ends.shape)} "
                         f"do not fit (K a multiple of {BK}, one scale per {BK} columns of a, "
                         f"per weight row or per {BK} of its columns)")
    c = launch_config(m, n, k)
    if n % c["bn"]:  # (small test shapes) one-CTA 64 x 128 tiles
        c.update(bn=128, ctas=1, tma=False)
    c.update(cfg or {})
    if not (use_triton(a) and n % c["bn"] == 0 and m):
        return grouped_fp8_gemm_ref(a, sa, b, sb, ends)
    a, b = a.contiguous(), b.contiguous()
    y = torch.empty(m, n, dtype=torch.bfloat16, device=a.device)
    tiles = _tile_map(ends, m, c["bm"])
    launch = dict(BM=c["bm"], BN=c["bn"], BK=BK, ROW=row, num_warps=c["warps"],
                  num_ctas=c["ctas"])
    strides = (sa.stride(0), sa.stride(1), sb.stride(0), sb.stride(1), 0 if row else sb.stride(2))
    if c["tma"]:
        _set_allocator()
        progs = num_sms(a.device)  # (programs of c["ctas"] CTAs: as measured)
        _grouped_fp8_tma_kernel[(progs,)](a, sa, b, sb, y, tiles, tiles.shape[1], m, n, k, g,
                                          *strides, NUM_PROGS=progs, STAGES=c["stages"],
                                          **launch)
    else:
        grid = (tiles.shape[1] * (n // c["bn"]),)
        _grouped_fp8_kernel[grid](a, sa, b, sb, y, tiles, tiles.shape[1], n, k, *strides,
                                  num_stages=c["stages"], **launch)
    return y


_ALLOCATOR_SET = [False]


def _set_allocator() -> None:
    """The TMA kernel makes its descriptors on the device, in scratch memory Triton asks the
    process's allocator for: torch's caching allocator (set once)."""
    if not _ALLOCATOR_SET[0]:
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8,
                                                                     device="cuda"))
        _ALLOCATOR_SET[0] = True


def _tile_map(ends: torch.Tensor, m: int, bm: int) -> torch.Tensor:
    """int32 [3, M / bm + G]: each row tile's group, first row and end row (group end); tiles
    past the last group have first = end (no rows). Built on the device."""
    ends = ends.long()
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    n_t = (ends - starts + bm - 1) // bm
    cum = n_t.cumsum(0)
    t = torch.arange(m // bm + ends.numel(), device=ends.device)
    grp = torch.searchsorted(cum, t, right=True)
    live = grp < ends.numel()
    gc = grp.clamp(max=ends.numel() - 1)
    first = starts[gc] + (t - (cum[gc] - n_t[gc])) * bm
    end = torch.where(live, ends[gc], first)
    return torch.stack([gc, first, end]).to(torch.int32)


if HAS_TRITON:
    import triton
    import triton.language as tl

    from . import num_sms

    @triton.jit
    def _row_tile(tile_ptr, n_tiles, tm):
        """Row tile tm of `_tile_map`: (its group, first row, end row; first >= end: empty)."""
        return (tl.load(tile_ptr + tm), tl.load(tile_ptr + n_tiles + tm),
                tl.load(tile_ptr + 2 * n_tiles + tm))

    @triton.jit(do_not_specialize=["n_tiles"])
    def _grouped_fp8_kernel(a_ptr, sa_ptr, b_ptr, sb_ptr, y_ptr, tile_ptr, n_tiles, N, K,
                            sa_m, sa_k, sb_g, sb_n, sb_k,
                            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                            ROW: tl.constexpr = False):
        """Row tile program_id // (N / BN), column tile program_id % (N / BN). ROW: sb holds
        one scale per weight row, applied once after the K loop."""
        pid = tl.program_id(0)
        n_col = N // BN
        tm = pid // n_col
        pn = pid % n_col
        g, r0, r1 = _row_tile(tile_ptr, n_tiles, tm)
        g = g.to(tl.int64)
        if r0 >= r1:
            return
        rows = r0 + tl.arange(0, BM)
        rok = rows < r1
        cols = pn * BN + tl.arange(0, BN)
        kk = tl.arange(0, BK)
        nkb = K // BK
        a_row = a_ptr + rows.to(tl.int64)[:, None] * K + kk[None, :]
        b_row = b_ptr + (g * N + cols).to(tl.int64)[:, None] * K + kk[None, :]
        sa_row = sa_ptr + rows.to(tl.int64) * sa_m
        sb_row = sb_ptr + g * sb_g + cols.to(tl.int64) * sb_n
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for kb in range(0, nkb):
            a = tl.load(a_row + kb * BK, mask=rok[:, None], other=0.0)
            b = tl.load(b_row + kb * BK)
            sa = tl.load(sa_row + kb * sa_k, mask=rok, other=0.0)
            if ROW:
                acc += tl.dot(a, tl.trans(b)) * sa[:, None]
            else:
                sb = tl.load(sb_row + kb * sb_k)
                acc += tl.dot(a, tl.trans(b)) * sa[:, None] * sb[None, :]
        if ROW:
            acc = acc * tl.load(sb_row)[None, :]
        tl.store(y_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], acc.to(tl.bfloat16),
                 mask=rok[:, None])

    @triton.jit(do_not_specialize=["n_tiles", "M"])
    def _grouped_fp8_tma_kernel(a_ptr, sa_ptr, b_ptr, sb_ptr, y_ptr, tile_ptr, n_tiles, M, N,
                                K, G, sa_m, sa_k, sb_g, sb_n, sb_k, NUM_PROGS: tl.constexpr,
                                STAGES: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                                BK: tl.constexpr, ROW: tl.constexpr = False):
        """`_grouped_fp8_kernel` with the a and b tiles through TMA descriptors, persistent:
        each program loops over (row tile, column tile) pairs, column tiles fastest. A row
        tile's rows past its group's end are loaded (the next group's, or zeros past M) and
        not stored; tiles past the last group run no K-block."""
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1],
                                           block_shape=[BM, BK])
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[G * N, K], strides=[K, 1],
                                           block_shape=[BN, BK])
        n_col = N // BN
        nkb = K // BK
        for t in tl.range(tl.program_id(0), n_tiles * n_col, NUM_PROGS):
            tm = t // n_col
            pn = t % n_col
            g, r0, r1 = _row_tile(tile_ptr, n_tiles, tm)
            rows = r0 + tl.arange(0, BM)
            cols = pn * BN + tl.arange(0, BN)
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for kb in tl.range(0, tl.where(r0 < r1, nkb, 0), num_stages=STAGES):
                a = a_desc.load([r0, kb * BK])
                b = b_desc.load([g * N + pn * BN, kb * BK])
                sa = tl.load(sa_ptr + rows.to(tl.int64) * sa_m + kb * sa_k, mask=rows < M,
                             other=0.0)
                if ROW:
                    acc += tl.dot(a, b.T) * sa[:, None]
                else:
                    sb = tl.load(sb_ptr + g.to(tl.int64) * sb_g + cols.to(tl.int64) * sb_n
                                 + kb * sb_k)
                    acc += tl.dot(a, b.T) * sa[:, None] * sb[None, :]
            if ROW:
                acc = acc * tl.load(sb_ptr + g.to(tl.int64) * sb_g
                                    + cols.to(tl.int64) * sb_n)[None, :]
            tl.store(y_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], acc.to(tl.bfloat16),
                     mask=(rows < r1)[:, None])
