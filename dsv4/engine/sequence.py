"""Requests and their sequences: the engine's per-request state.

A `Request` is one submitted prompt with its `SamplingParams`; it owns `n` `Sequence`s, one per
completion. Each sequence has its own cache slot and blocks (blocks of a cached prompt prefix
are shared), so the scheduler treats sequences, not requests, as the unit of work.

A sequence is `token_ids` (prompt + output so far) of which the first `num_computed` have their
kv in the cache. One rule covers prefill, chunked prefill, decode and recompute after
preemption: the next chunk is `token_ids[num_computed:]` (or a prefix of it), and a chunk that
reaches the end of `token_ids` yields logits from which the next token is sampled.
"""
from __future__ import annotations

import enum
import itertools
import time
from collections import abc

import torch

from ..tokenizer import IncrementalDecoder, Tokenizer
from .outputs import (CompletionOutput, PositionLogprobs, RequestMetrics, RequestOutput,
                      RequestOutputKind)
from .sampler import SamplingParams, make_generator


# Stands in `token_ids` for a token that a step launched ahead of the host is still sampling
# (async scheduling); `append_token` fills it in. Never a model input: the step that computes
# that position takes the token from the device.
PENDING_TOKEN = -1


class SequenceStatus(enum.Enum):
    WAITING = "waiting"    # holds no cache: not started, or preempted (recomputed later)
    RUNNING = "running"    # holds a slot and blocks for its first num_computed tokens
    FINISHED = "finished"  # done; its cache has been freed


class OutputIds(abc.Sequence):
    """A read-only view of a token list from `start` on: its length, items, slices and
    iteration, without copying a long output at every step."""
    __slots__ = ("_ids", "_start")

    def __init__(self, ids: list[int], start: int) -> None:
        self._ids, self._start = ids, start

    def __len__(self) -> int:
        return len(self._ids) - self._start

    def __getitem__(self, i):
        if isinstance(i, slice):
            a, b, step = i.indices(len(self))
            if step != 1:
                return list(self)[i]
            return self._ids[self._start + a:self._start + max(a, b)]
        n = len(self)
        if not -n <= i < n:
            raise IndexError("output index out of range")
        return self._ids[self._start + (i + n if i < 0 else i)]

    def __iter__(self):
        return itertools.islice(self._ids, self._start, None)


