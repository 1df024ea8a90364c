"""The DeepSeek-V4 network: embedding, blocks, hc_head + norm + head, and the MTP layers."""
from __future__ import annotations

import torch
from torch import nn

from ..cache.kv_cache import ModelCache
from ..distributed import SINGLE, ParallelGroup
from ..kernels.f32_linear import linear_f32
from ..kernels.mhc import hc_head
from ..kernels.pdl import for_tokens
from ..quant.linear import BF16Linear, make_linear
from ..quant.scheme import QuantScheme
from .batch import ForwardBatch
from .block import Block
from .mhc import hc_params, settle
from .norm import RMSNorm

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


class MTPLayer(Block):
    """Multi-token prediction: from the main model's final state at p and token p+1, a block
    with its own caches predicts token p+2 (SPEC.md 8)."""

    def __init__(self, cfg, j: int, scheme, dtype: torch.dtype, qat: bool = True,
                 tp: ParallelGroup = SINGLE):
        prefix = f"mtp.{j}"
        super().__init__(cfg, cfg.num_hidden_layers + j, scheme, prefix, dtype, qat, tp)
        d, n = cfg.hidden_size, cfg.hc_mult
        self.e_proj = make_linear(d, d, scheme.format_for(f"{prefix}.e_proj"), dtype)
        self.h_proj = make_linear(d, d, scheme.format_for(f"{prefix}.h_proj"), dtype)
        self.enorm = RMSNorm(d, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps)
        self.norm = RMSNorm(d, cfg.rms_norm_eps)
        hc_params(self, "hc_head", n, d, n)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, batch: ForwardBatch, cache,
                input_ids: torch.Tensor) -> torch.Tensor:
        """h [T, n, d] main-model state at p; emb [T, d] embedding of token p+1 -> the
        block's Pending update of [T, n, d]."""
        x = self.e_proj(self.enorm(emb))[:, None, :] + self.h_proj(self.hnorm(h))
        return super().forward(x, batch, cache, input_ids)


class DeepseekV4Model(nn.Module):
    """Parameter names are the official checkpoint's, so loading is a lookup.

    `qat=False` switches off the FP8/FP4 rounding simulations of the kv and indexer paths (only
    for comparisons with implementations that lack them; the real model needs them)."""

    def __init__(self, cfg, dtype: str | torch.dtype = "bfloat16", scheme: QuantScheme | None = None,
                 qat: bool = True, tp: ParallelGroup = SINGLE):
        super().__init__()
        self.cfg, self.tp, self.qat = cfg, tp, qat
        self.dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        scheme = scheme or QuantScheme.from_config(cfg)
        self.scheme = scheme
        d, n, V = cfg.hidden_size, cfg.hc_mult, cfg.vocab_size
        # Vocabulary-parallel embedding: each rank holds a contiguous range of rows. The head is
        # replicated, so logits need no collective and rank 0 alone can sample.
        self.vocab_start, v_local = tp.split(V, "vocab_size")
        self.embed = nn.Embedding(v_local, d, dtype=self.dtype)
        self.embed.weight.requires_grad_(False)
        self.layers = nn.ModuleList(Block(cfg, i, scheme, f"layers.{i}", self.dtype, qat, tp)
                                    for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(d, cfg.rms_norm_eps)
        self.head = BF16Linear(d, V, dtype=self.dtype)
        hc_params(self, "hc_head", n, d, n)
        self.mtp = nn.ModuleList(MTPLayer(cfg, j, scheme, self.dtype, qat, tp)
                                 for j in range(cfg.num_nextn_predict_layers))

    # ------------------------------------------------------------------ forward
    def _check(self, batch: ForwardBatch, cache: ModelCache) -> None:
        if batch.window_rows != cache.window_rows or batch.num_slots != cache.num_slots:
            raise ValueError("ForwardBatch was built for another cache geometry")

    def forward(self, batch: ForwardBatch, cache: ModelCache) -> torch.Tensor:
        """Runs every main layer over the batch, updating `cache`. Returns the final state
        X [T, n, d]; `logits(X[batch.logits_indices])` gives next-token logits."""
        self._check(batch, cache)
        ids = batch.input_ids
        with for_tokens(batch.num_tokens):  # how the GPU kernels are launched
            x = self.embed_tokens(ids)[:, None, :].expand(-1, self.cfg.hc_mult, -1).contiguous()
            for i, layer in enumerate(self.layers):
                x = layer(x, batch, cache.layers[i], ids)
            return settle(x)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return self.embed(ids)
        local = ids - self.vocab_start
        mine = (local >= 0) & (local < self.embed.num_embeddings)
        e = self.embed(torch.where(mine, local, 0)) * mine[:, None].to(self.dtype)
        return self.tp.all_reduce(e)

    def logits(self, x: torch.Tensor, head_owner: nn.Module | None = None) -> torch.Tensor:
        """x [N, n, d] -> fp32 logits [N, V] through hc_head, norm and the shared head."""
        o = head_owner if head_owner is not None else self
        with for_tokens(x.shape[0]):
            y = hc_head(x, o.hc_head_fn, o.hc_head_scale, o.hc_head_base, self.cfg.rms_norm_eps,
                        self.cfg.hc_eps, norm=(o.norm.weight, o.norm.eps))
            # the fp32 head (SPEC.md 8) of the normed rows in the working dtype: bf16 rows
            # are one exact part for `linear_f32` (a .float() copy was split into three, two
            # of them zeros: 3x the GEMM and a sum, 0.9 of an 8.8 ms batch-256 step, H200)
            return linear_f32(y, self.head.weight)

    def mtp_forward(self, h: torch.Tensor, next_ids: torch.Tensor, batch: ForwardBatch,
                    cache: ModelCache, j: int = 0) -> torch.Tensor:
        """MTP layer j at the batch's positions: h [T, n, d] is the main model's final state
        there and `next_ids` [T] the tokens one position later. Returns its state [T, n, d]."""
        self._check(batch, cache)
        layer = self.mtp[j]
        with for_tokens(batch.num_tokens):
            return settle(layer(h, self.embed_tokens(next_ids), batch,
                                cache.layers[self.cfg.num_hidden_layers + j], next_ids))

    def mtp_logits(self, x: torch.Tensor, j: int = 0) -> torch.Tensor:
        return self.logits(x, self.mtp[j])
