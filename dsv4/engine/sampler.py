"""vLLM-compatible sampling: penalties, greedy / temperature / top-k / top-p / min-p, logprobs.

Order of operations per row (vLLM semantics):
  1. raw logprobs = log_softmax(original logits)  (what is reported as logprobs)
  2. min_tokens: stop_token_ids and EOS (unless ignore_eos) are masked while
     ``len(output) < min_tokens``
  3. repetition penalty (tokens in prompt or output), frequency and presence penalties (output)
  4. temperature < 1e-5 -> greedy argmax (ties -> lowest id); otherwise divide by
     temperature, then top-k, top-p, min-p, and sample from the softmax.

Random draws use the exponential race ``argmax(p / q), q ~ Exp(1)``: each row draws its
``V`` exponentials from its own ``torch.Generator`` (one call per seeded row), so a
seeded row's tokens do not depend on which other rows share the batch. Unseeded rows
share the sampler's default generator (the global torch RNG unless one is given).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..kernels.greedy import greedy_logprob
from .outputs import RequestOutputKind
from .structured import StructuredOutputs, mask_logits
from .upload import upload

__all__ = [
    "SamplingParams",
    "SamplerOutput",
    "TokenLogprob",
    "Sampler",
    "apply_penalties",
    "compute_logprobs_topn",
    "make_generator",
]

SAMPLING_EPS = 1e-5  # temperature below this is greedy (as vLLM)


@dataclass
class SamplingParams:
    """Per-request sampling parameters; names, defaults and validation follow vLLM.

    ``top_k`` 0 or -1 disables top-k; ``max_tokens=None`` means up to the context limit;
    ``stop`` is normalised to a list of strings, ``stop_token_ids`` to a list of ints;
    ``logit_bias`` (OpenAI's: token id -> a bias in [-100, 100] added to its logit before
    sampling, after the penalties) to a dict of ints to floats; ``allowed_token_ids`` (vLLM's)
    restricts sampling to those tokens; ``bad_words`` (vLLM's) are words the output never
    ends with: the last token of each word's tokenisation (with and without a leading space)
    is excluded where the output ends with the tokens before it.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    # vLLM's: False leaves the text empty and logprobs' decoded tokens None (no
    # detokenisation work; stop strings then cannot be used)
    detokenize: bool = True
    include_stop_str_in_output: bool = False
    truncate_prompt_tokens: int | None = None  # keep the last k prompt tokens (-1: what fits)
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    # vLLM's `structured_outputs`: a StructuredOutputs, or a dict of its fields
    structured_outputs: StructuredOutputs | dict | None = None
    bad_words: list[str] | None = None
    # vLLM's: every step's cumulative output, only its new part, or only the final one
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # bad_words tokenised by the engine that takes the request (`tokenize_bad_words`)
    bad_words_token_ids: list[list[int]] | None = field(default=None, init=False, repr=False,
                                                         compare=False)

    def __post_init__(self) -> None:
        def bad(field: str, cond: str) -> ValueError:
            return ValueError(f"{field} must be {cond}, got {getattr(self, field)!r}")

        if self.n < 1:
            raise bad("n", ">= 1")
        if not self.temperature >= 0.0:
            raise bad("temperature", ">= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "in (0, 1]")
        if self.top_k < -1:
            raise bad("top_k", "-1 or 0 (disabled) or >= 1")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "in [0, 1]")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", "in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", "in [-2, 2]")
        if not self.repetition_penalty > 0.0:
            raise bad("repetition_penalty", "> 0")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", "an int or None")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad("max_tokens", ">= 1 or None")
        if self.min_tokens < 0:
            raise bad("min_tokens", ">= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"<= max_tokens ({self.max_tokens})")
        if self.logprobs is not None and self.logprobs < 0:
            raise bad("logprobs", ">= 0 or None")
        if self.prompt_logprobs is not None and self.prompt_logprobs < 0:
            raise bad("prompt_logprobs", ">= 0 or None")
        if self.truncate_prompt_tokens is not None and not (
                self.truncate_prompt_tokens >= 1 or self.truncate_prompt_tokens == -1):
            raise bad("truncate_prompt_tokens", ">= 1, -1 (the model's length) or None")
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        if not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "a non-empty string or a list of non-empty strings")
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        if self.logit_bias:
            bias = {}
            for tok, b in self.logit_bias.items():
                try:
                    t, v = int(tok), float(b)
                except (TypeError, ValueError):
                    raise ValueError(f"logit_bias must map token ids to numbers, got {tok!r}: "
                                     f"{b!r}") from None
                if t < 0 or not -100.0 <= v <= 100.0:
                    raise ValueError(f"logit_bias must map token ids >= 0 to biases in "
                                     f"[-100, 100], got {tok!r}: {b!r}")
                bias[t] = v
            self.logit_bias = bias
        else:
            self.logit_bias = None
        if self.allowed_token_ids is not None:
            try:
                allowed = sorted({int(t) for t in self.allowed_token_ids})
            except (TypeError, ValueError):
                raise bad("allowed_token_ids", "a list of token ids") from None
            if not allowed or allowed[0] < 0:
                raise bad("allowed_token_ids", "a non-empty list of token ids >= 0")
            self.allowed_token_ids = allowed
        if self.bad_words is not None:
            if isinstance(self.bad_words, str) or not all(
                    isinstance(w, str) and w.strip() for w in self.bad_words):
                raise bad("bad_words", "a list of non-empty strings")
            self.bad_words = list(self.bad_words) or None
        try:
            self.output_kind = RequestOutputKind(self.output_kind)
        except (ValueError, TypeError):
            raise bad("output_kind", "a RequestOutputKind (0 cumulative, 1 delta, 2 final "
                      "only)") from None
        if isinstance(self.structured_outputs, dict):
            try:
                self.structured_outputs = StructuredOutputs(**self.structured_outputs)
            except TypeError as e:  # an unknown key
                raise ValueError(f"structured_outputs: {e}") from None
        elif self.structured_outputs is not None and not isinstance(self.structured_outputs,
                                                                    StructuredOutputs):
            raise bad("structured_outputs", "a StructuredOutputs, a dict or None")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @property
    def top_k_active(self) -> bool:
        return self.top_k > 0

    @property
    def needs_logits_processing(self) -> bool:
        """Whether the logits change before sampling (penalties, a logit bias, an allowed set
        or structured outputs): then the token is not the raw argmax."""
        return (self.needs_penalties or bool(self.logit_bias) or self.allowed_token_ids is not None
                or self.structured_outputs is not None or self.bad_words is not None)

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


@dataclass
class TokenLogprob:
    """Raw logprob and rank of one token, plus the top-N (token id, logprob) of its position."""

    token_id: int
    logprob: float
    rank: int  # 1 + number of tokens with strictly higher logprob
    top: list[tuple[int, float]]  # descending; empty when N == 0


@dataclass
class SamplerOutput:
    """Result of one sampling step for a batch of B rows.

    Logprobs are log_softmax of the raw logits (before penalties/temperature/top-k/top-p).
    """

    token_ids: Tensor  # [B] int64
    logprobs: Tensor  # [B] float32, raw logprob of the sampled token
    ranks: Tensor  # [B] rank of the sampled token (int64, or float64 as a row of `packed`)
    top_logprobs: list[list[tuple[int, float]] | None]  # per row; None where params.logprobs is None
    # [3, B] float64 ids, logprobs and ranks for one copy to the host, where the sampler
    # made them in one go (plain greedy on the GPU); else None
    packed: Tensor | None = None


def truncate_prompt(ids: list[int], keep: int | None, max_model_len: int) -> list[int]:
    """The prompt ids kept under `truncate_prompt_tokens` = keep (the last keep; -1: as many
    as leave room for one generated token; None: all)."""
    if keep is None:
        return ids
    return ids[-(max_model_len - 1 if keep == -1 else keep):]


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A generator seeded with ``seed`` on ``device`` (None when seed is None)."""
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _row_col(rows: Iterable[int], lists: Sequence[Sequence[int]], device: torch.device) -> tuple[Tensor, Tensor]:
    r: list[int] = []
    c: list[int] = []
    for i in rows:
        ids = lists[i]
        r.extend([i] * len(ids))
        c.extend(ids)
    return upload(r, device), upload(c, device)


def apply_penalties(
    logits: Tensor,
    params: Sequence[SamplingParams],
    output_token_ids: Sequence[Sequence[int]],
    prompt_token_ids: Sequence[Sequence[int]],
) -> Tensor:
    """Apply vLLM repetition/frequency/presence penalties; returns a new [B, V] tensor.

    Repetition (tokens in prompt or output): logit > 0 -> logit / p, else logit * p.
    Then logit -= frequency * count_in_output and logit -= presence * (count_in_output > 0).
    """
    rows = [i for i, p in enumerate(params) if p.needs_penalties]
    if not rows:
        return logits
    B, V = logits.shape
    dev = logits.device
    counts = torch.zeros(B, V, dtype=logits.dtype, device=dev)
    r, c = _row_col(rows, output_token_ids, dev)
    counts.index_put_((r, c), torch.ones_like(r, dtype=logits.dtype), accumulate=True)
    out = logits.clone()

    rep = [params[i].repetition_penalty for i in range(B)]
    if any(x != 1.0 for x in rep):
        seen = counts > 0
        r, c = _row_col([i for i in rows if rep[i] != 1.0], prompt_token_ids, dev)
        seen[r, c] = True
        pen = upload(rep, dev, logits.dtype)[:, None]
        out = torch.where(seen, torch.where(out > 0, out / pen, out * pen), out)
    freq = upload([p.frequency_penalty for p in params], dev, logits.dtype)[:, None]
    pres = upload([p.presence_penalty for p in params], dev, logits.dtype)[:, None]
    out = out - freq * counts - pres * (counts > 0).to(logits.dtype)
    return out


def tokenize_bad_words(words: Sequence[str], encode) -> list[list[int]]:
    """The token sequences of `words` as vLLM bans them: each word (leading spaces dropped)
    alone, and after a space where that makes a different first token of as many tokens (a
    word inside the text); `encode(text)` gives ids without special tokens."""
    out: list[list[int]] = []
    for word in words:
        alone = encode(word.lstrip())
        spaced = encode(" " + word.lstrip())
        for ids in (alone, spaced if spaced and alone and spaced[0] != alone[0]
                    and len(spaced) == len(alone) else None):
            if ids and ids not in out:
                out.append(ids)
    return out


def apply_bad_words(logits: Tensor, params: Sequence[SamplingParams],
                    output_token_ids: Sequence[Sequence[int]]) -> Tensor:
    """Exclude (-inf) the last token of every bad word whose other tokens end the row's
    output (a one-token word: always); a new tensor when any row bans something."""
    r, c = [], []
    for i, p in enumerate(params):
        for ids in p.bad_words_token_ids or ():
            head = ids[:-1]
            if not head or list(output_token_ids[i][-len(head):]) == head:
                r.append(i)
                c.append(ids[-1])
    if not r:
        return logits
    dev = logits.device
    return logits.index_put((upload(r, dev), upload(c, dev)),
                            torch.tensor(float("-inf"), dtype=logits.dtype, device=dev))


def apply_logit_bias(logits: Tensor, params: Sequence[SamplingParams]) -> Tensor:
    """Add each row's `logit_bias` to its logits and exclude (-inf) the tokens outside its
    `allowed_token_ids` (a new tensor when any row has either)."""
    rows = [i for i, p in enumerate(params) if p.allowed_token_ids is not None]
    if rows:
        r = [i for i in rows for _ in params[i].allowed_token_ids]
        c = [t for i in rows for t in params[i].allowed_token_ids]
        dev = logits.device
        keep = torch.ones_like(logits, dtype=torch.bool)
        keep[upload(rows, dev)] = False
        keep[upload(r, dev), upload(c, dev)] = True
        logits = logits.masked_fill(~keep, float("-inf"))
    rows = [i for i, p in enumerate(params) if p.logit_bias]
    if not rows:
        return logits
    r = [i for i in rows for _ in params[i].logit_bias]
    c = [t for i in rows for t in params[i].logit_bias]
    v = [b for i in rows for b in params[i].logit_bias.values()]
    dev = logits.device
    return logits.index_put((upload(r, dev), upload(c, dev)), upload(v, dev, logits.dtype),
                            accumulate=True)


def _top_lists(logprobs: Tensor, ns: Sequence[int | None]) -> list[list[tuple[int, float]] | None]:
    """Per-row top-N (id, logprob) lists from a [B, V] logprob tensor (None where N is None)."""
    wanted = [n for n in ns if n]
    if not wanted:
        return [None if n is None else [] for n in ns]
    k = min(max(wanted), logprobs.shape[-1])
    vals, ids = logprobs.topk(k, dim=-1)  # sorted descending
    vals, ids = vals.tolist(), ids.tolist()
    return [None if n is None else list(zip(ids[i][:n], vals[i][:n])) for i, n in enumerate(ns)]


def compute_logprobs_topn(logits: Tensor, token_ids: Tensor, n: int | Sequence[int],
                          chunk: int = 1024) -> list[TokenLogprob]:
    """Raw logprob, rank and top-``n`` of ``token_ids[i]`` under ``log_softmax(logits[i])``.

    ``logits`` is [B, V] (e.g. prompt positions for ``prompt_logprobs``), ``token_ids`` [B];
    ``n`` one count for every row or one per row. Processed in chunks of rows to bound the
    memory of the float32 log-softmax.
    """
    ns = [n] * logits.shape[0] if isinstance(n, int) else list(n)
    token_ids = token_ids.to(logits.device, torch.long)
    result: list[TokenLogprob] = []
    for s in range(0, logits.shape[0], chunk):
        lp = torch.log_softmax(logits[s : s + chunk].float(), dim=-1)
        tok = token_ids[s : s + chunk]
        tok_lp = lp.gather(1, tok[:, None])
        ranks = (lp > tok_lp).sum(-1) + 1
        tops = _top_lists(lp, ns[s:s + chunk])
        for t, l, r, top in zip(tok.tolist(), tok_lp[:, 0].tolist(), ranks.tolist(), tops):
            result.append(TokenLogprob(t, l, r, top or []))
    return result


class Sampler:
    """Batched vLLM-compatible sampler working on [B, V] logits on any device.

    ``eos_token_ids`` are masked (with each row's ``stop_token_ids``) while a row has
    fewer than ``min_tokens`` outputs, unless ``ignore_eos``. ``generator`` is the shared
    generator for rows without their own (None: the global torch RNG of the device).
    """

    def __init__(self, eos_token_ids: int | Iterable[int] | None = None, generator: torch.Generator | None = None):
        if eos_token_ids is None:
            eos_token_ids = []
        elif isinstance(eos_token_ids, int):
            eos_token_ids = [eos_token_ids]
        self.eos_token_ids = list(eos_token_ids)
        self.generator = generator

    compute_logprobs_topn = staticmethod(compute_logprobs_topn)

    def _apply_min_tokens(self, logits: Tensor, params, output_token_ids) -> Tensor:
        r: list[int] = []
        c: list[int] = []
        for i, p in enumerate(params):
            if len(output_token_ids[i]) < p.min_tokens:
                ids = set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.eos_token_ids))
                r.extend([i] * len(ids))
                c.extend(ids)
        if not r:
            return logits
        logits = logits.clone()
        dev = logits.device
        logits[upload(r, dev), upload(c, dev)] = float("-inf")
        return logits

    def _draw_exponentials(self, rows: list[int], V: int, generators, device) -> Tensor:
        """[len(rows), V] Exp(1) draws; seeded rows draw only from their own generator."""
        q = torch.empty(len(rows), V, dtype=torch.float32, device=device)
        shared = [j for j, i in enumerate(rows) if generators[i] is None]
        if shared:
            gdev = self.generator.device if self.generator is not None else device
            draw = torch.empty(len(shared), V, dtype=torch.float32, device=gdev)
            draw.exponential_(generator=self.generator)
            q[upload(shared, device)] = draw.to(device)
        for j, i in enumerate(rows):
            g = generators[i]
            if g is not None:
                q[j] = torch.empty(V, dtype=torch.float32, device=g.device).exponential_(generator=g).to(device)
        return q.clamp_min_(torch.finfo(torch.float32).tiny)

    @staticmethod
    def _filter(x: Tensor, ps: list[SamplingParams]) -> Tensor:
        """Temperature-scaled logits [R, V] -> logits with top-k/top-p/min-p exclusions at -inf."""
        R, V = x.shape
        dev = x.device
        ninf = float("-inf")
        if any(p.top_k_active and p.top_k < V or p.top_p < 1.0 for p in ps):
            k = upload([p.top_k if p.top_k_active and p.top_k < V else V for p in ps], dev)
            top_p = upload([p.top_p if p.top_p < 1.0 else float("inf") for p in ps], dev,
                           torch.float32)
            sx, idx = x.sort(dim=-1, descending=True, stable=True)
            drop = torch.arange(V, device=dev)[None, :] >= k[:, None]
            sx = sx.masked_fill(drop, ninf)
            sp = torch.softmax(sx, dim=-1)
            before = sp.cumsum(dim=-1) - sp  # mass strictly before each position
            drop |= before >= top_p[:, None]  # keeps the smallest prefix with mass >= top_p
            x = x.masked_fill(torch.zeros_like(drop).scatter_(1, idx, drop), ninf)
        if any(p.min_p > 0.0 for p in ps):
            min_p = upload([p.min_p for p in ps], dev, x.dtype)[:, None]
            probs = torch.softmax(x, dim=-1)
            x = x.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), ninf)
        return x

    def probs(
        self,
        logits: Tensor,
        params: Sequence[SamplingParams],
        output_token_ids: Sequence[Sequence[int]],
        prompt_token_ids: Sequence[Sequence[int]],
        grammars: Sequence | None = None,
    ) -> Tensor:
        """The distribution each row samples from [B, V] (fp32): penalties, temperature, top-k,
        top-p and min-p applied; a greedy row is one-hot on its argmax. Speculative decoding
        verifies drafts against these."""
        x = self._processed(logits, params, output_token_ids, prompt_token_ids, grammars)
        greedy = [i for i, p in enumerate(params) if p.is_greedy]
        rand = [i for i, p in enumerate(params) if not p.is_greedy]
        dev = x.device
        if not rand:  # all greedy (no index upload)
            return torch.nn.functional.one_hot(x.argmax(-1), x.shape[1]).float()
        out = torch.empty_like(x)
        if greedy:
            g_idx = upload(greedy, dev)
            out[g_idx] = torch.nn.functional.one_hot(x[g_idx].argmax(-1), x.shape[1]).float()
        if rand:
            r_idx = upload(rand, dev)
            ps = [params[i] for i in rand]
            temp = upload([p.temperature for p in ps], dev, torch.float32)[:, None]
            out[r_idx] = torch.softmax(self._filter(x[r_idx] / temp, ps), dim=-1)
        return out

    def _processed(self, logits: Tensor, params, output_token_ids, prompt_token_ids,
                   grammars=None) -> Tensor:
        """fp32 logits after min_tokens masking, the penalties, the logit biases, the
        allowed sets and the structured outputs' grammars (what greedy maximises)."""
        x = self._apply_min_tokens(logits.float(), params, output_token_ids)
        x = apply_penalties(x, params, output_token_ids, prompt_token_ids)
        x = apply_logit_bias(x, params)
        x = apply_bad_words(x, params, output_token_ids)
        if grammars is not None and any(g is not None for g in grammars):
            x = mask_logits(x if x.data_ptr() != logits.data_ptr() else x.clone(), grammars,
                            self.eos_token_ids)
        return x

    def draw(self, probs: Tensor, rows: Sequence[int], generators) -> Tensor:
        """Sample one token per row of `probs` [R, V]; row j draws from generators[rows[j]]."""
        q = self._draw_exponentials(list(rows), probs.shape[1], generators, probs.device)
        return (probs / q).argmax(dim=-1)

    def __call__(
        self,
        logits: Tensor,
        params: Sequence[SamplingParams],
        output_token_ids: Sequence[Sequence[int]],
        prompt_token_ids: Sequence[Sequence[int]],
        generators: Sequence[torch.Generator | None],
        grammars: Sequence | None = None,
    ) -> SamplerOutput:
        """`grammars`: per row, a structured-output `GrammarState` or None."""
        B, V = logits.shape
        if not len(params) == len(output_token_ids) == len(prompt_token_ids) == len(generators) == B:
            raise ValueError(
                f"batch size mismatch: logits {B}, params {len(params)}, outputs {len(output_token_ids)}, "
                f"prompts {len(prompt_token_ids)}, generators {len(generators)}"
            )
        if plain_greedy(params, output_token_ids):
            # the raw argmax is the token, rank 1, one fused pass on the GPU
            return greedy_output(params, *greedy_logprob(logits, packed=True))
        rand = [i for i, p in enumerate(params) if not p.is_greedy]
        logits = logits.float()
        raw_logprobs = torch.log_softmax(logits, dim=-1)
        if not rand:  # all greedy: the argmax, without building the one-hot distributions
            token_ids = self._processed(logits, params, output_token_ids,
                                        prompt_token_ids, grammars).argmax(dim=-1)
        else:
            probs = self.probs(logits, params, output_token_ids, prompt_token_ids, grammars)
            token_ids = probs.argmax(dim=-1)  # greedy rows are one-hot on their argmax
        if len(rand) == B:
            token_ids = self.draw(probs, rand, generators)
        elif rand:
            r_idx = upload(rand, logits.device)
            token_ids[r_idx] = self.draw(probs[r_idx], rand, generators)

        tok_lp = raw_logprobs.gather(1, token_ids[:, None])
        ranks = (raw_logprobs > tok_lp).sum(dim=-1) + 1
        top = _top_lists(raw_logprobs, [p.logprobs for p in params])
        return SamplerOutput(token_ids=token_ids, logprobs=tok_lp[:, 0], ranks=ranks, top_logprobs=top)


def plain_greedy(params: Sequence[SamplingParams],
                 output_token_ids: Sequence[Sequence[int]]) -> bool:
    """Whether every row's token is the raw logits' argmax and needs nothing but its
    logprob and rank 1 (`greedy_logprob`): greedy, no logits processing, no top logprobs,
    past min_tokens."""
    return not any(not p.is_greedy or p.logprobs or p.needs_logits_processing
                   or len(out) < p.min_tokens for p, out in zip(params, output_token_ids))


def greedy_output(params: Sequence[SamplingParams], token_ids: Tensor, tok_lp: Tensor,
                  packed: Tensor) -> SamplerOutput:
    """A plain-greedy step's SamplerOutput from `greedy_logprob(..., packed=True)`."""
    return SamplerOutput(token_ids=token_ids, logprobs=tok_lp, ranks=packed[2],
                         top_logprobs=[None if p.logprobs is None else [] for p in params],
                         packed=packed)


# generation_config.json keys that become request defaults (vLLM's `--generation-config auto`)
GENERATION_DEFAULT_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                           "min_p": "min_p", "repetition_penalty": "repetition_penalty",
                           "max_new_tokens": "max_tokens"}


def generation_defaults(generation_config: Any) -> dict[str, Any]:
    """The SamplingParams defaults a model's generation config sets: its temperature, top_p,
    top_k, min_p and repetition_penalty, and max_new_tokens as max_tokens (not do_sample, as
    vLLM). Values SamplingParams refuses are a ValueError naming the file's key."""
    gen = generation_config or {}
    if not isinstance(gen, dict):
        gen = {k: getattr(gen, k) for k in GENERATION_DEFAULT_KEYS if hasattr(gen, k)}
    out = {ours: gen[key] for key, ours in GENERATION_DEFAULT_KEYS.items()
           if gen.get(key) is not None}
    try:
        SamplingParams(**out)
    except (ValueError, TypeError) as e:
        raise ValueError(f"generation_config.json: {e}") from e
    return out
