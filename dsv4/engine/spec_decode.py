"""Exact acceptance of speculative drafts (Leviathan et al. / Chen et al. rejection sampling).

Draft token d_j was sampled from the draft distribution q_j; the target model gives p_j at the
same position. Accept d_j with probability min(1, p_j(d_j) / q_j(d_j)); at the first rejection
sample from normalise(max(0, p_j - q_j)) and stop; if all K drafts are accepted, sample a bonus
token from p_{K+1}. The emitted tokens are then distributed exactly as sampling from p alone.
With greedy sampling p and q are one-hot, so this accepts exactly the drafts equal to the
target's argmax and emits the target's argmax at the first mismatch: the greedy output is the
non-speculative greedy output token for token.
"""
from __future__ import annotations

import torch

from .upload import upload


def greedy_plain(seq) -> bool:
    """Greedy sampling of the raw logits (no penalties, logit bias, logprobs or pending
    min_tokens): its drafts and their verification are argmaxes, done on the device in batches
    with one copy to the host."""
    p = seq.params
    return (p.is_greedy and p.logprobs is None and not p.needs_logits_processing
            and seq.num_output_tokens >= p.min_tokens)


def _sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw from `probs` [V] (exponential race), as a 0-d device tensor."""
    dev = generator.device if generator is not None else probs.device
    q = torch.empty(probs.shape, device=dev).exponential_(generator=generator).to(probs.device)
    return (probs / q.clamp_min(torch.finfo(torch.float32).tiny)).argmax()


def accept_drafts(target: torch.Tensor, draft: torch.Tensor, drafts: list[int],
                  generator: torch.Generator | None) -> list[int]:
    """target [K+1, V] and draft [K, V] distributions (rows sum to 1), drafts the K sampled draft
    tokens. Returns the emitted tokens: the accepted drafts plus one corrected or bonus token.
    Every draft's test runs at once on the device (K uniforms, drawn up front: the ones past
    the first rejection are unused, which leaves the result exact), and the corrected or bonus
    token is drawn there too; one copy to the host."""
    k = len(drafts)
    dev = target.device
    if k == 0:
        return [int(_sample(target[0], generator))]
    d = upload(drafts, dev)
    j = torch.arange(k, device=dev)
    pd, qd = target[j, d], draft[j, d]
    gdev = generator.device if generator is not None else dev
    u = torch.rand(k, generator=generator, device=gdev).to(dev)
    ok = (qd > 0) & ((pd >= qd) | (u * qd < pd))
    n = ok.int().cumprod(0).sum()  # drafts accepted before the first rejection
    p_n = target[n]  # the corrected position, or the bonus one when n == k
    residual = (p_n - draft[n.clamp(max=k - 1)]).clamp_min(0)
    total = residual.sum()
    use_residual = (n < k) & (total > 0)
    probs = torch.where(use_residual, residual / torch.where(total > 0, total, 1.0), p_n)
    n, last = torch.stack([n.long(), _sample(probs, generator)]).tolist()
    return drafts[:n] + [last]


class _Post:
    """A sequence's tokens after a step: its tokens before `cut`, then the step's emitted
    ones. Drafting reads its length and a few of its last tokens, so the whole list (a copy
    of a long context, for every sequence at every step) is built only where asked for."""
    __slots__ = ("seq", "cut", "em")

    def __init__(self, seq, cut: int, em: list[int]) -> None:
        self.seq, self.cut, self.em = seq, cut, em

    def __len__(self) -> int:
        return self.cut + len(self.em)

    def tail(self, start: int) -> list[int]:
        """The tokens from position `start` on (start <= cut)."""
        return self.seq.token_ids[start:self.cut] + self.em

    def list(self) -> list[int]:
        return self.tail(0)


class MTPProposer:
    """Drafts K tokens per sequence with the model's MTP layer (SPEC.md 8), after each step.

    The MTP layer at position p reads the main model's final state h_p and token p+1. After a
    step, for every position whose token is now final (a prefill chunk's positions, or a
    verified chunk's accepted positions) it runs once over (h_p, token p+1): this writes the MTP
    caches for those positions, and its output at the last position p0 gives the first draft
    (token p0+2). Draft j >= 2 applies the MTP layer again at position p0+j-1 on its own output
    state and draft j-1. Those chained positions are rewritten by the next step's catch-up, which
    starts at the first position they occupy: the caches roll back by truncation (kv_cache.py).
    """

    def __init__(self, runner, k: int, max_model_len: int):
        self.runner, self.k, self.max_model_len = runner, k, max_model_len
        # Tests and benchmarks may replace the MTP's draft tokens (seq, tokens so far) -> drafts,
        # to exercise long acceptances with random weights; the MTP layer still runs.
        self.override = None
        # Benchmarks only: accept every draft (wrong tokens, real cost of the whole path), to
        # measure speed as a function of acceptance with random weights.
        self.force_accept = False
        self.proposed = [0] * k  # per draft position: drafts verified
        self.accepted = [0] * k  # per draft position: drafts accepted
        self.verify_steps = 0

    def reset_stats(self) -> None:
        self.proposed, self.accepted, self.verify_steps = [0] * self.k, [0] * self.k, 0

    def record(self, num_drafts: int, num_accepted: int) -> None:
        self.verify_steps += 1
        for j in range(num_drafts):
            self.proposed[j] += 1
            self.accepted[j] += j < num_accepted

    def stats(self) -> dict:
        rates = [a / p if p else None for a, p in zip(self.accepted, self.proposed)]
        mean = (sum(self.accepted) / self.verify_steps + 1) if self.verify_steps else None
        return {"k": self.k, "acceptance_rate_per_position": rates,
                "mean_accepted_length": mean, "verify_steps": self.verify_steps}

    def propose(self, chunks, x_all: torch.Tensor, emitted: list[list[int]]) -> None:
        from ..model.batch import ForwardBatch, SeqChunk
        r = self.runner
        model, cache = r.model, r.cache
        plan = []  # per chunk: (tokens one position later, valid rows, tokens so far)
        for c, em in zip(chunks, emitted):
            seq = c.seq
            if c.num_drafts:
                self.record(c.num_drafts, len(em) - 1)
            valid = c.num_tokens - c.num_drafts + (len(em) - 1 if c.num_drafts else 0)
            post = _Post(seq, c.start + c.num_tokens - c.num_drafts, em)
            nxt = post.tail(c.start + 1)[:valid]
            if len(nxt) < valid:  # the prompt continues past this chunk
                nxt = seq.token_ids[c.start + 1:c.start + 1 + valid]
            plan.append((nxt, valid, post))
        graphs = getattr(r, "draft_graphs", None)
        # the drafting graphs take decode-shaped steps (a graph replay may also have been a
        # short prefill, `StaticBatch.fits`) without prefix-caching snapshots
        if (graphs is not None and r.graph_key is not None and all(emitted)
                and all(greedy_plain(c.seq) and c.num_tokens <= 1 + self.k and not c.snapshots
                        for c in chunks)):
            self._draft_graph(chunks, plan)
        else:
            mtp_chunks, rows, last_rows, drafting = [], [], [], []
            cu = cu_mtp = 0
            for c, em, (nxt, valid, post) in zip(chunks, emitted, plan):
                # the MTP layer's rows at a snapshot too (`SeqChunk.snapshots`), those it has
                snaps = tuple((p, s) for p, s in c.snapshots if p <= c.start + valid)
                mtp_chunks.append(SeqChunk(nxt, c.start, c.slot, c.block_table, snaps))
                rows.extend(range(cu, cu + valid))
                cu_mtp += valid
                if em:
                    last_rows.append(cu_mtp - 1)
                    drafting.append((c, post, c.start + valid))  # first chained position
                cu += c.num_tokens
            batch = ForwardBatch(mtp_chunks, r.window, cache.window_rows, cache.num_slots,
                                 r.device, logits_indices=last_rows)
            h = x_all[upload(rows, x_all.device)]
            x = model.mtp_forward(h, batch.input_ids, batch, cache)[batch.logits_indices]
            if not drafting:
                return
            seqs = [c.seq for c, _, _ in drafting]
            limit = [self._limit(post) for _, post, _ in drafting]
            if all(greedy_plain(s) for s in seqs):
                self._draft_greedy(x, drafting, limit)
            else:
                self._draft_sampled(x, drafting, limit)
        self._override(chunks, emitted, [post for _, _, post in plan])

    def adopt(self, chunks, emitted: list[list[int]], drafts: list[list[int]]) -> None:
        """After a step whose verification and drafting ran together on the device
        (`ModelRunner._verify_and_draft`): the statistics, and each sequence's new drafts
        (cut to what fits before max_model_len)."""
        posts = []
        for c, em, row in zip(chunks, emitted, drafts):
            self.record(c.num_drafts, len(em) - 1)
            posts.append(_Post(c.seq, c.start + c.num_tokens - c.num_drafts, em))
            c.seq.drafts, c.seq.draft_probs = row[:self._limit(posts[-1])], None
        self._override(chunks, emitted, posts)

    def _override(self, chunks, emitted, posts) -> None:
        """Apply `override` (tests, benchmarks) to the sequences that drafted."""
        if self.override is None:
            return
        for c, em, post in zip(chunks, emitted, posts):
            s = c.seq
            if em and s.drafts:
                forced = list(self.override(s, post.list()))[:len(s.drafts)]
                s.drafts = forced
                s.draft_probs = torch.nn.functional.one_hot(
                    upload(forced, self.runner.device), self.runner.model.cfg.vocab_size).float()

    def _limit(self, post: _Post) -> int:
        """Drafts that fit before max_model_len."""
        return max(0, min(self.k, self.max_model_len - len(post) - 1))

    def _draft_graph(self, chunks, plan) -> None:
        """Greedy plain sequences after a step that replayed the main model's graph: the
        catch-up over every row of the step and the chained drafts in one graph replay
        (draft_graph.py); the rows past each sequence's accepted ones get filler tokens."""
        from ..model.batch import ForwardBatch, SeqChunk
        r = self.runner
        geo = (r.window, r.cache.window_rows, r.cache.num_slots, "cpu")
        catch, last, cu = [], [], 0
        for c, (nxt, valid, _) in zip(chunks, plan):
            catch.append(SeqChunk(nxt + nxt[-1:] * (c.num_tokens - valid), c.start, c.slot,
                                  c.block_table))
            last.append(cu + valid - 1)
            cu += c.num_tokens
        chain = [ForwardBatch([SeqChunk([0], c.start + valid + j, c.slot, c.block_table)
                               for c, (_, valid, _) in zip(chunks, plan)], *geo)
                 for j in range(self.k - 1)]
        ids = r.draft_graphs.run(r.graph_key, ForwardBatch(catch, *geo), chain, last).tolist()
        for c, (_, _, post), row in zip(chunks, plan, ids):
            c.seq.drafts, c.seq.draft_probs = row[:self._limit(post)], None

    def _chain(self, x: torch.Tensor, tok: torch.Tensor, drafting, j: int) -> torch.Tensor:
        """The MTP layer again, at each sequence's j-th chained position, on its own output
        state x and its draft tokens tok (device [S])."""
        from ..model.batch import ForwardBatch, SeqChunk
        r = self.runner
        step = [SeqChunk([0], pos + j, c.slot, c.block_table) for c, _, pos in drafting]
        b = ForwardBatch(step, r.window, r.cache.window_rows, r.cache.num_slots, r.device)
        return r.model.mtp_forward(x, tok, b, r.cache)

    def _draft_greedy(self, x: torch.Tensor, drafting, limit: list[int]) -> None:
        """Every drafting sequence greedy and plain: argmax drafts that stay on the device
        through the chain, one copy to the host at the end; no draft distributions (their
        verification compares argmaxes)."""
        model = self.runner.model
        toks = []
        for j in range(self.k):
            toks.append(model.mtp_logits(x).argmax(-1))
            if j + 1 < self.k:
                x = self._chain(x, toks[-1], drafting, j)
        ids = torch.stack(toks, 1).tolist()
        for (c, _, _), row, n in zip(drafting, ids, limit):
            c.seq.drafts, c.seq.draft_probs = row[:n], None

    def _draft_sampled(self, x: torch.Tensor, drafting, limit: list[int]) -> None:
        """Drafts sampled from the processed MTP distributions, which are kept for the
        rejection sampler. Without penalties or pending min_tokens no distribution reads the
        drafts so far, so the tokens stay on the device until one copy at the end."""
        r = self.runner
        model = r.model
        seqs = [c.seq for c, _, _ in drafting]
        on_device = all(not s.params.needs_penalties
                        and s.num_output_tokens >= s.params.min_tokens for s in seqs)
        drafts: list[list[int]] = [[] for _ in drafting]
        toks, qs = [], []
        for j in range(self.k):
            hist = [post.tail(s.num_prompt_tokens) + d
                    for (_, post, _), s, d in zip(drafting, seqs, drafts)]
            q = r.sampler.probs(model.mtp_logits(x), [s.params for s in seqs], hist,
                                [s.request.prompt_token_ids for s in seqs])
            tok = r.sampler.draw(q, range(len(seqs)), [s.generator for s in seqs])
            toks.append(tok)
            qs.append(q)
            if not on_device:
                for d, t in zip(drafts, tok.tolist()):
                    d.append(t)
            if j + 1 < self.k:
                x = self._chain(x, tok, drafting, j)
        ids = torch.stack(toks, 1).tolist()
        q_all = torch.stack(qs, 1)  # [S, K, V]
        for i, (s, n) in enumerate(zip(seqs, limit)):
            s.drafts = ids[i][:n]
            s.draft_probs = q_all[i, :n] if n else None
