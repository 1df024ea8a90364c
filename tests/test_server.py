"""The OpenAI-compatible server, over real HTTP on loopback, against the tiny model.

Servers run in-process (uvicorn on a background thread, port chosen by the OS); the SIGTERM
test starts ``python -m dsv4.cli serve`` as a subprocess. "Alone" references come from a
second ``LLMEngine`` with the same seed (hence the same weights) running one request at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from dsv4.chat import (
    EOS,
    INVOKE_END,
    INVOKE_START,
    PARAMETER_END,
    PARAMETER_START,
    TOOL_CALLS_END,
    TOOL_CALLS_START,
    encode_messages,
)
from dsv4.engine.llm_engine import LLMEngine
from dsv4.engine.sampler import SamplingParams
from dsv4.server.api_server import build_app
from dsv4.server.protocol import ChatCompletionRequest
from dsv4.server.serving_chat import _ChoiceStream, finalize, forced_prefix

API_KEY = "test-key"
MODEL = "tiny"
ENGINE_ARGS = dict(dtype="float32", device="cpu", max_num_seqs=16, cpu_cache_bytes=32 << 20)


# --------------------------------------------------------------------------- harness


@dataclasses.dataclass
class Server:
    base_url: str  # http://127.0.0.1:PORT
    app: Any

    def client(self, **kw: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url + "/v1", api_key=API_KEY, max_retries=0, **kw)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base_url + "/v1", api_key=API_KEY, max_retries=0)

    def post(self, path: str, body: Any, key: str | None = API_KEY, timeout: float = 30) -> httpx.Response:
        headers = {"Content-Type": "application/json"}
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        content = body if isinstance(body, (str, bytes)) else json.dumps(body)
        return httpx.post(self.base_url + path, content=content, headers=headers, timeout=timeout)

    def metrics(self) -> dict[tuple[str, tuple], float]:
        text = httpx.get(self.base_url + "/metrics", timeout=10).text
        # keyed without the model_name label (`test_health_and_metrics_need_no_api_key`)
        return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))):
                s.value for fam in text_string_to_metric_families(text) for s in fam.samples}

    def wait_idle(self, timeout: float = 10.0) -> dict[tuple[str, tuple], float]:
        """Metrics once nothing runs or waits and every KV block is free (aborts are async)."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            idle = (m[("dsv4:num_requests_running", ())] == 0
                    and m[("dsv4:num_requests_waiting", ())] == 0
                    and m[("dsv4:kv_cache_free_blocks", ())] == m[("dsv4:kv_cache_blocks", ())])
            if idle or time.monotonic() > deadline:
                return m
            time.sleep(0.05)


@contextlib.contextmanager
def serve(engine: Any, api_key: str | None = API_KEY) -> Iterator[Server]:
    app = build_app(engine, MODEL, api_key)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield Server(f"http://127.0.0.1:{port}", app)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with serve(LLMEngine.from_args(MODEL, **ENGINE_ARGS)) as s:
        yield s


@pytest.fixture(scope="module")
def reference() -> LLMEngine:
    return LLMEngine.from_args(MODEL, **ENGINE_ARGS)


def run_alone(engine: LLMEngine, prompt_ids: list[int], **params: Any) -> Any:
    """The final RequestOutput of one greedy request with nothing else in the engine."""
    engine.add_request("ref", prompt_ids, SamplingParams(temperature=0.0, **params))
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            final = out
    return final


def chat_prompt_ids(engine: LLMEngine, messages: list[dict], mode: str = "chat") -> list[int]:
    return engine.tokenizer.encode(encode_messages(messages, mode), add_special_tokens=True)


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# --------------------------------------------------------------------------- openai client


def test_list_models_names_the_served_model(server: Server) -> None:
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_completion_equals_the_engine_alone_with_its_usage(server: Server, reference: LLMEngine) -> None:
    r = server.client().completions.create(model=MODEL, prompt="The weather in Beijing",
                                           max_tokens=8, temperature=0)
    prompt_ids = reference.tokenizer.encode("The weather in Beijing", add_special_tokens=True)
    ref = run_alone(reference, prompt_ids, max_tokens=8)
    assert r.choices[0].text == ref.outputs[0].text
    assert r.choices[0].finish_reason == ref.outputs[0].finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == \
        (len(prompt_ids), len(ref.outputs[0].token_ids), len(prompt_ids) + len(ref.outputs[0].token_ids))


def test_completion_logit_bias_equals_the_engine_alone(server: Server, reference: LLMEngine) -> None:
    """OpenAI's logit_bias (token id strings -> biases) reaches the sampler: +100 on one token
    makes greedy decoding repeat it."""
    bias = {"300": 100, "301": -100}
    r = server.client().completions.create(model=MODEL, prompt="The weather in Beijing",
                                           max_tokens=4, temperature=0, logit_bias=bias)
    prompt_ids = reference.tokenizer.encode("The weather in Beijing", add_special_tokens=True)
    ref = run_alone(reference, prompt_ids, max_tokens=4, logit_bias=bias)
    assert ref.outputs[0].token_ids == [300] * 4
    assert r.choices[0].text == ref.outputs[0].text


