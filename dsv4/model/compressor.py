"""Token compressor: softmax-pools every m tokens into one cache row (SPEC.md 6)."""
from __future__ import annotations

import torch
from torch import nn

from ..cache.kv_cache import CompressorState, overlap_factor
from ..kernels.compressor import compress_finish, compress_windows, ring_write_
from ..kernels.f32_linear import linear_f32_pair
from ..quant.linear import BF16Linear
from .batch import ForwardBatch
from .norm import RMSNorm


class Compressor(nn.Module):
    """Compresses windows of `ratio` tokens into rows of width `dim`.

    `kind="attn"` rows go to the attention cache (FP8-simulated), `kind="index"` rows are the
    indexer keys (Hadamard-rotated, FP4-simulated). For ratio 4 the windows overlap: entry i
    pools window i-1 (channels [:dim]) and window i (channels [dim:]).
    """

    def __init__(self, cfg, ratio: int, dim: int, freqs: torch.Tensor, kind: str,
                 qat: bool = True, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.ratio, self.dim, self.kind, self.qat = ratio, dim, kind, qat
        self.k = overlap_factor(ratio)
        self.rope_dim = cfg.qk_rope_head_dim
        # bf16 in the checkpoint, held in the working dtype, applied in fp32 (SPEC.md 6)
        self.wkv = BF16Linear(cfg.hidden_size, self.k * dim, dtype=dtype)
        self.wgate = BF16Linear(cfg.hidden_size, self.k * dim, dtype=dtype)
        self.ape = nn.Parameter(torch.zeros(ratio, self.k * dim), requires_grad=False)
        self.norm = RMSNorm(dim, cfg.rms_norm_eps)
        self.register_buffer("freqs", freqs, persistent=False)

    def prepare(self, batch: ForwardBatch, state: CompressorState) -> None:
        """Build the batch tensors `forward` reads (built on first use) on the current stream,
        before `forward` runs on another (`kernels/side_stream.py`)."""
        batch.positions, batch.compress_plan(self.ratio, state.rows)
        batch.ring_writes(state.rows)

    def forward(self, u: torch.Tensor, batch: ForwardBatch, state: CompressorState,
                store) -> None:
        """Write the rows of the windows that complete in this step with `store(rows_idx, rows)`
        (flat rows of the compressed cache) and keep the raw rows of the open windows in `state`."""
        m = self.ratio
        # a [T, k*C] fp32; the kernels add ape[pos % m] to g as they read it
        a, g = linear_f32_pair(u, self.wkv.weight, self.wgate.weight)
        kv_ring, sc_ring = state.kv.flatten(0, 1), state.score.flatten(0, 1)
        plan = batch.compress_plan(m, state.rows)
        if plan.seq.numel():
            pooled = compress_windows(a, g, kv_ring, sc_ring, plan.is_new, plan.new_idx,
                                      plan.state_idx, plan.valid, m, self.ape)
            # RMSNorm, RoPE at the entry's first position, the QAT rounding; [W, C]
            c = compress_finish(pooled, self.norm.weight, self.norm.eps, plan.index, m,
                                self.freqs, self.rope_dim, self.kind == "index", self.qat,
                                u.dtype)
            store(plan.dst, c)
        tok, dst = batch.ring_writes(state.rows)
        ring_write_(kv_ring, sc_ring, a, g, self.ape, batch.positions, tok, dst)
