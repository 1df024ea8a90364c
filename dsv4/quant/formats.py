"""Weight storage formats of DeepSeek-V4 checkpoints (SPEC.md section 2).

- FP8: e4m3 [N, K] with one e8m0 scale per 128x128 block.
- MXFP4 (official FP4 experts): packed e2m1 [N, K/2] (element 2j in the low nibble) with one
  e8m0 scale per 32 along K.
- NVFP4 (NVIDIA ModelOpt): packed e2m1 [N, K/2], an e4m3 scale per 16 along K, an fp32 global scale.
Dequantisers return fp32; quantisers exist to write checkpoints (make-tiny, dummy weights).
The MoE kernels' layouts (`mxfp4_to_kernel_layout`, `nvfp4_to_kernel_layout`) hold the same
bytes and scales re-ordered for the GPU, in place, on the experts' first CUDA use.
"""
from __future__ import annotations

import torch

from .sim import E2M1_VALUES, FP4_MAX, FP8_MAX, e2m1_codes, e2m1_round, pow2ceil

FP8_BLOCK = 128
MXFP4_BLOCK = 32
NVFP4_BLOCK = 16


def _expand_blocks(s: torch.Tensor, n: int, k: int, bn: int, bk: int) -> torch.Tensor:
    """Repeat a per-block scale [ceil(n/bn), ceil(k/bk)] to per-element [n, k]."""
    return s.float().repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]


