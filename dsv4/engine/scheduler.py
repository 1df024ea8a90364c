"""Continuous batching: which sequences run in the next step, and how many tokens each.

Each step, in admission order, every running sequence gets its next chunk: one token for a
decode, as much of the remaining prompt as the token budget allows for a prefill. Then waiting
sequences are admitted first-come-first-served (or, with the priority policy, by priority and
then arrival) while the budget, the sequence cap and the free blocks allow. Admission order
makes the newest running sequence the only one that can be mid-prefill, so "decodes first,
then prefill chunks" is simply the order of `running`.

When a running sequence cannot get the blocks for its chunk, the newest running sequence is
preempted: its blocks and slot are freed and it goes back to the front of the queue with all its
tokens so far, to be recomputed later as a longer prompt. Preempting from the back of `running`
never touches a sequence already scheduled in this step. With the priority policy the victim
is the lowest-priority running sequence, which goes back to its place in the queue; if it was
scheduled already in this step, its chunk is taken back.

With a prefix cache (`cache/prefix_cache.py`), a sequence admitted with a cached prefix starts
at its end (the step first copies the prefix's state snapshot into the sequence's slot:
`SchedulerOutput.copies`). Its cache points (its last block boundary before its last token,
and the boundary up to which an earlier prompt was the same) do not end chunks: the chunk that
crosses one also writes the state there into a snapshot (`LLMEngine._take_snapshots`).
"""
from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

from ..model.batch import SeqChunk
from ..cache.block_manager import BlockManager
from ..cache.prefix_cache import PrefixCache, prefix_hashes
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledChunk:
    """One sequence's share of a step: `num_tokens` tokens from position `start`, the last
    `num_drafts` of them speculative drafts to verify."""
    seq: Sequence
    start: int
    num_tokens: int
    slot: int
    block_table: list[int]
    num_drafts: int = 0
    # prefix caching: (P, slot) snapshots of the state at P this step also writes
    # (`LLMEngine._take_snapshots`, `SeqChunk.snapshots`)
    snapshots: list[tuple[int, int]] = field(default_factory=list)

    def seq_chunk(self) -> SeqChunk:
        """The model's view of this chunk."""
        return SeqChunk(self.tokens, self.start, self.slot, self.block_table,
                        tuple(self.snapshots))

    @property
    def tokens(self) -> list[int]:
        real = self.seq.token_ids[self.start:self.start + self.num_tokens - self.num_drafts]
        return real + self.seq.drafts[:self.num_drafts]

    @property
    def samples(self) -> bool:
        """Whether the chunk reaches the end of the sequence, so its last row is sampled."""
        return self.start + self.num_tokens - self.num_drafts == len(self.seq.token_ids)


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)  # (from, to) slots, run first

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


def _priority_key(seq: Sequence) -> tuple[int, int]:
    """Lower first: the request's priority, then arrival (sequence ids grow with it)."""
    return seq.request.priority, seq.seq_id