def test_completion_echo_returns_the_prompt_and_its_logprobs(server: Server,
                                                            reference: LLMEngine) -> None:
    """`echo` (as lm-evaluation-harness scores prompts: echo, logprobs, max_tokens 1): the
    prompt leads the text; its tokens' logprobs are the engine's prompt logprobs, None for the
    first; offsets run over the whole text; streamed = not streamed; token-id prompts too."""
    prompt = "The weather in Beijing"
    ids = reference.tokenizer.encode(prompt, add_special_tokens=True)
    ref = run_alone(reference, ids, max_tokens=1, logprobs=2, prompt_logprobs=2)
    c = server.client()
    r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0, echo=True,
                             logprobs=2)
    choice = r.choices[0]
    assert choice.text == prompt + ref.outputs[0].text
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None
    assert lp.top_logprobs[0] is None and len(lp.top_logprobs[1]) == 2
    want = [ref.prompt_logprobs[j][t].logprob for j, t in enumerate(ids) if j] + \
        [ref.outputs[0].logprobs[0][ref.outputs[0].token_ids[0]].logprob]
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-5)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    streamed = list(c.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0,
                                         echo=True, logprobs=2, stream=True))
    assert "".join(ch.choices[0].text for ch in streamed) == choice.text
    assert [t for ch in streamed if ch.choices[0].logprobs
            for t in ch.choices[0].logprobs.tokens] == lp.tokens
    plain = c.completions.create(model=MODEL, prompt=ids, max_tokens=3, temperature=0, echo=True)
    assert plain.choices[0].text == reference.tokenizer.decode(ids) + \
        run_alone(reference, ids, max_tokens=3).outputs[0].text


def test_chat_prefix_completion_continues_the_final_assistant_message(
        server: Server, reference: LLMEngine) -> None:
    """DeepSeek's chat prefix completion (`"prefix": true` on a final assistant message) and
    vLLM's `continue_final_message`: the prompt is the conversation before it, then its text;
    the answer is the continuation alone. Thinking mode and a forced tool call are refused."""
    head = user("Write a haiku")
    messages = head + [{"role": "assistant", "content": "Autumn", "prefix": True}]
    ids = reference.tokenizer.encode(encode_messages(head, "chat") + "Autumn",
                                     add_special_tokens=True)
    ref = run_alone(reference, ids, max_tokens=6)
    for body in ({"messages": messages},
                 {"messages": head + [{"role": "assistant", "content": "Autumn"}],
                  "continue_final_message": True}):
        r = server.post("/v1/chat/completions", {**body, "max_tokens": 6, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == ref.outputs[0].text
        assert r.json()["usage"]["prompt_tokens"] == len(ids)
    for body, needle in (({"messages": messages, "reasoning_effort": "high"}, "chat mode"),
                         ({"messages": head, "continue_final_message": True}, "final assistant")):
        bad = server.post("/v1/chat/completions", {**body, "max_tokens": 2})
        assert bad.status_code == 400 and needle in bad.json()["error"]["message"], bad.text


def test_truncate_prompt_tokens_counts_the_kept_tokens(server: Server, reference: LLMEngine) -> None:
    r = server.post("/v1/completions", {"prompt": "The weather in Beijing today", "max_tokens": 3,
                                        "temperature": 0, "truncate_prompt_tokens": 4})
    ids = reference.tokenizer.encode("The weather in Beijing today", add_special_tokens=True)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 4
    assert r.json()["choices"][0]["text"] == run_alone(reference, ids[-4:], max_tokens=3).outputs[0].text
    chat = server.post("/v1/chat/completions", {**GOOD_CHAT, "truncate_prompt_tokens": 3})
    assert chat.status_code == 200 and chat.json()["usage"]["prompt_tokens"] == 3


def test_unknown_request_fields_are_ignored_with_a_warning(server: Server, caplog) -> None:
    body = {**GOOD_CHAT, "spaces_between_special_tokens": False, "user": "me"}
    with caplog.at_level("WARNING", logger="dsv4.server.protocol"):
        assert server.post("/v1/chat/completions", body).status_code == 200
    assert "spaces_between_special_tokens" in caplog.text and "user" not in caplog.text


def test_tokenize_and_detokenize_use_the_served_tokenizer_and_chat_encoding(
        server: Server, reference: LLMEngine) -> None:
    """vLLM's /tokenize (a prompt, or chat messages encoded as a chat completion would be) and
    /detokenize; bad bodies get OpenAI-shaped 400s, an unknown model a 404."""
    r = server.post("/tokenize", {"model": MODEL, "prompt": "The weather in Beijing"})
    ids = reference.tokenizer.encode("The weather in Beijing", add_special_tokens=True)
    assert r.status_code == 200 and r.json() == {
        "count": len(ids), "max_model_len": server.app.state.engine.max_model_len, "tokens": ids}
    bare = server.post("/tokenize", {"prompt": "The weather", "add_special_tokens": False}).json()
    assert bare["tokens"] == reference.tokenizer.encode("The weather", add_special_tokens=False)
    messages = user("Hello!")
    for kwargs, mode in (({}, "chat"), ({"chat_template_kwargs": {"thinking": True}}, "thinking")):
        chat = server.post("/tokenize", {"messages": messages, **kwargs}).json()
        assert chat["tokens"] == chat_prompt_ids(reference, messages, mode)
    text = server.post("/detokenize", {"model": MODEL, "tokens": ids}).json()["prompt"]
    assert text == reference.tokenizer.decode(ids)
    for path, body, status, needle in (
            ("/tokenize", {"prompt": "x", "messages": messages}, 400, "exactly one"),
            ("/tokenize", {}, 400, "exactly one"),
            ("/detokenize", {"tokens": [1, 10 ** 9]}, 400, "vocabulary"),
            ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
            ("/tokenize", {"model": "gpt-5", "prompt": "x"}, 404, "gpt-5")):
        bad = server.post(path, body)
        assert bad.status_code == status and needle in bad.json()["error"]["message"], bad.text


def test_chat_completion_equals_the_engine_alone_with_its_usage(server: Server, reference: LLMEngine) -> None:
    messages = [{"role": "system", "content": "You are a helpful assistant."}, *user("Hello!")]
    r = server.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=10,
                                                temperature=0)
    prompt_ids = chat_prompt_ids(reference, messages)
    ref = run_alone(reference, prompt_ids, max_tokens=10, skip_special_tokens=False)
    expected = finalize(ref.outputs[0].text, "chat", parse_tools=False)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected["content"]
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.completion_tokens == len(ref.outputs[0].token_ids)


@pytest.mark.parametrize("thinking", [False, True], ids=["chat", "thinking"])
def test_streamed_chat_equals_non_streamed_chat(server: Server, thinking: bool) -> None:
    client = server.client()
    extra = {"chat_template_kwargs": {"thinking": True}} if thinking else {}
    kw = dict(model=MODEL, messages=user("What is the capital of France?"), max_tokens=12,
              temperature=0, extra_body=extra)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True,
                                                 stream_options={"include_usage": True}))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or ""
                        for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert content == (full.choices[0].message.content or "")
    assert reasoning == (full.choices[0].message.reasoning_content or "")
    assert (full.choices[0].message.reasoning_content is not None) == thinking
    assert finish == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage


