"""What the completion and chat endpoints share: model check, prompt length, the engine call.

``OpenAIServing.submit`` is the one path from an HTTP request to the engine: it turns engine
validation errors into 400s (before any response starts) and records the request's latency
metrics. A request is aborted, freeing its cache blocks, when the task consuming its outputs
is cancelled (client disconnect) and, as a backstop, whenever its HTTP response ends:
``EngineStreamingResponse`` for streams, a ``finally`` in the handlers otherwise.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse

from dsv4.server.async_engine import AsyncLLMEngine, EngineDeadError
from dsv4.server.metrics import ServerMetrics
from dsv4.server.logprobs import token_id_text
from dsv4.server.protocol import OpenAIError, bad_request

logger = logging.getLogger(__name__)

T = TypeVar("T")


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event: ``data: <json>`` and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n"


SSE_DONE = sse("[DONE]")


class TextDelta:
    """Turns an output's cumulative text into deltas.

    The engine only ever extends the text it shows (it holds back a tail that could still
    become a stop string), so each delta is the text past what was already sent.
    """

    def __init__(self) -> None:
        self.sent = 0

    def next(self, text: str) -> str:
        delta = text[self.sent:]
        self.sent = max(self.sent, len(text))
        return delta


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; `prompt_tokens_details.cached_tokens`: prompt tokens resumed from
    the prefix cache (present when some were)."""
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out


