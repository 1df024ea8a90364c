"""DeepSeek-V4 attention: sliding window + compressed (CSA / HCA) sparse attention (SPEC.md 5)."""
from __future__ import annotations

import torch
from torch import nn

from ..distributed import SINGLE, ParallelGroup
from ..kernels.grouped_linear import grouped_linear
from ..kernels.rmsnorm import rmsnorm_split, rmsnorm_split_pair
from ..kernels.side_stream import SideBranch, side_streams_wide
from ..kernels.sparse_attention import sparse_attention
from ..quant.linear import BF16Linear, make_linear, split_k_pair
from .batch import ForwardBatch
from .compressor import Compressor
from .indexer import Indexer
from .norm import RMSNorm
from .rope import rope_, rope_frequencies

# a step whose longest chunk has this many new tokens lets the attention read the chunk's own
# rows packed (`pack_new`: FP8 rows; on an H200 the 4 attention launches of an 8192-token
# prefill 10.6 -> 6.5 ms); decode steps (one new row a token) do not
PACK_NEW_CHUNK = 16


class DeepseekV4Attention(nn.Module):
    """One latent key/value head of width D shared by H query heads.

    Every token attends to its last `w` raw rows; with ratio m=128 (HCA) also to every
    compressed row, with m=4 (CSA) to the rows its lightning indexer picks. One softmax with a
    per-head sink covers them all. The output is inverse-rotated and projected per group.
    """

    def __init__(self, cfg, layer: int, ratio: int, scheme, prefix: str, dtype: torch.dtype,
                 qat: bool = True, tp: ParallelGroup = SINGLE):
        super().__init__()
        self.ratio, self.qat, self.tp = ratio, qat, tp
        # Tensor parallelism splits the heads (and with them the output groups); the latent kv,
        # the compressors and the caches are computed in full on every rank.
        _, self.n_heads = tp.split(cfg.num_attention_heads, "num_attention_heads")
        _, self.groups = tp.split(cfg.o_groups, "o_groups")
        self.head_dim = cfg.head_dim
        self.rope_dim, self.eps = cfg.qk_rope_head_dim, cfg.rms_norm_eps
        self.o_lora = cfg.o_lora_rank
        H, D, d = self.n_heads, self.head_dim, cfg.hidden_size

        def lin(name, i, o):
            return make_linear(i, o, scheme.format_for(f"{prefix}.{name}"), dtype)

        self.wq_a = lin("wq_a", d, cfg.q_lora_rank)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.wq_b = lin("wq_b", cfg.q_lora_rank, H * D)
        self.wkv = lin("wkv", d, D)
        self.kv_norm = RMSNorm(D, cfg.rms_norm_eps)
        # wo_a is applied as a dequantised working-dtype weight (SPEC.md 2). FP8 stays FP8 in
        # memory (e4m3 times a power of two is exactly bf16); other formats are dequantised at load.
        wo_a_fmt = scheme.format_for(f"{prefix}.wo_a")
        self.wo_a = (lin("wo_a", H * D // self.groups, self.groups * self.o_lora)
                     if wo_a_fmt == "fp8" else
                     BF16Linear(H * D // self.groups, self.groups * self.o_lora, dtype=dtype))
        self.wo_b = lin("wo_b", self.groups * self.o_lora, d)
        self.attn_sink = nn.Parameter(torch.zeros(H), requires_grad=False)
        freqs = rope_frequencies(cfg, ratio)
        self.register_buffer("freqs", freqs, persistent=False)
        if ratio:
            self.compressor = Compressor(cfg, ratio, D, freqs, kind="attn", qat=qat, dtype=dtype)
        if ratio == 4:
            self.indexer = Indexer(cfg, freqs, scheme.format_for(f"{prefix}.indexer.wq_b"), dtype,
                                   qat, tp)

    def _compress(self, u: torch.Tensor, batch: ForwardBatch, cache) -> None:
        if self.ratio:
            self.compressor(u, batch, cache.state, cache.store_cmp)
        if self.ratio == 4:
            self.indexer.compress(u, batch, cache)

    def forward(self, u: torch.Tensor, batch: ForwardBatch, cache) -> torch.Tensor:
        """u [T, d] -> the output [T, d], or without tensor parallelism wo_b's split-K
        partials [S, T, d], which the hyper-connection's post update sums (`hc_post`)."""
        T, H, D = u.shape[0], self.n_heads, self.head_dim
        nope = D - self.rope_dim
        pos, rd = batch.positions, self.rope_dim
        # The kv row and the compressors do not depend on the query path: in decode-sized
        # steps they run beside it on a second stream (`kernels/side_stream.py`),
        # joined before the indexer's scores and the attention read them. Compressed rows
        # completed by this chunk are written before they are read, so that later tokens of
        # the same chunk see them; each token's index list only reaches entries already complete.
        side = SideBranch(u.device, T, enabled=self.ratio > 0)
        # DSV4_SIDE_STREAM=wide (opt-in): a CSA layer's indexer compressor and its attention
        # query (wq_b, RoPE) on side streams of their own, the indexer's query on this one
        wide = side.on and self.ratio == 4 and side_streams_wide()
        side_idx = SideBranch(u.device, T, enabled=wide, lane=1)
        side_q = SideBranch(u.device, T, enabled=wide, lane=2)
        if side.on and self.ratio:  # batch tensors built on first use: on this stream
            self.compressor.prepare(batch, cache.state)
            if self.ratio == 4:
                self.indexer.compressor.prepare(batch, cache.idx_state)
        # kv = rope(kv_norm(wkv u)), then the FP8 rounding of its no-rope dims: one op
        kv_norm = (self.kv_norm.weight, self.kv_norm.eps, (pos, self.freqs, rd),
                   nope if self.qat else 0)
        if side.on:
            with side.run():
                kv = rmsnorm_split(self.wkv.split_k(u), self.kv_norm.weight, self.kv_norm.eps,
                                   u.dtype, rope=kv_norm[2], fp8_width=kv_norm[3])  # [T, D]
                if wide:
                    self.compressor(u, batch, cache.state, cache.store_cmp)
                else:
                    self._compress(u, batch, cache)
            if wide:
                with side_idx.run():
                    self.indexer.compress(u, batch, cache)
            qr = rmsnorm_split(self.wq_a.split_k(u), self.q_norm.weight, self.q_norm.eps,
                               u.dtype)
        else:  # one-stream order: wkv and wq_a in one launch, their norms in another
            kv_p, q_p = split_k_pair(self.wkv, self.wq_a, u)
            kv, qr = rmsnorm_split_pair((kv_p, *kv_norm),
                                        (q_p, self.q_norm.weight, self.q_norm.eps, None, 0),
                                        u.dtype)
            self._compress(u, batch, cache)
        # per-head q normalisation and RoPE, in place on fresh tensors
        with side_q.run():
            q = rope_(self.wq_b(qr).view(T, H, D), pos, self.freqs, rd, norm_eps=self.eps)
        cmp_idx = cmp_rows = cmp_len = None
        if self.ratio:
            cmp_rows = cache.flat(cache.cmp)
            # the visible entries are each token's first `cmp_len`: the candidates, or the
            # indexer's picks (which come first in its rows)
            cand, cmp_len = batch.candidates(self.ratio)
            cmp_idx = (self.indexer(qr, u, batch, cache, compressed=True,
                                    ready=side_idx.join if wide else side.join)
                       if self.ratio == 4 else cand)
        side_idx.join()
        side.join()
        side_q.join()
        # the output's rope dims turned back (inverse RoPE) by the attention op itself
        # (FP8 rows: a chunk's own rows, most of a prefill token's window, are exact in the
        # packed layout once the QAT rounding made them: the kernels may read them packed)
        o = sparse_attention(q, self.attn_sink, D ** -0.5, cache.flat(cache.win), kv,
                             batch.window_index, cmp_rows, cmp_idx, self.rope_dim, cmp_len,
                             out_rope=(pos, self.freqs),
                             pack_new=self.qat and batch.longest_chunk >= PACK_NEW_CHUNK)
        tok, dst = batch.ring_writes(cache.window_rows)
        cache.store_win(dst, kv, tok)  # kv[tok], gathered by the store

        o = o.reshape(T, self.groups, H * D // self.groups)
        scale = self.wo_a.scale if self.wo_a.fmt == "fp8" else None
        z = grouped_linear(o, self.wo_a.weight, scale)  # [T, G, o_lora]
        if self.tp.size > 1:
            return self.tp.all_reduce(self.wo_b(z.flatten(1)))
        return self.wo_b.split_k(z.flatten(1))  # partials [S, T, d]: hc_post sums them
