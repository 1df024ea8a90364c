"""Runs one scheduled step on the model: chunks in, sampled tokens and logprobs out.

The whole step is one ragged `ForwardBatch`. Logits are computed only for the rows that need
them (`logits_indices`): the last row of every chunk that reaches the end of its sequence (to
sample the next token), the K+1 rows of a chunk that verifies K speculative drafts, and, for a
request that asked for `prompt_logprobs`, every prompt row whose next token is a prompt token.
With speculative decoding the MTP proposer then drafts the next step's tokens (spec_decode.py);
a graph step verifying one greedy draft per sequence drafts on the device right after, with one
copy to the host for both (`_verify_and_draft`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache.kv_cache import ModelCache
from ..kernels.greedy import greedy_logprob
from ..model.batch import ForwardBatch, SeqChunk
from ..model.model import DeepseekV4Model
from .sampler import (Sampler, TokenLogprob, compute_logprobs_topn, greedy_output,
                      plain_greedy)
from .scheduler import ScheduledChunk
from .spec_decode import MTPProposer, accept_drafts, greedy_plain
from .upload import upload

LOGITS_ROWS = 512  # prompt-logprob rows per head matmul: bounds the fp32 [rows, vocab] buffer


@dataclass
class SampledToken:
    token_id: int
    logprob: float  # raw log-softmax of the model's logits (vLLM's reported logprob)
    rank: int
    top: list[tuple[int, float]] | None  # top-N (id, logprob) when the request asked for logprobs


@dataclass
class RunnerOutput:
    sampled: list[list[SampledToken]]           # per chunk: the emitted tokens (often one)
    prompt_logprobs: list[list[TokenLogprob]]   # per chunk; positions start.. of the chunk
    hidden: torch.Tensor | None  # [S, n, d] final X of the sampled rows, chunk order (for MTP)


class StepHandle:
    """A decode step launched ahead of the host (`ModelRunner.launch`): its sampled ids stay on
    the device for the next step's inputs while a pinned copy travels to the host."""

    def __init__(self, chunks: list[ScheduledChunk], ids: torch.Tensor, host: torch.Tensor,
                 event):
        self.chunks, self.ids, self._host, self._event = chunks, ids, host, event
        self.start = 0.0  # when the step was scheduled (request metrics)

    def result(self) -> RunnerOutput:
        """Waits for this step's sampled tokens (one per chunk)."""
        if self._event is not None:
            self._event.synchronize()
        ids, lps, ranks = self._host.tolist()
        return RunnerOutput([[SampledToken(int(i), lp, int(r), None)]
                             for i, lp, r in zip(ids, lps, ranks)],
                            [[] for _ in self.chunks], None)


