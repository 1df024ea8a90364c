"""FP8 row layout of the attention caches (window and compressed rows, SPEC.md 5.2 and 6).

A `[D]` row (D=512, r=64 rope dims) is stored in `D - r + 2r + 8` bytes, 584 for the published
models, the layout FlashMLA uses for DeepSeek-V4 ("MODEL1" FP8 sparse):

    [0, D-r)            e4m3 codes of the no-rope dims
    [D-r, D-r+2r)       the rope dims as bf16 (little-endian)
    [D-r+2r, +(D-r)/64) one e8m0 byte per 64 no-rope dims: scale = 2^(byte-127)
    then zero padding   to a multiple of 8 bytes

The model already rounds the no-rope dims to e4m3 with a power-of-two scale per 64 (`fp8_sim`)
and keeps rows in bf16, so packing a model-produced bf16 row is lossless. The rope dims of a
float32 row are rounded to bf16 here: the layout is for the bf16 working dtype.
"""
from __future__ import annotations

import torch

from ..quant.sim import FP8_MAX, fp8_block_scale
from . import HAS_TRITON, use_triton
from .pdl import pdl

FP8_GROUP = 64  # no-rope dims sharing one e8m0 scale

# The attention kernels' decode of 4 e4m3 codes (one register) into 2 bf16 pairs, each value
# times 2^-120 (`sparse_attention_wg._e4m3_bf16`, `sparse_attention._fp8_decode`): `prmt` puts
# code i in the high byte of half i (zeros below), then (y >> 4) & 0x07F007F0 keeps its
# magnitude bits (e4m3's exponent and mantissa in a bf16's low exponent and high mantissa
# bits; its subnormals on bf16's) and y & 0x80008000 its sign. Integer pipes only: the
# conversion unit (e4m3 -> f16 -> bf16) runs 16 lanes a clock an SM.
E4M3_BF16_PTX = """{
.reg .b32 y, t;
prmt.b32 y, $2, 0, 0x1404;
shr.b32 t, y, 4;
and.b32 t, t, 0x07F007F0;
and.b32 y, y, 0x80008000;
or.b32 $0, t, y;
prmt.b32 y, $2, 0, 0x3424;
shr.b32 t, y, 4;
and.b32 t, t, 0x07F007F0;
and.b32 y, y, 0x80008000;
or.b32 $1, t, y;
}"""


