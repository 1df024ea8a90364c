"""Decode steps replayed from CUDA graphs, one graph per batch size (padded up to the next)
and context band.

A graph captures the main model's forward and head over a `StaticBatch`: fixed-shape index
buffers that each step overwrites with its own (`StaticBatch.load`). Padding rows write only
into a slot and a block reserved for them, and attend to nothing. Captured: steps in which every
sequence feeds at most `1 + speculative_tokens` tokens (decode and draft verification), and
ragged steps that fit a graph's token capacity (a short prompt's prefill, alone or beside
decodes: `StaticBatch.fits`), which replay the smallest graph they fit. Longer steps and
prompt-logprob requests run eagerly.

Context bands: a graph's CSA candidate lists are as wide as the longest context it serves /
4, and the indexer's top-k picks its kernels by that static width: past `topk.MAX_KERNEL_N`
columns the 7-launch split select, whose floor (~18 us a CSA layer at batch 1 on an H200)
is paid at every context. When the graphs serve more than SHORT_LEN tokens, each batch size
also gets a graph for contexts up to SHORT_LEN (lists of at most MAX_KERNEL_N columns: the
one-program select, ~7 us at short contexts), and a step replays the narrowest band its
longest context fits.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from tqdm.auto import tqdm

from ..cache.kv_cache import BLOCK_TOKENS
from ..kernels.greedy import greedy_logprob
from ..kernels.topk import MAX_KERNEL_N
from ..model.batch import ForwardBatch, SeqChunk, StaticBatch
from .upload import upload

logger = logging.getLogger(__name__)

BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
# Prefill graphs: token capacities past the decode graphs' (a step pads up to the next: at
# most a third more tokens, mostly a fifth or less), and the context they serve. An eager step
# costs ~3.5 ms of host time a layer whatever its size, which the GPU work of a prefill
# outgrows around 2K tokens.
PREFILL_TOKENS = (384, 512, 640, 768, 896, 1024, 1280, 1536, 1792, 2048)
PREFILL_MAX_LEN = 32768
MIN_AUTO_LEN = 16384  # the automatic graph length (`fit_graph_len`) stops halving here
# the short context band's length (module docstring): CSA lists of MAX_KERNEL_N columns, less
# room for the MTP drafting graphs' chained steps (up to 8 positions past the band)
SHORT_LEN = 4 * (MAX_KERNEL_N - 8)


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
    list (int64, max_len / m wide; and SHORT_LEN / m for the short band when there is one),
    and for the indexer's ratio 4 its fp32 scores."""
    list_tokens, score_tokens = tokens
    per_list = sum(8 * -(-max_len // m) for m in set(ratios) if m)
    if SHORT_LEN < max_len:  # the short band's own lists (its scores share the graphs' pool)
        per_list += sum(8 * -(-SHORT_LEN // m) for m in set(ratios) if m)
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


def prefill_sizes(max_num_seqs: int, tokens_per_seq: int, max_tokens: int) -> list[int]:
    """The token capacities that get a prefill graph: past the largest decode graph's, up to
    max_tokens (the largest step the scheduler makes, or less)."""
    return [t for t in PREFILL_TOKENS if max_num_seqs * tokens_per_seq < t <= max_tokens]


class CUDAGraphRunner:
    def __init__(self, model, cache, max_num_seqs: int, tokens_per_seq: int, max_model_len: int,
                 pad_slot: int, pad_block: int, with_logits: bool = True,
                 max_prefill_tokens: int = 0, short_len: int | None = None):
        """`max_model_len` bounds the context a graph serves: CSA candidate lists are sized for
        it, so longer contexts than the graphs were built for run eagerly. Without
        `with_logits` (tensor-parallel workers: rank 0 samples) the graphs stop at X.
        Decode graphs (`sizes`: batch sizes of `tokens_per_seq` tokens a sequence) also
        replay ragged steps that fit them; prefill graphs (`prefill`: token capacities up to
        `max_prefill_tokens`, any `max_num_seqs` sequences, contexts up to
        PREFILL_MAX_LEN) take the longer ones. They stop at X: the head then runs eagerly on
        the sample rows only (a few launches; in a graph it would cost as many rows as the
        step may sample, 256 rows' fp32 head ~1 ms on an H200 for the one a lone prompt
        needs). Decode graphs come in context bands (module docstring): `short_len`
        (default SHORT_LEN; 0: none) and max_model_len; `graphs` is keyed (band, batch size)."""
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
        short = SHORT_LEN if short_len is None else short_len
        self.bands = sorted({max_model_len} | ({short} if 0 < short < max_model_len else set()))
        self.graphs: dict[tuple[int, int], tuple] = {}
        # plain-greedy sampling of each one-token decode graph's logits (`greedy`)
        self.greedy_graphs: dict[tuple[int, int], tuple] = {}
        self._replayed = None  # the greedy graph that follows the last `run`'s graph, or None
        self.prefill: dict[int, tuple] = {}
        self.prefill_len = min(max_model_len, PREFILL_MAX_LEN)
        self._memo = None  # (chunks, `_select`'s answer) of the last step asked about
        self.pool = None
        cuda = torch.device(cache.device).type == "cuda"  # (tests replay eagerly on the CPU)
        before = torch.cuda.memory_reserved(cache.device) if cuda else 0
        # largest first: smaller graphs reuse its memory pool
        # (no capacity past what max_num_seqs chunks of at most prefill_len tokens can fill)
        prefill = prefill_sizes(self.sizes[-1], tokens_per_seq,
                                min(max_prefill_tokens, self.sizes[-1] * self.prefill_len))
        # (a progress bar on the GPU: a full model's graphs take a while; tensor-parallel
        # workers, which stop at X, capture theirs silently beside rank 0's)
        with tqdm(total=len(prefill) + len(self.bands) * len(self.sizes), unit="graph",
                  desc="capturing CUDA graphs", disable=not (cuda and with_logits)) as bar:
            for t in reversed(prefill):
                self._capture_prefill(t)
                bar.update()
            for band in reversed(self.bands):
                for bs in reversed(self.sizes):
                    self._capture(band, bs)
                    bar.update()
        logger.info("captured CUDA graphs for batch sizes %s (%d tokens per sequence, contexts "
                    "up to %s tokens) and prefill steps of up to %s tokens (contexts up to %d), "
                    "%.2f GiB", self.sizes, tokens_per_seq, " / ".join(map(str, self.bands)),
                    prefill, self.prefill_len,
                    ((torch.cuda.memory_reserved(cache.device) if cuda else 0) - before) / 2**30)

    def _dummy(self, lens: list[int]) -> ForwardBatch:
        """A capture batch: chunks of `lens` pad tokens at position 0."""
        chunks = [SeqChunk([0] * n, 0, self.pad_slot, [self.pad_block] * -(-n // BLOCK_TOKENS))
                  for n in lens]
        return ForwardBatch(chunks, self.model.cfg.sliding_window, self.cache.window_rows,
                            self.cache.num_slots, "cpu", logits_indices=list(range(sum(lens))))

    def static_args(self, band: int) -> dict:
        """`StaticBatch` arguments of the decode graphs of a context band (its lists shared by
        the band's graphs)."""
        if band == self.max_len:
            return self._static
        return dict(self._static, max_model_len=band,
                    lists=self._static["lists"].setdefault(("band", band), {}))

    def _capture(self, band: int, bs: int) -> None:
        sb = StaticBatch(bs, self.tokens_per_seq, **self.static_args(band))
        sb.load(self._dummy([self.tokens_per_seq] * bs))
        self.graphs[band, bs] = self._record(sb)
        if self.with_logits and self.tokens_per_seq == 1:
            logits = self.graphs[band, bs][3]
            self.greedy_graphs[band, bs] = self._graph(lambda: greedy_logprob(logits, True))

    def _capture_prefill(self, t: int) -> None:
        """A graph of up to t tokens in any max_num_seqs chunks (prefix-caching snapshots
        writing up to t more ring rows), with lists of its own as wide as `prefill_len`."""
        static = dict(self._static, max_model_len=self.prefill_len,
                      lists=self._static["lists"].setdefault("prefill", {}))
        sb = StaticBatch(self.sizes[-1], self.tokens_per_seq, num_tokens=t, ring_extra=t,
                         **static)
        # chunks no longer than the graph's contexts (one chunk of t tokens when they allow)
        n = self.prefill_len
        sb.load(self._dummy([n] * (t // n) + ([t % n] if t % n else [])))
        self.prefill[t] = self._record(sb, False)

    @torch.inference_mode()
    def _record(self, sb: StaticBatch, logits: bool = True) -> tuple:
        """Capture the forward over sb, and the logits of every row: (graph, sb, X, logits)."""
        def body():
            sb.prepare()
            x = self.model(sb, self.cache)
            return x, (self.model.logits(x) if logits and self.with_logits else None)

        g, (x, out) = self._graph(body)
        return g, sb, x, out

    def _graph(self, body) -> tuple:
        """(graph, outputs) of body() captured in this runner's memory pool."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: compile kernels, build weight tables
                body()
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool):
            out = body()
        self.pool = g.pool()
        return g, out

    def fits(self, chunks: list[SeqChunk]) -> bool:
        """Whether a step of these chunks can replay a graph (checked before its batch is built:
        a graph step builds its indices on the host)."""
        return self._select(chunks) is not None

    def decode_key(self, chunks: list[SeqChunk]) -> tuple[int, int] | None:
        """(band, batch size) of the decode graph a step of these chunks replays (None: a
        prefill graph, or none)."""
        key = self._select(chunks)
        return key[1] if key is not None and key[0] is self.graphs else None

    def size_for(self, num_seqs: int) -> int:
        """The batch size of the graph that replays a decode step of num_seqs sequences."""
        return next(b for b in self.sizes if b >= num_seqs)

    def _select(self, chunks: list[SeqChunk]) -> tuple | None:
        """(graphs dict, key) of the smallest graph that holds a step of these chunks: decode
        steps the next batch size up from their count in the narrowest context band that
        holds their longest context, ragged ones the first decode graph of that band or
        prefill graph whose capacities hold them; None if none does. A step asks several
        times (the runner, then `run`) with one list: the last answer is kept."""
        if self._memo is None or self._memo[0] is not chunks:
            self._memo = (chunks, self._find(chunks))
        return self._memo[1]

    def _find(self, chunks: list[SeqChunk]) -> tuple | None:
        end = max(c.start_pos + len(c.tokens) for c in chunks)
        lens = [len(c.tokens) for c in chunks]
        if end > self.max_len or len(chunks) > self.sizes[-1]:
            return None
        band = next(b for b in self.bands if b >= end)
        if max(lens) <= self.tokens_per_seq and not any(c.snapshots for c in chunks):
            key = (band, self.size_for(len(chunks)))
            return (self.graphs, key) if self.graphs[key][1].fits(chunks) else None
        for key in sorted(k for k in self.graphs if k[0] == band):
            if self.graphs[key][1].fits(chunks):
                return self.graphs, key
        if end <= self.prefill_len:
            for key in sorted(self.prefill):
                if self.prefill[key][1].fits(chunks):
                    return self.prefill, key
        return None

    def run(self, batch: ForwardBatch, fill=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay the smallest graph that holds `batch`: (X [T, n, d] of its rows, fp32
        logits of its `logits_indices` rows). `fill(input_ids)` may then rewrite the uploaded
        token ids on the device (a step launched before its tokens reached the host)."""
        graphs, key = self._select(batch.chunks)
        g, sb, x, logits = graphs[key]
        sb.load(batch)
        if fill is not None:
            fill(sb.input_ids)
        g.replay()
        self._replayed = None
        n, rows = batch.num_tokens, batch.logits_rows
        if not self.with_logits:
            return x[:n], None
        if logits is None:  # a prefill graph: the head on the sample rows, eagerly
            return x[:n], self.model.logits(x[upload(rows.tolist(), x.device)])
        if np.array_equal(rows, np.arange(len(rows))):
            if graphs is self.graphs:
                self._replayed = self.greedy_graphs.get(key)
            return x[:n], logits[:len(rows)]
        return x[:n], logits[upload(rows.tolist(), logits.device)]

    def greedy(self, n: int) -> tuple | None:
        """Plain-greedy sampling (`sampler.plain_greedy`) of the n logits rows the last `run`
        returned, from a graph captured after its graph: (ids [n], logprobs [n], packed
        [3, n]) as `greedy_logprob(..., packed=True)` gives them, views of the graph's buffers
        (valid until its next replay); None where the last step's rows have no such graph.
        One graph launch instead of the sampler's two Triton launches and five buffers: a
        batch-1 step's host work on an H200's host was ~250-450 us, near the 0.83 ms a
        4-layer model's step takes on the GPU."""
        if self._replayed is None:
            return None
        g, (ids, lp, packed) = self._replayed
        g.replay()
        return ids[:n], lp[:n], packed[:, :n]
