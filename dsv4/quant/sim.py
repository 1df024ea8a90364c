"""Low-precision rounding used by DeepSeek-V4 (SPEC.md sections 3, 5.2 and 6).

These are part of the model, not an optimisation: the network was trained with them
("QAT simulation"), so skipping one changes the logits. Every function here is exact:
scales are powers of two computed with frexp, and rounding is round-to-nearest-even.
"""
from __future__ import annotations

import torch

FP8_MAX = 448.0
FP4_MAX = 6.0
# e2m1 code -> value for codes 0..7 (bit 3 is the sign).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def pow2ceil(v: torch.Tensor) -> torch.Tensor:
    """2^ceil(log2 v) for v > 0, computed exactly from the binary exponent."""
    mant, exp = torch.frexp(v.float())  # v = mant * 2^exp, mant in [0.5, 1)
    exp = torch.where(mant == 0.5, exp - 1, exp)
    return torch.ldexp(torch.ones_like(mant), exp)


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    if x.shape[-1] % block:
        raise ValueError(f"last dim {x.shape[-1]} is not a multiple of the block size {block}")
    return x.float().unflatten(-1, (x.shape[-1] // block, block))


def fp8_block_scale(xb: torch.Tensor) -> torch.Tensor:
    """Power-of-two scale per block ([..., nb, block] -> [..., nb, 1])."""
    amax = xb.abs().amax(-1, keepdim=True).clamp_min(1e-4)
    return pow2ceil(amax / FP8_MAX)


def _padded_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """[..., K] -> [..., ceil(K/block), block]; a short last block is zero-padded (zeros change
    no block maximum), so K need not be a multiple of the block (tiny test models)."""
    k = x.shape[-1]
    if k % block:
        x = torch.nn.functional.pad(x.float(), (0, block - k % block))
    return _blocks(x, block)


def act_quant(x: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token FP8 activation quantisation (SPEC.md 3): e4m3 values [..., K] and fp32 scales
    [..., ceil(K/block)]."""
    xb = _padded_blocks(x, block)
    s = fp8_block_scale(xb)
    q = (xb / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.flatten(-2)[..., :x.shape[-1]], s.squeeze(-1)


def act_quant_sim(x: torch.Tensor, block: int = 128) -> torch.Tensor:
    """act_quant followed by dequantisation, in fp32: the values an FP8 linear multiplies."""
    xb = _padded_blocks(x, block)
    s = fp8_block_scale(xb)
    y = (xb / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * s
    return y.flatten(-2)[..., :x.shape[-1]]


def fp8_sim(x: torch.Tensor, block: int = 64) -> torch.Tensor:
    """FP8 e4m3 round trip with a power-of-two scale per block; keeps x's dtype (SPEC.md 5.2)."""
    xb = _blocks(x, block)
    s = fp8_block_scale(xb)
    return ((xb / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * s).flatten(-2).to(x.dtype)


def e2m1_round(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 values in [-6, 6] to the nearest e2m1 value, ties to the even code."""
    a = x.abs()
    code = ((a > 0.25).int() + (a >= 0.75).int() + (a > 1.25).int() + (a >= 1.75).int()
            + (a > 2.5).int() + (a >= 3.5).int() + (a > 5.0).int())
    return _e2m1_lut(x.device)[code] * torch.sign(x)


_LUTS: dict = {}


def _e2m1_lut(device) -> torch.Tensor:
    # Cached per device: no host-to-device copy inside a step (CUDA graph capture forbids it).
    key = str(device)
    if key not in _LUTS:
        _LUTS[key] = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)
    return _LUTS[key]


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """Codes (uint8 0..15, bit 3 = sign) of values that are already e2m1-representable."""
    a = x.abs()
    code = ((a > 0.25).to(torch.uint8) + (a >= 0.75).to(torch.uint8) + (a > 1.25).to(torch.uint8)
            + (a >= 1.75).to(torch.uint8) + (a > 2.5).to(torch.uint8) + (a >= 3.5).to(torch.uint8)
            + (a > 5.0).to(torch.uint8))
    return code | ((x < 0).to(torch.uint8) << 3)


def fp4_block_scale(xb: torch.Tensor) -> torch.Tensor:
    amax = xb.abs().amax(-1, keepdim=True).clamp_min(FP4_MAX * 2.0 ** -126)
    return pow2ceil(amax / FP4_MAX)


def fp4_sim(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """FP4 e2m1 round trip with a power-of-two scale per block (SPEC.md 6); keeps x's dtype."""
    xb = _blocks(x, block)
    s = fp4_block_scale(xb)
    return (e2m1_round((xb / s).clamp(-FP4_MAX, FP4_MAX)) * s).flatten(-2).to(x.dtype)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """x @ H_C * C^-0.5 along the last dim with the Sylvester Hadamard matrix (C a power of two)."""
    c = x.shape[-1]
    return x @ hadamard_matrix(c, x.dtype, x.device)


_HADAMARD_CACHE: dict = {}


def hadamard_matrix(c: int, dtype: torch.dtype, device) -> torch.Tensor:
    key = (c, dtype, str(device))
    if key not in _HADAMARD_CACHE:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < c:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        if h.shape[0] != c:
            raise ValueError(f"Hadamard size {c} is not a power of two")
        _HADAMARD_CACHE[key] = (h * c ** -0.5).to(dtype=dtype, device=device)
    return _HADAMARD_CACHE[key]
