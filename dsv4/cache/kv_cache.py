"""The per-layer caches of DeepSeek-V4 (SPEC.md section 9) as preallocated tensors.

Two kinds of memory:
- per *slot* (one slot per running sequence, fixed size): the sliding-window ring of raw kv rows
  and the compressor state (raw `wkv`/`wgate` rows of the open window(s)), both addressed by
  token position modulo the ring length;
- per *block* (128 tokens of a sequence, paged through the sequence's block table): the
  compressed rows (32 for a CSA layer, 1 for an HCA layer) and, for CSA, the indexer keys.

Rollback (speculative decoding, preemption) is a truncation of the sequence length and nothing
else: every row is addressed by the absolute position that produced it, and the rings keep
`margin` rows beyond what the window (`w`) or the open compressor windows (`k*m`) need, so a
rejected token never overwrites a row that an accepted token still needs. A compressed row that
a rejected token completed is simply rewritten when its window completes again. Hence: the
rings hold the last `w + margin` (window) and `k*m + margin` (compressor) positions, and a
sequence may roll back at most `margin` tokens since its last step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK_TOKENS = 128  # lcm(4, 128): a block holds 32 CSA rows or 1 HCA row


def overlap_factor(ratio: int) -> int:
    return 2 if ratio == 4 else 1


@dataclass
class CompressorState:
    """Raw rows of the open compressor window(s): kv and gate score, fp32 [slots, rows, k*C]."""
    kv: torch.Tensor
    score: torch.Tensor

    @property
    def rows(self) -> int:
        return self.kv.shape[1]


class LayerCache:
    """All cache tensors of one attention layer (main model or MTP)."""

    def __init__(self, ratio: int, head_dim: int, index_dim: int, window: int, num_slots: int,
                 num_blocks: int, margin: int, dtype: torch.dtype, device):
        self.ratio = ratio
        self.window_rows = window + margin
        self.win = torch.zeros(num_slots, self.window_rows, head_dim, dtype=dtype, device=device)
        self.cmp = self.idx = self.state = self.idx_state = None
        if ratio:
            k = overlap_factor(ratio)
            self.cmp = torch.zeros(num_blocks, BLOCK_TOKENS // ratio, head_dim, dtype=dtype,
                                   device=device)
            self.state = _state(num_slots, k * ratio + margin, k * head_dim, device)
        if ratio == 4:
            self.idx = torch.zeros(num_blocks, BLOCK_TOKENS // ratio, index_dim, dtype=dtype,
                                   device=device)
            self.idx_state = _state(num_slots, 2 * ratio + margin, 2 * index_dim, device)

    def state_rows(self) -> int:
        return self.state.rows if self.state is not None else 0


def _state(slots: int, rows: int, width: int, device) -> CompressorState:
    z = lambda: torch.zeros(slots, rows, width, dtype=torch.float32, device=device)  # noqa: E731
    return CompressorState(kv=z(), score=z())


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def slot_bytes(cfg, margin: int, dtype: torch.dtype) -> int:
    """Bytes of per-sequence (slot) memory over all layers, MTP included."""
    D, cI = cfg.head_dim, cfg.index_head_dim
    total = 0
    for m in cfg.compress_ratios:
        total += (cfg.sliding_window + margin) * D * _elem(dtype)
        if m:
            k = overlap_factor(m)
            total += 2 * (k * m + margin) * k * D * 4
        if m == 4:
            total += 2 * (2 * m + margin) * 2 * cI * 4
    return total


def block_bytes(cfg, dtype: torch.dtype) -> int:
    """Bytes of one 128-token block over all layers, MTP included."""
    D, cI = cfg.head_dim, cfg.index_head_dim
    total = 0
    for m in cfg.compress_ratios:
        if m:
            total += (BLOCK_TOKENS // m) * D * _elem(dtype)
        if m == 4:
            total += (BLOCK_TOKENS // m) * cI * _elem(dtype)
    return total


class ModelCache:
    """Caches of every layer: `layers[i]` for main layer i, then the MTP layers."""

    def __init__(self, cfg, num_slots: int, num_blocks: int, margin: int = 8,
                 dtype: torch.dtype = torch.bfloat16, device="cpu"):
        self.num_slots, self.num_blocks, self.margin = num_slots, num_blocks, margin
        self.dtype, self.device = dtype, torch.device(device)
        self.layers = [LayerCache(m, cfg.head_dim, cfg.index_head_dim, cfg.sliding_window,
                                  num_slots, num_blocks, margin, dtype, device)
                       for m in cfg.compress_ratios]
        self.window_rows = cfg.sliding_window + margin

    def state_rows(self, ratio: int) -> int:
        return overlap_factor(ratio) * ratio + self.margin