# ---------------------------------------------------------------------------------- FP8
def dequant_fp8(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    n, k = weight.shape
    return weight.float() * _expand_blocks(scale, n, k, FP8_BLOCK, FP8_BLOCK)


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 [N, K] -> (e4m3 [N, K], e8m0 [ceil(N/128), ceil(K/128)]) with power-of-two block scales."""
    n, k = w.shape
    nb, kb = -(-n // FP8_BLOCK), -(-k // FP8_BLOCK)
    pad = torch.zeros(nb * FP8_BLOCK, kb * FP8_BLOCK, dtype=torch.float32, device=w.device)
    pad[:n, :k] = w.float()
    blocks = pad.view(nb, FP8_BLOCK, kb, FP8_BLOCK)
    amax = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-4)
    s = pow2ceil(amax / FP8_MAX)
    q = (w.float() / _expand_blocks(s, n, k, FP8_BLOCK, FP8_BLOCK)).clamp(-FP8_MAX, FP8_MAX)
    return q.to(torch.float8_e4m3fn), s.to(torch.float8_e8m0fnu)


# ---------------------------------------------------------------------------------- FP4 codes
def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] (0..15) -> int8 [N, K/2], element 2j in the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"FP4 packing needs an even K, got {codes.shape[-1]}")
    c = codes.to(torch.uint8)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).view(torch.int8)


def unpack_fp4(packed: torch.Tensor, halves: bool = False) -> torch.Tensor:
    """int8/uint8 [N, K/2] -> uint8 codes [N, K]. `halves`: the GPU kernels' order (see
    `fp4_to_halves`) instead of the checkpoint's."""
    p = packed.view(torch.uint8)
    if halves:
        g = p.view(*p.shape[:-1], -1, MXFP4_BLOCK // 2)
        return torch.cat([g & 0xF, g >> 4], dim=-1).flatten(-2)
    return torch.stack([p & 0xF, p >> 4], dim=-1).flatten(-2)


def fp4_to_halves(packed: torch.Tensor) -> torch.Tensor:
    """Checkpoint order (byte j = codes 2j, 2j+1) -> the MoE kernel's order: byte b of each
    16-byte group = codes b and b + 16 of its 32-code block. A thread's 4 packed bytes then
    decode to exactly the 2 registers of codes a Hopper FP8 MMA fragment needs, with no byte
    shuffles (kernels/moe.py). Same bytes, same scales; K must be a multiple of 32."""
    c = unpack_fp4(packed).view(*packed.shape[:-1], -1, 2, MXFP4_BLOCK // 2)
    return (c[..., 0, :] | (c[..., 1, :] << 4)).flatten(-2).view(packed.dtype)


KERNEL_ROWS = 64  # rows per group of the MoE kernels' MXFP4 layout


def _group_tiles(t: torch.Tensor, per_block: int, inverse: bool) -> torch.Tensor:
    """[N, C] with `per_block` columns per 128-deep K-block <-> the same values with each
    64-row group's K-blocks [64, per_block] contiguous, one after the other."""
    n, c = t.shape
    if inverse:
        g = t.reshape(n // KERNEL_ROWS, c // per_block, KERNEL_ROWS, per_block).transpose(1, 2)
    else:
        g = t.reshape(n // KERNEL_ROWS, KERNEL_ROWS, c // per_block, per_block).transpose(1, 2)
    return g.contiguous().view(n, c)


def mxfp4_to_kernel_layout(weight: torch.Tensor, scale: torch.Tensor,
                           inverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Checkpoint MXFP4 (packed [N, K/2], e8m0 [N, K/32]) -> the MoE kernels' layout, same
    shapes, bytes and scales (`inverse`: back). Codes in the halves order (`fp4_to_halves`),
    and for each group of 64 rows and each 128-deep K-block, the group's 64 x 64 weight bytes
    (64 x 4 scales) contiguous: a CTA's weight tile is one 4 KB run of memory instead of 64
    runs of 64 bytes 2 KB apart, which DRAM serves at least 1.3-1.7x faster (H200, Flash and
    Pro MoE at 1-64 tokens). N must be a multiple of 64, K of 128."""
    n, k2 = weight.shape
    if n % KERNEL_ROWS or (2 * k2) % 128 or scale.shape != (n, 2 * k2 // MXFP4_BLOCK):
        raise ValueError(f"the MoE kernels' MXFP4 layout needs N % 64 == 0 and K % 128 == 0 "
                         f"with one scale per 32, got weight {tuple(weight.shape)}, scale "
                         f"{tuple(scale.shape)}")
    s = scale.view(torch.uint8)
    if inverse:
        w = _group_tiles(weight.view(torch.uint8), 64, True)
        w = pack_fp4(unpack_fp4(w, halves=True)).view(torch.uint8)
        return w.view(weight.dtype), _group_tiles(s, 4, True).view(scale.dtype)
    w = _group_tiles(fp4_to_halves(weight).view(torch.uint8), 64, False)
    return w.view(weight.dtype), _group_tiles(s, 4, False).view(scale.dtype)


def nvfp4_to_kernel_layout(weight: torch.Tensor, scale: torch.Tensor,
                           inverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4 (packed [N, K/2] in the checkpoint's code order, e4m3 [N, K/16]) -> the MoE
    kernels' layout, same shapes and values (`inverse`: back): for each group of 64 rows and
    each 128-deep K-block, the group's 64 x 64 weight bytes (64 x 8 scales) contiguous, as
    `mxfp4_to_kernel_layout` but in the checkpoint's code order (its kernel decodes to bf16)."""
    n, k2 = weight.shape
    if n % KERNEL_ROWS or (2 * k2) % 128 or scale.shape != (n, 2 * k2 // NVFP4_BLOCK):
        raise ValueError(f"the MoE kernels' NVFP4 layout needs N % 64 == 0 and K % 128 == 0 "
                         f"with one scale per 16, got weight {tuple(weight.shape)}, scale "
                         f"{tuple(scale.shape)}")
    w = _group_tiles(weight.view(torch.uint8), 64, inverse).view(weight.dtype)
    return w, _group_tiles(scale.view(torch.uint8), 8, inverse).view(scale.dtype)


_LUTS: dict = {}


def fp4_values(codes: torch.Tensor) -> torch.Tensor:
    key = str(codes.device)  # cached: no host-to-device copy inside a step (CUDA graphs)
    if key not in _LUTS:
        _LUTS[key] = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES),
                                  dtype=torch.float32, device=codes.device)
    return _LUTS[key][codes.long()]


# ---------------------------------------------------------------------------------- MXFP4
def dequant_mxfp4(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    vals = fp4_values(unpack_fp4(weight))
    return vals * scale.float().repeat_interleave(MXFP4_BLOCK, -1)


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 [N, K] -> (packed int8 [N, K/2], e8m0 [N, K/32])."""
    n, k = w.shape
    wb = w.float().view(n, k // MXFP4_BLOCK, MXFP4_BLOCK)
    s = pow2ceil(wb.abs().amax(-1, keepdim=True).clamp_min(FP4_MAX * 2.0 ** -126) / FP4_MAX)
    v = e2m1_round((wb / s).clamp(-FP4_MAX, FP4_MAX)).view(n, k)
    return pack_fp4(e2m1_codes(v)), s.squeeze(-1).to(torch.float8_e8m0fnu)


def mxfp4_to_fp8(weight: torch.Tensor, scale: torch.Tensor):
    """Convert MXFP4 to 128x128 block FP8 (SPEC.md 2).

    Per block, S = max_scale / 2^6 and each element becomes code_value * scale / S in e4m3.
    Returns (e4m3 [N, K], e8m0 [N/128, K/128], lossy) where `lossy` lists the (row-block,
    col-block) pairs holding a per-32 scale below 2^-14 * max_scale, whose values may lose bits.
    """
    n, k = weight.shape[0], weight.shape[1] * 2
    if n % FP8_BLOCK or k % FP8_BLOCK:
        raise ValueError(f"FP4->FP8 conversion needs multiples of 128, got [{n}, {k}]")
    s = scale.float().view(n // FP8_BLOCK, FP8_BLOCK, k // FP8_BLOCK, FP8_BLOCK // MXFP4_BLOCK)
    smax = s.amax(dim=(1, 3))  # [N/128, K/128]
    S = smax / 2.0 ** 6
    lossy_mask = (s < smax[:, None, :, None] * 2.0 ** -14).any(dim=3).any(dim=1)
    vals = fp4_values(unpack_fp4(weight)) * scale.float().repeat_interleave(MXFP4_BLOCK, -1)
    q = (vals / _expand_blocks(S, n, k, FP8_BLOCK, FP8_BLOCK)).to(torch.float8_e4m3fn)
    lossy = [tuple(map(int, ij)) for ij in lossy_mask.nonzero().tolist()]
    return q, S.to(torch.float8_e8m0fnu), lossy


# ---------------------------------------------------------------------------------- NVFP4
def dequant_nvfp4(weight: torch.Tensor, weight_scale: torch.Tensor,
                  weight_scale_2: torch.Tensor) -> torch.Tensor:
    vals = fp4_values(unpack_fp4(weight))
    return vals * weight_scale.float().repeat_interleave(NVFP4_BLOCK, -1) * weight_scale_2.float()


def quantize_nvfp4(w: torch.Tensor):
    """fp32 [N, K] -> (packed uint8 [N, K/2], e4m3 [N, K/16], fp32 global scale [])."""
    n, k = w.shape
    gscale = (w.abs().amax().clamp_min(1e-12) / (FP4_MAX * FP8_MAX)).float()
    wb = w.float().view(n, k // NVFP4_BLOCK, NVFP4_BLOCK)
    bscale = (wb.abs().amax(-1, keepdim=True) / FP4_MAX / gscale).clamp(2.0 ** -9, FP8_MAX)
    bscale = bscale.to(torch.float8_e4m3fn)
    eff = bscale.float() * gscale
    v = e2m1_round((wb / eff).clamp(-FP4_MAX, FP4_MAX)).view(n, k)
    return pack_fp4(e2m1_codes(v)).view(torch.uint8), bscale.squeeze(-1), gscale.reshape(())
