"""One transformer block: attention and MoE, each wrapped in a hyper-connection (SPEC.md 4)."""
from __future__ import annotations

import torch
from torch import nn

from ..distributed import SINGLE
from .attention import DeepseekV4Attention
from .batch import ForwardBatch
from .mhc import HyperConnection, Pending, hc_params
from .moe import MoE
from .norm import RMSNorm


class Block(nn.Module):
    def __init__(self, cfg, layer: int, scheme, prefix: str, dtype: torch.dtype, qat: bool = True,
                 tp=None):
        super().__init__()
        n, d = cfg.hc_mult, cfg.hidden_size
        self.layer, self.ratio = layer, cfg.compress_ratios[layer]
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.ffn_norm = RMSNorm(d, cfg.rms_norm_eps)
        hc_params(self, "hc_attn", n, d, (2 + n) * n)
        hc_params(self, "hc_ffn", n, d, (2 + n) * n)
        tp = tp or SINGLE
        self.attn = DeepseekV4Attention(cfg, layer, self.ratio, scheme, f"{prefix}.attn", dtype,
                                        qat, tp)
        self.ffn = MoE(cfg, layer, scheme, f"{prefix}.ffn", dtype, tp)
        self._hc_attn = HyperConnection(self, "hc_attn", cfg)
        self._hc_ffn = HyperConnection(self, "hc_ffn", cfg)

    def forward(self, x: torch.Tensor | Pending, batch: ForwardBatch, cache,
                input_ids: torch.Tensor) -> Pending:
        """X [T, n, d] (or the previous block's Pending update) -> this block's Pending update
        (`mhc.settle` forms it)."""
        x, y, ctx = self._hc_attn.pre(x, self.attn_norm)
        x, y, ctx = self._hc_ffn.pre(self._hc_attn.post(x, self.attn(y, batch, cache), ctx),
                                     self.ffn_norm)
        return self._hc_ffn.post(x, self.ffn(y, input_ids), ctx)
