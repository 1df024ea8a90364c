"""How a ragged batch is described to the model.

One step feeds several sequences at once, each a chunk of new tokens starting at its cached
length: a prefill chunk of any length or a single decode token (or K+1 verification tokens).
Tokens are flattened to `[T]`; every index the layers need (which window rows a token attends
to, which compressor windows complete in this step, where rows are written) is derived here once
per step, vectorised over tokens, and shared by all layers with the same ratio.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from ..cache.kv_cache import BLOCK_TOKENS, overlap_factor


@dataclass
class SeqChunk:
    """One sequence's part of a step: `tokens` at positions start_pos, start_pos+1, ..."""
    tokens: list[int]
    start_pos: int
    slot: int
    block_table: list[int]


@dataclass
class CompressPlan:
    """Compressor windows that complete in this step, and where their items come from.

    For window w (one row per completed window): items j = 0..k*m-1 are positions
    `pos[w, j]`; an item is read from this step's new rows (`is_new`, index `new_idx`) or from
    the slot's state ring (`state_idx`); `valid` is False for the absent window before 0.
    """
    seq: torch.Tensor        # [W] batch index of the sequence
    index: torch.Tensor      # [W] compressed entry index i (window i covers i*m .. i*m+m-1)
    is_new: torch.Tensor     # [W, k*m] bool
    new_idx: torch.Tensor    # [W, k*m] row of this step's tokens
    state_idx: torch.Tensor  # [W, k*m] flat row of the state ring
    valid: torch.Tensor      # [W, k*m] bool
    dst: torch.Tensor        # [W] flat row of the compressed cache


