"""What the engine hands back: vLLM-shaped request outputs, logprobs and engine statistics.

The field names are vLLM's, so code written against ``vllm.RequestOutput`` reads ours unchanged.
Every object returned by the engine is a snapshot: later steps never mutate it.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass


class RequestOutputKind(enum.IntEnum):
    """What a request's outputs carry (vLLM's `SamplingParams.output_kind`, same values).

    CUMULATIVE: after every step, everything so far. DELTA: only what the step added (token
    ids, text, logprobs, prompt logprobs; `cumulative_logprob` stays cumulative), so a
    consumer joins the pieces. FINAL_ONLY: one output, when the request finishes (what
    `LLM.generate` and non-streaming HTTP requests use: no per-step copies of a long output).
    """
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass
class Logprob:
    """Log-probability of one token at one position, its rank (1 = most likely) and its text."""
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One position: token id -> Logprob (the chosen token first, then the top-N).
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    """One of the ``n`` completions of a request.

    ``text`` excludes a matched stop string; ``finish_reason`` is "stop" (EOS, a stop token id
    or a stop string), "length" (max_tokens or the context limit), "abort", or None while
    running; ``stop_reason`` is the matched stop string or stop token id (None for EOS).
    """
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[PositionLogprobs] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Wall-clock times (``time.time()``) of a request's life, for TTFT and TPOT."""
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    """The cumulative state of one request after a step.

    ``prompt_logprobs`` is None unless asked for; then entry 0 is None (nothing predicts the
    first token) and entry i maps the prompt token i (and the top-N) to its Logprob.
    ``prompt_token_ids`` is the request's own list, shared by every step's output (copying a
    32K-token prompt for each request at each step cost 30 us): read it, do not modify it.
    """
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[PositionLogprobs | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0  # prompt tokens resumed from the prefix cache (first sequence)


@dataclass
class EngineStats:
    """A point-in-time view of the engine, for logs and the server's /metrics."""
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of blocks in use, 0..1
    num_free_blocks: int
    num_blocks: int
    prompt_tokens_total: int
    generation_tokens_total: int
    num_preemptions: int
    # Prefix caching: prompt tokens of admitted sequences, and of those resumed from the cache.
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    # Speculative decoding (empty when off): per draft position, drafts verified and accepted.
    spec_proposed: tuple[int, ...] = ()
    spec_accepted: tuple[int, ...] = ()
    spec_verify_steps: int = 0
    # Triton compiles after the warm-up (each one delayed the step that met its shape).
    triton_compiles: int = 0
    triton_compile_seconds: float = 0.0
