"""MTP drafting replayed from CUDA graphs, one graph per batch size (greedy drafts).

After a decode or verify step that replayed the main model's graph for `bs` sequences, the MTP
layer runs over the same rows (`StaticBatch(bs, 1 + K)`) and then K-1 times more, one chained
position per sequence, drafting by argmax: launched eagerly that is a few hundred kernels and
Python between them, several milliseconds at batch 1. Here it is one graph replay.

The catch-up runs over every row of the step, not only the accepted ones: the rows past a
sequence's last accepted token are later positions, so causal attention keeps them out of the
accepted rows, and the next step's catch-up rewrites their MTP cache rows before anything reads
them (the same rollback-by-overwrite the caches rely on, kv_cache.py). Its input states are the
main graph's own output buffer, so nothing is copied; the accepted rows' last one per sequence
is picked on the device (`last`). The drafts stay on the device through the chain and reach the
host in one copy.

`DraftGraph.body()` is the computation; on CPU it runs eagerly (tests compare it with the
eager proposer), on CUDA it is captured once per batch size.
"""
from __future__ import annotations

import logging

import torch

from ..model.batch import ForwardBatch, SeqChunk, StaticBatch
from .upload import upload

logger = logging.getLogger(__name__)


class DraftGraph:
    """The drafting of one batch size: static batches for the catch-up and each chained
    position, the index of each sequence's last accepted row, and the [bs, K] draft ids."""

    def __init__(self, model, cache, h: torch.Tensor, bs: int, k: int, static: dict):
        self.model, self.cache, self.h, self.bs, self.k = model, cache, h, bs, k
        self.catch = StaticBatch(bs, k + 1, **static)
        # the chained positions reach k past the step's first: room for the same block tables
        chained = dict(static, max_model_len=static["max_model_len"] + k)
        self.chain = [StaticBatch(bs, 1, **chained) for _ in range(k - 1)]
        dev = static["device"]
        self.last = torch.zeros(bs, dtype=torch.long, device=dev)
        self.drafts = torch.zeros(bs, k, dtype=torch.long, device=dev)

    def body(self) -> None:
        model, cache = self.model, self.cache
        self.catch.prepare()
        x = model.mtp_forward(self.h, self.catch.input_ids, self.catch, cache)[self.last]
        for j in range(self.k):
            tok = model.mtp_logits(x).argmax(-1)
            self.drafts[:, j] = tok
            if j + 1 < self.k:
                sb = self.chain[j]
                sb.prepare()
                x = model.mtp_forward(x, tok, sb, cache)

    def load(self, catch: ForwardBatch, chain: list[ForwardBatch], last: list[int]) -> None:
        """Indices of one step (built on the host); no host synchronisation."""
        self.catch.load(catch)
        for sb, b in zip(self.chain, chain):
            sb.load(b)
        self.last.copy_(upload(last + [0] * (self.bs - len(last)), self.last.device))


class DraftGraphs:
    """One captured `DraftGraph` per decode graph of the main model (`CUDAGraphRunner`: keyed
    (context band, batch size)), sharing their memory pool and reading their output
    buffers."""

    def __init__(self, runner, k: int):
        self.runner, self.k = runner, k
        self.graphs: dict[tuple[int, int], tuple] = {}
        for key in sorted(runner.graphs, reverse=True):
            self._capture(key)
        logger.info("captured MTP drafting graphs for batch sizes %s (%d drafts)", runner.sizes, k)

    def _dummy(self, dg: DraftGraph, bs: int) -> None:
        r = self.runner
        window, rows, slots = r.model.cfg.sliding_window, r.cache.window_rows, r.cache.num_slots
        pad = lambda n: [SeqChunk([0] * n, 0, r.pad_slot, [r.pad_block])] * bs  # noqa: E731
        dg.load(ForwardBatch(pad(self.k + 1), window, rows, slots, "cpu"),
                [ForwardBatch(pad(1), window, rows, slots, "cpu") for _ in dg.chain], [0] * bs)

    @torch.inference_mode()
    def _capture(self, key: tuple[int, int]) -> None:
        r = self.runner
        band, bs = key
        dg = DraftGraph(r.model, r.cache, r.graphs[key][2], bs, self.k, r.static_args(band))
        self._dummy(dg, bs)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: compile kernels, build the MTP experts' tables
                dg.body()
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=r.pool):
            dg.body()
        self.graphs[key] = (g, dg)

    def run_verified(self, key: tuple[int, int], chunks: list[SeqChunk], ids: torch.Tensor,
                     inputs: torch.Tensor, force: bool = False) -> torch.Tensor:
        """Drafts [n, K] (device) after a main-graph step that verified K = 1 draft for each of
        the n sequences of `chunks` (rows: token, draft), drawn before the verified tokens
        reach the host. `ids` [2n] are the main model's argmaxes, `inputs` [2n] the step's
        input ids. On the device: a sequence accepts its draft when the argmax of its first row
        equals it (`force`: always), its catch-up tokens are the tokens now at positions
        start + 1 and start + 2 (the accepted draft, else the first argmax; then the second
        argmax, a filler when the draft was rejected), and its last accepted row is row 0 or 1.
        Only the tokens and `last` differ from the host-built catch-up of `run`."""
        g, dg = self.graphs[key]
        n, k = len(chunks), self.k
        if k != 1:
            raise ValueError("drafting on verified tokens on the device needs K = 1")
        geo = (self.runner.model.cfg.sliding_window, self.runner.cache.window_rows,
               self.runner.cache.num_slots, "cpu")
        dg.load(ForwardBatch(chunks, *geo), [], [0] * n)  # indices; tokens and rows follow
        ids, inputs = ids.view(n, 2), inputs.view(n, 2)
        accept = inputs[:, 1] == ids[:, 0]
        if force:
            accept = torch.ones_like(accept)
        nxt = torch.stack([torch.where(accept, inputs[:, 1], ids[:, 0]), ids[:, 1]], 1)
        dg.catch.input_ids[:2 * n].copy_(nxt.flatten())
        dg.last[:n].copy_(torch.arange(n, device=ids.device) * 2 + accept.long())
        self._replay(g, dg)
        return dg.drafts[:n]

    def _replay(self, g, dg: DraftGraph) -> None:
        g.replay()

    def run(self, key: tuple[int, int], catch: ForwardBatch, chain: list[ForwardBatch],
            last: list[int]) -> torch.Tensor:
        """Drafts [n, K] (device) of the n sequences of a step that replayed the main model's
        decode graph `key` (context band, batch size)."""
        g, dg = self.graphs[key]
        dg.load(catch, chain, last)
        self._replay(g, dg)
        return dg.drafts[:len(last)]