class Scheduler:
    """Continuous batching under `max_num_batched_tokens` and `max_num_seqs`: first come first
    served, or (`policy="priority"`, vLLM's) by each request's priority, lower first, then
    arrival: the waiting queue is kept in that order, and the sequence preempted for blocks is
    the running one that comes last in it (one already scheduled in the step gives its chunk
    back)."""

    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 lookahead: int = 0, prefix_cache: PrefixCache | None = None,
                 policy: str = "fcfs"):
        """`lookahead`: extra positions each sequence's blocks must cover beyond its chunk (the
        MTP layer writes its K-1 chained drafts there)."""
        self.block_manager = block_manager
        self.prefix_cache = prefix_cache
        self.lookahead = lookahead
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.priority = policy == "priority"
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        if self.priority:
            bisect.insort(self.waiting, seq, key=_priority_key)
        else:
            self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        bm = self.block_manager

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            drafts = len(seq.drafts) if n == seq.num_uncomputed else 0
            if n + drafts > budget:
                drafts = 0
            n += drafts
            while not bm.can_allocate(seq.seq_id, seq.num_computed + n + self.lookahead):
                j = (max(range(len(self.running)), key=lambda k: _priority_key(self.running[k]))
                     if self.priority else len(self.running) - 1)
                victim = self.running.pop(j)
                if j < i:  # scheduled already in this step: its chunk goes back
                    k = next(k for k, c in enumerate(out.chunks) if c.seq is victim)
                    budget += out.chunks.pop(k).num_tokens
                    i -= 1
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                out.chunks.append(self._chunk(seq, n, drafts))
                budget -= n
                i += 1

        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if self.prefix_cache is not None and _sibling_ahead(seq):
                break  # it resumes from the snapshot its sibling is computing
            copy = self._resume(seq) if self.prefix_cache is not None else None
            n = min(seq.num_uncomputed, budget)
            if not bm.can_allocate(seq.seq_id, seq.num_computed + n + self.lookahead):
                if copy is not None:  # give the prefix back; it is looked up again next time
                    bm.free(seq.seq_id)
                    seq.num_computed = seq.num_cached_tokens = 0
                break  # wait for blocks to be freed; never preempt to admit
            if copy is not None:
                out.copies.append(copy)
            if self.prefix_cache is not None:
                self.prefix_cache.queries += len(seq.token_ids)
                self.prefix_cache.hits += seq.num_cached_tokens
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.chunks.append(self._chunk(seq, n))
            budget -= n
        return out

    def schedule_decode(self, seqs: list[Sequence]) -> list[ScheduledChunk] | None:
        """One-token chunks for running `seqs` (async scheduling: each next token is still being
        sampled), or None when one of them would need blocks that are not free (the caller
        then waits for the tokens and schedules normally, which may preempt)."""
        # the blocks they need together: sequences crossing a block boundary in the same
        # step may each fit alone in the last free block
        if not self.block_manager.can_allocate_all(
                [(s.seq_id, s.num_computed + 1 + self.lookahead) for s in seqs]):
            return None
        return [self._chunk(s, 1) for s in seqs]

    def _resume(self, seq: Sequence) -> tuple[int, int] | None:
        """Look `seq` up in the prefix cache and set its cache points. On a hit the sequence
        takes the prefix's blocks and a slot and starts at the prefix's end: returns the
        (snapshot, slot) copy to run before its first chunk."""
        seq.cache_points, seq.num_cached_tokens, seq.chain = [], 0, None
        if seq.request.params.prompt_logprobs is not None:
            return None  # every prompt position must be computed to be scored
        size = self.block_manager.block_size
        last = (len(seq.token_ids) - 1) // size  # blocks before the last token
        salt = seq.request.cache_salt
        if last == 0:
            seq.chain = (0, salt)
            return None
        names = prefix_hashes(seq.token_ids, size, last, name=salt)
        seq.chain = (last, names[-1])
        hit, shared = self.prefix_cache.lookup(names)
        copy = None
        if hit is not None:
            self.block_manager.adopt(seq.seq_id, hit.blocks)
            seq.num_computed = seq.num_cached_tokens = hit.num_tokens
            copy = (hit.slot, self.block_manager.slot(seq.seq_id))
        # its own last boundary, and one that an earlier prompt shared without a snapshot there
        points = {last} | ({shared} if shared else set())
        seq.cache_points = [(j * size, names[j - 1]) for j in sorted(points)
                            if j * size > seq.num_computed]
        return copy

    def _chunk(self, seq: Sequence, n: int, drafts: int = 0) -> ScheduledChunk:
        if not drafts:
            seq.drafts, seq.draft_probs = [], None
        table = self.block_manager.allocate(seq.seq_id, seq.num_computed + n + self.lookahead)
        return ScheduledChunk(seq, seq.num_computed, n, self.block_manager.slot(seq.seq_id), table,
                              drafts)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq.seq_id)
        seq.num_computed = 0
        seq.drafts, seq.draft_probs = [], None
        seq.status = SequenceStatus.WAITING
        if self.priority:
            bisect.insort(self.waiting, seq, key=_priority_key)
        else:
            self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence from the queues and free its cache."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.seq_id in self.block_manager:
            self.block_manager.free(seq.seq_id)


def _sibling_ahead(seq: Sequence) -> bool:
    """Whether another completion of seq's request (n > 1) is prefilling the same prompt and
    will snapshot it: parallel samples then compute their shared prompt once."""
    return any(s is not seq and s.status is SequenceStatus.RUNNING and s.cache_points
               for s in seq.request.seqs)