def kv_fp8_row_bytes(head_dim: int, rope_dim: int) -> int:
    """Bytes of one packed row (584 for D=512, r=64)."""
    nope = head_dim - rope_dim
    if nope <= 0 or nope % FP8_GROUP:
        raise ValueError(f"no-rope width {nope} (head_dim {head_dim} - rope {rope_dim}) is not a "
                         f"positive multiple of {FP8_GROUP}")
    raw = nope + 2 * rope_dim + nope // FP8_GROUP
    return -(-raw // 8) * 8


def pack_kv_fp8(rows: torch.Tensor, rope_dim: int = 64) -> torch.Tensor:
    """rows [N, D] (bf16 or fp32) -> uint8 [N, kv_fp8_row_bytes(D, rope_dim)]."""
    n, d = rows.shape
    nope = d - rope_dim
    out = torch.zeros(n, kv_fp8_row_bytes(d, rope_dim), dtype=torch.uint8, device=rows.device)
    xb = rows[:, :nope].float().unflatten(-1, (nope // FP8_GROUP, FP8_GROUP))  # [N, G, 64]
    s = fp8_block_scale(xb)  # [N, G, 1], a power of two
    codes = (xb / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    out[:, :nope] = codes.flatten(1).view(torch.uint8)
    out[:, nope:nope + 2 * rope_dim] = rows[:, nope:].to(torch.bfloat16).contiguous().view(torch.uint8)
    _, exp = torch.frexp(s.squeeze(-1))  # s = 0.5 * 2^exp exactly
    g = nope // FP8_GROUP
    out[:, nope + 2 * rope_dim:nope + 2 * rope_dim + g] = (exp - 1 + 127).to(torch.uint8)
    return out


def unpack_kv_fp8(packed: torch.Tensor, head_dim: int, rope_dim: int = 64,
                  dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """uint8 [N, B] -> rows [N, head_dim] in `dtype` (exact for bf16 and fp32)."""
    nope = head_dim - rope_dim
    g = nope // FP8_GROUP
    if packed.shape[-1] != kv_fp8_row_bytes(head_dim, rope_dim):
        raise ValueError(f"packed rows have {packed.shape[-1]} bytes, expected "
                         f"{kv_fp8_row_bytes(head_dim, rope_dim)} for D={head_dim}, r={rope_dim}")
    codes = packed[:, :nope].contiguous().view(torch.float8_e4m3fn).float()
    exp = packed[:, nope + 2 * rope_dim:nope + 2 * rope_dim + g].int() - 127
    scale = torch.ldexp(torch.ones_like(exp, dtype=torch.float32), exp)  # [N, G]
    x = (codes.unflatten(-1, (g, FP8_GROUP)) * scale[..., None]).flatten(1)
    rope = packed[:, nope:nope + 2 * rope_dim].contiguous().view(torch.bfloat16).float()
    return torch.cat([x, rope], 1).to(dtype)


def store_kv_fp8_(buf: torch.Tensor, dst: torch.Tensor | None, rows: torch.Tensor,
                  rope_dim: int = 64, src: torch.Tensor | None = None) -> None:
    """buf[dst] = pack_kv_fp8(rows[src]) (src: row indices, None for all rows in order; dst
    None: buf's first rows in order): the gather, packing and scatter in one launch on CUDA
    (the torch packing is ~15 small kernels, which cost 15% of a batch-1 decode step)."""
    n = rows.shape[0] if src is None else src.numel()
    if (use_triton(rows) and n and (rows.shape[1] - rope_dim) % FP8_GROUP == 0
            and rope_dim & (rope_dim - 1) == 0):  # the kernel spans the rope dims in one arange
        _store_kv_fp8_cuda(buf, dst, rows, rope_dim, src)
    else:
        buf[slice(0, n) if dst is None else dst] = pack_kv_fp8(
            rows if src is None else rows[src], rope_dim)


if HAS_TRITON:
    import triton
    import triton.language as tl

    from .pdl import pdl_start
    from .quant_linear import _pow2ceil

    @triton.jit(do_not_specialize=["n"])
    def _store_kv_fp8_kernel(buf_ptr, dst_ptr, rows_ptr, src_ptr, n, stride_row,
                             ROW_BYTES: tl.constexpr, NOPE: tl.constexpr, ROPE: tl.constexpr,
                             G: tl.constexpr, BG: tl.constexpr, PAD: tl.constexpr,
                             BR: tl.constexpr, GATHER: tl.constexpr, SCATTER: tl.constexpr = True,
                             PDL: tl.constexpr = False):
        """BR rows (rows src[r] when GATHER): e4m3 codes and e8m0 scale byte per 64 no-rope
        dims (SPEC.md 5.2, as `pack_kv_fp8`), the rope dims as bf16, zero padding; written to
        rows dst of buf (SCATTER), else to its rows in order."""
        pdl_start(PDL)
        r = tl.program_id(0) * BR + tl.arange(0, BR)
        rmask = r < n
        if SCATTER:
            out = buf_ptr + tl.load(dst_ptr + r, mask=rmask, other=0).to(tl.int64) * ROW_BYTES
        else:
            out = buf_ptr + r.to(tl.int64) * ROW_BYTES
        if GATHER:
            src = rows_ptr + tl.load(src_ptr + r, mask=rmask, other=0).to(tl.int64) * stride_row
        else:
            src = rows_ptr + r.to(tl.int64) * stride_row
        g = tl.arange(0, BG)
        c = tl.arange(0, 64)
        m3 = rmask[:, None, None] & (g < G)[None, :, None]
        d = g[None, :, None] * 64 + c[None, None, :]
        x = tl.load(src[:, None, None] + d, mask=m3, other=0.0).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(x), 2), 1e-4)
        s, inv = _pow2ceil(tl.math.div_rn(amax, 448.0))
        q = tl.minimum(tl.maximum(x * inv[:, :, None], -448.0), 448.0).to(tl.float8e4nv)
        tl.store(out[:, None, None] + d, q.to(tl.uint8, bitcast=True), mask=m3)
        sbyte = (s.to(tl.int32, bitcast=True) >> 23).to(tl.uint8)  # s = 2^(byte - 127)
        tl.store(out[:, None] + (NOPE + 2 * ROPE) + g[None, :], sbyte,
                 mask=rmask[:, None] & (g < G)[None, :])
        e = tl.arange(0, ROPE)
        rope = tl.load(src[:, None] + NOPE + e[None, :], mask=rmask[:, None], other=0.0)
        rope_out = (out + NOPE).to(tl.pointer_type(tl.bfloat16), bitcast=True)
        tl.store(rope_out[:, None] + e[None, :], rope.to(tl.bfloat16), mask=rmask[:, None])
        p = tl.arange(0, 8)
        tl.store(out[:, None] + (NOPE + 2 * ROPE + G) + p[None, :], tl.zeros([BR, 8], tl.uint8),
                 mask=rmask[:, None] & (p < PAD)[None, :])

    def _store_kv_fp8_cuda(buf, dst, rows, rope_dim, src=None):
        d = rows.shape[1]
        n = rows.shape[0] if src is None else src.numel()
        nope = d - rope_dim
        g = nope // FP8_GROUP
        row_bytes = kv_fp8_row_bytes(d, rope_dim)
        if buf.dtype != torch.uint8 or buf.shape[-1] != row_bytes or not buf.is_contiguous():
            raise ValueError(f"packed FP8 rows need a contiguous uint8 [N, {row_bytes}] buffer, "
                             f"got {buf.dtype} {tuple(buf.shape)}")
        rows = rows if rows.stride(-1) == 1 else rows.contiguous()
        scatter = dst is not None
        if scatter:
            dst = dst.reshape(-1).contiguous()
            if dst.numel() != n:
                raise ValueError(f"{dst.numel()} destinations for {n} rows")
        elif buf.shape[0] < n:
            raise ValueError(f"{buf.shape[0]} rows of buffer for {n} rows")
        BR = 4
        gather = src is not None
        src = src.reshape(-1).contiguous() if gather else (dst if scatter else buf)
        dst = dst if scatter else buf
        _store_kv_fp8_kernel[(triton.cdiv(n, BR),)](
            buf, dst, rows, src, n, rows.stride(0), ROW_BYTES=row_bytes, NOPE=nope,
            ROPE=rope_dim, G=g, BG=triton.next_power_of_2(g), PAD=row_bytes - nope - 2 * rope_dim - g,
            BR=BR, GATHER=gather, SCATTER=scatter, num_warps=4, **pdl())