def test_continuous_usage_stats_count_the_tokens_so_far_in_every_chunk(server: Server) -> None:
    """vLLM's `stream_options.continuous_usage_stats`: each chunk's usage has the prompt and
    the tokens generated up to it; the last content chunk's equals the final usage."""
    client = server.client()
    opts = {"include_usage": True, "continuous_usage_stats": True}
    chat = list(client.chat.completions.create(model=MODEL, messages=user("Hi"), max_tokens=8,
                                               temperature=0, stream=True, stream_options=opts))
    text = list(client.completions.create(model=MODEL, prompt="Hello", max_tokens=8,
                                          temperature=0, stream=True, stream_options=opts))
    for chunks in (chat, text):
        final = chunks[-1].usage
        assert chunks[-1].choices == [] and final.completion_tokens == 8
        counts = [c.usage.completion_tokens for c in chunks[:-1]]
        assert all(c.usage.prompt_tokens == final.prompt_tokens for c in chunks[:-1])
        assert counts == sorted(counts) and counts[-1] == 8 and counts[0] < 8
    plain = list(client.completions.create(model=MODEL, prompt="Hello", max_tokens=4,
                                           stream=True, stream_options={"include_usage": True}))
    assert all(c.usage is None for c in plain[:-1]) and plain[-1].usage.completion_tokens == 4


def test_reasoning_effort_switches_on_thinking_mode(server: Server, reference: LLMEngine) -> None:
    r = server.client().chat.completions.create(model=MODEL, messages=user("Hi"), max_tokens=6,
                                                temperature=0, reasoning_effort="high")
    ref = run_alone(reference, chat_prompt_ids(reference, user("Hi"), "thinking"), max_tokens=6,
                    skip_special_tokens=False)
    expected = finalize(ref.outputs[0].text, "thinking", parse_tools=False)
    assert r.choices[0].message.reasoning_content == expected["reasoning_content"]
    assert r.usage.prompt_tokens == len(chat_prompt_ids(reference, user("Hi"), "thinking"))


def test_completion_batch_numbers_choices_prompt_major(server: Server) -> None:
    r = server.client().completions.create(model=MODEL, prompt=[[5, 6, 7], [9, 10]], max_tokens=3,
                                           n=2, temperature=0.8, seed=1)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 12


# --------------------------------------------------------------------------- tool calls

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "days": {"type": "integer"}}}}}

DSML_COMPLETION = (
    "Let me check.\n\n" + TOOL_CALLS_START + "\n"
    + INVOKE_START + ' name="get_weather">\n'
    + PARAMETER_START + ' name="city" string="true">Beijing' + PARAMETER_END + "\n"
    + PARAMETER_START + ' name="days" string="false">3' + PARAMETER_END + "\n"
    + INVOKE_END + "\n" + TOOL_CALLS_END + EOS)


class ScriptedText:
    """The real engine, except that each completion's text is ``script``, revealed 9 characters
    per generated token and in full when the engine finishes it (as a model emitting DSML would).

    The tiny model does not write DSML; this drives the server's parser end to end instead.
    """

    def __init__(self, engine: LLMEngine, script: str) -> None:
        self._engine, self._script = engine, script
        self._shown: dict[tuple[str, int], int] = {}  # DELTA outputs: tokens handed out so far
        self._delta: dict[str, bool] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def step(self) -> list[Any]:
        from dsv4 import RequestOutputKind
        outs = []
        for out in self._engine.step():
            req = self._engine.requests.get(out.request_id)  # None once finished
            if req is not None:
                self._delta[out.request_id] = req.params.output_kind == RequestOutputKind.DELTA
            delta = self._delta.get(out.request_id, False)
            completions = []
            for c in out.outputs:
                key = (out.request_id, c.index)
                before = self._shown.get(key, 0) if delta else 0
                self._shown[key] = before + len(c.token_ids)
                end = None if c.finish_reason else 9 * (before + len(c.token_ids))
                completions.append(dataclasses.replace(
                    c, text=self._script[9 * before:end],
                    finish_reason="stop" if c.finish_reason else None))
            outs.append(dataclasses.replace(out, outputs=completions))
        return outs


@pytest.fixture(scope="module")
def tool_server() -> Iterator[Server]:
    engine = ScriptedText(LLMEngine.from_args(MODEL, **ENGINE_ARGS), DSML_COMPLETION)
    with serve(engine) as s:
        yield s


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_dsml_completion_becomes_tool_calls(tool_server: Server, stream: bool) -> None:
    kw = dict(model=MODEL, messages=user("Weather in Beijing?"), tools=[WEATHER_TOOL],
              max_tokens=8, temperature=0)
    client = tool_server.client()
    if stream:
        chunks = [c for c in client.chat.completions.create(**kw, stream=True) if c.choices]
        content = "".join(c.choices[0].delta.content or "" for c in chunks)
        calls = [t for c in chunks for t in (c.choices[0].delta.tool_calls or [])]
        finish = chunks[-1].choices[0].finish_reason
    else:
        message = client.chat.completions.create(**kw).choices[0]
        content, calls, finish = message.message.content, message.message.tool_calls, message.finish_reason
    assert content == "Let me check."
    assert finish == "tool_calls"
    assert len(calls) == 1 and calls[0].type == "function" and calls[0].id.startswith("call_")
    assert calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Beijing", "days": 3}


