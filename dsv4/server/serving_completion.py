"""``POST /v1/completions``: raw prompts (text or token ids, one or a batch) -> engine -> text.

A batch of P prompts with ``n`` choices each gives choices ``p * n + i``, as OpenAI and vLLM
number them; each prompt is its own engine request, so they are scheduled independently.
``echo`` puts the prompt before each choice's text (first in a stream), with its tokens'
logprobs when ``logprobs`` is set (None for the first token, as in vLLM).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request

from dsv4.engine.sampler import truncate_prompt
from dsv4.server.logprobs import completion_logprobs, echo_offset
from dsv4.server.protocol import CompletionRequest, OpenAIError, now, random_id
from dsv4.server.serving import (
    SSE_DONE,
    EngineStreamingResponse,
    OpenAIServing,
    TextDelta,
    cancel_on_disconnect,
    merge,
    sse,
    usage,
)


def _prompt_logprobs(output: Any) -> list[dict[str, Any] | None] | None:
    """vLLM's ``prompt_logprobs``: None at position 0, then token id -> logprob, rank, token."""
    plp = getattr(output, "prompt_logprobs", None)
    if plp is None:
        return None
    return [None if entry is None else {
        str(tid): {"logprob": lp.logprob, "rank": lp.rank,
                   "decoded_token": getattr(lp, "decoded_token", None)}
        for tid, lp in entry.items()} for entry in plp]


def _joined(head: dict[str, Any], tail: dict[str, Any] | None) -> dict[str, Any]:
    """An echoed prompt's logprobs followed by the completion's."""
    return head if tail is None else {k: head[k] + tail[k] for k in head}


