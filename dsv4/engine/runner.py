"""Runs one scheduled step on the model: chunks in, sampled tokens and logprobs out.

The whole step is one ragged `ForwardBatch`. Logits are computed only for the rows that need
them (`logits_indices`): the last row of every chunk that reaches the end of its sequence (to
sample the next token) and, for a request that asked for `prompt_logprobs`, every prompt row
whose next token is a prompt token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache.kv_cache import ModelCache
from ..model.batch import ForwardBatch, SeqChunk
from ..model.model import DeepseekV4Model
from .sampler import Sampler, TokenLogprob, compute_logprobs_topn
from .scheduler import ScheduledChunk

LOGITS_ROWS = 512  # prompt-logprob rows per head matmul: bounds the fp32 [rows, vocab] buffer


@dataclass
class SampledToken:
    token_id: int
    logprob: float  # raw log-softmax of the model's logits (vLLM's reported logprob)
    rank: int
    top: list[tuple[int, float]] | None  # top-N (id, logprob) when the request asked for logprobs


@dataclass
class RunnerOutput:
    sampled: list[SampledToken | None]          # per chunk; None when the chunk is not sampled
    prompt_logprobs: list[list[TokenLogprob]]   # per chunk; positions start.. of the chunk
    hidden: torch.Tensor  # [S, n, d] final state X of the sampled rows, in chunk order (for MTP)


class ModelRunner:
    """Owns the model, its cache and the sampler; nothing here knows about requests' lifetimes."""

    def __init__(self, model: DeepseekV4Model, cache: ModelCache, sampler: Sampler,
                 device: torch.device):
        self.model, self.cache, self.sampler, self.device = model, cache, sampler, device
        self.window = model.cfg.sliding_window

    def _rows(self, chunks: list[ScheduledChunk]) -> tuple[list[int], list[range], list[int]]:
        """Row indices into the step's tokens: prompt-logprob rows (per chunk) and sample rows."""
        plp_rows: list[int] = []
        plp_spans: list[range] = []
        sample_rows: list[int] = []
        cu = 0
        for c in chunks:
            req = c.seq.request
            span = range(0)
            if req.wants_prompt_logprobs(c.seq):
                # Row p predicts prompt token p+1; positions already scored are skipped (recompute).
                first = max(c.start, len(req.prompt_logprobs) - 1)
                last = min(c.start + c.num_tokens, len(req.prompt_token_ids) - 1)
                span = range(first, max(first, last))
                plp_rows.extend(cu + p - c.start for p in span)
            plp_spans.append(span)
            if c.samples:
                sample_rows.append(cu + c.num_tokens - 1)
            cu += c.num_tokens
        return plp_rows, plp_spans, sample_rows

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk]) -> RunnerOutput:
        plp_rows, plp_spans, sample_rows = self._rows(chunks)
        batch = ForwardBatch(
            [SeqChunk(c.tokens, c.start, c.slot, c.block_table) for c in chunks],
            self.window, self.cache.window_rows, self.cache.num_slots, self.device,
            logits_indices=sample_rows + plp_rows)
        x = self.model(batch, self.cache)[batch.logits_indices]  # [S + P, n, d]
        hidden, x_plp = x[:len(sample_rows)], x[len(sample_rows):]

        sampled: list[SampledToken | None] = [None] * len(chunks)
        sampled_chunks = [i for i, c in enumerate(chunks) if c.samples]
        if sampled_chunks:
            seqs = [chunks[i].seq for i in sampled_chunks]
            out = self.sampler(self.model.logits(hidden), [s.params for s in seqs],
                               [s.output_token_ids for s in seqs],
                               [s.request.prompt_token_ids for s in seqs],
                               [s.generator for s in seqs])
            ids, lps, ranks = out.token_ids.tolist(), out.logprobs.tolist(), out.ranks.tolist()
            for j, i in enumerate(sampled_chunks):
                sampled[i] = SampledToken(ids[j], lps[j], ranks[j], out.top_logprobs[j])

        prompt_logprobs: list[list[TokenLogprob]] = []
        at = 0
        for c, span in zip(chunks, plp_spans):
            prompt_logprobs.append(self._prompt_logprobs(c, span, x_plp[at:at + len(span)]))
            at += len(span)
        return RunnerOutput(sampled, prompt_logprobs, hidden)

    def _prompt_logprobs(self, c: ScheduledChunk, span: range, x: torch.Tensor) -> list[TokenLogprob]:
        if not len(span):
            return []
        req = c.seq.request
        targets = torch.tensor(req.prompt_token_ids[span.start + 1:span.stop + 1])
        result: list[TokenLogprob] = []
        for s in range(0, len(span), LOGITS_ROWS):
            logits = self.model.logits(x[s:s + LOGITS_ROWS])
            result += compute_logprobs_topn(logits, targets[s:s + LOGITS_ROWS],
                                            req.params.prompt_logprobs)
        return result