def test_tool_result_round_trip_is_encoded_into_the_next_prompt(tool_server: Server) -> None:
    client = tool_server.client()
    messages = user("Weather in Beijing?")
    first = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL],
                                           max_tokens=8, temperature=0).choices[0].message
    call = first.tool_calls[0]
    messages = [*messages,
                {"role": "assistant", "content": first.content,
                 "tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 22}'}]
    second = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL],
                                            max_tokens=8, temperature=0)
    prompt = encode_messages(messages, "chat", tools=[WEATHER_TOOL])
    assert '<tool_result>{"temp": 22}</tool_result>' in prompt
    assert TOOL_CALLS_START in prompt.split("Weather in Beijing?")[-1]
    tok = tool_server.app.state.engine.tokenizer
    assert second.usage.prompt_tokens == len(tok.encode(prompt, add_special_tokens=True))


def test_tool_choice_none_keeps_dsml_as_content(tool_server: Server) -> None:
    r = tool_server.client().chat.completions.create(
        model=MODEL, messages=user("Weather?"), tools=[WEATHER_TOOL], tool_choice="none",
        max_tokens=8, temperature=0)
    assert r.choices[0].message.tool_calls in (None, [])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == DSML_COMPLETION.removesuffix(EOS)


def test_stream_parser_emits_content_then_tool_calls_for_any_split() -> None:
    for size in (1, 2, 5, 13):
        state = _ChoiceStream("", "chat", parse_tools=True)
        deltas: list[dict] = []
        for end in range(size, len(DSML_COMPLETION) + size, size):
            out, final = state.deltas(DSML_COMPLETION[:end], end >= len(DSML_COMPLETION))
            deltas += out
        assert "".join(d.get("content", "") for d in deltas) == "Let me check.", size
        calls = [call for d in deltas for call in d.get("tool_calls", [])]
        assert [c["function"]["name"] for c in calls] == ["get_weather"], size
        assert final["tool_calls"], size


def test_named_tool_choice_forces_the_opening_of_that_call() -> None:
    req = ChatCompletionRequest(messages=user("x"), tools=[WEATHER_TOOL],
                                tool_choice={"type": "function", "function": {"name": "get_weather"}})
    prefix = forced_prefix(req, "chat")
    assert prefix == f'\n\n{TOOL_CALLS_START}\n{INVOKE_START} name="get_weather">\n'
    rest = DSML_COMPLETION.split('name="get_weather">\n', 1)[1]
    assert finalize(prefix + rest, "chat", True)["tool_calls"][0]["function"]["name"] == "get_weather"


# --------------------------------------------------------------------------- errors

GOOD_CHAT = {"model": MODEL, "messages": user("Hi"), "max_tokens": 2}


def _error_cases(max_model_len: int) -> list[tuple[str, Any, str | None, int, str]]:
    """(name, body, key, status, text the message must contain)."""
    return [
        ("malformed json", '{"model": "tiny", "messages": [', API_KEY, 400, "JSON"),
        ("missing messages", {"model": MODEL}, API_KEY, 400, "messages"),
        ("messages not a list", {"model": MODEL, "messages": "hi"}, API_KEY, 400, "messages"),
        ("bad role", {**GOOD_CHAT, "messages": [{"role": "robot", "content": "x"}]}, API_KEY, 400, "role"),
        ("bad top_p", {**GOOD_CHAT, "top_p": 1.5}, API_KEY, 400, "top_p"),
        ("bad logit_bias", {**GOOD_CHAT, "logit_bias": {"5": 500}}, API_KEY, 400, "logit_bias"),
        ("unknown response_format", {**GOOD_CHAT, "response_format": {"type": "xml"}}, API_KEY,
         400, "response_format type must be text, json_object or json_schema"),
        ("json_schema without a schema", {**GOOD_CHAT, "response_format": {
            "type": "json_schema", "json_schema": {"name": "x"}}}, API_KEY, 400,
         "json_schema.schema"),
        ("a regex that does not compile", {**GOOD_CHAT, "guided_regex": "a(b"}, API_KEY, 400,
         "unclosed group"),
        ("two structured formats", {**GOOD_CHAT, "guided_choice": ["a"], "guided_regex": "a"},
         API_KEY, 400, "at most one of"),
        ("an unknown structured_outputs key", {**GOOD_CHAT, "structured_outputs": {"xml": 1}},
         API_KEY, 400, "xml"),
        ("logit_bias past the vocabulary", {**GOOD_CHAT, "logit_bias": {"99999999": 1}}, API_KEY,
         400, "logit_bias"),
        ("unknown model", {**GOOD_CHAT, "model": "gpt-5"}, API_KEY, 404, "gpt-5"),
        ("over the context", {**GOOD_CHAT, "max_tokens": max_model_len}, API_KEY, 400,
         str(max_model_len)),
        ("missing api key", GOOD_CHAT, None, 401, "API key"),
        ("wrong api key", GOOD_CHAT, "not-the-key", 401, "API key"),
    ]


def test_each_bad_request_gets_its_status_and_an_openai_error_body(server: Server) -> None:
    max_model_len = server.app.state.engine.max_model_len
    prompt_len = len(chat_prompt_ids(server.app.state.engine.engine, GOOD_CHAT["messages"]))
    for name, body, key, status, needle in _error_cases(max_model_len):
        r = server.post("/v1/chat/completions", body, key=key)
        assert r.status_code == status, (name, r.status_code, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, (name, error)
        assert needle in error["message"], (name, error["message"])
        if name == "over the context":  # both numbers of the request
            assert str(prompt_len) in error["message"] and str(prompt_len + max_model_len) in error["message"]
    ok = server.post("/v1/chat/completions", GOOD_CHAT)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["role"] == "assistant"


def test_openai_client_raises_the_matching_exceptions(server: Server) -> None:
    with pytest.raises(openai.NotFoundError):
        server.client().chat.completions.create(model="nope", messages=user("x"))
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url + "/v1", api_key="bad", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError):
        server.client().completions.create(model=MODEL, prompt="x", max_tokens=10**6)


