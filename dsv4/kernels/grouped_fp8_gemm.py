"""Grouped FP8 GEMM with 1 x 128 block scales on both sides, for the MoE's large batches.

`grouped_fp8_gemm(a, sa, b, sb, ends)`: rows ends[g-1] .. ends[g] of a (group g) times group
g's weight rows: y[r, n] = sum over 128-deep blocks kb of (a[r, kb] . b[g, n, kb]) * sa[r, kb]
* sb[g, n, kb], with a [M, K] e4m3 codes and sa [M, K/128] fp32 scales (the FP8 activation
quantisation of SPEC.md 3), b [G, N, K] e4m3 and sb [G, N, K/128] fp32 (each weight row's
scale per 128 columns), fp32 accumulation promoted once per block, y [M, N] bf16. `ends` is
int32 on the device (a group may be empty): nothing is read back to the host.

Reference: `grouped_fp8_gemm_ref` (fp32 dequantisation, a matmul per group). GPU: one Triton
kernel over (row tile, column tile) programs, column tiles fastest, so the programs running
together share their activation tile and their group's weight tiles through L2. The row tiles
come from `ends` on the device (`_tile_map`): a bound of M / BM + G tiles is launched and the
ones past the last group's end return at once.
"""
from __future__ import annotations

import torch

from . import HAS_TRITON, use_triton

BK = 128  # the scales' block: one promotion of the fp32 accumulator per block
# Measured at Flash 8192-token shapes on an H200 (scratch sweep, thirteenth session): 64 x 128
# tiles, 4 warps, 4 stages: w13 455, w2 497 TFLOP/s; 128 x 128, 8 warps: 365 and 338.
CONFIG = {"bm": 64, "bn": 128, "warps": 4, "stages": 4}


def grouped_fp8_gemm_ref(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor,
                         ends: torch.Tensor) -> torch.Tensor:
    af = (a.float().unflatten(1, (-1, BK)) * sa[..., None]).flatten(1)
    bf = (b.float().unflatten(2, (-1, BK)) * sb[..., None]).flatten(2)
    y = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float32, device=a.device)
    start = 0
    for g, end in enumerate(ends.tolist()):
        y[start:end] = af[start:end] @ bf[g].t()
        start = end
    return y.to(torch.bfloat16)


def grouped_fp8_gemm(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor,
                     ends: torch.Tensor, cfg: dict | None = None) -> torch.Tensor:
    """See the module docstring; `cfg` (bm, bn, warps, stages) overrides the launch."""
    m, k = a.shape
    g, n, kb = b.shape
    if (kb != k or k % BK or sa.shape != (m, k // BK) or sb.shape != (g, n, k // BK)
            or ends.shape != (g,)):
        raise ValueError(f"grouped FP8 GEMM: a {tuple(a.shape)}, sa {tuple(sa.shape)}, b "
                         f"{tuple(b.shape)}, sb {tuple(sb.shape)}, ends {tuple(ends.shape)} "
                         f"do not fit (K a multiple of {BK}, one scale per {BK} columns)")
    c = dict(CONFIG, **(cfg or {}))
    if not (use_triton(a) and n % c["bn"] == 0 and m):
        return grouped_fp8_gemm_ref(a, sa, b, sb, ends)
    y = torch.empty(m, n, dtype=torch.bfloat16, device=a.device)
    tiles = _tile_map(ends, m, c["bm"])
    grid = (tiles.shape[1] * (n // c["bn"]),)
    _grouped_fp8_kernel[grid](a, sa, b, sb, y, tiles, tiles.shape[1], n, k, BM=c["bm"],
                              BN=c["bn"], BK=BK, num_warps=c["warps"], num_stages=c["stages"])
    return y


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

    @triton.jit(do_not_specialize=["n_tiles"])
    def _grouped_fp8_kernel(a_ptr, sa_ptr, b_ptr, sb_ptr, y_ptr, tile_ptr, n_tiles, N, K,
                            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """Row tile program_id // (N / BN), column tile program_id % (N / BN)."""
        pid = tl.program_id(0)
        n_col = N // BN
        tm = pid // n_col
        pn = pid % n_col
        g = tl.load(tile_ptr + tm).to(tl.int64)
        r0 = tl.load(tile_ptr + n_tiles + tm)
        r1 = tl.load(tile_ptr + 2 * n_tiles + tm)
        if r0 >= r1:
            return
        rows = r0 + tl.arange(0, BM)
        rok = rows < r1
        cols = pn * BN + tl.arange(0, BN)
        kk = tl.arange(0, BK)
        nkb = K // BK
        a_row = a_ptr + rows.to(tl.int64)[:, None] * K + kk[None, :]
        b_row = b_ptr + (g * N + cols).to(tl.int64)[:, None] * K + kk[None, :]
        sa_row = sa_ptr + rows.to(tl.int64) * nkb
        sb_row = sb_ptr + (g * N + cols).to(tl.int64) * nkb
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for kb in range(0, nkb):
            a = tl.load(a_row + kb * BK, mask=rok[:, None], other=0.0)
            b = tl.load(b_row + kb * BK)
            sa = tl.load(sa_row + kb, mask=rok, other=0.0)
            sb = tl.load(sb_row + kb)
            acc += tl.dot(a, tl.trans(b)) * sa[:, None] * sb[None, :]
        tl.store(y_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], acc.to(tl.bfloat16),
                 mask=rok[:, None])
