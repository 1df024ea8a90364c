"""Decode steps replayed from CUDA graphs, one graph per batch size (padded up to the next).

A graph captures the main model's forward and head over a `StaticBatch`: fixed-shape index
buffers that each step overwrites with its own (`StaticBatch.load`). Padding rows write only
into a slot and a block reserved for them, and attend to nothing. Captured: steps in which every
sequence feeds at most `1 + speculative_tokens` tokens (decode and draft verification), and
ragged steps that fit a graph's token capacity (a short prompt's prefill, alone or beside
decodes: `StaticBatch.fits`), which replay the smallest graph they fit. Longer steps and
prompt-logprob requests run eagerly.
"""
from __future__ import annotations

import logging

import torch

from ..model.batch import ForwardBatch, SeqChunk, StaticBatch, snapshot_spans

logger = logging.getLogger(__name__)

BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
MIN_AUTO_LEN = 16384  # the automatic graph length (`fit_graph_len`) stops halving here


def capture_sizes(max_num_seqs: int) -> list[int]:
    """The batch sizes that get a graph (a step pads up to the next)."""
    return sorted({b for b in BATCH_SIZES if b < max_num_seqs} | {max_num_seqs})


def graph_tokens(max_num_seqs: int, speculative_tokens: int) -> tuple[int, int]:
    """(list tokens, score tokens): the tokens whose context-wide buffers the graphs hold. The
    row lists are shared by all graphs (`StaticBatch(lists=)`), as long as the largest batch
    (1 + K tokens a sequence), plus the MTP drafting graphs' chained steps' (one token a
    sequence, a little wider, with K > 1). The indexer's fp32 scores live only within a step,
    so the graphs' shared pool holds the largest batch's."""
    k = speculative_tokens
    largest = max_num_seqs * (1 + k)
    return largest + (max_num_seqs if k > 1 else 0), largest


def graph_list_bytes(ratios, tokens: tuple[int, int], max_len: int) -> int:
    """Device bytes the graphs hold for their context-wide buffers at graph length max_len,
    `tokens` = (list tokens, score tokens) from `graph_tokens`: per compressed ratio m a row
    list (int64, max_len / m wide), and for the indexer's ratio 4 its fp32 scores."""
    list_tokens, score_tokens = tokens
    per_list = sum(8 * -(-max_len // m) for m in set(ratios) if m)
    per_score = 4 * -(-max_len // 4) if 4 in ratios else 0
    return list_tokens * per_list + score_tokens * per_score


def fit_graph_len(ratios, tokens: tuple[int, int], max_len: int, budget: int) -> int:
    """The longest graph length up to max_len, halving from it, whose lists fit `budget`
    bytes (not below MIN_AUTO_LEN, or max_len if that is smaller)."""
    floor = min(max_len, MIN_AUTO_LEN)
    n = max_len
    while n > floor and graph_list_bytes(ratios, tokens, n) > budget:
        n = max(floor, n // 2)
    return n


class CUDAGraphRunner:
    def __init__(self, model, cache, max_num_seqs: int, tokens_per_seq: int, max_model_len: int,
                 pad_slot: int, pad_block: int, with_logits: bool = True):
        """`max_model_len` bounds the context a graph serves: CSA candidate lists are sized for
        it, so longer contexts than the graphs were built for run eagerly. Without
        `with_logits` (tensor-parallel workers: rank 0 samples) the graphs stop at X."""
        self.model, self.cache, self.tokens_per_seq = model, cache, tokens_per_seq
        self.with_logits = with_logits
        self.max_len = max_model_len
        cfg = model.cfg
        self.sizes = capture_sizes(max_num_seqs)
        ratios = {m for m in cfg.compress_ratios if m}
        self._static = dict(ratios=ratios, state_rows={m: cache.state_rows(m) for m in ratios},
                            window=cfg.sliding_window, window_rows=cache.window_rows,
                            num_slots=cache.num_slots, max_model_len=max_model_len,
                            pad_slot=pad_slot, pad_block=pad_block, device=cache.device,
                            lists={})  # one set of context-wide lists for every graph
        self.pad_slot, self.pad_block = pad_slot, pad_block
        self.graphs: dict[int, tuple] = {}
        self.pool = None
        before = torch.cuda.memory_reserved(cache.device)
        for bs in reversed(self.sizes):  # largest first: smaller graphs reuse its memory pool
            self._capture(bs)
        logger.info("captured CUDA graphs for batch sizes %s (%d tokens per sequence, contexts "
                    "up to %d tokens, %.2f GiB)", self.sizes, tokens_per_seq, max_model_len,
                    (torch.cuda.memory_reserved(cache.device) - before) / 2**30)

    def _dummy(self, bs: int) -> ForwardBatch:
        chunks = [SeqChunk([0] * self.tokens_per_seq, 0, self.pad_slot, [self.pad_block])] * bs
        return ForwardBatch(chunks, self.model.cfg.sliding_window, self.cache.window_rows,
                            self.cache.num_slots, "cpu",
                            logits_indices=list(range(bs * self.tokens_per_seq)))

    @torch.inference_mode()
    def _capture(self, bs: int) -> None:
        sb = StaticBatch(bs, self.tokens_per_seq, **self._static)
        sb.load(self._dummy(bs))
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: compile kernels, build weight tables
                sb.prepare()
                x = self.model(sb, self.cache)
                if self.with_logits:
                    self.model.logits(x)
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool):
            sb.prepare()
            x = self.model(sb, self.cache)
            logits = self.model.logits(x) if self.with_logits else None
        self.pool = g.pool()
        self.graphs[bs] = (g, sb, x, logits)

    def fits(self, chunks: list[SeqChunk]) -> bool:
        """Whether a step of these chunks can replay a graph (checked before its batch is built:
        a graph step builds its indices on the host)."""
        return (max(c.start_pos + len(c.tokens) for c in chunks) <= self.max_len
                and self.graphs[self.sizes[-1]][1].fits(chunks)
                and self.pick([c.start_pos for c in chunks], [len(c.tokens) for c in chunks],
                              snapshot_spans(chunks)) is not None)

    def size_for(self, num_seqs: int) -> int:
        """The batch size of the graph that replays a decode step of num_seqs sequences."""
        return next(b for b in self.sizes if b >= num_seqs)

    def pick(self, starts: list[int], lens: list[int], snapshots=()) -> int | None:
        """The batch size of the smallest graph that holds a step of chunks of these lengths
        (decode steps: the next size up from their count), or None."""
        if max(lens) <= self.tokens_per_seq and not snapshots:
            return self.size_for(len(lens)) if len(lens) <= self.sizes[-1] else None
        return next((b for b in self.sizes
                     if self.graphs[b][1].fits_tokens(starts, lens, snapshots)), None)

    def run(self, batch: ForwardBatch, fill=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay the smallest graph that holds `batch`: (X [T, n, d], logits [T, V]) of its rows.
        `fill(input_ids)` may then rewrite the uploaded token ids on the device (a step
        launched before its tokens reached the host)."""
        bs = self.pick(batch.starts, batch.lens, snapshot_spans(batch.chunks))
        g, sb, x, logits = self.graphs[bs]
        sb.load(batch)
        if fill is not None:
            fill(sb.input_ids)
        g.replay()
        n = batch.num_tokens
        return x[:n], (logits[:n] if logits is not None else None)