class ModelRunner:
    """Owns the model, its cache and the sampler; nothing here knows about requests' lifetimes."""

    def __init__(self, model: DeepseekV4Model, cache: ModelCache, sampler: Sampler,
                 device: torch.device, speculative_tokens: int = 0, max_model_len: int = 0,
                 graphs=None):
        self.model, self.cache, self.sampler, self.device = model, cache, sampler, device
        self.window = model.cfg.sliding_window
        self.graphs = graphs  # CUDAGraphRunner for decode steps, or None (eager)
        self.lockstep = hasattr(model, "stop")  # tensor parallel (`LockstepModel`)
        self.draft_graphs = None  # DraftGraphs (MTP drafting), set by the engine with graphs
        # (context band, batch size) of the decode graph the last step replayed
        self.graph_key: tuple[int, int] | None = None
        self.proposer = (MTPProposer(self, speculative_tokens, max_model_len)
                         if speculative_tokens else None)

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
                sample_rows.extend(range(cu + c.num_tokens - 1 - c.num_drafts, cu + c.num_tokens))
            cu += c.num_tokens
        return plp_rows, plp_spans, sample_rows

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk]) -> RunnerOutput:
        plp_rows, plp_spans, sample_rows = self._rows(chunks)
        seq_chunks = [c.seq_chunk() for c in chunks]
        graph = self.graphs is not None and not plp_rows and self.graphs.fits(seq_chunks)
        self.graph_key = self.graphs.decode_key(seq_chunks) if graph else None
        # A graph step builds its indices on the host (one upload); an eager step where it runs.
        batch = ForwardBatch(seq_chunks, self.window, self.cache.window_rows, self.cache.num_slots,
                             "cpu" if graph else self.device,
                             logits_indices=sample_rows + plp_rows)
        if graph:
            # [T, n, d], and [rows, V] of the sample rows (all rows in a decode step)
            x_all, sample_logits = self.graphs.run(batch)
            if self._fusable(chunks):
                return self._verify_and_draft(chunks, x_all, sample_logits)
        else:
            x_all, sample_logits = self.model(batch, self.cache), None  # [T, n, d]
        x = _take(x_all, sample_rows + plp_rows)
        hidden, x_plp = x[:len(sample_rows)], x[len(sample_rows):]

        def head(rows: list[int]) -> torch.Tensor:
            """fp32 logits of the given sample rows (from the graph, or computed now)."""
            if sample_logits is not None:
                return _take(sample_logits, rows)
            return self.model.logits(_take(hidden, rows))

        sampled: list[list[SampledToken]] = [[] for _ in chunks]
        plain = [i for i, c in enumerate(chunks) if c.samples and not c.num_drafts]
        row_of, at = {}, 0
        for i, c in enumerate(chunks):
            if c.samples:
                row_of[i] = at
                at += 1 + c.num_drafts
        if plain:
            out = self._sample([chunks[i].seq for i in plain], head([row_of[i] for i in plain]),
                               graph and len(plain) == len(chunks))
            # one device-to-host copy for the three
            packed = _packed(out).tolist()
            ids, lps, ranks = ([int(v) for v in packed[0]], packed[1],
                               [int(v) for v in packed[2]])
            for j, i in enumerate(plain):
                sampled[i] = [SampledToken(ids[j], lps[j], ranks[j], out.top_logprobs[j])]
        # drafts verified in two batches: greedy plain chunks by argmax, the rest by sampling
        verify = [i for i, c in enumerate(chunks) if c.samples and c.num_drafts]
        greedy = [i for i in verify if greedy_plain(chunks[i].seq)]
        general = [i for i in verify if not greedy_plain(chunks[i].seq)]
        for group, check in ((greedy, self._verify_greedy), (general, self._verify)):
            if group:
                rows = [r for i in group
                        for r in range(row_of[i], row_of[i] + 1 + chunks[i].num_drafts)]
                for i, got in zip(group, check([chunks[i] for i in group], head(rows))):
                    sampled[i] = got

        prompt_logprobs: list[list[TokenLogprob]] = []
        at = 0
        for c, span in zip(chunks, plp_spans):
            prompt_logprobs.append(self._prompt_logprobs(c, span, x_plp[at:at + len(span)]))
            at += len(span)
        if self.proposer is not None:
            self.proposer.propose(chunks, x_all, [[t.token_id for t in s] for s in sampled])
            for c in chunks:  # structured outputs and bad words: drafts would need masks
                if c.seq.grammar is not None or c.seq.params.bad_words is not None:
                    c.seq.drafts, c.seq.draft_probs = [], None
        return RunnerOutput(sampled, prompt_logprobs, hidden)

    # ------------------------------------------------------------------ running ahead
    def overlappable(self, chunks: list[ScheduledChunk]) -> bool:
        """Whether a step may be launched before the previous step's tokens reach the host:
        one sampled token per chunk, no drafts, and sampling that reads no host-side history
        (penalties, min_tokens, logprobs) or runs MTP drafting."""
        if self.proposer is not None or not all(
                c.num_tokens == 1 and c.samples and not c.num_drafts and _plain(c.seq)
                for c in chunks):
            return False
        # Tensor parallel: the workers take device-sampled tokens only in graph replays.
        return not self.lockstep or (self.graphs is not None and self.graphs.fits(
            [SeqChunk(c.tokens, c.start, c.slot, c.block_table) for c in chunks]))

    @torch.inference_mode()
    def launch(self, chunks: list[ScheduledChunk], feed: StepHandle | None = None) -> StepHandle:
        """Run an `overlappable` step without waiting for it. With `feed`, chunks whose token
        is not yet known on the host take it from `feed`'s sampled ids on the device."""
        seq_chunks = [c.seq_chunk() for c in chunks]
        fill = _feeder(chunks, feed) if feed is not None else None
        graph = self.graphs is not None and self.graphs.fits(seq_chunks)
        rows = list(range(len(chunks)))
        batch = ForwardBatch(seq_chunks, self.window, self.cache.window_rows, self.cache.num_slots,
                             "cpu" if graph else self.device, logits_indices=rows)
        if graph:
            _, logits = self.graphs.run(batch, fill)
        else:
            if fill is not None:
                fill(batch.input_ids)
            logits = self.model.logits(self.model(batch, self.cache))
        out = self._sample([c.seq for c in chunks], logits, graph)
        packed = _packed(out)
        cuda = packed.is_cuda
        host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=cuda)
        host.copy_(packed, non_blocking=cuda)
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record()
        return StepHandle(chunks, out.token_ids, host, event)

    def _sample(self, seqs, logits: torch.Tensor, graph: bool = False):
        """`graph`: logits are the rows, in order, of the graph step `graphs.run` just
        replayed (a plain-greedy step then samples from its captured greedy graph)."""
        if graph and plain_greedy([s.params for s in seqs], [s.output_ids_view for s in seqs]):
            got = self.graphs.greedy(len(seqs))
            if got is not None:
                return greedy_output([s.params for s in seqs], *got)
        grammars = [s.grammar for s in seqs]
        return self.sampler(logits, [s.params for s in seqs], [s.output_ids_view for s in seqs],
                            [s.request.prompt_token_ids for s in seqs],
                            [s.generator for s in seqs],
                            grammars if any(g is not None for g in grammars) else None)

    def _fusable(self, chunks: list[ScheduledChunk]) -> bool:
        """A graph step that verifies one greedy draft per sequence (K = 1, every chunk its
        token and its draft, greedy plain): its drafting can follow on the device
        (`_verify_and_draft`). Longer drafts chain at positions that depend on the acceptance."""
        p = self.proposer
        return (p is not None and p.k == 1 and self.draft_graphs is not None
                and self.graph_key is not None
                and all(c.samples and c.num_drafts == 1 and c.num_tokens == 2
                        and greedy_plain(c.seq) for c in chunks))

    def _verify_and_draft(self, chunks: list[ScheduledChunk], x_all: torch.Tensor,
                          logits: torch.Tensor) -> RunnerOutput:
        """The verification of a `_fusable` step and the next drafts in one go: the argmaxes
        stay on the device, the draft graph's catch-up takes its tokens and each sequence's
        last accepted row from them there (`DraftGraphs.run_verified`), and the verified
        tokens and the new drafts reach the host in one copy. Same tokens, drafts and MTP
        cache writes as verifying, then drafting."""
        k = self.proposer.k
        t = len(chunks) * (k + 1)
        rows = self._greedy_rows(chunks, logits[:t])
        inputs = self.graphs.graphs[self.graph_key][1].input_ids[:t]  # tokens, then drafts
        drafts = self.draft_graphs.run_verified(
            self.graph_key, [SeqChunk(c.tokens, c.start, c.slot, c.block_table) for c in chunks],
            rows[0].long(), inputs, self.proposer.force_accept)
        flat = torch.cat([torch.stack(rows).flatten(), drafts.double().flatten()]).tolist()
        packed = [flat[i * t:(i + 1) * t] for i in range(len(rows))]
        sampled = self._greedy_emit(chunks, packed)
        new = [int(v) for v in flat[len(rows) * t:]]
        self.proposer.adopt(chunks, [[tok.token_id for tok in s] for s in sampled],
                            [new[i * k:(i + 1) * k] for i in range(len(chunks))])
        return RunnerOutput(sampled, [[] for _ in chunks], x_all[:t])

    def _greedy_rows(self, chunks: list[ScheduledChunk], logits: torch.Tensor) -> list:
        """Device rows of `_verify_greedy`: argmax ids, their raw logprobs and (benchmarks'
        `force_accept`) each row's draft's logprob, all float64."""
        ids, lps = greedy_logprob(logits)
        rows = [ids.double(), lps.double()]
        if self.proposer.force_accept:  # each row's draft's logprob (bonus rows: unused)
            cand = upload([t for c in chunks for t in c.seq.drafts[:c.num_drafts] + [0]],
                          logits.device)
            r = torch.arange(len(cand), device=logits.device)
            rows.append((logits[r, cand] - logits[r, ids] + lps).double())
        return rows

    def _verify_greedy(self, chunks: list[ScheduledChunk],
                       logits: torch.Tensor) -> list[list[SampledToken]]:
        """Greedy plain chunks (`greedy_plain`), their K+1 rows each in `logits`: the target's
        argmax and its raw logprob for every row in one pass and one copy to the host; a chunk
        emits its drafts up to the first that differs from the argmax, then that argmax (or the
        bonus argmax). The same tokens as the rejection sampler with one-hot distributions.
        Benchmarks' `force_accept` emits every draft: a draft's logprob is then its logit minus
        the row's logsumexp (max - argmax logprob). Ranks are not computed: these requests
        report no logprobs."""
        return self._greedy_emit(chunks, torch.stack(self._greedy_rows(chunks, logits)).tolist())

    def _greedy_emit(self, chunks: list[ScheduledChunk], packed) -> list[list[SampledToken]]:
        """The emitted tokens of each chunk from `_greedy_rows` on the host."""
        force = self.proposer.force_accept
        out, at = [], 0
        for c in chunks:
            drafts = c.seq.drafts[:c.num_drafts]
            n = 0
            while n < len(drafts) and (force or drafts[n] == int(packed[0][at + n])):
                n += 1
            toks = [SampledToken(d, packed[2][at + j] if d != int(packed[0][at + j])
                                 else packed[1][at + j], 1, None)
                    for j, d in enumerate(drafts[:n])]
            toks.append(SampledToken(int(packed[0][at + n]), packed[1][at + n], 1, None))
            out.append(toks)
            at += c.num_drafts + 1
        return out

    def _verify(self, chunks: list[ScheduledChunk],
                logits: torch.Tensor) -> list[list[SampledToken]]:
        """Exact acceptance of each chunk's drafts against the model's distributions at its
        last K+1 rows (`logits`: those rows of every chunk, in order); returns per chunk the
        accepted drafts and the corrected (or bonus) token. The distributions and the emitted
        tokens' logprobs are computed for all chunks at once; the acceptance runs per chunk
        (each sequence may draw from its own generator)."""
        params, hists, prompts = [], [], []
        for c in chunks:
            seq, drafts = c.seq, c.seq.drafts[:c.num_drafts]
            for j in range(c.num_drafts + 1):
                params.append(seq.params)
                hists.append(seq.output_token_ids + drafts[:j])
                prompts.append(seq.request.prompt_token_ids)
        target = self.sampler.probs(logits, params, hists, prompts)
        emitted, rows, ns, at = [], [], [], 0
        for c in chunks:
            seq, drafts = c.seq, c.seq.drafts[:c.num_drafts]
            span = slice(at, at + c.num_drafts + 1)
            if self.proposer.force_accept:
                em = drafts + [int(target[span][len(drafts)].argmax())]
            else:
                q = seq.draft_probs
                if q is None:  # greedy drafts (`MTPProposer._draft_greedy`): one-hot
                    q = torch.nn.functional.one_hot(upload(drafts, logits.device),
                                                    logits.shape[-1]).float()
                em = accept_drafts(target[span], q[:len(drafts)], drafts,
                                   seq.generator or self.sampler.generator)
            emitted.append(em)
            rows.extend(range(at, at + len(em)))
            ns.extend([seq.params.logprobs or 0] * len(em))
            at += c.num_drafts + 1
        info = compute_logprobs_topn(_take(logits, rows),
                                     torch.tensor([t for e in emitted for t in e]), ns)
        out, at = [], 0
        for c, em in zip(chunks, emitted):
            want = c.seq.params.logprobs
            out.append([SampledToken(t.token_id, t.logprob, t.rank, t.top if want else None)
                        for t in info[at:at + len(em)]])
            at += len(em)
        return out

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


