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

FP8_GROUP = 64  # no-rope dims sharing one e8m0 scale


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
