"""Softmax pooling of the token compressor (SPEC.md 6).

For each completing window, each channel is a softmax-weighted sum over the window's items:
`c = sum_t softmax_t(g_t) * a_t`; absent items (before window 0) get weight 0.
The Triton kernel reads each input element once: one CTA holds all items of a window for a
block of channels, so the softmax and the sum stay in registers.
"""
from __future__ import annotations

import torch

from . import HAS_TRITON, use_triton


def compress_pool_ref(kv: torch.Tensor, score: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """kv, score [W, items, C] fp32; valid [W, items] -> [W, C] fp32."""
    s = score.masked_fill(~valid[..., None], float("-inf"))
    return (torch.softmax(s, dim=1) * kv.masked_fill(~valid[..., None], 0.0)).sum(1)


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _compress_pool_kernel(kv_ptr, score_ptr, valid_ptr, out_ptr, ITEMS, C,
                              BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr):
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
            items, C, BLOCK_I=bi, BLOCK_C=bc, num_warps=4)
        return out


def compress_pool(kv, score, valid):
    if use_triton(kv) and kv.dtype == torch.float32 and kv.shape[1] <= 1024:
        return compress_pool_triton(kv, score, valid)
    return compress_pool_ref(kv, score, valid)
