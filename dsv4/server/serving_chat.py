"""``POST /v1/chat/completions``: messages -> DeepSeek-V4 prompt -> engine -> message or SSE.

Reasoning and tool calls are split out of the completion the way vLLM's DeepSeek parsers do:
``reasoning_content`` holds the thinking-mode text before ``</think>``, and a trailing DSML
``tool_calls`` block becomes OpenAI ``tool_calls`` with ``finish_reason: "tool_calls"``.

``tool_choice``:

* ``auto`` (the default with tools): the tools are in the prompt and calls are parsed.
* ``none``: as vLLM, the model must not call tools: they are left out of the prompt and any
  DSML text the model writes anyway stays in ``content``.
* ``required`` / named: the call is forced by the prompt and held to well-formed calls of the
  offered functions by a grammar (``tool_grammar.py``): the assistant turn is started with
  the opening of a tool-call block (and, for a named choice, ``<｜DSML｜invoke
  name="NAME">``), which the model then completes. In thinking
  mode this prefix first closes the thinking, so ``reasoning_content`` is empty. The prefix is
  part of the prompt (and of ``prompt_tokens``) but is parsed as the start of the completion.
"""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request

from dsv4.chat import (
    EOS,
    INVOKE_START,
    THINK_END,
    TOOL_CALLS_START,
    CompletionStreamParser,
    encode_messages,
    parse_completion,
)
from dsv4.engine.sampler import truncate_prompt
from dsv4.engine.structured import StructuredOutputs
from dsv4.server.logprobs import chat_logprobs
from dsv4.server.protocol import (
    ChatCompletionRequest,
    NamedToolChoice,
    OpenAIError,
    bad_request,
    now,
    random_id,
)
from dsv4.server.serving import (
    SSE_DONE,
    EngineStreamingResponse,
    OpenAIServing,
    TextDelta,
    cancel_on_disconnect,
    sse,
    usage,
)
from dsv4.server.tool_grammar import tool_call_grammar

_HAS_LLGUIDANCE = importlib.util.find_spec("llguidance") is not None


def forced_prefix(request: ChatCompletionRequest, thinking_mode: str) -> str:
    """The start of the assistant turn that ``required`` / named ``tool_choice`` imposes."""
    choice = request.tool_choice
    if choice != "required" and not isinstance(choice, NamedToolChoice):
        return ""
    prefix = (THINK_END if thinking_mode == "thinking" else "") + f"\n\n{TOOL_CALLS_START}\n"
    if isinstance(choice, NamedToolChoice):
        prefix += f'{INVOKE_START} name="{choice.function.name}">\n'
    return prefix


def finalize(text: str, thinking_mode: str, parse_tools: bool) -> dict[str, Any]:
    """``parse_completion``, except that without tools a DSML block stays in the content."""
    result = parse_completion(text, thinking_mode)
    if result["tool_calls"] and not parse_tools:
        body = text.split(EOS, 1)[0]
        if thinking_mode == "thinking":
            body = body.partition(THINK_END)[2]
        result = {**result, "content": body, "tool_calls": []}
    return result


class _ChoiceStream:
    """Streaming state of one choice: text deltas, the reasoning/tool parser, sent logprobs."""

    def __init__(self, prefix: str, thinking_mode: str, parse_tools: bool) -> None:
        self.text = TextDelta()
        self.parser = CompletionStreamParser(thinking_mode)
        self.parser.feed(prefix)  # a tool-call opening: held, never emitted as content
        self.prefix, self.thinking_mode, self.parse_tools = prefix, thinking_mode, parse_tools
        self.emitted = {"reasoning_content": 0, "content": 0}
        self.tokens_sent = 0
        self.done = False

    def deltas(self, text: str, finished: bool) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        """Delta dicts made certain by the output's new text; at the end also the final parse."""
        out = []
        for event in self.parser.feed(self.text.next(text)):
            for key, value in event.items():
                self.emitted[key] += len(value)
                out.append({key: value})
        if not finished:
            return out, None
        final = finalize(self.prefix + text, self.thinking_mode, self.parse_tools)
        for key in ("reasoning_content", "content"):
            rest = (final[key] or "")[self.emitted[key]:]
            if rest:
                out.append({key: rest})
        if final["tool_calls"]:
            out.append({"tool_calls": [{"index": k, **call} for k, call in enumerate(final["tool_calls"])]})
        return out, final


