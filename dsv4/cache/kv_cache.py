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

from ..kernels.index_fp4 import index_fp4_row_bytes, store_index_fp4_
from ..kernels.kv_fp8 import kv_fp8_row_bytes, store_kv_fp8_

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
    """All cache tensors of one attention layer (main model or MTP).

    With `kv_fp8` the window and compressed rows are stored in the packed FP8 layout of
    `kernels/kv_fp8.py` (584 bytes instead of 1024 for D=512): lossless, because the model
    itself rounds those values to e4m3 with power-of-two scales per 64 (SPEC.md 5.2). With
    `index_fp4` the indexer keys are stored packed (`kernels/index_fp4.py`, 80 bytes instead of
    256 in bf16): lossless when the model's QAT rounds them to FP4, which only it knows."""

    def __init__(self, ratio: int, head_dim: int, index_dim: int, window: int, num_slots: int,
                 num_blocks: int, margin: int, dtype: torch.dtype, device, kv_fp8: bool = False,
                 rope_dim: int = 64, index_fp4: bool = False):
        self.ratio, self.kv_fp8, self.rope_dim = ratio, kv_fp8, rope_dim
        self.index_fp4, self.index_dim = index_fp4, index_dim
        self.window_rows = window + margin
        width = kv_fp8_row_bytes(head_dim, rope_dim) if kv_fp8 else head_dim
        rdtype = torch.uint8 if kv_fp8 else dtype
        self.win = torch.zeros(num_slots, self.window_rows, width, dtype=rdtype, device=device)
        self.cmp = self.idx = self.state = self.idx_state = None
        if ratio:
            k = overlap_factor(ratio)
            self.cmp = torch.zeros(num_blocks, BLOCK_TOKENS // ratio, width, dtype=rdtype,
                                   device=device)
            self.state = _state(num_slots, k * ratio + margin, k * head_dim, device)
        if ratio == 4:
            iw = index_fp4_row_bytes(index_dim) if index_fp4 else index_dim
            self.idx = torch.zeros(num_blocks, BLOCK_TOKENS // ratio, iw,
                                   dtype=torch.uint8 if index_fp4 else dtype, device=device)
            self.idx_state = _state(num_slots, 2 * ratio + margin, 2 * index_dim, device)

    def state_rows(self) -> int:
        return self.state.rows if self.state is not None else 0

    @staticmethod
    def flat(buf: torch.Tensor) -> torch.Tensor:
        return buf.view(-1, buf.shape[-1])

    def _store_rows(self, buf: torch.Tensor, dst: torch.Tensor, rows: torch.Tensor,
                    src: torch.Tensor | None = None) -> None:
        """flat buf[dst] = rows[src] (all rows in order when src is None)."""
        if self.kv_fp8:
            store_kv_fp8_(self.flat(buf), dst, rows, self.rope_dim, src)
        else:
            self.flat(buf)[dst] = (rows if src is None else rows[src]).to(buf.dtype)

    def store_win(self, dst: torch.Tensor, rows: torch.Tensor,
                  src: torch.Tensor | None = None) -> None:
        self._store_rows(self.win, dst, rows, src)

    def store_cmp(self, dst: torch.Tensor, rows: torch.Tensor) -> None:
        self._store_rows(self.cmp, dst, rows)

    def store_idx(self, dst: torch.Tensor, rows: torch.Tensor) -> None:
        if self.index_fp4:
            store_index_fp4_(self.flat(self.idx), dst, rows)
        else:
            self.flat(self.idx)[dst] = rows.to(self.idx.dtype)


def _state(slots: int, rows: int, width: int, device) -> CompressorState:
    z = lambda: torch.zeros(slots, rows, width, dtype=torch.float32, device=device)  # noqa: E731
    return CompressorState(kv=z(), score=z())


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _row_bytes(cfg, dtype: torch.dtype, kv_fp8: bool) -> int:
    if kv_fp8:
        return kv_fp8_row_bytes(cfg.head_dim, cfg.qk_rope_head_dim)
    return cfg.head_dim * _elem(dtype)


def slot_bytes(cfg, margin: int, dtype: torch.dtype, kv_fp8: bool = False) -> int:
    """Bytes of per-sequence (slot) memory over all layers, MTP included."""
    D, cI = cfg.head_dim, cfg.index_head_dim
    total = 0
    for m in cfg.compress_ratios:
        total += (cfg.sliding_window + margin) * _row_bytes(cfg, dtype, kv_fp8)
        if m:
            k = overlap_factor(m)
            total += 2 * (k * m + margin) * k * D * 4
        if m == 4:
            total += 2 * (2 * m + margin) * 2 * cI * 4
    return total


def block_bytes(cfg, dtype: torch.dtype, kv_fp8: bool = False, index_fp4: bool = False) -> int:
    """Bytes of one 128-token block over all layers, MTP included."""
    cI = cfg.index_head_dim
    key_bytes = index_fp4_row_bytes(cI) if index_fp4 else cI * _elem(dtype)
    total = 0
    for m in cfg.compress_ratios:
        if m:
            total += (BLOCK_TOKENS // m) * _row_bytes(cfg, dtype, kv_fp8)
        if m == 4:
            total += (BLOCK_TOKENS // m) * key_bytes
    return total


class ModelCache:
    """Caches of every layer: `layers[i]` for main layer i, then the MTP layers."""

    def __init__(self, cfg, num_slots: int, num_blocks: int, margin: int = 8,
                 dtype: torch.dtype = torch.bfloat16, device="cpu", kv_fp8: bool = False,
                 index_fp4: bool = False):
        self.num_slots, self.num_blocks, self.margin = num_slots, num_blocks, margin
        self.dtype, self.device, self.kv_fp8 = dtype, torch.device(device), kv_fp8
        self.layers = [LayerCache(m, cfg.head_dim, cfg.index_head_dim, cfg.sliding_window,
                                  num_slots, num_blocks, margin, dtype, device, kv_fp8,
                                  cfg.qk_rope_head_dim, index_fp4)
                       for m in cfg.compress_ratios]
        self.window_rows = cfg.sliding_window + margin

    def state_rows(self, ratio: int) -> int:
        return overlap_factor(ratio) * ratio + self.margin

    def copy_slots(self, pairs: list[tuple[int, int]]) -> None:
        """Slot `to` takes slot `src`'s window ring and compressor states in every layer, for
        each (src, to) in order (prefix caching: snapshots of a sequence's state, and resuming
        from one). One multi-tensor copy per run of pairs that neither reads a slot an earlier
        pair of the run writes nor writes one it reads; no index upload, no host sync."""
        bufs = []
        for layer in self.layers:
            bufs.append(layer.win)
            for st in (layer.state, layer.idx_state):
                if st is not None:
                    bufs += [st.kv, st.score]
        runs: list[list[tuple[int, int]]] = [[]]
        for a, b in pairs:
            run = runs[-1]
            if any(a == t or b == f for f, t in run):
                runs.append(run := [])
            run.append((a, b))
        for run in runs:
            if run:
                torch._foreach_copy_([buf[t] for buf in bufs for _, t in run],
                                     [buf[f] for buf in bufs for f, _ in run])
