"""Engine logprobs in OpenAI's two shapes: chat's ``content`` list and the legacy completion one.

The engine gives, per generated token, a dict ``token_id -> Logprob(logprob, rank,
decoded_token)`` holding the sampled token and the top-N alternatives (vLLM's shape).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

Decode = Callable[[int], str]

# JSON has no -Infinity; OpenAI and vLLM report impossible tokens with this floor instead.
_FLOOR = -9999.0


def _finite(logprob: float) -> float:
    return max(logprob, _FLOOR)


def _top(entry: dict[int, Any], n: int) -> list[tuple[int, Any]]:
    """The ``n`` most likely alternatives of one position, most likely first."""
    ranked = sorted(entry.items(), key=lambda kv: -kv[1].logprob)
    return ranked[:n]


def token_id_text(token_id: int) -> str:
    """vLLM's `return_tokens_as_token_ids` spelling of a token: exact even where a token's
    text is not (part of a character, a byte that is not UTF-8 alone)."""
    return f"token_id:{token_id}"


def _token(token_id: int, lp: Any, decode: Decode) -> str:
    decoded = getattr(lp, "decoded_token", None) if decode is not token_id_text else None
    return decoded if decoded is not None else decode(token_id)


def chat_logprobs(token_ids: Sequence[int], entries: Sequence[dict[int, Any]], n: int,
                  decode: Decode) -> dict[str, Any]:
    """``choices[i].logprobs`` of a chat completion: ``{"content": [...]}``."""
    content = []
    for token_id, entry in zip(token_ids, entries):
        lp = entry.get(token_id)
        token = _token(token_id, lp, decode) if lp is not None else decode(token_id)
        content.append({
            "token": token,
            "logprob": _finite(lp.logprob) if lp is not None else _FLOOR,
            "bytes": list(token.encode("utf-8")),
            "top_logprobs": [
                {"token": (t := _token(tid, alt, decode)), "logprob": _finite(alt.logprob),
                 "bytes": list(t.encode("utf-8"))}
                for tid, alt in _top(entry, n)
            ],
        })
    return {"content": content}


def completion_logprobs(token_ids: Sequence[int], entries: Sequence[dict[int, Any] | None],
                        n: int, decode: Decode, text_offset: int = 0) -> dict[str, Any]:
    """``choices[i].logprobs`` of a legacy completion (tokens, token_logprobs, top_logprobs).
    An entry None (the first prompt token under ``echo``: nothing predicts it) gives None."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    offset = text_offset
    for token_id, entry in zip(token_ids, entries):
        lp = entry.get(token_id) if entry is not None else None
        token = _token(token_id, lp, decode) if lp is not None else decode(token_id)
        tokens.append(token)
        token_logprobs.append(_finite(lp.logprob) if lp is not None else None)
        tops.append(None if entry is None else
                    {_token(tid, alt, decode): _finite(alt.logprob) for tid, alt in _top(entry, n)})
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops,
            "text_offset": offsets}


def echo_offset(head: dict[str, Any]) -> int:
    """Where the completion's text offsets continue after the echoed prompt's tokens (their
    strings' lengths summed, as vLLM counts them: a BOS token's text counts too)."""
    return head["text_offset"][-1] + len(head["tokens"][-1]) if head["tokens"] else 0