class Sequence:
    """One completion: its tokens, how many are cached, and its detokenised text."""

    _next_id = itertools.count()

    def __init__(self, request: Request, index: int, generator: torch.Generator | None,
                 decoder: IncrementalDecoder | None):
        self.seq_id = next(Sequence._next_id)  # the BlockManager key
        self.request = request
        self.index = index
        self.token_ids: list[int] = list(request.prompt_token_ids)
        self.num_computed = 0
        self.status = SequenceStatus.WAITING
        self.generator = generator  # this sequence's own RNG when the request is seeded
        self.decoder = decoder
        self.text = ""
        self.cumulative_logprob = 0.0
        self.logprobs: list[PositionLogprobs] | None = (
            [] if request.params.logprobs is not None else None)
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        # Speculative decoding: tokens the MTP layer proposed after token_ids (not yet part of
        # the sequence) and the distributions they were drawn from [K, V].
        self.drafts: list[int] = []
        self.draft_probs: torch.Tensor | None = None
        # Prefix caching (scheduler.py): tokens resumed from a cached prefix at admission, and
        # the block boundaries still ahead where this sequence's state is to be cached, with
        # the names of the prefixes there, in order.
        self.num_cached_tokens = 0
        self.cache_points: list[tuple[int, bytes]] = []
        # the name of the first `chain[0]` blocks of token_ids (None: not cached), and the
        # entry this sequence keeps at the last boundary its generated tokens crossed
        self.chain: tuple[int, bytes] | None = None
        self.tail_name: bytes | None = None
        # Structured outputs (`structured.py`): the matcher the sampled tokens advance
        self.grammar = None
        # output_kind DELTA: output tokens and visible characters already handed out
        self._sent_tokens = self._sent_text = 0

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def output_ids_view(self) -> OutputIds:
        """The generated ids without a copy (what the sampler reads every step)."""
        return OutputIds(self.token_ids, self.num_prompt_tokens)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    # ------------------------------------------------------------------ generation
    def append_token(self, token_id: int, logprob: float, position_logprobs: PositionLogprobs | None,
                     eos_token_ids: frozenset[int], max_model_len: int) -> None:
        """Add a sampled token (into the PENDING_TOKEN slot if a step was launched ahead of
        it), extend the text, and finish the sequence if a stop rule fires."""
        if self.token_ids and self.token_ids[-1] == PENDING_TOKEN:
            self.token_ids[-1] = token_id
        else:
            self.token_ids.append(token_id)
        self.cumulative_logprob += logprob
        if self.logprobs is not None:
            self.logprobs.append(position_logprobs or {})
        old_len = len(self.text)
        if self.decoder is not None:
            self.text += self.decoder.add(token_id)

        p = self.params
        if self.grammar is not None and token_id not in eos_token_ids \
                and token_id not in p.stop_token_ids:
            self.grammar.advance(token_id)
        if not p.ignore_eos and token_id in eos_token_ids:
            self.finish("stop")
        elif token_id in p.stop_token_ids:
            self.finish("stop", token_id)
        elif (hit := self._find_stop_string(old_len)) is not None:
            start, stop = hit
            self.text = self.text[:start + (len(stop) if p.include_stop_str_in_output else 0)]
            self.finish("stop", stop, flush=False)
        elif (p.max_tokens is not None and self.num_output_tokens >= p.max_tokens) or \
                len(self.token_ids) >= max_model_len:
            self.finish("length")

    def _find_stop_string(self, old_len: int) -> tuple[int, str] | None:
        """(start, string) of the earliest stop string ending in the newly added text."""
        p = self.params
        if not p.stop or self.num_output_tokens <= p.min_tokens:  # vLLM: none before min_tokens
            return None
        best: tuple[int, str] | None = None
        for s in p.stop:
            # Earlier occurrences would have stopped an earlier step, so search only where one
            # could end in the new text.
            i = self.text.find(s, max(0, old_len - len(s) + 1))
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        return best

    def finish(self, reason: str, stop_reason: int | str | None = None, flush: bool = True) -> None:
        if self.token_ids and self.token_ids[-1] == PENDING_TOKEN:  # aborted while in flight
            self.token_ids.pop()
        self.finish_reason, self.stop_reason = reason, stop_reason
        self.status = SequenceStatus.FINISHED
        if flush and self.decoder is not None:
            self.text += self.decoder.flush()

    @property
    def visible_text(self) -> str:
        """Text that can be shown now: while running, a tail that could still become the start
        of a stop string is held back, so shown text is only ever extended, never retracted."""
        hold = self.request.max_stop_len - 1
        if self.is_finished or hold <= 0:
            return self.text
        return self.text[:max(0, len(self.text) - hold)]

    def output(self, delta: bool = False) -> CompletionOutput:
        """Everything so far, or with `delta` only what came since the last delta output."""
        text, n_prompt = self.visible_text, self.num_prompt_tokens
        tok0 = txt0 = 0
        if delta:
            tok0, txt0 = self._sent_tokens, self._sent_text
            self._sent_tokens, self._sent_text = len(self.token_ids) - n_prompt, len(text)
        return CompletionOutput(
            index=self.index, text=text[txt0:], token_ids=self.token_ids[n_prompt + tok0:],
            cumulative_logprob=self.cumulative_logprob,
            logprobs=self.logprobs[tok0:] if self.logprobs is not None else None,
            finish_reason=self.finish_reason, stop_reason=self.stop_reason)


class Request:
    """A submitted prompt: parameters, its `n` sequences, prompt logprobs and timings."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 params: SamplingParams, arrival_time: float | None = None,
                 tokenizer: Tokenizer | None = None, device: torch.device | str = "cpu"):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.cache_salt = b""  # the prefix cache's names start from it (`_cache_salt`)
        self.priority = 0  # lower first, with the priority scheduling policy
        self.metrics = RequestMetrics(arrival_time if arrival_time is not None else time.time())
        self.max_stop_len = max((len(s) for s in params.stop), default=0)
        # Entry i scores prompt token i; nothing predicts token 0. Filled by sequence 0.
        self.prompt_logprobs: list[PositionLogprobs | None] | None = (
            [None] if params.prompt_logprobs is not None else None)
        self._sent_prompt_logprobs = 0  # output_kind DELTA: entries already handed out
        self.seqs = [
            Sequence(self, i,
                     make_generator(None if params.seed is None else params.seed + i, device),
                     IncrementalDecoder(tokenizer, params.skip_special_tokens)
                     if tokenizer is not None and params.detokenize else None)
            for i in range(params.n)]

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    def wants_prompt_logprobs(self, seq: Sequence) -> bool:
        """Whether `seq` still has prompt positions to score (only sequence 0 scores them)."""
        return (seq.index == 0 and self.prompt_logprobs is not None
                and len(self.prompt_logprobs) < len(self.prompt_token_ids))

    def output(self) -> RequestOutput:
        """This step's output, as `params.output_kind` asks (DELTA: the new part only)."""
        delta = self.params.output_kind == RequestOutputKind.DELTA
        plp = self.prompt_logprobs
        if plp is not None:
            p0 = self._sent_prompt_logprobs if delta else 0
            self._sent_prompt_logprobs = len(plp)
            plp = plp[p0:]
        return RequestOutput(
            request_id=self.request_id, prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,  # shared, not copied: every step's output
            prompt_logprobs=plp, outputs=[s.output(delta) for s in self.seqs],
            finished=self.finished,
            metrics=RequestMetrics(**vars(self.metrics)),
            num_cached_tokens=self.seqs[0].num_cached_tokens)
