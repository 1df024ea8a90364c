"""`POST /v1/responses` (OpenAI's Responses API) on the tiny model: the same prompt and
tokens as the chat completion it describes, the API's stream of events, structured outputs,
thinking mode, function-call history, and 400s for what is not supported."""
from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest

from dsv4.engine.llm_engine import LLMEngine
from dsv4.server.serving_responses import OpenAIServingResponses, _messages
from test_server import ENGINE_ARGS, MODEL, Server, serve, user


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with serve(LLMEngine.from_args(MODEL, **ENGINE_ARGS)) as s:
        yield s


def test_a_response_is_the_chat_completion_it_describes(server: Server) -> None:
    client = server.client()
    r = client.responses.create(model=MODEL, input="Hello there", instructions="Be brief.",
                                max_output_tokens=12, temperature=0)
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "Be brief."}] + user("Hello there"),
        max_tokens=12, temperature=0)
    assert r.object == "response" and r.id.startswith("resp-")
    assert [item.type for item in r.output] == ["message"]
    assert r.output_text == chat.choices[0].message.content
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert r.usage.output_tokens == chat.usage.completion_tokens
    assert r.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens"


def test_the_stream_sends_the_apis_events_and_the_same_text(server: Server) -> None:
    client = server.client()
    want = client.responses.create(model=MODEL, input="Stream me", max_output_tokens=16,
                                   temperature=0).output_text
    events = list(client.responses.create(model=MODEL, input="Stream me", max_output_tokens=16,
                                          temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", kinds[-1]]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == want == events[-1].response.output_text


def test_text_format_json_schema_is_structured_output(server: Server) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
              "required": ["city"], "additionalProperties": False}
    r = server.client().responses.create(
        model=MODEL, input="A city", max_output_tokens=60, temperature=1.0,
        text={"format": {"type": "json_schema", "name": "city", "schema": schema,
                         "strict": True}})
    assert set(json.loads(r.output_text)) == {"city"}


def test_reasoning_effort_gives_a_reasoning_item(server: Server) -> None:
    r = server.client().responses.create(model=MODEL, input="Think", max_output_tokens=10,
                                         temperature=0, reasoning={"effort": "high"})
    kinds = [item.type for item in r.output]
    assert kinds[0] == "reasoning", kinds
    assert r.usage.output_tokens_details.reasoning_tokens > 0
    events = list(server.client().responses.create(
        model=MODEL, input="Think", max_output_tokens=10, temperature=0,
        reasoning={"effort": "high"}, stream=True))
    done = [e.item.type for e in events if e.type == "response.output_item.done"]
    assert done == kinds  # the stream announces the items the response holds
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == (
        r.output[0].content[0].text)


def test_function_call_history_becomes_tool_messages(server: Server) -> None:
    items = [{"role": "user", "content": "Weather in Paris?"},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather",
              "arguments": '{"city": "Paris"}'},
             {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
             {"type": "reasoning", "id": "rs_1", "summary": []}]
    assert _messages(items) == [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    tools = [{"type": "function", "name": "get_weather", "description": "Weather of a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    client = server.client()
    r = client.responses.create(model=MODEL, input=items, tools=tools, max_output_tokens=8,
                                temperature=0)
    chat = client.chat.completions.create(
        model=MODEL, messages=_messages(items), max_tokens=8, temperature=0,
        tools=[{"type": "function", "function": {k: v for k, v in tools[0].items()
                                                 if k != "type"}}])
    assert r.usage.input_tokens == chat.usage.prompt_tokens


def test_parsed_tool_calls_become_function_call_items() -> None:
    parsed = {"reasoning_content": "", "content": "",
              "tool_calls": [{"id": "call_9", "type": "function",
                              "function": {"name": "f", "arguments": "{}"}}]}
    items = OpenAIServingResponses._items(parsed, {})
    assert [(i["type"], i["call_id"], i["name"], i["arguments"]) for i in items] == [
        ("function_call", "call_9", "f", "{}")]


@pytest.mark.parametrize("body, needle", [
    ({"input": "x", "previous_response_id": "resp_1"}, "previous response 'resp_1' not found"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]},
     "input_image"),
    ({"input": [{"type": "file_search_call"}]}, "file_search_call"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "function tools"),
    ({"input": [{"role": "robot", "content": "x"}]}, "role"),
    ({"input": []}, "input"),
])
def test_what_is_not_supported_is_a_400_naming_it(server: Server, body, needle) -> None:
    with pytest.raises(openai.BadRequestError, match=needle):
        server.client().responses.create(model=MODEL, **body)


def test_previous_response_id_continues_a_stored_conversation(server: Server) -> None:
    """The second turn's prompt is the chat of both turns, the first answer included;
    GET returns a stored response, DELETE drops it, store=false keeps nothing."""
    client = server.client()
    first = client.responses.create(model=MODEL, input="My name is Ada.", instructions="Be nice.",
                                    max_output_tokens=6, temperature=0)
    second = client.responses.create(model=MODEL, input="What is my name?",
                                     previous_response_id=first.id, max_output_tokens=6,
                                     temperature=0)
    chat = client.chat.completions.create(
        model=MODEL, max_tokens=6, temperature=0,
        messages=user("My name is Ada.") + [{"role": "assistant", "content": first.output_text}]
        + user("What is my name?"))
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens == chat.usage.prompt_tokens  # instructions do not carry
    assert second.output_text == chat.choices[0].message.content
    assert client.responses.retrieve(first.id).output_text == first.output_text
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    third = client.responses.create(model=MODEL, input="x", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(third.id)


def test_vllm_extensions_reach_the_engine(server) -> None:
    """`cache_salt` and `priority` (vLLM's) are taken as on the chat endpoint."""
    ok = server.post("/v1/responses", {"model": MODEL, "input": "Hi", "max_output_tokens": 2,
                                       "cache_salt": "tenant-1"})
    assert ok.status_code == 200, ok.text
    bad = server.post("/v1/responses", {"model": MODEL, "input": "Hi", "max_output_tokens": 2,
                                        "priority": 2})
    assert bad.status_code == 400 and "priority" in bad.json()["error"]["message"]