def test_health_and_metrics_need_no_api_key(server: Server) -> None:
    assert httpx.get(server.base_url + "/health").status_code == 200
    server.client().completions.create(model=MODEL, prompt="Hi", max_tokens=3, temperature=0)
    m = server.metrics()
    for name in ("dsv4:time_to_first_token_seconds_count", "dsv4:time_per_output_token_seconds_count",
                 "dsv4:e2e_request_latency_seconds_count", "dsv4:request_queue_time_seconds_count",
                 "dsv4:request_prefill_time_seconds_count",
                 "dsv4:request_decode_time_seconds_count", "dsv4:request_prompt_tokens_count",
                 "dsv4:request_generation_tokens_count"):
        assert m[(name, ())] >= 1, name
    assert m[("dsv4:request_generation_tokens_sum", ())] >= 3
    assert m[("dsv4:prompt_tokens_total", ())] > 0 and m[("dsv4:generation_tokens_total", ())] >= 3
    assert 0 <= m[("dsv4:kv_cache_usage_perc", ())] <= 1
    assert m[("dsv4:triton_compiles_total", ())] == 0  # CPU: nothing compiles
    assert m[("dsv4:triton_compile_seconds_total", ())] == 0
    ok = m[("dsv4:http_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))]
    assert ok >= 1
    # every generation metric carries vLLM's model_name label: the served name
    text = httpx.get(server.base_url + "/metrics", timeout=10).text
    labels = {s.name: s.labels.get("model_name") for fam in text_string_to_metric_families(text)
              for s in fam.samples if not s.name.startswith("dsv4:http_requests")}
    assert len(labels) > 20 and set(labels.values()) == {MODEL}, labels


def test_metrics_count_requests_by_status(server: Server) -> None:
    key = ("dsv4:http_requests_total", (("endpoint", "/v1/chat/completions"), ("status", "401")))
    before = server.metrics().get(key, 0)
    server.post("/v1/chat/completions", GOOD_CHAT, key=None)
    assert server.metrics()[key] == before + 1


# --------------------------------------------------------------------------- load and cancel


def test_32_concurrent_streams_equal_each_prompt_alone_and_free_the_cache(
        server: Server, reference: LLMEngine) -> None:
    prompts = [f"Request {i}: " + "tell me about the fox " * (i % 5) for i in range(32)]

    async def one(client: openai.AsyncOpenAI, prompt: str) -> tuple[str, int, str]:
        stream = await client.chat.completions.create(
            model=MODEL, messages=user(prompt), max_tokens=10, temperature=0, stream=True,
            stream_options={"include_usage": True})
        text, usage, finish = "", None, None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            else:
                usage = chunk.usage
        return text, usage.completion_tokens, finish

    async def all_streams() -> list[tuple[str, int, str]]:
        client = server.async_client()
        try:
            return await asyncio.gather(*(one(client, p) for p in prompts))
        finally:
            await client.close()

    results = asyncio.run(all_streams())
    for prompt, (text, n_tokens, finish) in zip(prompts, results):
        ref = run_alone(reference, chat_prompt_ids(reference, user(prompt)), max_tokens=10,
                        skip_special_tokens=False)
        out = ref.outputs[0]
        assert text == finalize(out.text, "chat", False)["content"], prompt
        assert (n_tokens, finish) == (len(out.token_ids), out.finish_reason), prompt
    m = server.wait_idle()
    assert m[("dsv4:kv_cache_free_blocks", ())] == m[("dsv4:kv_cache_blocks", ())]
    assert m[("dsv4:num_requests_running", ())] == 0 and m[("dsv4:num_requests_waiting", ())] == 0


def _aborts(server: Server) -> float:
    return server.metrics().get(("dsv4:request_success_total", (("finished_reason", "abort"),)), 0)


def test_client_killed_mid_stream_frees_its_blocks(server: Server) -> None:
    aborts, generated = _aborts(server), server.metrics()[("dsv4:generation_tokens_total", ())]
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 3000, "ignore_eos": True,
            "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=30) as client:
        with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            for _ in range(3):
                assert next(lines).startswith("data: ")
                next(lines)  # blank separator
            assert server.metrics()[("dsv4:num_requests_running", ())] == 1
    # The connection is closed here, long before 3000 tokens.
    m = server.wait_idle()
    assert m[("dsv4:kv_cache_free_blocks", ())] == m[("dsv4:kv_cache_blocks", ())]
    assert m[("dsv4:num_requests_running", ())] == 0
    assert _aborts(server) == aborts + 1
    assert m[("dsv4:generation_tokens_total", ())] - generated < 3000


def test_client_gone_during_a_non_streamed_request_frees_its_blocks(server: Server) -> None:
    aborts = _aborts(server)
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 3000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        server.post("/v1/completions", body, timeout=0.5)
    m = server.wait_idle()
    assert m[("dsv4:kv_cache_free_blocks", ())] == m[("dsv4:kv_cache_blocks", ())]
    assert _aborts(server) == aborts + 1


# --------------------------------------------------------------------------- shutdown


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_finishes_in_flight_requests_and_exits_0() -> None:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dsv4.cli", "serve", "--model", MODEL, "--dtype", "float32", "--device", "cpu",
         "--port", str(port), "--max-num-seqs", "4", "--cpu-cache-bytes", str(16 << 20)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "server did not come up"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.1)
        body = {"model": MODEL, "prompt": "Hello", "max_tokens": 200, "ignore_eos": True,
                "stream": True}
        chunks: list[str] = []
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            chunks.append(next(lines))
            proc.send_signal(signal.SIGTERM)
            chunks += [line for line in lines if line]
        assert chunks[-1] == "data: [DONE]"
        finish = json.loads(chunks[-2][len("data: "):])["choices"][0]["finish_reason"]
        assert finish == "length"  # the in-flight request ran to its end
        assert proc.wait(timeout=30) == 0, proc.stdout.read()
        with pytest.raises(httpx.TransportError):
            httpx.get(base + "/health", timeout=1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_speculative_decoding_metrics_are_exported() -> None:
    """With --speculative-tokens, /metrics carries the acceptance rate per draft position and
    the mean accepted length, and the output is the non-speculative greedy output."""
    plain = LLMEngine.from_args(MODEL, **ENGINE_ARGS)
    with serve(LLMEngine.from_args(MODEL, speculative_tokens=2, **ENGINE_ARGS)) as s:
        out = s.client().completions.create(model=MODEL, prompt="Hello there", max_tokens=8,
                                            temperature=0)
        m = s.metrics()
    ids = plain.tokenizer.encode("Hello there", add_special_tokens=True)
    assert out.choices[0].text == run_alone(plain, ids, max_tokens=8).outputs[0].text
    for j in ("0", "1"):
        assert 0 <= m[("dsv4:spec_decode_acceptance_rate", (("position", j),))] <= 1
    assert m[("dsv4:spec_decode_mean_accepted_length", ())] >= 1
    assert m[("dsv4:spec_decode_num_drafts_total", ())] > 0


def test_prefix_cached_prompts_report_cached_tokens_in_usage_and_metrics() -> None:
    """`--enable-prefix-caching`: the second identical chat resumes from the cache; its usage
    says how many prompt tokens did, and so do the Prometheus counters."""
    with serve(LLMEngine.from_args(MODEL, enable_prefix_caching=True, **ENGINE_ARGS)) as s:
        body = {"model": MODEL, "max_tokens": 4, "temperature": 0,
                "messages": [{"role": "user", "content": "Tell me about caches. " * 30}]}
        first = s.post("/v1/chat/completions", body).json()
        second = s.post("/v1/chat/completions", body).json()
        assert "prompt_tokens_details" not in first["usage"]
        cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached > 0 and cached % 128 == 0 and cached < second["usage"]["prompt_tokens"]
        assert second["choices"][0]["message"] == first["choices"][0]["message"]
        m = s.wait_idle()
        assert m[("dsv4:prefix_cache_hits_total", ())] == cached
        assert m[("dsv4:prefix_cache_queries_total", ())] == 2 * second["usage"]["prompt_tokens"]


# --------------------------------------------------------------------------- structured outputs

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


def test_response_format_json_schema_gives_json_that_fits_the_schema(server: Server) -> None:
    """The random tiny model writes garbage, yet the content parses and fits the schema."""
    client = server.client()
    for seed in (1, 2):
        r = client.chat.completions.create(
            model=MODEL, messages=user("A person, as JSON"), max_tokens=200, seed=seed,
            temperature=1.0, response_format={"type": "json_schema", "json_schema": {
                "name": "person", "schema": PERSON, "strict": True}})
        choice = r.choices[0]
        assert choice.finish_reason == "stop", choice
        value = json.loads(choice.message.content)
        assert set(value) == {"name", "age"} and isinstance(value["age"], int)
        assert isinstance(value["name"], str) and len(value["name"]) <= 12
    r = client.chat.completions.create(model=MODEL, messages=user("Anything"), max_tokens=200,
                                       seed=3, temperature=1.0,
                                       response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_completions_take_vllms_guided_fields_and_structured_outputs(server: Server) -> None:
    client = server.client()
    r = client.completions.create(model=MODEL, prompt="Pick one:", max_tokens=10, n=3, seed=4,
                                  temperature=1.0, extra_body={"guided_choice": ["red", "blue"]})
    assert {c.text for c in r.choices} <= {"red", "blue"}
    r = client.completions.create(model=MODEL, prompt="A date:", max_tokens=20, seed=5,
                                  temperature=1.0,
                                  extra_body={"structured_outputs": {"regex": "[0-9]{4}-[0-9]{2}"}})
    assert re.fullmatch("[0-9]{4}-[0-9]{2}", r.choices[0].text), r.choices[0].text


def test_thinking_mode_constrains_only_the_answer(server: Server) -> None:
    """With thinking on, the grammar starts after </think>: the reasoning is free text (here
    empty: a logit bias makes </think> the first token) and the content fits the schema."""
    tok = server.app.state.engine.engine.tokenizer
    end = tok.token_to_id("</think>")
    r = server.client().chat.completions.create(
        model=MODEL, messages=user("A person"), max_tokens=200, seed=6, temperature=1.0,
        logit_bias={str(end): 100}, response_format={"type": "json_schema", "json_schema": {
            "name": "person", "schema": PERSON}},
        extra_body={"chat_template_kwargs": {"thinking": True}})
    message = r.choices[0].message
    assert set(json.loads(message.content)) == {"name", "age"}


FORECAST_TOOL = {"type": "function", "function": {
    "name": "forecast", "parameters": {
        "type": "object", "required": ["unit", "days"],
        "properties": {"unit": {"type": "string", "enum": ["C", "F"]},
                       "days": {"type": "integer", "minimum": 1, "maximum": 7}}}}}
CLOCK_TOOL = {"type": "function", "function": {
    "name": "clock", "parameters": {"type": "object", "properties": {}}}}


def _check_calls(calls, names) -> None:
    assert calls, "no tool call"
    for call in calls:
        args = json.loads(call.function.arguments)
        assert call.function.name in names, call
        if call.function.name == "forecast":
            assert args["unit"] in ("C", "F") and 1 <= args["days"] <= 7, args
        else:
            assert args == {}, args


def test_forced_tool_calls_are_well_formed_calls_of_the_offered_functions(server: Server) -> None:
    """tool_choice required / named: whatever the random weights prefer, the answer parses
    into calls of the offered functions with arguments that fit their schemas."""
    client = server.client()
    for seed in (1, 2, 3):
        r = client.chat.completions.create(
            model=MODEL, messages=user("Plan my week"), tools=[FORECAST_TOOL, CLOCK_TOOL],
            tool_choice="required", max_tokens=1000, temperature=1.0, seed=seed)
        # (random weights rarely pick the block's end over another call: up to ~20 calls)
        assert r.choices[0].finish_reason == "tool_calls", (seed, r.choices[0])
        _check_calls(r.choices[0].message.tool_calls, {"forecast", "clock"})
    r = client.chat.completions.create(
        model=MODEL, messages=user("Forecast"), tools=[FORECAST_TOOL, CLOCK_TOOL],
        tool_choice={"type": "function", "function": {"name": "forecast"}}, max_tokens=200,
        temperature=1.0, seed=4)
    calls = r.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["forecast"]
    _check_calls(calls, {"forecast"})
    r = client.chat.completions.create(
        model=MODEL, messages=user("One call"), tools=[FORECAST_TOOL, CLOCK_TOOL],
        tool_choice="required", parallel_tool_calls=False, max_tokens=200, temperature=1.0,
        seed=5)
    assert len(r.choices[0].message.tool_calls) == 1
    with pytest.raises(openai.BadRequestError, match="response_format cannot be combined"):
        client.chat.completions.create(
            model=MODEL, messages=user("x"), tools=[FORECAST_TOOL], tool_choice="required",
            response_format={"type": "json_object"}, max_tokens=5)
    out = client.responses.create(
        model=MODEL, input="Plan", max_output_tokens=1000, temperature=1.0,
        tools=[{"type": "function", **FORECAST_TOOL["function"]}],
        tool_choice={"type": "function", "name": "forecast"})  # one call: a bounded length
    assert [item.type for item in out.output] == ["function_call"]
    assert out.output[0].name == "forecast"
    assert json.loads(out.output[0].arguments)["unit"] in ("C", "F")


def test_tool_schemas_with_refs_compile_and_broken_ones_leave_calls_unconstrained() -> None:
    from dsv4.server.tool_grammar import tool_call_grammar
    from dsv4.tokenizer import Tokenizer
    tok = Tokenizer.tiny()
    refs = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "$defs": {"P": {"type": "object",
                                         "properties": {"x": {"type": "integer"}}}},
        "properties": {"p": {"$ref": "#/$defs/P"}}, "required": ["p"]}}}
    assert "$defs" in tool_call_grammar([refs], tok.token_to_id)
    broken = {"type": "function", "function": {"name": "g", "parameters": {
        "type": "object", "properties": {"p": {"$ref": "#/nowhere"}}}}}
    assert tool_call_grammar([broken], tok.token_to_id) is None  # the prompt's opening only
    assert tool_call_grammar([refs], lambda text: None) is None  # no DSML special tokens