def _packed(out) -> torch.Tensor:
    """[3, B] float64 ids, logprobs and ranks (ids and ranks are exact in float64): one copy
    to the host for the three."""
    if out.packed is not None:
        return out.packed
    return torch.stack([out.token_ids.double(), out.logprobs.double(), out.ranks.double()])


def _plain(seq) -> bool:
    p = seq.params
    return (p.logprobs is None and not p.needs_penalties and seq.grammar is None
            and p.bad_words is None and seq.num_output_tokens >= p.min_tokens)


def _feeder(chunks: list[ScheduledChunk], prev: StepHandle):
    """In-place writer of a step's input ids from the previous step's sampled ids (device):
    chunk i is sequence s, whose token was sampled in row j of `prev`."""
    row = {id(c.seq): j for j, c in enumerate(prev.chunks)}
    src = [row[id(c.seq)] for c in chunks]
    n, ids = len(src), prev.ids
    if src == list(range(n)):
        return lambda buf: buf[:n].copy_(ids[:n])
    idx = upload(src, ids.device)
    return lambda buf: buf[:n].copy_(ids[idx])


def _take(t: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """t[rows]: a slice when the rows are consecutive (every decode and verify step), so no
    index upload."""
    if rows and rows == list(range(rows[0], rows[0] + len(rows))):
        return t[rows[0]:rows[0] + len(rows)]
    return t[upload(rows, t.device)]
