"""DeepSeek-V4 prompt format: published vectors, completion parsing and streaming."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import pytest

from dsv4.chat import (
    ASSISTANT,
    EOS,
    SPECIAL_TOKENS,
    THINK_END,
    THINK_START,
    TOOL_CALLS_END,
    TOOL_CALLS_START,
    USER,
    CompletionStreamParser,
    encode_messages,
    parse_completion,
)

_HERE = Path(__file__).resolve()
# CI puts shared/ beside the clone; a checkout may also carry it inside.
_VECTOR_DIRS = [_HERE.parents[2] / "shared" / "chat_encoding",
                _HERE.parents[1] / "shared" / "chat_encoding"]

Events = list[dict[str, str]]


def _vectors_dir() -> Path:
    for candidate in _VECTOR_DIRS:
        if candidate.is_dir():
            return candidate
    pytest.fail(f"published chat vectors not found in any of {[str(p) for p in _VECTOR_DIRS]}")


def _case_messages(case: int) -> list[dict[str, Any]]:
    data = json.loads((_vectors_dir() / f"case{case}.input.json").read_text(encoding="utf-8"))
    if isinstance(data, dict):  # case 1: {"tools": [...], "messages": [...]}
        messages = data["messages"]
        return [{**messages[0], "tools": data["tools"]}, *messages[1:]]
    return data


def _case_expected(case: int) -> bytes:
    return (_vectors_dir() / f"case{case}.expected.txt").read_bytes()


def _assistant_completions(prompt: str) -> list[tuple[str, str]]:
    """(mode, completion) of every assistant turn in a rendered prompt.

    The tag after the assistant tag belongs to the prompt and says which mode the turn was
    generated in; the completion runs through its EOS.
    """
    turns = []
    for piece in prompt.split(ASSISTANT)[1:]:
        mode = "thinking" if piece.startswith(THINK_START) else "chat"
        body = piece.removeprefix(THINK_START if mode == "thinking" else THINK_END)
        turns.append((mode, body[: body.index(EOS) + len(EOS)]))
    return turns


def _calls(tool_calls: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    """(name, decoded arguments) per OpenAI tool call: what a round trip must preserve."""
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in tool_calls]


def _without_ids(result: dict[str, Any]) -> dict[str, Any]:
    calls = [{k: v for k, v in call.items() if k != "id"} for call in result["tool_calls"]]
    return {**result, "tool_calls": calls}


def _fields(result: dict[str, Any]) -> tuple[Any, Any, Any]:
    return result["reasoning_content"], result["content"], result["tool_calls"]


def _stream(text: str, mode: str, sizes: list[int]) -> tuple[Events, CompletionStreamParser]:
    """Feed ``text`` in chunks of the given sizes (cycled); return the events and parser."""
    parser = CompletionStreamParser(mode)
    events: Events = []
    pos, i = 0, 0
    while pos < len(text):
        size = sizes[i % len(sizes)]
        events += parser.feed(text[pos:pos + size])
        pos, i = pos + size, i + 1
    return events, parser


def _joined(events: Events, key: str) -> str:
    return "".join(e[key] for e in events if key in e)


def _block(name: str, *params: tuple[str, str, str]) -> str:
    """A DSML tool-call block, preceded by its blank line, from (name, string, value)."""
    lines = [f'<｜DSML｜parameter name="{k}" string="{s}">{v}</｜DSML｜parameter>'
             for k, s, v in params]
    return "\n".join([f"\n\n{TOOL_CALLS_START}", f'<｜DSML｜invoke name="{name}">', *lines,
                      "</｜DSML｜invoke>", TOOL_CALLS_END])


_VALID_BLOCK = _block("f", ("n", "false", "1"))
_UNCLOSED_BLOCK = _VALID_BLOCK.removesuffix(TOOL_CALLS_END)


# --------------------------------------------------------------------------- published vectors


def test_case1_tools_on_system_message_tool_call_and_result_in_thinking_mode() -> None:
    assert encode_messages(_case_messages(1), "thinking").encode("utf-8") == _case_expected(1)


def test_case2_reasoning_before_last_user_turn_is_dropped_in_thinking_mode() -> None:
    assert encode_messages(_case_messages(2), "thinking").encode("utf-8") == _case_expected(2)


def test_case4_latest_reminder_and_action_task_in_chat_mode() -> None:
    assert encode_messages(_case_messages(4), "chat").encode("utf-8") == _case_expected(4)


def test_tools_argument_is_attached_to_the_system_message() -> None:
    data = json.loads((_vectors_dir() / "case1.input.json").read_text(encoding="utf-8"))
    prompt = encode_messages(data["messages"], "thinking", tools=data["tools"])
    assert prompt.encode("utf-8") == _case_expected(1)


def test_tools_without_a_system_message_get_an_empty_one() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    prompt = encode_messages([{"role": "user", "content": "hi"}], tools=tools)
    assert prompt.startswith("<｜begin▁of▁sentence｜>\n\n## Tools\n\n")
    assert '{"name": "f", "parameters": {}}\n\nYou MUST' in prompt


def test_every_marker_in_the_vectors_is_a_special_token() -> None:
    attribute_tags = ("<｜DSML｜invoke ", "<｜DSML｜parameter ")
    for case in (1, 2, 4):
        text = _case_expected(case).decode("utf-8")
        for marker in re.findall(r"</?think>|<[^<>]*｜[^<>]*>", text):
            assert marker in SPECIAL_TOKENS or marker.startswith(attribute_tags), marker


def test_parallel_tool_results_share_one_user_turn_in_call_order() -> None:
    calls = [{"id": f"call_{n}", "type": "function",
              "function": {"name": "f", "arguments": {"n": n}}} for n in (1, 2)]
    prompt = encode_messages([
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": "", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_2", "content": "two"},
        {"role": "tool", "tool_call_id": "call_1", "content": "one"},
    ], "chat")
    results = "<tool_result>one</tool_result>\n\n<tool_result>two</tool_result>"
    assert prompt.endswith(f"{EOS}{USER}{results}{ASSISTANT}{THINK_END}")


def test_user_message_ending_the_conversation_opens_the_assistant_turn() -> None:
    messages = [{"role": "user", "content": "Hi"}]
    assert encode_messages(messages, "thinking").endswith(f"Hi{ASSISTANT}{THINK_START}")
    assert encode_messages(messages, "chat").endswith(f"Hi{ASSISTANT}{THINK_END}")


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("case", [1, 2])
def test_parse_inverts_the_assistant_turns_of_the_vectors(case: int) -> None:
    assistants = [m for m in _case_messages(case) if m["role"] == "assistant"]
    completions = _assistant_completions(_case_expected(case).decode("utf-8"))
    assert len(completions) == len(assistants)
    for message, (mode, completion) in zip(assistants, completions):
        parsed = parse_completion(completion, mode)
        assert parsed["content"] == (message.get("content") or "")
        if mode == "thinking":
            assert parsed["reasoning_content"] == message["reasoning_content"]
        assert _calls(parsed["tool_calls"]) == _calls(message.get("tool_calls", []))


def test_tool_calls_round_trip_through_dsml() -> None:
    arguments = {"city": "Beijing", "days": 5, "metric": True, "tags": ["a", "b"],
                 "filter": {"min": 1.5}, "note": "line one\nline <two>", "nothing": None}
    calls = [
        {"id": "call_1", "type": "function",
         "function": {"name": "forecast", "arguments": json.dumps(arguments)}},
        {"id": "call_2", "type": "function", "function": {"name": "ping", "arguments": {}}},
    ]
    prompt = encode_messages([{"role": "user", "content": "go"},
                              {"role": "assistant", "content": "Checking.", "tool_calls": calls}])
    parsed = parse_completion(prompt.split(ASSISTANT + THINK_END, 1)[1])
    assert parsed["content"] == "Checking."
    assert _calls(parsed["tool_calls"]) == [("forecast", arguments), ("ping", {})]


def test_parsed_tool_calls_have_openai_shape() -> None:
    (call,) = parse_completion(_VALID_BLOCK.lstrip() + EOS)["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"] == {"name": "f", "arguments": '{"n": 1}'}


def test_string_parameters_stay_strings_even_when_they_look_like_json() -> None:
    parsed = parse_completion(_block("f", ("zip", "true", "007")))
    assert _calls(parsed["tool_calls"]) == [("f", {"zip": "007"})]


def test_eos_is_stripped_from_content() -> None:
    assert _fields(parse_completion(f"Hello.{EOS}")) == (None, "Hello.", [])


def test_thinking_mode_splits_reasoning_at_think_end() -> None:
    parsed = parse_completion(f"Let me see.{THINK_END}Four.{EOS}", "thinking")
    assert _fields(parsed) == ("Let me see.", "Four.", [])


def test_unfinished_reasoning_is_all_reasoning() -> None:
    parsed = parse_completion("Still thinking about", "thinking")
    assert _fields(parsed) == ("Still thinking about", "", [])


@pytest.mark.parametrize("block", [
    pytest.param(_UNCLOSED_BLOCK, id="unclosed block"),
    pytest.param(_block("f", ("n", "false", "{not json")), id="invalid JSON, string=false"),
    pytest.param(_VALID_BLOCK.replace("｜invoke name", "｜call name"), id="unknown tag"),
    pytest.param(_VALID_BLOCK.replace("\n</｜DSML｜invoke>", "x</｜DSML｜invoke>"),
                 id="stray text"),
    pytest.param(_VALID_BLOCK + "after", id="text after the block"),
    pytest.param(f"\n\n{TOOL_CALLS_START}\n{TOOL_CALLS_END}", id="empty block"),
    pytest.param(_block("f", ("n", "true", "1"), ("n", "true", "2")), id="duplicate parameter"),
])
def test_malformed_dsml_is_returned_as_plain_content(block: str) -> None:
    raw = "Answer." + block
    assert _fields(parse_completion(raw + EOS)) == (None, raw, [])


def test_malformed_dsml_after_reasoning_keeps_the_reasoning() -> None:
    raw = "Answer." + _UNCLOSED_BLOCK
    assert _fields(parse_completion(f"why{THINK_END}{raw}", "thinking")) == ("why", raw, [])


# --------------------------------------------------------------------------- streaming

_STREAM_COMPLETIONS = [
    pytest.param(f"The user wants weather.{THINK_END}{_VALID_BLOCK}{EOS}", id="tool call"),
    pytest.param(f"Got it.{THINK_END}Sunny, 22°C.\n\nEnjoy!\n{EOS}", id="trailing newline"),
    pytest.param("No tag yet, still <thi", id="truncated reasoning"),
    pytest.param(f"Short.{THINK_END}Answer.{_UNCLOSED_BLOCK}", id="malformed block"),
]
_CHUNKINGS = [[1], [2, 3], [7], [10_000]]


@pytest.mark.parametrize("completion", _STREAM_COMPLETIONS)
@pytest.mark.parametrize("sizes", _CHUNKINGS)
def test_stream_parser_finishes_with_the_parse_completion_result(
        completion: str, sizes: list[int]) -> None:
    _, parser = _stream(completion, "thinking", sizes)
    assert _without_ids(parser.finish()) == _without_ids(parse_completion(completion, "thinking"))


@pytest.mark.parametrize("completion", _STREAM_COMPLETIONS)
@pytest.mark.parametrize("sizes", _CHUNKINGS)
def test_stream_events_and_flush_concatenate_to_the_final_fields(
        completion: str, sizes: list[int]) -> None:
    events, parser = _stream(completion, "thinking", sizes)
    events += parser.flush()
    final = parser.finish()
    assert _joined(events, "reasoning_content") == final["reasoning_content"]
    assert _joined(events, "content") == final["content"]


def test_stream_parser_on_the_vector_completions() -> None:
    rng = random.Random(0)
    for case in (1, 2):
        for mode, completion in _assistant_completions(_case_expected(case).decode("utf-8")):
            events, parser = _stream(completion, mode, [rng.randint(1, 9) for _ in range(50)])
            events += parser.flush()
            final = parser.finish()
            assert _without_ids(final) == _without_ids(parse_completion(completion, mode))
            assert _joined(events, "content") == final["content"]


def test_stream_never_emits_part_of_think_end_as_content_or_reasoning() -> None:
    parser = CompletionStreamParser("thinking")
    events = [e for ch in f"a < b{THINK_END}c" for e in parser.feed(ch)]
    assert _joined(events, "reasoning_content") == "a < b"
    assert _joined(events, "content") == "c"
    assert all("/" not in text for e in events for text in e.values())


def test_stream_holds_back_a_possible_tool_block_start() -> None:
    parser = CompletionStreamParser("chat")
    assert parser.feed("Checking.\n\n<｜DSML｜tool") == [{"content": "Checking."}]


def test_stream_reports_tool_calls_only_at_the_end() -> None:
    parser = CompletionStreamParser("chat")
    assert parser.feed("Checking." + _VALID_BLOCK + EOS) == [{"content": "Checking."}]
    assert parser.flush() == []
    assert _calls(parser.finish()["tool_calls"]) == [("f", {"n": 1})]


# --------------------------------------------------------------------------- bad input


def test_unknown_role_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown role"):
        encode_messages([{"role": "narrator", "content": "x"}])


def test_user_message_without_content_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"messages\[0\].*content is required"):
        encode_messages([{"role": "user"}])


def test_assistant_message_without_content_or_tool_calls_is_rejected() -> None:
    with pytest.raises(ValueError, match="content is required"):
        encode_messages([{"role": "user", "content": "x"}, {"role": "assistant"}])


def test_bad_thinking_mode_is_rejected_everywhere() -> None:
    with pytest.raises(ValueError, match="thinking_mode"):
        encode_messages([{"role": "user", "content": "x"}], "deep")
    with pytest.raises(ValueError, match="thinking_mode"):
        parse_completion("x", "deep")
    with pytest.raises(ValueError, match="thinking_mode"):
        CompletionStreamParser("deep")


def test_tool_call_with_non_object_arguments_is_rejected() -> None:
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1, 2]"}}
    with pytest.raises(ValueError, match="JSON object"):
        encode_messages([{"role": "user", "content": "x"},
                         {"role": "assistant", "tool_calls": [call]}])