class OpenAIServingCompletion(OpenAIServing):
    """Handler of ``/v1/completions``."""

    async def create(self, request: CompletionRequest, raw_request: Request) -> Any:
        self.check_model(request.model)
        request.check()
        prompts = [truncate_prompt(await self.tokenize(p) if isinstance(p, str) else list(p),
                                   request.truncate_prompt_tokens, self.engine.max_model_len)
                   for p in request.prompts()]
        if any(not p for p in prompts):
            raise OpenAIError(400, "prompt must not be empty", param="prompt")
        # One SamplingParams for the batch: max_tokens must fit the longest prompt.
        max_tokens = min(self.max_tokens_for(len(p), request.max_tokens, "prompt") for p in prompts)
        params = request.to_sampling_params(max_tokens, self.engine.default_sampling)
        base = random_id("cmpl")
        request_ids = [f"{base}-{i}" for i in range(len(prompts))]
        echo = None
        if request.echo:  # the prompts' texts as given, or decoded from their ids
            echo = [p if isinstance(p, str) else self._decode_ids(ids)
                    for p, ids in zip(request.prompts(), prompts)]
        streams = await self.submit_all(request_ids, prompts, params, request.cache_salt,
                                        request.priority)
        if request.stream:
            body = self._stream(request, base, streams, params, echo)
            return EngineStreamingResponse(body, self, request_ids)
        try:
            return await cancel_on_disconnect(raw_request,
                                              self._full(request, base, streams, params, echo))
        finally:
            self.abort(request_ids)

    def _decode_ids(self, ids: list[int]) -> str:
        return self.engine.tokenizer.decode(ids) if self.engine.tokenizer else ""

    def _echo_logprobs(self, request: CompletionRequest, final: Any) -> dict[str, Any] | None:
        """The echoed prompt's part of a choice's logprobs (None without ``logprobs``)."""
        plp = getattr(final, "prompt_logprobs", None)
        if request.logprobs is None or plp is None:
            return None
        return completion_logprobs(final.prompt_token_ids, plp, request.logprobs,
                                   self.decoder(request))

    def _logprobs(self, request: CompletionRequest, o: Any, start: int = 0,
                  text_offset: int = 0) -> dict[str, Any] | None:
        if request.logprobs is None or o.logprobs is None:
            return None
        return completion_logprobs(o.token_ids[start:], o.logprobs[start:], request.logprobs,
                                   self.decoder(request), text_offset)

    async def _full(self, request: CompletionRequest, base: str, streams: list[AsyncIterator[Any]],
                    params: Any, echo: list[str] | None) -> dict[str, Any]:
        finals: list[Any] = [None] * len(streams)
        async for p, output in merge(streams):
            finals[p] = output
        choices = []
        for p, final in enumerate(finals):
            for o in final.outputs:
                text, logprobs = o.text, self._logprobs(request, o)
                if echo is not None:
                    text = echo[p] + o.text
                    head = self._echo_logprobs(request, final)
                    if head is not None:
                        logprobs = _joined(head, self._logprobs(request, o, 0, echo_offset(head)))
                choice = {"index": p * params.n + o.index, "text": text,
                          "logprobs": logprobs, "finish_reason": o.finish_reason,
                          "stop_reason": getattr(o, "stop_reason", None)}
                if request.prompt_logprobs is not None:
                    choice["prompt_logprobs"] = _prompt_logprobs(final)
                choices.append(choice)
        return {
            "id": base, "object": "text_completion", "created": now(), "model": self.model_name,
            "choices": choices,
            "usage": usage(sum(len(f.prompt_token_ids) for f in finals),
                           sum(len(o.token_ids) for f in finals for o in f.outputs),
                           sum(f.num_cached_tokens for f in finals)),
        }

    async def _stream(self, request: CompletionRequest, base: str, streams: list[AsyncIterator[Any]],
                      params: Any, echo: list[str] | None) -> AsyncIterator[str]:
        created = now()
        extra = {"usage": None} if request.include_usage else {}
        n = params.n
        texts = [TextDelta() for _ in range(len(streams) * n)]
        tokens_sent = [0] * (len(streams) * n)
        done = [False] * (len(streams) * n)
        echoed = [False] * (len(streams) * n)
        base_offset = [0] * (len(streams) * n)  # text offsets after an echoed prompt's tokens
        prompt_tokens = [0] * len(streams)
        completion_tokens = [0] * len(streams)
        cached_tokens = [0] * len(streams)

        def chunk(index: int, text: str, finish_reason: str | None, logprobs: Any) -> str:
            if request.continuous_usage:  # this choice's prompt and tokens so far (as vLLM)
                p = index // n
                extra["usage"] = usage(prompt_tokens[p], tokens_sent[index])
            return sse({"id": base, "object": "text_completion", "created": created,
                        "model": self.model_name,
                        "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                     "finish_reason": finish_reason}], **extra})

        try:
            async for p, output in merge(streams):
                prompt_tokens[p] = len(output.prompt_token_ids)
                cached_tokens[p] = output.num_cached_tokens
                completion_tokens[p] = sum(len(o.token_ids) for o in output.outputs)
                for o in output.outputs:
                    i = p * n + o.index
                    if done[i]:
                        continue
                    finished = o.finish_reason is not None
                    offset = texts[i].sent + base_offset[i]
                    delta = texts[i].next(o.text)
                    if echo is not None and not echoed[i]:  # the prompt leads the first chunk
                        echoed[i] = True
                        head = self._echo_logprobs(request, output)
                        base_offset[i] = echo_offset(head) if head is not None else 0
                        logprobs = self._logprobs(request, o, 0, base_offset[i])
                        tokens_sent[i] = len(o.token_ids)
                        done[i] = finished
                        yield chunk(i, echo[p] + delta, o.finish_reason if finished else None,
                                    logprobs if head is None else _joined(head, logprobs))
                    elif delta or finished or len(o.token_ids) > tokens_sent[i]:
                        # a chunk for every step's tokens, as vLLM streams (an empty text
                        # while they end inside a character), so clients can time them
                        logprobs = self._logprobs(request, o, tokens_sent[i], offset)
                        tokens_sent[i] = len(o.token_ids)
                        done[i] = finished
                        yield chunk(i, delta, o.finish_reason if finished else None, logprobs)
        except OpenAIError as exc:
            yield sse(exc.body())
            yield SSE_DONE
            return
        if request.include_usage:
            yield sse({"id": base, "object": "text_completion", "created": created,
                       "model": self.model_name, "choices": [],
                       "usage": usage(sum(prompt_tokens), sum(completion_tokens),
                                      sum(cached_tokens))})
        yield SSE_DONE
