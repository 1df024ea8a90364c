"""``POST /v1/responses``: OpenAI's Responses API over the chat path.

A request becomes the chat completion it describes, and the chat's parse of the answer
becomes the response's output items:

* ``instructions`` -> a system message; ``input`` -> messages: a string is one user turn;
  message items keep their role (``developer`` as the chat encoding renders it) and their
  text parts; ``function_call`` items become the assistant's ``tool_calls`` and
  ``function_call_output`` items ``tool`` messages; ``reasoning`` items are dropped (DeepSeek-V4
  drops earlier turns' reasoning from the prompt anyway).
* ``tools`` (flat: ``{"type": "function", "name", "parameters"}``) and ``tool_choice``;
  ``reasoning.effort`` turns thinking mode on (``"none"``: off); ``text.format`` is the chat's
  ``response_format`` (structured outputs); ``max_output_tokens``, ``temperature``, ``top_p``.
* Output: a ``reasoning`` item (thinking mode), a ``message`` item with ``output_text``, then a
  ``function_call`` item per call; ``status`` ``incomplete`` with ``max_output_tokens`` when
  the length ran out. Streams send the API's events (``response.created`` ...
  ``response.output_text.delta`` ... ``response.completed``).

Responses are kept in memory (``store``, true by default as in OpenAI's API; the last
``STORE_SIZE`` of them, lost on restart): ``previous_response_id`` continues a stored
conversation (its messages and answer come before this request's input, its
``instructions`` do not carry over), ``GET`` / ``DELETE /v1/responses/{id}`` read and drop one.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request

from dsv4.server.protocol import ChatCompletionRequest, OpenAIError, bad_request, now, random_id
from dsv4.server.serving import EngineStreamingResponse, cancel_on_disconnect
from dsv4.server.serving_chat import OpenAIServingChat, _ChoiceStream, finalize


class ResponsesRequest(BaseModel):
    """The request body; unknown fields are accepted and ignored (OpenAI's API grows)."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    input: str | list[dict[str, Any]] = Field(min_length=1)
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    reasoning: dict[str, Any] | None = None
    text: dict[str, Any] | None = None
    stream: bool = False
    previous_response_id: str | None = None
    store: bool = True
    metadata: dict[str, Any] | None = None
    user: str | None = None
    cache_salt: str | None = None  # vLLM's extensions, as on the chat endpoint
    priority: int = 0

    def chat_request(self, history: list[dict[str, Any]] = ()) -> ChatCompletionRequest:
        """The chat completion this request describes, after `history` (the messages of a
        previous response); a 400 naming what does not fit."""
        messages = ([{"role": "system", "content": self.instructions}]
                    if self.instructions else []) + list(history) + _messages(self.input)
        fields: dict[str, Any] = {
            "model": self.model, "messages": messages, "max_tokens": self.max_output_tokens,
            "temperature": self.temperature, "top_p": self.top_p, "stream": self.stream,
            "parallel_tool_calls": self.parallel_tool_calls, "cache_salt": self.cache_salt,
            "priority": self.priority,
        }
        if self.tools:
            fields["tools"] = [_chat_tool(t) for t in self.tools]
        if self.tool_choice is not None:
            fields["tool_choice"] = _chat_tool_choice(self.tool_choice)
        effort = (self.reasoning or {}).get("effort")
        if effort is not None:
            fields["reasoning_effort"] = str(effort)
        fmt = (self.text or {}).get("format")
        if fmt is not None:
            fields["response_format"] = _chat_format(fmt)
        try:
            return ChatCompletionRequest(**{k: v for k, v in fields.items() if v is not None})
        except ValueError as e:  # pydantic's: a field of the translated request
            raise bad_request(f"input: {e}", "input") from None


def _text(content: Any, where: str) -> str:
    """The text of a message item's content: a string, or its text parts joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or a list of parts", "input")
    out = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text"):
            raise bad_request(f"{where}: content parts of type {kind!r} are not supported "
                              "(text only)", "input")
        out.append(str(part.get("text", "")))
    return "".join(out)


def _messages(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages from the input items (module docstring)."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad_request(f"{where} must be an object", "input")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise bad_request(f"{where}.role must be user, system, developer or assistant, "
                                  f"got {role!r}", "input")
            messages.append({"role": role, "content": _text(item.get("content"), where)})
        elif kind == "function_call":
            call = {"id": item.get("call_id") or item.get("id") or random_id("call"),
                    "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "")}}
            last = messages[-1] if messages else None
            if last and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            elif last and last["role"] == "assistant" and not last.get("tool_calls"):
                last["tool_calls"] = [call]  # the text before the calls, then the calls
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": output if isinstance(output, str) else json.dumps(output)})
        elif kind == "reasoning":
            continue
        else:
            raise bad_request(f"{where}: items of type {kind!r} are not supported", "input")
    if not messages:
        raise bad_request("input holds no message", "input")
    return messages


def _chat_tool(tool: dict[str, Any]) -> dict[str, Any]:
    if tool.get("type") != "function" or not tool.get("name"):
        raise bad_request(f"tools: only function tools with a name are supported, got "
                          f"{tool.get('type')!r}", "tools")
    function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
    return {"type": "function", "function": function}


def _chat_tool_choice(choice: str | dict[str, Any]) -> Any:
    if isinstance(choice, str):
        return choice
    if choice.get("type") == "function" and choice.get("name"):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise bad_request(f"tool_choice {choice!r} is not supported", "tool_choice")


def _chat_format(fmt: dict[str, Any]) -> dict[str, Any]:
    """`text.format` (flat) as the chat's `response_format` (nested `json_schema`)."""
    kind = fmt.get("type")
    if kind == "json_schema":
        return {"type": "json_schema", "json_schema": {k: fmt[k] for k in
                                                       ("name", "schema", "strict") if k in fmt}}
    return {"type": kind}


STORE_SIZE = 1024  # responses kept for previous_response_id and GET, least recent dropped


class OpenAIServingResponses(OpenAIServingChat):
    """Handler of ``/v1/responses``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # id -> (the conversation's messages, answer included; the response object)
        self._store: OrderedDict[str, tuple[list[dict[str, Any]], dict[str, Any]]] = OrderedDict()

    def stored(self, response_id: str) -> dict[str, Any]:
        if response_id not in self._store:
            raise OpenAIError(404, f"no stored response {response_id!r} (not stored, dropped "
                              "as older than the last 1024, or from before a restart)",
                              "invalid_request_error", "response_id")
        self._store.move_to_end(response_id)
        return self._store[response_id][1]

    def delete(self, response_id: str) -> dict[str, Any]:
        self.stored(response_id)
        del self._store[response_id]
        return {"id": response_id, "object": "response", "deleted": True}

    def _keep(self, request: ResponsesRequest, history: list[dict[str, Any]],
              done: dict) -> None:
        if not request.store:
            return
        answer = {"role": "assistant", "content": "", "tool_calls": []}
        for item in done["output"]:
            if item["type"] == "message":
                answer["content"] = item["content"][0]["text"]
            elif item["type"] == "function_call":
                answer["tool_calls"].append({"id": item["call_id"], "type": "function",
                                             "function": {"name": item["name"],
                                                          "arguments": item["arguments"]}})
        conversation = list(history) + _messages(request.input)  # instructions do not carry
        self._store[done["id"]] = (conversation + [answer], done)
        while len(self._store) > STORE_SIZE:
            self._store.popitem(last=False)

    async def create_response(self, request: ResponsesRequest, raw_request: Request) -> Any:
        history: list[dict[str, Any]] = []
        if request.previous_response_id is not None:
            if request.previous_response_id not in self._store:
                raise bad_request(f"previous response {request.previous_response_id!r} not "
                                  "found (not stored, dropped, or from before a restart)",
                                  "previous_response_id")
            self._store.move_to_end(request.previous_response_id)
            history = self._store[request.previous_response_id][0]
        chat = request.chat_request(history)
        self.check_model(chat.model)
        chat.check()
        prompt_ids, mode, prefix, tools = await self.prompt_ids(chat)
        max_tokens = self.max_tokens_for(len(prompt_ids), chat.requested_max_tokens, "input")
        params = chat.to_sampling_params(max_tokens, self.engine.default_sampling)
        self.constrain(chat, params, mode, prefix, tools)
        response_id = random_id("resp")
        outputs = await self.submit(response_id, prompt_ids, params, chat.cache_salt,
                                    chat.priority)
        shell = self._shell(request, response_id, max_tokens)
        keep = lambda done: self._keep(request, history, done)  # noqa: E731
        if request.stream:
            body = self._events(shell, outputs, mode, prefix, bool(tools), keep)
            return EngineStreamingResponse(body, self, [response_id])
        try:
            done = await cancel_on_disconnect(
                raw_request, self._full(shell, outputs, mode, prefix, bool(tools)))
            keep(done)
            return done
        finally:
            self.abort([response_id])

    def _shell(self, request: ResponsesRequest, response_id: str, max_tokens: int) -> dict:
        """The response object without its output (as `response.created` sends it)."""
        return {
            "id": response_id, "object": "response", "created_at": now(),
            "status": "in_progress", "model": self.model_name, "output": [], "error": None,
            "incomplete_details": None, "instructions": request.instructions,
            "max_output_tokens": request.max_output_tokens or max_tokens,
            "metadata": request.metadata or {}, "parallel_tool_calls":
                request.parallel_tool_calls if request.parallel_tool_calls is not None else True,
            "temperature": request.temperature, "top_p": request.top_p,
            "tool_choice": request.tool_choice or "auto", "tools": request.tools or [],
            "reasoning": request.reasoning, "text": request.text or {"format": {"type": "text"}},
            "previous_response_id": request.previous_response_id, "store": request.store,
            "usage": None,
        }

    def _finish(self, shell: dict, final: Any, items: list[dict]) -> dict:
        o = final.outputs[0]
        out_tokens = len(o.token_ids)
        reasoning = sum(len(i["content"][0]["text"]) for i in items if i["type"] == "reasoning")
        done = dict(shell, output=items, status="completed")
        if o.finish_reason == "length":
            done.update(status="incomplete", incomplete_details={"reason": "max_output_tokens"})
        think = self._reasoning_tokens(o.token_ids) if reasoning else 0
        done["usage"] = {
            "input_tokens": len(final.prompt_token_ids),
            "input_tokens_details": {"cached_tokens": final.num_cached_tokens},
            "output_tokens": out_tokens, "output_tokens_details": {"reasoning_tokens": think},
            "total_tokens": len(final.prompt_token_ids) + out_tokens}
        return done

    def _reasoning_tokens(self, token_ids: list[int]) -> int:
        tok = self.engine.tokenizer
        end = tok.token_to_id("</think>") if tok is not None else None
        return token_ids.index(end) if end in token_ids else len(token_ids)

    @staticmethod
    def _items(parsed: dict[str, Any], ids: dict[str, str]) -> list[dict[str, Any]]:
        """The output items of a parsed answer; `ids` names them (the stream's, reused)."""
        items = []
        if parsed["reasoning_content"]:
            items.append({"type": "reasoning", "id": ids.setdefault("reasoning", random_id("rs")),
                          "summary": [], "status": "completed",
                          "content": [{"type": "reasoning_text",
                                       "text": parsed["reasoning_content"]}]})
        if parsed["content"] or not (parsed["tool_calls"] or parsed["reasoning_content"]):
            items.append({"type": "message", "id": ids.setdefault("content", random_id("msg")),
                          "status": "completed", "role": "assistant",
                          "content": [{"type": "output_text", "text": parsed["content"] or "",
                                       "annotations": [], "logprobs": []}]})
        for call in parsed["tool_calls"]:
            items.append({"type": "function_call", "id": random_id("fc"),
                          "call_id": call["id"], "name": call["function"]["name"],
                          "arguments": call["function"]["arguments"], "status": "completed"})
        return items

    async def _full(self, shell: dict, outputs: AsyncIterator[Any], mode: str, prefix: str,
                    parse_tools: bool) -> dict[str, Any]:
        final = None
        async for final in outputs:
            pass
        parsed = finalize(prefix + final.outputs[0].text, mode, parse_tools)
        return self._finish(shell, final, self._items(parsed, {}))

    async def _events(self, shell: dict, outputs: AsyncIterator[Any], mode: str, prefix: str,
                      parse_tools: bool, keep) -> AsyncIterator[str]:
        """The stream: an item a kind of text as it starts (reasoning, then the message),
        each closed when the next starts or the answer ends, then the function calls."""
        seq = iter(range(1 << 62))

        def event(kind: str, **body: Any) -> str:
            data = {"type": kind, "sequence_number": next(seq), **body}
            return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

        yield event("response.created", response=shell)
        yield event("response.in_progress", response=shell)
        state = _ChoiceStream(prefix, mode, parse_tools)
        ids: dict[str, str] = {}
        open_kind, texts, index = None, {"reasoning_content": "", "content": ""}, -1

        def close(kind: str) -> list[str]:
            text = texts[kind]
            if kind == "reasoning_content":
                item = {"type": "reasoning", "id": ids["reasoning"], "summary": [],
                        "status": "completed",
                        "content": [{"type": "reasoning_text", "text": text}]}
                return [event("response.reasoning_text.done", item_id=item["id"],
                              output_index=index, content_index=0, text=text),
                        event("response.output_item.done", output_index=index, item=item)]
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            item = {"type": "message", "id": ids["content"], "status": "completed",
                    "role": "assistant", "content": [part]}
            return [event("response.output_text.done", item_id=item["id"], output_index=index,
                          content_index=0, text=text, logprobs=[]),
                    event("response.content_part.done", item_id=item["id"], output_index=index,
                          content_index=0, part=part),
                    event("response.output_item.done", output_index=index, item=item)]

        def start(kind: str) -> list[str]:
            if kind == "reasoning_content":
                ids["reasoning"] = random_id("rs")
                item = {"type": "reasoning", "id": ids["reasoning"], "summary": [],
                        "status": "in_progress", "content": []}
                return [event("response.output_item.added", output_index=index, item=item)]
            ids["content"] = random_id("msg")
            item = {"type": "message", "id": ids["content"], "status": "in_progress",
                    "role": "assistant", "content": []}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            return [event("response.output_item.added", output_index=index, item=item),
                    event("response.content_part.added", item_id=ids["content"],
                          output_index=index, content_index=0, part=part)]

        final = parsed = None
        try:
            async for final in outputs:
                o = final.outputs[0]
                deltas, got = state.deltas(o.text, o.finish_reason is not None)
                parsed = got or parsed
                for delta in deltas:
                    for kind in ("reasoning_content", "content"):
                        if kind not in delta:
                            continue
                        if kind != open_kind:
                            if open_kind is not None:
                                for e in close(open_kind):
                                    yield e
                            open_kind, index = kind, index + 1
                            for e in start(kind):
                                yield e
                        texts[kind] += delta[kind]
                        name = ("response.reasoning_text.delta" if kind == "reasoning_content"
                                else "response.output_text.delta")
                        item_id = ids["reasoning" if kind == "reasoning_content" else "content"]
                        yield event(name, item_id=item_id, output_index=index, content_index=0,
                                    delta=delta[kind], **({} if kind == "reasoning_content"
                                                          else {"logprobs": []}))
        except OpenAIError as exc:
            yield event("error", message=exc.message, code=exc.code, param=exc.param)
            return
        if open_kind is not None:
            for e in close(open_kind):
                yield e
        if parsed is None:  # the outputs ended unfinished (not expected): parse what came
            parsed = finalize(prefix + (final.outputs[0].text if final else ""), mode,
                              parse_tools)
        items = self._items(parsed, ids)
        if open_kind is None and not parsed["tool_calls"]:  # nothing was said: an empty message
            index += 1
            for e in start("content") + close("content"):
                yield e
        for item in (i for i in items if i["type"] == "function_call"):
            index += 1
            yield event("response.output_item.added", output_index=index,
                        item=dict(item, status="in_progress", arguments=""))
            yield event("response.function_call_arguments.delta", item_id=item["id"],
                        output_index=index, delta=item["arguments"])
            yield event("response.function_call_arguments.done", item_id=item["id"],
                        output_index=index, arguments=item["arguments"])
            yield event("response.output_item.done", output_index=index, item=item)
        done = self._finish(shell, final, items)
        keep(done)
        yield event("response.completed" if done["status"] == "completed"
                    else "response.incomplete", response=done)
