"""How a ragged batch is described to the model.

One step feeds several sequences at once, each a chunk of new tokens starting at its cached
length: a prefill chunk of any length or a single decode token (or K+1 verification tokens).
Tokens are flattened to `[T]`; every index the layers need (which window rows a token attends
to, which compressor windows complete in this step, where rows are written) is derived here once
per step, vectorised over tokens, and shared by all layers with the same ratio.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from ..cache.kv_cache import BLOCK_TOKENS, overlap_factor
from ..kernels.candidates import candidates_


@dataclass
class SeqChunk:
    """One sequence's part of a step: `tokens` at positions start_pos, start_pos+1, ...

    `snapshots` (prefix caching): (P, slot) pairs, start_pos < P <= the chunk's end; the step
    also writes the state the sequence has at position P into `slot`, which holds a copy of
    the sequence's slot from before the step (`ForwardBatch.ring_writes_host`)."""
    tokens: list[int]
    start_pos: int
    slot: int
    block_table: list[int]
    snapshots: tuple[tuple[int, int], ...] = ()


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
    """Flattened tokens of a step and the per-step indices derived from them.

    The indices are computed on the host with numpy (a decode step's arrays are tiny, and a
    torch op on them costs several times more) and moved to `device` once each; the [T, w]
    window index of a step on the GPU is built there (`window_index_torch`)."""

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
        self.longest_chunk = max(self.lens)  # new tokens of the step's longest chunk
        lens = np.array(self.lens, dtype=np.int64)
        cu = np.zeros(self.num_seqs + 1, dtype=np.int64)
        np.cumsum(lens, out=cu[1:])
        self.cu = cu.tolist()
        self._starts = np.array(self.starts, dtype=np.int64)
        self._ends = self._starts + lens
        self._cu0 = cu[:-1]
        self._slots = np.array([c.slot for c in chunks], dtype=np.int64)
        self._tok_seq = np.repeat(np.arange(self.num_seqs, dtype=np.int64), lens)
        self._pos = (self._starts - self._cu0)[self._tok_seq] + np.arange(self.num_tokens)
        nb = max(1, max(len(c.block_table) for c in chunks))
        self._bt = np.zeros((self.num_seqs, nb), dtype=np.int64)
        for b, c in enumerate(chunks):
            self._bt[b, :len(c.block_table)] = c.block_table
        self._ids = np.array([t for c in chunks for t in c.tokens], dtype=np.int64)
        if logits_indices is None:  # last token of every sequence
            logits_indices = [e - 1 for e in self.cu[1:]]
        self._logits = np.array(logits_indices, dtype=np.int64)
        self._plans: dict = {}
        self._host: dict = {}

    # Device tensors are built on first use: a CUDA-graph step (built on the host and copied
    # into a StaticBatch) reads the numpy arrays only.
    input_ids = cached_property(lambda self: self._to_dev(self._ids))
    positions = cached_property(lambda self: self._to_dev(self._pos))
    tok_seq = cached_property(lambda self: self._to_dev(self._tok_seq))
    block_tables = cached_property(lambda self: self._to_dev(self._bt))
    logits_indices = cached_property(lambda self: self._to_dev(self._logits))
    block_tables_cpu = property(lambda self: torch.from_numpy(self._bt))
    logits_rows = property(lambda self: self._logits)  # the logits_indices on the host

    def _to_dev(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a))
        if self.device.type == "cuda":  # pinned: the copy does not wait for queued kernels
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def entry_rows(self, seq: np.ndarray, i: np.ndarray, ratio: int) -> np.ndarray:
        """Flat compressed-cache row of entry i of sequence `seq` (host arrays)."""
        rpb = BLOCK_TOKENS // ratio
        blk = np.minimum(i // rpb, self._bt.shape[1] - 1)
        return self._bt[seq, blk] * rpb + i % rpb

    # ------------------------------------------------------------------ window attention
    @cached_property
    def window_index_host(self) -> np.ndarray:
        """[T, w] indices into cat(window ring rows [slots*R], this step's kv rows [T]); -1 = none.

        Positions before the chunk come from the ring (row slot*R + p mod R), the chunk's own
        positions from this step's rows. Offset j of a token at p with `off` chunk tokens
        before it: this step's row j back if j <= off, else ring row (p - j) mod R, which is
        p mod R - j, plus R where that wraps (no division over [T, w]: a prefill graph's
        step waits for this index, 0.9 against 4 ms at 2048 tokens on a 2-core machine)."""
        s = self._tok_seq
        R = self.window_rows
        j = np.arange(self.window, dtype=np.int64)[None, :]
        pos = self._pos
        off = pos - self._starts[s]
        q = pos % R
        new = (self.num_slots * R + self._cu0[s] + off)[:, None]
        ring = (self._slots[s] * R + q)[:, None]
        idx = np.where(j <= off[:, None], new, ring + R * (j > q[:, None])) - j
        idx[j > pos[:, None]] = -1
        return idx

    @cached_property
    def window_index(self) -> torch.Tensor:
        if self.device.type == "cpu":
            return torch.from_numpy(self.window_index_host)
        return self.window_index_torch()

    def window_index_torch(self) -> torch.Tensor:
        """`window_index_host` computed with torch on the batch's device: a prefill chunk's
        [T, w] index is a million entries, ~0.1 s of numpy on the host while the GPU waits."""
        d = self.device
        s = self.tok_seq
        p = self.positions[:, None] - torch.arange(self.window, device=d)[None, :]
        starts, cu0, slots = self._to_dev(np.stack([self._starts, self._cu0, self._slots]))
        p0 = starts[s][:, None]
        R = self.window_rows
        new = self.num_slots * R + cu0[s][:, None] + (p - p0)
        ring = slots[s][:, None] * R + torch.remainder(p, R)
        idx = torch.where(p >= p0, new, ring)
        return torch.where(p >= 0, idx, -1)

    def ring_writes_host(self, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """(token indices, flat ring rows) for the last `rows` tokens of every sequence; and,
        for a chunk's snapshot (P, s), its tokens among the `rows` positions before P into
        slot s's ring. A ring holds the rows of the last `rows` positions at their position
        modulo `rows`, so s, a copy of the slot from before the step, then holds the state at
        P: the rows before the chunk from the copy, the chunk's from these writes."""
        key = ("ring", rows)
        if key not in self._host:
            tok = np.nonzero(self._pos >= self._ends[self._tok_seq] - rows)[0].astype(np.int64)
            dst = self._slots[self._tok_seq[tok]] * rows + self._pos[tok] % rows
            extra_tok, extra_dst = [tok], [dst]
            for b, c in enumerate(self.chunks):
                for point, slot in c.snapshots:
                    if not self.starts[b] < point <= self._ends[b]:
                        raise ValueError(f"snapshot at {point} outside the chunk "
                                         f"({self.starts[b]}, {self._ends[b]}]")
                    pos = np.arange(max(self.starts[b], point - rows), point, dtype=np.int64)
                    extra_tok.append(self._cu0[b] + pos - self.starts[b])
                    extra_dst.append(slot * rows + pos % rows)
            if len(extra_tok) > 1:
                tok, dst = np.concatenate(extra_tok), np.concatenate(extra_dst)
            self._host[key] = (tok, dst)
        return self._host[key]

    def ring_writes(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = ("ring", rows)
        if key not in self._plans:
            self._plans[key] = tuple(map(self._to_dev, self.ring_writes_host(rows)))
        return self._plans[key]

    # ------------------------------------------------------------------ compressed entries
    def compress_plan_host(self, ratio: int, state_rows: int) -> dict[str, np.ndarray]:
        """The CompressPlan's fields as host arrays."""
        key = ("plan", ratio, state_rows)
        if key not in self._host:
            self._host[key] = self._build_plan(ratio, state_rows)
        return self._host[key]

    def compress_plan(self, ratio: int, state_rows: int) -> CompressPlan:
        key = ("plan", ratio, state_rows)
        if key not in self._plans:
            host = self.compress_plan_host(ratio, state_rows)
            self._plans[key] = CompressPlan(**{n: self._to_dev(a) for n, a in host.items()})
        return self._plans[key]

    def _build_plan(self, m: int, rows: int) -> dict[str, np.ndarray]:
        k = overlap_factor(m)
        first = self._starts // m
        count = self._ends // m - first
        if not count.any():  # most decode steps complete no window
            return _empty_plan(k * m)
        seq = np.repeat(np.arange(self.num_seqs, dtype=np.int64), count)
        offs = np.arange(len(seq)) - np.repeat(np.cumsum(count) - count, count)
        index = first[seq] + offs
        pos = (index[:, None] - (k - 1)) * m + np.arange(k * m)[None, :]  # [W, k*m]
        p0 = self._starts[seq][:, None]
        is_new = pos >= p0
        new_idx = np.maximum(self._cu0[seq][:, None] + pos - p0, 0)
        state_idx = self._slots[seq][:, None] * rows + np.mod(pos, rows)
        have = np.array([len(c.block_table) for c in self.chunks], dtype=np.int64)[seq]
        short = np.nonzero(index // (BLOCK_TOKENS // m) >= have)[0]
        if len(short):  # a write past the block table would land in another sequence's block
            w = short[0]
            raise ValueError(f"sequence {int(seq[w])} completes compressed entry {int(index[w])} "
                             f"(ratio {m}) but its block table has only {int(have[w])} "
                             f"blocks of {BLOCK_TOKENS} tokens")
        return dict(seq=seq, index=index, is_new=is_new, new_idx=new_idx, state_idx=state_idx,
                    valid=pos >= 0, dst=self.entry_rows(seq, index, m))

    def candidate_width(self, ratio: int) -> int:
        """N of `candidates`: the longest sequence's compressed entries."""
        return max(1, int((max(s + k for s, k in zip(self.starts, self.lens))) // ratio))

    def candidate_slices(self, ratio: int, max_entries: int) -> list[tuple[int, int]]:
        """Token ranges whose candidate lists hold at most max_entries entries each (at least
        one token a range)."""
        step = max(1, max_entries // self.candidate_width(ratio))
        return [(lo, min(lo + step, self.num_tokens)) for lo in range(0, self.num_tokens, step)]

    def candidates(self, ratio: int, lo: int = 0, hi: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Compressed entries visible to tokens lo:hi (all by default): (rows [T, N] with -1
        beyond, count [T]). Only the lists of all tokens are kept for later calls.

        Token p sees entries i < floor((p+1)/m): those whose window ended at or before p.
        """
        hi = self.num_tokens if hi is None else hi
        key = ("cand", ratio)
        whole = lo == 0 and hi == self.num_tokens
        if whole and key in self._plans:
            return self._plans[key]
        # Built where the model runs: [T, N] grows with the context (N = ctx / m).
        n = self.candidate_width(ratio)
        avail = (self.positions[lo:hi] + 1) // ratio  # [T]
        rpb = BLOCK_TOKENS // ratio
        i = torch.arange(n, device=self.device)[None, :]
        blk = (i // rpb).clamp(max=self.block_tables.shape[1] - 1)
        rows = self.block_tables[self.tok_seq[lo:hi, None], blk] * rpb + i % rpb
        rows = torch.where(i < avail[:, None], rows, -1)
        if whole:
            self._plans[key] = (rows, avail)
        return rows, avail


def snapshot_spans(chunks: list[SeqChunk]) -> list[int]:
    """Per snapshot (P, slot) of these chunks: its chunk's tokens before P."""
    return [p - c.start_pos for c in chunks for p, _ in c.snapshots]


def _empty_plan(items: int) -> dict[str, np.ndarray]:
    ints = np.zeros(0, dtype=np.int64)
    return dict(seq=ints, index=ints, is_new=np.zeros((0, items), dtype=bool),
                new_idx=np.zeros((0, items), dtype=np.int64),
                state_idx=np.zeros((0, items), dtype=np.int64),
                valid=np.zeros((0, items), dtype=bool), dst=ints)


class _Arena:
    """Fixed-shape device buffers of one dtype carved from one allocation, with a pinned host
    twin: a step writes its indices on the host and they travel in one asynchronous copy."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dtype, self.device = dtype, device
        self.shapes: list[tuple[int, ...]] = []
        self.uploaded = None  # CUDA event after the last upload

    def add(self, *shape: int) -> int:
        self.shapes.append(shape)
        return len(self.shapes) - 1

    def build(self) -> None:
        sizes = [math.prod(s) for s in self.shapes]
        pin = self.device.type == "cuda"
        self.host = torch.zeros(sum(sizes), dtype=self.dtype, pin_memory=pin)
        self.dev = torch.zeros(sum(sizes), dtype=self.dtype, device=self.device)
        self.h, self.d, self.offsets, at = [], [], [], 0  # host views: numpy (cheap to fill)
        host = self.host.numpy()
        for shape, n in zip(self.shapes, sizes):
            self.h.append(host[at:at + n].reshape(shape))
            self.d.append(self.dev[at:at + n].view(shape))
            self.offsets.append(at)
            at += n

    def upload(self, n: int | None = None) -> None:
        """Copy the host twin's first n elements (all of it by default) to the device."""
        self.dev[:n].copy_(self.host[:n], non_blocking=True)
        if self.device.type == "cuda":
            if self.uploaded is None:
                self.uploaded = torch.cuda.Event()
            self.uploaded.record()

    def wait_upload(self) -> None:
        """Before the host twin is rewritten: the previous upload must have read it (a step
        launched ahead of the host may still have its upload queued)."""
        if self.uploaded is not None:
            self.uploaded.synchronize()


class StaticBatch:
    """Fixed-shape, persistent device copies of a ForwardBatch's indices (for CUDA graphs).

    A graph captured on a StaticBatch replays any ForwardBatch that `fits`: at most `num_seqs`
    sequences and `num_tokens` tokens (by default `num_seqs * tokens_per_seq`), shared out in
    any way (a prefill chunk beside decode tokens), after `load(batch)` copies its indices in;
    the windows its chunks complete must fit the plans (a sequence of `tokens_per_seq` tokens
    completes at most its share) and its ring writes `num_tokens + ring_extra` entries
    (prefix-caching snapshots add some: `ForwardBatch.ring_writes_host`). Padding
    tokens see nothing, write into the reserved `pad_slot` and `pad_block`, and are never read.
    `load` takes a batch built on the host (device "cpu"): its indices are written into pinned
    buffers and uploaded in two asynchronous copies (int64, bool). The CSA candidate lists, which
    grow with the context, are derived on the device inside the graph (`prepare`).
    """

    def __init__(self, num_seqs: int, tokens_per_seq: int, ratios, state_rows: dict,
                 window: int, window_rows: int, num_slots: int, max_model_len: int,
                 pad_slot: int, pad_block: int, device, lists: dict | None = None,
                 num_tokens: int | None = None, ring_extra: int = 0):
        d = torch.device(device)
        self.device, self.window, self.window_rows, self.num_slots = d, window, window_rows, num_slots
        self.num_seqs, self.tokens_per_seq = num_seqs, tokens_per_seq
        self.pad_slot, self.pad_block = pad_slot, pad_block
        T = num_seqs * tokens_per_seq if num_tokens is None else num_tokens
        self.num_tokens = T
        # the longest chunk a replayed batch may hold (a prefill graph's: all its tokens)
        self.longest_chunk = tokens_per_seq if num_tokens is None else T
        self.ring_entries = T + ring_extra
        self.max_blocks = max(1, -(-(max_model_len + tokens_per_seq) // BLOCK_TOKENS))
        ints, bools = _Arena(torch.long, d), _Arena(torch.bool, d)
        self._arenas = (ints, bools)
        # (arena, field, fill) per index tensor, in load order
        self._fields: dict = {}

        def field(name, arena, fill, *shape):
            self._fields[name] = (arena, arena.add(*shape), fill)

        field("input_ids", ints, 0, T)
        field("positions", ints, 0, T)
        field("tok_seq", ints, 0, T)
        field("logits_indices", ints, 0, T)
        field("window_index", ints, -1, T, window)
        self._rows = sorted({window_rows, *state_rows.values()})
        for r in self._rows:
            field(("ring_tok", r), ints, T - 1, self.ring_entries)
            field(("ring_dst", r), ints, pad_slot * r, self.ring_entries)
        self._plan_keys = [(m, state_rows[m]) for m in sorted(ratios)]
        # completed windows a step may hold per ratio: a sequence's chunk of n tokens completes
        # at most ceil(n / m), and every completion takes one of the T tokens
        self.windows = {m: (num_seqs * -(-tokens_per_seq // m) if num_tokens is None
                            else min(T, T // m + num_seqs)) for m in sorted(ratios)}
        for m, rows in self._plan_keys:
            W = self.windows[m]
            km = overlap_factor(m) * m
            rpb = BLOCK_TOKENS // m
            for name, arena, fill, shape in (
                    ("seq", ints, 0, (W,)), ("index", ints, 0, (W,)),
                    ("is_new", bools, False, (W, km)), ("new_idx", ints, 0, (W, km)),
                    ("state_idx", ints, pad_slot * rows, (W, km)), ("valid", bools, True, (W, km)),
                    ("dst", ints, pad_block * rpb, (W,))):
                field(("plan", m, rows, name), arena, fill, *shape)
        # The block tables, block-major and last: a step uploads the ints only up to the
        # blocks in use (as wide as the graphs' context length, they would be most of the
        # upload: 4 MB a step at 1M tokens and 64 sequences).
        field("block_tables_t", ints, pad_block, self.max_blocks, num_seqs)
        self._bt_dirty = self.max_blocks  # leading blocks not known to hold `fill` (host, device)
        self._dirty: dict = {}  # per field: leading rows not known to hold `fill` (all at first)
        ints.build()
        bools.build()
        view = lambda name: self._fields[name][0].d[self._fields[name][1]]  # noqa: E731
        self.input_ids, self.positions = view("input_ids"), view("positions")
        self.tok_seq, self.logits_indices = view("tok_seq"), view("logits_indices")
        self.window_index = view("window_index")
        self.block_tables = view("block_tables_t").t()  # [num_seqs, max_blocks], strided
        self._ring = {r: (view(("ring_tok", r)), view(("ring_dst", r))) for r in self._rows}
        self._plans = {
            (m, rows): CompressPlan(**{n: view(("plan", m, rows, n)) for n in (
                "seq", "index", "is_new", "new_idx", "state_idx", "valid", "dst")})
            for m, rows in self._plan_keys}
        # the compressed rows each token may see: list widths per ratio; `prepare` builds them
        self._cand_width = {m: max(1, -(-max_model_len // m)) for m in sorted(ratios)}
        self._cand: dict = {}
        self._lists = lists

    def fits(self, chunks: list[SeqChunk]) -> bool:
        if len(chunks) > self.num_seqs or any(len(c.block_table) > self.max_blocks
                                              for c in chunks):
            return False
        return self.fits_tokens([c.start_pos for c in chunks], [len(c.tokens) for c in chunks],
                                snapshot_spans(chunks))

    def fits_tokens(self, starts: list[int], lens: list[int], snapshots=()) -> bool:
        """Whether chunks of these lengths (at these start positions; `snapshots`: the tokens
        of its chunk before each snapshot point) fit the token, window and ring-write
        capacities. Chunks of at most `tokens_per_seq` tokens without snapshots (decode steps)
        fit by construction."""
        if len(lens) > self.num_seqs or sum(lens) > self.num_tokens:
            return False
        if max(lens) <= self.tokens_per_seq and not snapshots:
            return True
        for m, w in self.windows.items():
            if sum((s + n) // m - s // m for s, n in zip(starts, lens)) > w:
                return False
        # ring writes: each sequence's last `rows` tokens, and per snapshot up to `rows` more
        for r in self._rows:
            if sum(min(n, r) for n in (*lens, *snapshots)) > self.ring_entries:
                return False
        return True

    def ring_writes(self, rows: int):
        return self._ring[rows]

    def compress_plan(self, ratio: int, state_rows: int) -> CompressPlan:
        return self._plans[(ratio, state_rows)]

    def candidate_slices(self, ratio: int, max_entries: int) -> list[tuple[int, int]]:
        # the lists are allocated at their full width with the graphs: slices would save none
        return [(0, self.num_tokens)]

    def candidates(self, ratio: int, lo: int = 0, hi: int | None = None):
        rows, avail = self._cand[ratio]
        return (rows, avail) if lo == 0 and hi is None else (rows[lo:hi], avail[lo:hi])

    def prepare(self) -> None:
        """Derive the compressed-row lists from the loaded positions and block tables, on the
        device; called before every forward over this batch (and so captured in its graph).
        On the GPU only each token's visible prefix is written (`kernels/candidates.py`)."""
        T = self.num_tokens
        for m, n in self._cand_width.items():
            rows, avail = self._list_buffers(m, n, T)
            candidates_(rows, avail, self.block_tables, self.tok_seq, self.positions, m,
                        BLOCK_TOKENS // m)
            self._cand[m] = (rows, avail)

    def _list_buffers(self, m: int, n: int, T: int):
        """Lists [T, n] and counts [T] for ratio m: fresh, or views of buffers that every
        StaticBatch given the same `lists` dict shares (the CUDA graphs: they replay one at a
        time and each rebuilds the prefix its consumers read, so one set as wide as the
        graphs' context serves all batch sizes instead of one set each). Capture the largest
        batch first; a buffer outgrown later stays referenced, as earlier graphs use it."""
        if self._lists is None:
            return (torch.empty(T, n, dtype=torch.long, device=self.device),
                    torch.empty(T, dtype=torch.long, device=self.device))
        buf = self._lists.get((m, n))
        if buf is None or buf[0].shape[0] < T:
            if buf is not None:
                self._lists.setdefault("outgrown", []).append(buf)
            buf = self._lists[(m, n)] = (torch.empty(T, n, dtype=torch.long, device=self.device),
                                         torch.empty(T, dtype=torch.long, device=self.device))
        return buf[0][:T], buf[1][:T]

    def _put(self, name, src: np.ndarray) -> None:
        """Write src into the leading rows (and columns) of field `name`'s host twin and
        `fill` over the rest, rewriting only the rows an earlier step wrote past src's (a
        decode step's plans are mostly empty: their padding stays as it is)."""
        arena, i, fill = self._fields[name]
        dst = arena.h[i]
        n = src.shape[0]
        if n > dst.shape[0] or (src.ndim > 1 and src.shape[1] > dst.shape[1]):
            raise ValueError(f"batch does not fit the captured shape {tuple(dst.shape)}")
        if n:
            if src.ndim > 1 and src.shape[1] < dst.shape[1]:
                dst[:n, :src.shape[1]] = src
                dst[:n, src.shape[1]:] = fill
            else:
                dst[:n] = src
        dirty = self._dirty.get(name, dst.shape[0])
        if dirty > n:
            dst[n:dirty] = fill
        self._dirty[name] = n

    def load(self, b: ForwardBatch) -> None:
        """Copy the indices of `b` (best built on the host) in, padding the rest; no host
        synchronisation."""
        if not self.fits_tokens(b.starts, b.lens, snapshot_spans(b.chunks)):
            raise ValueError("batch larger than the captured graph")
        for arena in self._arenas:
            arena.wait_upload()
        put = self._put
        put("input_ids", b._ids)
        put("positions", b._pos)
        put("tok_seq", b._tok_seq)
        put("logits_indices", b._logits)
        put("window_index", b.window_index_host)
        for r in self._rows:
            tok, dst = b.ring_writes_host(r)
            put(("ring_tok", r), tok)
            put(("ring_dst", r), dst)
        for m, rows in self._plan_keys:
            for n, a in b.compress_plan_host(m, rows).items():
                put(("plan", m, rows, n), a)
        ints, bools = self._arenas
        ints.upload(self._put_block_tables(b._bt))
        bools.upload()

    def _put_block_tables(self, bt: np.ndarray) -> int:
        """Write the block tables [n, w] into the block-major host twin, resetting only the
        blocks an earlier step wrote; returns how many leading ints of the arena to upload."""
        arena, i, fill = self._fields["block_tables_t"]
        dst = arena.h[i]  # [max_blocks, num_seqs]
        n, w = bt.shape
        if n > dst.shape[1] or w > dst.shape[0]:
            raise ValueError(f"batch does not fit the captured shape {tuple(dst.shape[::-1])}")
        dst[:w, :n] = bt.T
        dst[:w, n:] = fill
        upto = max(w, self._bt_dirty)
        dst[w:upto] = fill
        self._bt_dirty = w
        return arena.offsets[i] + upto * dst.shape[1]
