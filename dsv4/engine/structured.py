"""Structured outputs: generated text held to a JSON schema, a regex, a choice or a grammar.

Names follow vLLM's `StructuredOutputsParams` (`json`, `json_object`, `regex`, `choice`,
`grammar`). The grammars are compiled and matched by llguidance (the engine behind vLLM's
`guidance` backend): each constrained sequence holds a matcher; before a step samples, every
constrained row's logits outside the matcher's allowed tokens become -inf (`mask_logits`),
and the sampled token advances the matcher (`Sequence.append_token`). The matcher's state lives
on the host, so steps with constrained sequences run synchronously (no async launch ahead).

`start_after` (thinking mode): the constraint starts once that token (`</think>`) has been
generated, so the reasoning is free and the answer follows the format.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

logger = logging.getLogger(__name__)

INSTALL_HINT = "structured outputs need the llguidance package (pip install llguidance)"


@dataclass
class StructuredOutputs:
    """Exactly one of: `json` (a JSON schema, as a dict or its JSON text), `json_object` (any
    JSON object), `regex`, `choice` (one of these strings), `grammar` (Lark syntax)."""
    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    # JSON whitespace: by default exactly ", " and ": " between items (json.dumps' layout; a
    # free run of whitespace lets a model loop on blanks); True allows any
    whitespace_flexible: bool = False
    disable_any_whitespace: bool | None = None  # vLLM's name: whitespace_flexible = not this
    start_after: int | None = None  # a token id: constrain only what follows it
    # a GrammarState compiled ahead (the server compiles off the engine's thread); taken once
    compiled: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar")
                 if getattr(self, name) is not None] + (["json_object"] if self.json_object
                                                        else [])
        if len(given) != 1:
            raise ValueError("structured outputs take exactly one of json, json_object, regex, "
                             f"choice, grammar; got {given or 'none'}")
        if self.disable_any_whitespace is not None:
            self.whitespace_flexible = not self.disable_any_whitespace
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except json.JSONDecodeError as e:
                raise ValueError(f"structured outputs: the JSON schema is not JSON ({e})") from None
        if self.json is not None and not isinstance(self.json, (dict, bool)):
            raise ValueError("structured outputs: the JSON schema must be an object, got "
                             f"{type(self.json).__name__}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured outputs: {name} must be a non-empty string")
        if self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not self.choice
                    or not all(isinstance(c, str) and c for c in self.choice)):
                raise ValueError("structured outputs: choice must be a non-empty list of "
                                 "non-empty strings")
            self.choice = list(self.choice)

    def grammar_text(self) -> str:
        """The llguidance grammar of this constraint."""
        from llguidance import LLMatcher
        layout = ({"whitespace_flexible": True} if self.whitespace_flexible else
                  {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
        if self.json_object:
            return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=layout)
        if self.json is not None:
            try:
                return LLMatcher.grammar_from_json_schema(self.json, defaults=layout)
            except ValueError as e:
                raise ValueError(f"structured outputs: invalid JSON schema ({e})") from None
        if self.regex is not None:
            return LLMatcher.grammar_from_regex(self.regex)
        if self.choice is not None:  # a Lark alternation of JSON-quoted literals
            return LLMatcher.grammar_from_lark(
                "start: " + " | ".join(json.dumps(c) for c in self.choice))
        return LLMatcher.grammar_from_lark(self.grammar)


class GrammarCompiler:
    """Matchers for one tokenizer and vocabulary (the llguidance tokenizer is built once, on
    the first constrained request)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: Sequence[int]):
        self._json, self.vocab_size = tokenizer_json, vocab_size
        self._eos = sorted(eos_token_ids)
        self._tokenizer = None

    def matcher(self, spec: StructuredOutputs):
        """A fresh matcher for `spec`; ValueError naming the problem if it does not compile."""
        try:
            from llguidance import LLMatcher, LLTokenizer
        except ImportError:
            raise ValueError(INSTALL_HINT) from None
        if self._tokenizer is None:
            self._tokenizer = LLTokenizer(_without_placeholders(self._json),
                                          n_vocab=self.vocab_size, eos_token=self._eos or None)
        m = LLMatcher(self._tokenizer, spec.grammar_text(), log_level=0)
        if m.is_error():
            raise ValueError(f"structured outputs: {m.get_error().strip()}")
        return m