class ForwardBatch:
    """Flattened tokens of a step and the per-step indices derived from them."""

    def __init__(self, chunks: list[SeqChunk], window: int, window_rows: int, num_slots: int,
                 device="cpu", logits_indices: list[int] | None = None):
        if not chunks:
            raise ValueError("a batch needs at least one sequence")
        self.chunks = chunks
        self.window, self.window_rows, self.num_slots = window, window_rows, num_slots
        self.device = torch.device(device)
        self.lens = [len(c.tokens) for c in chunks]
        if min(self.lens) < 1:
            raise ValueError("every sequence in a batch needs at least one new token")
        self.starts = [c.start_pos for c in chunks]
        self.num_seqs, self.num_tokens = len(chunks), sum(self.lens)
        cu = [0]
        for n in self.lens:
            cu.append(cu[-1] + n)
        self.cu = cu
        ids = [t for c in chunks for t in c.tokens]
        dev = self.device
        self.input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        lens = torch.tensor(self.lens)
        self.tok_seq_cpu = torch.repeat_interleave(torch.arange(self.num_seqs), lens)
        start = torch.tensor(self.starts)
        cu_t = torch.tensor(cu[:-1])
        self.positions_cpu = start[self.tok_seq_cpu] + torch.arange(self.num_tokens) - cu_t[self.tok_seq_cpu]
        self.positions = self.positions_cpu.to(dev)
        self.tok_seq = self.tok_seq_cpu.to(dev)
        self.slots_cpu = torch.tensor([c.slot for c in chunks], dtype=torch.long)
        nb = max(1, max(len(c.block_table) for c in chunks))
        bt = torch.zeros(self.num_seqs, nb, dtype=torch.long)
        for b, c in enumerate(chunks):
            bt[b, :len(c.block_table)] = torch.tensor(c.block_table, dtype=torch.long)
        self.block_tables_cpu = bt
        self.block_tables = bt.to(dev)
        if logits_indices is None:  # last token of every sequence
            logits_indices = [e - 1 for e in cu[1:]]
        self.logits_indices = torch.tensor(logits_indices, dtype=torch.long, device=dev)
        self._plans: dict = {}

    # ------------------------------------------------------------------ helpers
    def _tok(self, per_seq: list[int] | torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(per_seq, dtype=torch.long)[self.tok_seq_cpu]

    def entry_rows(self, seq: torch.Tensor, i: torch.Tensor, ratio: int) -> torch.Tensor:
        """Flat compressed-cache row of entry i of sequence `seq` (CPU tensors)."""
        rpb = BLOCK_TOKENS // ratio
        blk = i // rpb
        blk = blk.clamp(max=self.block_tables_cpu.shape[1] - 1)
        return self.block_tables_cpu[seq, blk] * rpb + i % rpb

    # ------------------------------------------------------------------ window attention
    @cached_property
    def window_index(self) -> torch.Tensor:
        """[T, w] indices into cat(window ring rows [slots*R], this step's kv rows [T]); -1 = none.

        Positions before the chunk come from the ring (row slot*R + p mod R), the chunk's own
        positions from this step's rows."""
        p = self.positions_cpu[:, None] - torch.arange(self.window)[None, :]  # [T, w]
        p0 = self._tok(self.starts)[:, None]
        R = self.window_rows
        new = self.num_slots * R + self._tok(self.cu[:-1])[:, None] + (p - p0)
        ring = self.slots_cpu[self.tok_seq_cpu][:, None] * R + p.remainder(R)
        idx = torch.where(p >= p0, new, ring)
        return torch.where(p >= 0, idx, -1).to(self.device)

    def ring_writes(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(token indices, flat ring rows) for the last `rows` tokens of every sequence."""
        key = ("ring", rows)
        if key not in self._plans:
            end = self._tok([s + n for s, n in zip(self.starts, self.lens)])
            keep = self.positions_cpu >= end - rows
            tok = keep.nonzero().squeeze(1)
            dst = self.slots_cpu[self.tok_seq_cpu[tok]] * rows + self.positions_cpu[tok] % rows
            self._plans[key] = (tok.to(self.device), dst.to(self.device))
        return self._plans[key]

    # ------------------------------------------------------------------ compressed entries
    def compress_plan(self, ratio: int, state_rows: int) -> CompressPlan:
        key = ("plan", ratio, state_rows)
        if key not in self._plans:
            self._plans[key] = self._build_plan(ratio, state_rows)
        return self._plans[key]

    def _build_plan(self, m: int, rows: int) -> CompressPlan:
        k = overlap_factor(m)
        first = torch.tensor([s // m for s in self.starts])
        last = torch.tensor([(s + n) // m for s, n in zip(self.starts, self.lens)])
        count = last - first
        seq = torch.repeat_interleave(torch.arange(self.num_seqs), count)
        offs = torch.arange(len(seq)) - torch.repeat_interleave(torch.cumsum(count, 0) - count, count)
        index = first[seq] + offs
        pos = (index[:, None] - (k - 1)) * m + torch.arange(k * m)[None, :]  # [W, k*m]
        p0 = torch.tensor(self.starts)[seq][:, None]
        cu = torch.tensor(self.cu[:-1])[seq][:, None]
        is_new = pos >= p0
        new_idx = (cu + pos - p0).clamp(min=0)
        state_idx = self.slots_cpu[seq][:, None] * rows + pos.remainder(rows)
        have = torch.tensor([len(c.block_table) for c in self.chunks])[seq]
        short = (index // (BLOCK_TOKENS // m) >= have).nonzero()
        if len(short):  # a write past the block table would land in another sequence's block
            b = int(seq[short[0, 0]])
            raise ValueError(f"sequence {b} completes compressed entry {int(index[short[0, 0]])} "
                             f"(ratio {m}) but its block table has only {int(have[short[0, 0]])} "
                             f"blocks of {BLOCK_TOKENS} tokens")
        d = self.device
        return CompressPlan(seq=seq.to(d), index=index.to(d), is_new=is_new.to(d),
                            new_idx=new_idx.to(d), state_idx=state_idx.to(d),
                            valid=(pos >= 0).to(d), dst=self.entry_rows(seq, index, m).to(d))

    def candidates(self, ratio: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Compressed entries visible to each token: (rows [T, N] with -1 beyond, count [T]).

        Token p sees entries i < floor((p+1)/m): those whose window ended at or before p.
        """
        key = ("cand", ratio)
        if key not in self._plans:
            # Built where the model runs: [T, N] grows with the context (N = ctx / m).
            n = max(1, int((max(s + k for s, k in zip(self.starts, self.lens))) // ratio))
            avail = (self.positions + 1) // ratio  # [T]
            rpb = BLOCK_TOKENS // ratio
            i = torch.arange(n, device=self.device)[None, :]
            blk = (i // rpb).clamp(max=self.block_tables.shape[1] - 1)
            rows = self.block_tables[self.tok_seq[:, None], blk] * rpb + i % rpb
            rows = torch.where(i < avail[:, None], rows, -1)
            self._plans[key] = (rows, avail)
        return self._plans[key]


class StaticBatch:
    """Fixed-shape, persistent device copies of a ForwardBatch's indices (for CUDA graphs).

    A graph captured on a StaticBatch replays any ForwardBatch with at most `num_seqs` sequences
    of at most `tokens_per_seq` tokens each, after `load(batch)` copies its indices in. Padding
    tokens see nothing, write into the reserved `pad_slot` and `pad_block`, and are never read.
    """

    def __init__(self, num_seqs: int, tokens_per_seq: int, ratios, state_rows: dict,
                 window: int, window_rows: int, num_slots: int, max_model_len: int,
                 pad_slot: int, pad_block: int, device):
        d = torch.device(device)
        self.device, self.window, self.window_rows, self.num_slots = d, window, window_rows, num_slots
        self.num_seqs, self.tokens_per_seq = num_seqs, tokens_per_seq
        self.pad_slot, self.pad_block = pad_slot, pad_block
        T = num_seqs * tokens_per_seq
        self.num_tokens = T
        z = lambda *s, dt=torch.long: torch.zeros(*s, dtype=dt, device=d)  # noqa: E731
        self.input_ids, self.positions, self.tok_seq = z(T), z(T), z(T)
        self.logits_indices = z(T)
        self.window_index = z(T, window)
        self._ring = {r: (z(T), z(T)) for r in {window_rows, *state_rows.values()}}
        self._plans, self._cand = {}, {}
        for m in ratios:
            W = num_seqs * -(-tokens_per_seq // m)
            km = overlap_factor(m) * m
            self._plans[(m, state_rows[m])] = CompressPlan(
                seq=z(W), index=z(W), is_new=z(W, km, dt=torch.bool), new_idx=z(W, km),
                state_idx=z(W, km), valid=z(W, km, dt=torch.bool), dst=z(W))
            n = max(1, -(-max_model_len // m))
            self._cand[m] = (z(T, n), z(T))

    def ring_writes(self, rows: int):
        return self._ring[rows]

    def compress_plan(self, ratio: int, state_rows: int) -> CompressPlan:
        return self._plans[(ratio, state_rows)]

    def candidates(self, ratio: int):
        return self._cand[ratio]

    @staticmethod
    def _put(dst: torch.Tensor, src: torch.Tensor, fill) -> None:
        n = src.shape[0]
        if n > dst.shape[0] or (src.dim() > 1 and src.shape[1] > dst.shape[1]):
            raise ValueError(f"batch does not fit the captured shape {tuple(dst.shape)}")
        if src.dim() > 1 and src.shape[1] < dst.shape[1]:
            pad = torch.full((n, dst.shape[1] - src.shape[1]), fill, dtype=dst.dtype,
                             device=src.device)
            src = torch.cat([src.to(dst.dtype), pad], 1)
        dst[:n].copy_(src, non_blocking=True)
        if n < dst.shape[0]:
            dst[n:].fill_(fill)

    def load(self, b: ForwardBatch) -> None:
        """Copy the indices of `b` in, padding the rest (no host synchronisation)."""
        if b.num_seqs > self.num_seqs or max(b.lens) > self.tokens_per_seq:
            raise ValueError("batch larger than the captured graph")
        put = self._put
        put(self.input_ids, b.input_ids, 0)
        put(self.positions, b.positions, 0)
        put(self.tok_seq, b.tok_seq, 0)
        put(self.logits_indices, b.logits_indices, 0)
        put(self.window_index, b.window_index, -1)
        for rows, (tok, dst) in self._ring.items():
            t, d = b.ring_writes(rows)
            put(tok, t, self.num_tokens - 1)
            put(dst, d, self.pad_slot * rows)
        for (m, rows), plan in self._plans.items():
            p = b.compress_plan(m, rows)
            rpb = BLOCK_TOKENS // m
            put(plan.seq, p.seq, 0)
            put(plan.index, p.index, 0)
            put(plan.is_new, p.is_new, False)
            put(plan.new_idx, p.new_idx, 0)
            put(plan.state_idx, p.state_idx, self.pad_slot * rows)
            put(plan.valid, p.valid, True)
            put(plan.dst, p.dst, self.pad_block * rpb)
        for m, (cand, avail) in self._cand.items():
            c, a = b.candidates(m)
            put(cand, c, -1)
            put(avail, a, 0)