def test_strict_tools_under_auto_hold_any_call_to_its_schema(server: Server) -> None:
    """`strict: true` on a function (OpenAI's guarantee): under `auto` the answer is free text
    or text then a tool-call block whose calls fit the offered schemas."""
    import llguidance as llg

    from dsv4.server.tool_grammar import tool_call_grammar
    from dsv4.tokenizer import Tokenizer
    tok = Tokenizer.tiny()
    strict = {"type": "function", "function": {**FORECAST_TOOL["function"], "strict": True}}
    grammar = tool_call_grammar([strict], tok.token_to_id, auto=True)
    llt = llg.LLTokenizer(tok.backend.to_str(), n_vocab=tok.vocab_size,
                          eos_token=tok.eos_token_id)

    def fits(text: str) -> bool:
        m = llg.LLMatcher(llt, llg.LLMatcher.grammar_from_lark(grammar), log_level=0)
        return m.consume_tokens(tok.encode(text)) and m.is_accepting()

    call = (f"Checking.\n\n{TOOL_CALLS_START}\n{INVOKE_START} name=\"forecast\">\n"
            f"{PARAMETER_START} name=\"unit\" string=\"true\">C{PARAMETER_END}\n"
            f"{PARAMETER_START} name=\"days\" string=\"false\">3{PARAMETER_END}\n"
            f"{INVOKE_END}\n{TOOL_CALLS_END}")
    assert fits("Just an answer.") and fits(call)
    assert not fits(call.replace(">3<", ">12<"))  # days out of its range
    assert not fits(call.replace('"unit" string="true">C', '"unit" string="true">K'))  # enum
    r = server.client().chat.completions.create(
        model=MODEL, messages=user("Weather?"), tools=[strict], max_tokens=40, seed=7,
        temperature=1.0)
    choice = r.choices[0]
    if choice.message.tool_calls:
        _check_calls(choice.message.tool_calls, {"forecast"})
    else:
        assert choice.finish_reason in ("stop", "length")