def _without_placeholders(tokenizer_json: str) -> str:
    """The tokenizer without its reserved placeholder tokens (`<｜place▁holder▁no▁N｜>`, never
    valid output): llguidance then leaves their ids out of every mask, and builds its
    tokenizer in 0.1 s instead of a minute when they are a hundred thousand (the tiny
    tokenizer of the dummy presets, padded to DeepSeek-V4's vocabulary)."""
    spec = json.loads(tokenizer_json)
    added = spec.get("added_tokens") or []
    kept = [t for t in added if not str(t.get("content", "")).startswith("<｜place▁holder▁no▁")]
    if len(kept) == len(added):
        return tokenizer_json
    spec["added_tokens"] = kept
    return json.dumps(spec, ensure_ascii=False)


@dataclass
class GrammarState:
    """A sequence's matcher, and whether the constraint has started (`start_after`)."""
    matcher: Any
    start_after: int | None = None
    active: bool = True

    def __post_init__(self) -> None:
        self.active = self.start_after is None

    def copy(self) -> "GrammarState":
        return GrammarState(self.matcher.deep_copy(), self.start_after)

    def advance(self, token: int) -> None:
        """Take a generated token (not a stop or EOS token, which end the sequence): the
        matcher consumes it once the constraint has started. A token the grammar rejects
        (none can pass the mask; only a matcher error) lifts the constraint with a warning
        rather than failing the step that carries other requests."""
        if not self.active:
            self.active = token == self.start_after
            return
        if not self.matcher.consume_token(token):
            logger.warning("structured outputs: token %d rejected by the grammar (%s); the "
                           "sequence goes on unconstrained", token, self.matcher.get_error())
            self.active = False
            self.start_after = -1  # never again


_EXECUTOR: list = []


def _masks_in_parallel(bits: torch.Tensor, matchers: list) -> bool:
    """Every row's mask into `bits` [R, words] at once, on llguidance's threads (a few hundred
    microseconds a row for a 129K vocabulary, so a batch of constrained rows would otherwise
    hold the step); False (nothing assumed written) if that fails."""
    try:
        from llguidance import LLExecutor
        if not _EXECUTOR:
            _EXECUTOR.append(LLExecutor())
        _EXECUTOR[0].unsafe_compute_mask_ptr([(m, j) for j, m in enumerate(matchers)],
                                             bits.data_ptr(), bits.shape[1] * 4, bits.shape[0])
        return True
    except Exception as e:  # noqa: BLE001 - the rows are then computed one by one
        logger.debug("structured outputs: parallel masks failed (%s)", e)
        bits.fill_(-1)
        return False


def mask_logits(logits: torch.Tensor, grammars: Sequence[GrammarState | None],
                fallback_ids: Sequence[int]) -> torch.Tensor:
    """logits [B, V] with each constrained row's disallowed tokens at -inf (in place). A row
    left with no allowed token (the grammar is complete but min_tokens holds back EOS) keeps
    `fallback_ids` (the EOS tokens) open."""
    rows = [i for i, g in enumerate(grammars) if g is not None and g.active]
    if not rows:
        return logits
    V = logits.shape[1]
    words = (V + 31) // 32
    bits = torch.full((len(rows), words), -1, dtype=torch.int32)  # -1: every token allowed
    if len(rows) > 1 and _masks_in_parallel(bits, [grammars[i].matcher for i in rows]):
        rows_left = []
    else:
        rows_left = rows
    for j, i in enumerate(rows_left):
        try:
            mask = grammars[i].matcher.compute_bitmask()
            bits[j] = torch.frombuffer(bytearray(mask), dtype=torch.int32)[:words]
        except Exception as e:  # noqa: BLE001 - one request's grammar must not fail the step
            logger.warning("structured outputs: the grammar's mask failed (%s); the sequence "
                           "goes on unconstrained", e)
            grammars[i].active, grammars[i].start_after = False, -1
    bits = bits.to(logits.device, non_blocking=True)
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((bits[:, :, None] >> shifts) & 1).bool().view(len(rows), -1)[:, :V]
    idx = torch.tensor(rows, device=logits.device)
    sub = logits[idx].masked_fill(~allowed, float("-inf"))
    dead = ~torch.isfinite(sub).any(dim=1)
    if fallback_ids and bool(dead.any()):
        eos = torch.tensor(list(fallback_ids), device=logits.device)
        sub[dead[:, None] & (torch.arange(V, device=logits.device) == eos[:, None, None]).any(0)
            ] = 0.0
    logits[idx] = sub
    return logits