class OpenAIServing:
    """Base of the endpoint handlers: one served model name, one engine, one metrics set."""

    def __init__(self, engine: AsyncLLMEngine, model_name: str | list[str],
                 metrics: ServerMetrics) -> None:
        """`model_name`: the served name, or several (vLLM's aliases): requests may name any
        of them, responses carry the first."""
        self.engine = engine
        self.model_names = [model_name] if isinstance(model_name, str) else list(model_name)
        self.model_name = self.model_names[0]
        self.metrics = metrics
        # --enable-log-requests: each request's prompt and parameters at INFO, the prompt's
        # token ids cut to max_log_len (None: all)
        self.log_requests, self.max_log_len = False, None
        self.tokens_as_ids = False  # --return-tokens-as-token-ids

    def decoder(self, request: Any):
        """How a token reads in this request's logprobs: its text, or `token_id:N` (vLLM's
        `return_tokens_as_token_ids`, per request or for the server)."""
        if self.tokens_as_ids or getattr(request, "return_tokens_as_token_ids", False):
            return token_id_text
        tok = self.engine.tokenizer
        return (lambda t: tok.decode([t])) if tok is not None else str

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.model_names:
            raise OpenAIError(404, f"The model `{model}` does not exist.", "NotFoundError",
                              "model", "model_not_found")

    async def tokenize(self, text: str) -> list[int]:
        if self.engine.tokenizer is None:
            raise bad_request("this server has no tokenizer (skip_tokenizer_init): "
                              "send token ids instead of text", "prompt")
        # Off the event loop: a long prompt takes long enough to stall every other stream.
        # BOS is added unless the text starts with it (chat prompts do), as the engine does.
        return await asyncio.to_thread(self.engine.tokenizer.encode, text, add_special_tokens=True)

    def max_tokens_for(self, prompt_len: int, requested: int | None, what: str = "messages") -> int:
        """``requested``, or all the context left (at most the generation config's
        max_new_tokens); a 400 naming the numbers when it won't fit."""
        limit = self.engine.max_model_len
        if requested is not None and requested < 1:
            raise bad_request(f"max_tokens must be at least 1, got {requested}", "max_tokens")
        if prompt_len >= limit or (requested is not None and prompt_len + requested > limit):
            want = prompt_len + (requested or 1)
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{want} tokens ({prompt_len} in the {what}, {requested or 1} in the completion). "
                f"Please reduce the length of the {what} or completion.", "max_tokens")
        if requested is None:  # all the context left, or the generation config's default
            return min(limit - prompt_len, self.engine.default_sampling.get("max_tokens", limit))
        return requested

    async def submit(self, request_id: str, prompt_ids: list[int], params: Any,
                     cache_salt: str | None = None, priority: int = 0) -> AsyncIterator[Any]:
        """Add one request to the engine; return its cumulative outputs, metrics recorded.
        `cache_salt`: it resumes only from prefixes cached under the same salt; `priority`:
        lower first under the priority scheduling policy.

        Engine validation errors become a 400 here, before any response starts.
        """
        arrival = time.monotonic()
        if self.log_requests:
            shown = prompt_ids if self.max_log_len is None else prompt_ids[:self.max_log_len]
            logger.info("request %s: %d prompt tokens %s%s, %s%s", request_id, len(prompt_ids),
                        shown, "" if len(shown) == len(prompt_ids) else " ...", params,
                        f", priority {priority}" if priority else "")
        prompt = (prompt_ids if cache_salt is None
                  else {"prompt_token_ids": prompt_ids, "cache_salt": cache_salt})
        try:
            outputs = await self.engine.add_request(request_id, prompt, params, priority)
        except ValueError as exc:
            raise bad_request(str(exc)) from None
        except EngineDeadError as exc:
            raise OpenAIError(503, str(exc), "ServiceUnavailableError") from None
        return self._observe(outputs, arrival)

    async def _observe(self, outputs: AsyncIterator[Any], arrival: float) -> AsyncIterator[Any]:
        first_token: float | None = None
        last = None
        try:
            async for output in outputs:
                if first_token is None and any(o.token_ids for o in output.outputs):
                    first_token = time.monotonic()
                last = output
                yield output
        except EngineDeadError as exc:
            raise OpenAIError(503, str(exc), "ServiceUnavailableError") from None
        finally:
            finished = last is not None and last.finished
            times = getattr(last, "metrics", None)
            if first_token is None and getattr(times, "first_token_time", None) is not None:
                # final-only outputs (non-streaming): the engine's wall-clock time of it
                first_token = max(arrival, time.monotonic()
                                  - max(0.0, time.time() - times.first_token_time))
            reason = (last.outputs[0].finish_reason or "stop") if finished else "abort"
            tokens = max((len(o.token_ids) for o in last.outputs), default=0) if last else 0
            self.metrics.observe_request(
                arrival, first_token, time.monotonic(), tokens, reason,
                len(last.prompt_token_ids) if last else 0, times)

    async def submit_all(self, request_ids: list[str], prompts: list[list[int]], params: Any,
                         cache_salt: str | None = None, priority: int = 0
                         ) -> list[AsyncIterator[Any]]:
        """``submit`` several prompts; if one is rejected, the ones already added are aborted."""
        streams = []
        try:
            for request_id, prompt_ids in zip(request_ids, prompts):
                streams.append(await self.submit(request_id, prompt_ids, params, cache_salt,
                                                 priority))
        except BaseException:
            self.abort(request_ids)
            raise
        return streams

    def abort(self, request_ids: list[str]) -> None:
        """Free the requests' blocks if they are still running (finished ids are ignored)."""
        for request_id in request_ids:
            self.engine.abort(request_id)


class EngineStreamingResponse(StreamingResponse):
    """A ``StreamingResponse`` that aborts its engine requests however the response ends.

    The body generator's own cleanup does not run if the client disconnects before the
    body is first iterated; this ``finally`` always runs.
    """

    def __init__(self, content: AsyncIterator[str], serving: OpenAIServing, request_ids: list[str]) -> None:
        super().__init__(content, media_type="text/event-stream")
        self._serving, self._request_ids = serving, request_ids

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._serving.abort(self._request_ids)


async def merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Interleave several async iterators as ``(index, item)``; cancelling closes them all."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    q: asyncio.Queue[tuple[int, Any, BaseException | None]] = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                await q.put((i, item, None))
            await q.put((i, done, None))
        except BaseException as exc:  # re-raised in the consumer
            await q.put((i, done, exc))
            raise

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item, exc = await q.get()
            if exc is not None:
                raise exc
            if item is done:
                remaining -= 1
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run ``work``; cancel it if the client hangs up first (the caller then aborts)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                task.cancel()
                return

    watcher = asyncio.create_task(watch())
    try:
        return await task
    finally:
        watcher.cancel()
        task.cancel()