def test_version_ping_and_cors_as_vllm_serves_them(server: Server) -> None:
    """`/version`, `/ping` (GET and POST, SageMaker's health route) and CORS: preflights
    answered before the key check, every origin allowed by default."""
    assert httpx.get(server.base_url + "/version").json()["version"]
    assert httpx.get(server.base_url + "/ping").status_code == 200
    assert httpx.post(server.base_url + "/ping").status_code == 200
    pre = httpx.options(server.base_url + "/v1/chat/completions",
                        headers={"Origin": "http://ui.example", "Access-Control-Request-Method":
                                 "POST", "Access-Control-Request-Headers": "authorization"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "*"
    r = httpx.get(server.base_url + "/v1/models", headers={
        "Origin": "http://ui.example", "Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"


def test_cors_can_be_restricted_to_some_origins() -> None:
    from starlette.testclient import TestClient

    from dsv4.server.cli import add_serve_args

    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    args = parser.parse_args(["--allowed-origins", '["http://ok.example"]'])
    assert args.allowed_origins == ["http://ok.example"] and args.allowed_methods == ["*"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--allowed-origins", "http://ok.example"])  # not JSON
    app = build_app(LLMEngine.from_args(MODEL, **ENGINE_ARGS), MODEL, API_KEY,
                    {"allow_origins": args.allowed_origins})
    client = TestClient(app)  # no lifespan: the preflight never reaches the engine
    ask = {"Access-Control-Request-Method": "POST"}
    ok = client.options("/v1/completions", headers={"Origin": "http://ok.example", **ask})
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == "http://ok.example"
    bad = client.options("/v1/completions", headers={"Origin": "http://evil.example", **ask})
    assert bad.status_code == 400 and "access-control-allow-origin" not in bad.headers


def test_cache_salt_is_taken_and_checked(server: Server) -> None:
    ok = server.post("/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 2,
                                         "cache_salt": "tenant-1"})
    assert ok.status_code == 200, ok.text
    bad = server.post("/v1/chat/completions", {"model": MODEL, "messages": user("Hi"),
                                               "max_tokens": 2, "cache_salt": ""})
    assert bad.status_code == 400 and "cache_salt" in bad.json()["error"]["message"]


def test_several_served_names_are_aliases() -> None:
    """`--served-model-name a b`: requests may name either, responses and the model cards'
    root say the first, any other name is a 404."""
    from starlette.testclient import TestClient

    app = build_app(LLMEngine.from_args(MODEL, **ENGINE_ARGS), ["dsv4-a", "dsv4-b"])
    with TestClient(app) as client:
        cards = client.get("/v1/models").json()["data"]
        assert [c["id"] for c in cards] == ["dsv4-a", "dsv4-b"]
        assert {c["root"] for c in cards} == {"dsv4-a"}
        assert client.get("/v1/models/dsv4-b").json()["id"] == "dsv4-b"
        r = client.post("/v1/completions", json={"model": "dsv4-b", "prompt": "Hi",
                                                 "max_tokens": 2})
        assert r.status_code == 200 and r.json()["model"] == "dsv4-a"
        assert client.post("/v1/completions", json={"model": "other", "prompt": "Hi"}
                           ).status_code == 404


def test_priority_without_the_priority_policy_is_a_400(server: Server) -> None:
    r = server.post("/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 2,
                                        "priority": 3})
    assert r.status_code == 400 and "scheduling-policy priority" in r.json()["error"]["message"]
    assert server.post("/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 2,
                                           "priority": 0}).status_code == 200


def test_request_log_shows_the_prompt_ids_and_params(caplog) -> None:
    """`--enable-log-requests` (and `--max-log-len`): one INFO line a request, its prompt ids
    cut to the limit, and its sampling parameters."""
    import logging

    from starlette.testclient import TestClient

    app = build_app(LLMEngine.from_args(MODEL, **ENGINE_ARGS), MODEL, log_requests=True,
                    max_log_len=3)
    with TestClient(app) as client, caplog.at_level(logging.INFO, "dsv4.server.serving"):
        r = client.post("/v1/completions", json={"prompt": [11, 12, 13, 14, 15],
                                                 "max_tokens": 2, "temperature": 0.5})
        assert r.status_code == 200
    lines = [m for m in caplog.messages if m.startswith("request cmpl")]
    assert len(lines) == 1 and "5 prompt tokens [11, 12, 13] ..." in lines[0]
    assert "temperature=0.5" in lines[0] and "max_tokens=2" in lines[0]


def test_logprob_tokens_as_token_ids(server: Server) -> None:
    """vLLM's `return_tokens_as_token_ids`: the logprobs name tokens `token_id:N`, the
    sampled ones those the plain request's text came from."""
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 4, "temperature": 0,
            "logprobs": 2}
    plain = server.post("/v1/completions", body).json()["choices"][0]["logprobs"]
    ids = server.post("/v1/completions", {**body, "return_tokens_as_token_ids": True}
                      ).json()["choices"][0]["logprobs"]
    assert all(re.fullmatch(r"token_id:\d+", t) for t in ids["tokens"])
    assert ids["token_logprobs"] == plain["token_logprobs"]
    assert all(len(top) == 2 and all(k.startswith("token_id:") for k in top)
               for top in ids["top_logprobs"])
    chat = server.post("/v1/chat/completions", {
        "model": MODEL, "messages": user("Hi"), "max_tokens": 3, "logprobs": True,
        "top_logprobs": 1, "return_tokens_as_token_ids": True,
        "ignore_eos": True}).json()  # sampled: an early end of sequence would cut it short
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == 3 and all(c["token"].startswith("token_id:") for c in content)


def test_logprobs_above_max_logprobs_are_a_400_naming_the_limit(server: Server) -> None:
    """vLLM's --max-logprobs (20 by default, OpenAI's cap): more is a 400 that names it."""
    for path, body in (("/v1/chat/completions", {"messages": user("Hi"), "logprobs": True,
                                                 "top_logprobs": 21}),
                       ("/v1/completions", {"prompt": "Hi", "logprobs": 21})):
        bad = server.post(path, {"model": MODEL, "max_tokens": 2, **body})
        assert bad.status_code == 400 and "max_logprobs=20" in bad.json()["error"]["message"]
        ok = server.post(path, {"model": MODEL, "max_tokens": 2,
                                **{k: (20 if v == 21 else v) for k, v in body.items()}})
        assert ok.status_code == 200, ok.text
