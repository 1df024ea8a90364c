"""Lightning indexer of CSA layers: picks the top-k compressed entries per token (SPEC.md 6)."""
from __future__ import annotations

import torch
from torch import nn

from ..distributed import SINGLE, ParallelGroup
from ..kernels.indexer import indexer_topk
from ..kernels.qat import rope_hadamard_fp4
from ..quant.linear import BF16Linear, make_linear
from .batch import ForwardBatch
from .compressor import Compressor

# candidate-list entries (tokens x compressed entries) scored at once: 2^26, so a slice's int64
# lists and fp32 scores take 0.5 + 0.25 GB (prefill at 128K context: 2048 tokens a slice)
MAX_SCORES = 1 << 26


class Indexer(nn.Module):
    def __init__(self, cfg, freqs: torch.Tensor, fmt: str, dtype: torch.dtype, qat: bool = True,
                 tp: ParallelGroup = SINGLE):
        super().__init__()
        self.qat, self.tp = qat, tp
        self.total_heads, self.head_dim = cfg.index_n_heads, cfg.index_head_dim
        _, self.n_heads = tp.split(cfg.index_n_heads, "index_n_heads")
        self.rope_dim, self.topk = cfg.qk_rope_head_dim, cfg.index_topk
        self.wq_b = make_linear(cfg.q_lora_rank, self.n_heads * self.head_dim, fmt, dtype)
        self.weights_proj = BF16Linear(cfg.hidden_size, self.n_heads, dtype=dtype)
        self.compressor = Compressor(cfg, 4, self.head_dim, freqs, kind="index", qat=qat,
                                     dtype=dtype)
        self.register_buffer("freqs", freqs, persistent=False)

    def compress(self, u: torch.Tensor, batch: ForwardBatch, cache) -> None:
        """The indexer keys of the windows this step completes (before `forward` scores them;
        the attention may run it on its side stream)."""
        self.compressor(u, batch, cache.idx_state, cache.store_idx)

    def forward(self, qr: torch.Tensor, u: torch.Tensor, batch: ForwardBatch, cache,
                compressed: bool = False, ready=None) -> torch.Tensor:
        """Returns the selected compressed-cache rows [T, <=topk] (-1 = empty). `compressed`:
        `compress` already ran for this step; `ready()` is called before the scores read the
        keys (where the attention joins its side stream)."""
        if not compressed:
            self.compress(u, batch, cache)
        T, c, r = u.shape[0], self.head_dim, self.rope_dim
        # wq_b's product (from its split-K partials), RoPE, Hadamard and the FP4 rounding:
        # one launch on the GPU
        q = rope_hadamard_fp4(self.wq_b.split_k(qr), self.n_heads, batch.positions,
                              self.freqs, r, self.qat, qr.dtype)
        w = self.weights_proj.scaled(u, c ** -0.5 * self.total_heads ** -0.5)  # [T, nI]
        reduce = self.tp.all_reduce if self.tp.size > 1 else None  # heads' partial scores
        keys = cache.idx.view(-1, cache.idx.shape[-1])  # [rows, c], or packed FP4 bytes
        if ready is not None:
            ready()

        def select(lo: int, hi: int) -> torch.Tensor:
            whole = lo == 0 and hi == T
            cand, avail = batch.candidates(4) if whole else batch.candidates(4, lo, hi)
            return indexer_topk(q[lo:hi], w[lo:hi], keys, cand, self.topk, reduce, avail,
                                q_fp4=self.qat)
        # a long prefill chunk at a long context takes its tokens in slices: the candidate
        # lists and scores are [tokens, context / 4] (8192 tokens at 1M context: 17 GB of
        # int64 lists); every token's selection is its own, so the slices change nothing
        parts = [select(lo, hi) for lo, hi in batch.candidate_slices(4, MAX_SCORES)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)