class OpenAIServingChat(OpenAIServing):
    """Handler of ``/v1/chat/completions``."""

    async def prompt_ids(self, request: ChatCompletionRequest) -> tuple[list[int], str, str, Any]:
        """(prompt token ids, mode, forced prefix, tools offered) of a checked chat request:
        the DeepSeek-V4 encoding of its messages (and tools), tokenized. A forced tool-call
        prefix is also read back before the answer; a prefix completion's text (the final
        assistant message, continued) is not: the answer is the continuation, as in
        DeepSeek's API."""
        mode = request.thinking_mode
        offered = request.tools if request.tool_choice != "none" else None
        tools = [t.model_dump(exclude_none=True) for t in offered] if offered else None
        messages, prefix, lead = request.messages, forced_prefix(request, mode), ""
        if request.prefix_completion:
            messages, lead = messages[:-1], str(messages[-1].get("content") or "")
        try:
            prompt = encode_messages(messages, mode, tools=tools)
        except ValueError as exc:
            raise bad_request(str(exc), "messages") from None
        ids = await self.tokenize(prompt + lead + prefix)
        return (truncate_prompt(ids, request.truncate_prompt_tokens, self.engine.max_model_len),
                mode, prefix, tools)

    async def create(self, request: ChatCompletionRequest, raw_request: Request) -> Any:
        self.check_model(request.model)
        request.check()
        prompt_ids, mode, prefix, tools = await self.prompt_ids(request)
        max_tokens = self.max_tokens_for(len(prompt_ids), request.requested_max_tokens)
        params = request.to_sampling_params(max_tokens, self.engine.default_sampling)
        self.constrain(request, params, mode, prefix, tools)
        request_id = random_id("chatcmpl")
        outputs = await self.submit(request_id, prompt_ids, params, request.cache_salt,
                                    request.priority)
        parse_tools = bool(tools)
        if request.stream:
            body = self._stream(request, request_id, outputs, mode, prefix, parse_tools, params)
            return EngineStreamingResponse(body, self, [request_id])
        try:
            return await cancel_on_disconnect(
                raw_request, self._full(request, request_id, outputs, mode, prefix, parse_tools))
        finally:
            self.abort([request_id])

    def constrain(self, request: ChatCompletionRequest, params: Any, mode: str, prefix: str,
                  tools: Any) -> None:
        """Structured outputs for the answer: in thinking mode they start after `</think>`; a
        forced tool call (`required` / named) is held to well-formed calls of the offered
        functions (`tool_grammar.py`), and so is any call under `auto` when a function is
        `strict` (OpenAI's guarantee that calls fit their schemas)."""
        tok = self.engine.tokenizer
        so = params.structured_outputs
        if tok is None:
            return
        strict = any((t.get("function") or {}).get("strict") for t in tools or ())
        if tools and _HAS_LLGUIDANCE and (prefix or (strict and so is None)):
            if so is not None:
                raise bad_request("response_format cannot be combined with tool_choice "
                                  "'required' or a named function", "response_format")
            choice = request.tool_choice
            grammar = tool_call_grammar(
                tools, tok.token_to_id,
                named=choice.function.name if isinstance(choice, NamedToolChoice) else None,
                single=request.parallel_tool_calls is False, auto=not prefix)
            if grammar is not None:
                so = params.structured_outputs = StructuredOutputs(grammar=grammar)
                if prefix:  # the block is already open: the grammar holds from the start
                    return
            else:
                return
        if so is not None and mode == "thinking":
            # the reasoning is free; the answer after </think> follows the format
            so.start_after = tok.token_to_id(THINK_END)

    def _logprobs(self, request: ChatCompletionRequest, o: Any, start: int = 0) -> dict[str, Any] | None:
        if not request.logprobs or o.logprobs is None:
            return None
        return chat_logprobs(o.token_ids[start:], o.logprobs[start:], request.top_logprobs or 0,
                             self.decoder(request))

    async def _full(self, request: ChatCompletionRequest, request_id: str, outputs: AsyncIterator[Any],
                    mode: str, prefix: str, parse_tools: bool) -> dict[str, Any]:
        final = None
        async for final in outputs:
            pass
        choices = []
        for o in final.outputs:
            parsed = finalize(prefix + o.text, mode, parse_tools)
            calls = parsed["tool_calls"]
            message = {
                "role": "assistant",
                "content": parsed["content"] if parsed["content"] or not calls else None,
                "reasoning_content": parsed["reasoning_content"],
                "tool_calls": calls,
            }
            choices.append({
                "index": o.index, "message": message, "logprobs": self._logprobs(request, o),
                "finish_reason": "tool_calls" if calls else o.finish_reason,
                "stop_reason": getattr(o, "stop_reason", None),
            })
        completion_tokens = sum(len(o.token_ids) for o in final.outputs)
        return {
            "id": request_id, "object": "chat.completion", "created": now(),
            "model": self.model_name, "choices": choices,
            "usage": usage(len(final.prompt_token_ids), completion_tokens, final.num_cached_tokens),
        }

    async def _stream(self, request: ChatCompletionRequest, request_id: str,
                      outputs: AsyncIterator[Any], mode: str, prefix: str, parse_tools: bool,
                      params: Any) -> AsyncIterator[str]:
        created = now()
        extra = {"usage": None} if request.include_usage else {}

        def chunk(index: int, delta: dict[str, Any], finish_reason: str | None = None,
                  logprobs: dict[str, Any] | None = None, tokens: int = 0) -> str:
            if request.continuous_usage:  # the prompt and this choice's tokens so far (vLLM)
                extra["usage"] = usage(len(final.prompt_token_ids), tokens)
            return sse({"id": request_id, "object": "chat.completion.chunk", "created": created,
                        "model": self.model_name,
                        "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                     "finish_reason": finish_reason}], **extra})

        states = [_ChoiceStream(prefix, mode, parse_tools) for _ in range(params.n)]
        first, final = True, None
        try:
            async for final in outputs:
                if first:  # the role chunks come with the first tokens, as vLLM's do: a
                    # client timing its first chunk measures the time to the first token
                    first = False
                    for i in range(params.n):
                        yield chunk(i, {"role": "assistant", "content": ""})
                for o in final.outputs:
                    state = states[o.index]
                    if state.done:
                        continue
                    finished = o.finish_reason is not None
                    deltas, parsed = state.deltas(o.text, finished)
                    for delta in deltas:
                        yield chunk(o.index, delta,
                                    logprobs=self._logprobs(request, o, state.tokens_sent),
                                    tokens=len(o.token_ids))
                        state.tokens_sent = len(o.token_ids)
                    if finished:
                        state.done = True
                        reason = "tool_calls" if parsed["tool_calls"] else o.finish_reason
                        rest = self._logprobs(request, o, state.tokens_sent)
                        if rest is not None and not rest["content"]:
                            rest = None
                        yield chunk(o.index, {}, reason, rest, tokens=len(o.token_ids))
        except OpenAIError as exc:
            yield sse(exc.body())
            yield SSE_DONE
            return
        if request.include_usage and final is not None:
            completion_tokens = sum(len(o.token_ids) for o in final.outputs)
            yield sse({"id": request_id, "object": "chat.completion.chunk", "created": created,
                       "model": self.model_name, "choices": [],
                       "usage": usage(len(final.prompt_token_ids), completion_tokens,
                                      final.num_cached_tokens)})
        yield SSE_DONE
