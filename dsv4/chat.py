"""DeepSeek-V4 prompt format: OpenAI-style messages to prompt text, and completions back.

The rules are those of the published vectors in ``shared/chat_encoding`` (the model release's
``encoding`` folder):

* The prompt opens with BOS. A system message is its bare content; a user turn is
  ``<｜User｜>content``; a ``latest_reminder`` is ``<｜latest_reminder｜>content``; a
  ``developer`` message is rendered like a user turn.
* There is no tool role: consecutive ``tool`` and ``user`` messages form one user turn whose
  blocks (``<tool_result>...</tool_result>`` or text) are joined by a blank line, with tool
  results in the order the preceding assistant called them.
* A user turn followed by an assistant turn (or ending the conversation) is closed by
  ``<｜Assistant｜>`` plus ``<think>`` in thinking mode or ``</think>`` in chat mode.
* An assistant turn is ``reasoning</think>`` (thinking mode only), the content, an optional
  DSML ``tool_calls`` block after a blank line, then EOS.
* In thinking mode without tools, turns before the last user turn lose their reasoning (their
  user turn is closed by ``</think>``) and earlier developer messages are dropped; with tools
  every turn keeps its reasoning.
* A user message may carry an internal ``task`` (``action``, ``query``, ...): its token replaces
  the usual turn close, and the answer to it carries no reasoning.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
LATEST_REMINDER = "<｜latest_reminder｜>"
THINK_START = "<think>"
THINK_END = "</think>"

# DSML tags are plain markup around the single vocabulary token "｜DSML｜"; the opening
# invoke/parameter tags carry attributes, so only their fixed prefix is a constant.
DSML = "｜DSML｜"
TOOL_CALLS_START = f"<{DSML}tool_calls>"
TOOL_CALLS_END = f"</{DSML}tool_calls>"
INVOKE_START = f"<{DSML}invoke"
INVOKE_END = f"</{DSML}invoke>"
PARAMETER_START = f"<{DSML}parameter"
PARAMETER_END = f"</{DSML}parameter>"

TOOL_RESULT_START = "<tool_result>"
TOOL_RESULT_END = "</tool_result>"

TASK_TOKENS: dict[str, str] = {
    "action": "<｜action｜>",
    "query": "<｜query｜>",
    "authority": "<｜authority｜>",
    "domain": "<｜domain｜>",
    "title": "<｜title｜>",
    "read_url": "<｜read_url｜>",
}

SPECIAL_TOKENS: list[str] = [
    BOS,
    EOS,
    USER,
    ASSISTANT,
    LATEST_REMINDER,
    THINK_START,
    THINK_END,
    DSML,
    TOOL_CALLS_START,
    TOOL_CALLS_END,
    INVOKE_END,
    PARAMETER_END,
    TOOL_RESULT_START,
    TOOL_RESULT_END,
    *TASK_TOKENS.values(),
]
"""Every fixed marker string the format emits, BOS and EOS first."""

THINKING_MODES = ("chat", "thinking")
ROLES = ("system", "user", "assistant", "tool", "latest_reminder", "developer")

_TOOLS_PROMPT = f"""## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "{TOOL_CALLS_START}" block like the following:

{TOOL_CALLS_START}
{INVOKE_START} name="$TOOL_NAME">
{PARAMETER_START} name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE{PARAMETER_END}
...
{INVOKE_END}
{INVOKE_START} name="$TOOL_NAME2">
...
{INVOKE_END}
{TOOL_CALLS_END}

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by {THINK_START}), you MUST output your complete reasoning inside {THINK_START}...{THINK_END} BEFORE any tool calls or final response.

Otherwise, output directly after {THINK_END} with tool calls or final response.

### Available Tool Schemas

{{schemas}}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""


def _check_mode(thinking_mode: str) -> bool:
    """Validate ``thinking_mode``; True for thinking mode."""
    if thinking_mode not in THINKING_MODES:
        raise ValueError(f"thinking_mode must be 'chat' or 'thinking', got {thinking_mode!r}")
    return thinking_mode == "thinking"


def _json(value: Any) -> str:
    # ensure_ascii=False: the vectors carry non-ASCII text verbatim (e.g. "°C").
    return json.dumps(value, ensure_ascii=False)


# --------------------------------------------------------------------------- encoding


@dataclass
class _Turn:
    """One rendered unit of the prompt, after tool results are merged into user turns."""

    role: str
    text: str = ""
    reasoning: str = ""
    tool_calls: str = ""
    task: str | None = None
    tools: list[dict[str, Any]] = field(default_factory=list)
    # (sort key, text) per block of a user turn; the key is None for plain text.
    blocks: list[tuple[int | None, str]] = field(default_factory=list)
    closed: bool = False


def _content_text(message: dict[str, Any], where: str, required: bool) -> str:
    """A message's content as one string; OpenAI text parts are joined like user blocks."""
    content = message.get("content")
    if content is None:
        if required:
            raise ValueError(f"{where}: content is required")
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise ValueError(f"{where}: only text content parts are supported, got {part!r}")
            parts.append(part["text"])
        return "\n\n".join(parts)
    raise ValueError(f"{where}: content must be a string or a list of text parts")


def _tool_functions(tools: Any, where: str) -> list[dict[str, Any]]:
    """The ``function`` objects of OpenAI-format tools, in order."""
    if not isinstance(tools, list):
        raise ValueError(f"{where}: tools must be a list")
    functions = []
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ValueError(f"{where}: each tool must be {{'type': 'function', "
                             f"'function': {{'name': ..., ...}}}}, got {tool!r}")
        functions.append(function)
    return functions


def _tools_prompt(functions: list[dict[str, Any]]) -> str:
    return _TOOLS_PROMPT.format(schemas="\n".join(_json(f) for f in functions))


def _call_arguments(call: dict[str, Any], where: str) -> dict[str, Any]:
    arguments = call["function"].get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: tool call arguments are not valid JSON: {exc}") from None
    if not isinstance(arguments, dict):
        raise ValueError(f"{where}: tool call arguments must be a JSON object")
    return arguments


def _tool_calls_dsml(tool_calls: Any, where: str) -> str:
    """The DSML block for OpenAI-format tool calls, preceded by its blank line."""
    if not isinstance(tool_calls, list):
        raise ValueError(f"{where}: tool_calls must be a list")
    invokes = []
    for call in tool_calls:
        if not (isinstance(call, dict) and isinstance(call.get("function"), dict)
                and isinstance(call["function"].get("name"), str)):
            raise ValueError(f"{where}: each tool call needs function.name, got {call!r}")
        params = []
        for key, value in _call_arguments(call, where).items():
            is_str = isinstance(value, str)
            text = value if is_str else _json(value)
            params.append(f'{PARAMETER_START} name="{key}" string="{str(is_str).lower()}">'
                          f"{text}{PARAMETER_END}")
        invokes.append(f'{INVOKE_START} name="{call["function"]["name"]}">\n'
                       + "\n".join(params) + f"\n{INVOKE_END}")
    return f"\n\n{TOOL_CALLS_START}\n" + "\n".join(invokes) + f"\n{TOOL_CALLS_END}"


def _task(message: dict[str, Any], where: str) -> str | None:
    task = message.get("task")
    if task is not None and task not in TASK_TOKENS:
        raise ValueError(f"{where}: unknown task {task!r}; expected one of {list(TASK_TOKENS)}")
    return task


def _turns(messages: list[dict[str, Any]]) -> list[_Turn]:
    """Validate messages and merge tool results and user text into user turns."""
    turns: list[_Turn] = []
    call_order: dict[str, int] = {}  # tool_call id -> position in the latest assistant call list
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}]: expected a dict, got {type(message).__name__}")
        role = message.get("role")
        where = f"messages[{i}] (role {role!r})"
        if role not in ROLES:
            raise ValueError(f"{where}: unknown role; expected one of {list(ROLES)}")
        if message.get("tools") and role not in ("system", "developer"):
            raise ValueError(f"{where}: tools belong on a system or developer message")
        if message.get("task") is not None and role not in ("user", "developer"):
            raise ValueError(f"{where}: a task belongs on a user or developer message")

        if role in ("user", "tool"):
            if role == "tool":
                text = TOOL_RESULT_START + _content_text(message, where, True) + TOOL_RESULT_END
                block = (call_order.get(message.get("tool_call_id"), len(call_order)), text)
            else:
                block = (None, _content_text(message, where, True))
            if not turns or turns[-1].role != "user" or turns[-1].closed:
                turns.append(_Turn("user"))
            turns[-1].blocks.append(block)
            if role == "user" and (task := _task(message, where)) is not None:
                # The task token must directly follow the text it classifies.
                turns[-1].task, turns[-1].closed = task, True
        elif role == "assistant":
            tool_calls = message.get("tool_calls") or []
            content = _content_text(message, where, required=not tool_calls)
            reasoning = message.get("reasoning_content") or ""
            if not isinstance(reasoning, str):
                raise ValueError(f"{where}: reasoning_content must be a string")
            dsml = _tool_calls_dsml(tool_calls, where) if tool_calls else ""
            turns.append(_Turn("assistant", text=content, reasoning=reasoning, tool_calls=dsml))
            if tool_calls:
                call_order = {c["id"]: n for n, c in enumerate(tool_calls) if c.get("id")}
        else:
            turns.append(_Turn(
                role,
                text=_content_text(message, where, required=role != "system"),
                task=_task(message, where),
                tools=_tool_functions(message["tools"], where) if message.get("tools") else [],
            ))

    for turn in turns:
        if turn.role == "user":
            # Tool results follow the call order; text blocks keep their places.
            results = iter(sorted((b for b in turn.blocks if b[0] is not None), key=lambda b: b[0]))
            turn.text = "\n\n".join(b[1] if b[0] is None else next(results)[1] for b in turn.blocks)
    return turns


def _last_user(turns: list[_Turn]) -> int:
    return max((i for i, t in enumerate(turns) if t.role in ("user", "developer")), default=-1)


def encode_messages(messages: list[dict[str, Any]], thinking_mode: str = "chat",
                    tools: list[dict[str, Any]] | None = None) -> str:
    """Render an OpenAI-style conversation as a DeepSeek-V4 prompt string (BOS included).

    ``tools`` (OpenAI format) are attached to the leading system message, or to a new empty
    one when the conversation does not start with a system message; they may instead be
    given as that message's ``tools`` key. When the last message is a user turn the prompt
    ends with the assistant tag and ``<think>`` / ``</think>``, ready for generation.
    Raises ``ValueError`` naming the problem for an unknown role, missing content, malformed
    tools or tool calls, an unknown task or a bad ``thinking_mode``.
    """
    thinking = _check_mode(thinking_mode)
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    turns = _turns(messages)
    if tools:
        if turns[0].role != "system":
            turns.insert(0, _Turn("system"))
        elif turns[0].tools:
            raise ValueError("tools were given both as an argument and on the system message")
        turns[0].tools = _tool_functions(tools, "tools")
    # As in case 1 against case 2: with tools, earlier turns keep their reasoning, so the model
    # can follow its own multi-step tool use.
    drop = thinking and not any(t.tools for t in turns)
    if drop:
        last = _last_user(turns)
        turns = [t for i, t in enumerate(turns) if t.role != "developer" or i >= last]
    last = _last_user(turns)

    out = [BOS]
    for i, turn in enumerate(turns):
        tools_text = "\n\n" + _tools_prompt(turn.tools) if turn.tools else ""
        if turn.role == "system":
            out.append(turn.text + tools_text)
        elif turn.role in ("user", "developer"):
            out.append(USER + turn.text + tools_text)
        elif turn.role == "latest_reminder":
            out.append(LATEST_REMINDER + turn.text)
        else:
            answers_task = i > 0 and turns[i - 1].task is not None
            if thinking and not answers_task and (not drop or i > last):
                out.append(turn.reasoning + THINK_END)
            out.append(turn.text + turn.tool_calls + EOS)

        # The release closes a turn only before an assistant turn, a reminder or the end.
        next_role = turns[i + 1].role if i + 1 < len(turns) else None
        if next_role not in (None, "assistant", "latest_reminder"):
            continue
        if turn.task == "action":
            out.append(ASSISTANT + (THINK_START if thinking else THINK_END) + TASK_TOKENS["action"])
        elif turn.task is not None:
            out.append(TASK_TOKENS[turn.task])
        elif turn.role in ("user", "developer"):
            opens_thinking = thinking and (not drop or i >= last)
            out.append(ASSISTANT + (THINK_START if opens_thinking else THINK_END))
    return "".join(out)


# --------------------------------------------------------------------------- parsing

_WS = re.compile(r"\s*")
_INVOKE = re.compile(re.escape(INVOKE_START) + r' name="([^"]+)">')
_PARAMETER = re.compile(re.escape(PARAMETER_START) + r' name="([^"]+)" string="(true|false)">(.*?)'
                        + re.escape(PARAMETER_END), re.DOTALL)


def _new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _parse_tool_calls(block: str) -> list[dict[str, Any]] | None:
    """Parse text starting at ``<｜DSML｜tool_calls>``; None unless it is exactly one block.

    Whitespace between tags is tolerated; any other text outside parameter values, a
    duplicate parameter, invalid JSON in a ``string="false"`` value or an empty block is not.
    """
    def skip_ws(at: int) -> int:
        return _WS.match(block, at).end()

    calls = []
    pos = skip_ws(len(TOOL_CALLS_START))
    while invoke := _INVOKE.match(block, pos):
        arguments: dict[str, Any] = {}
        pos = skip_ws(invoke.end())
        while param := _PARAMETER.match(block, pos):
            name, is_str, raw = param.groups()
            if name in arguments:
                return None
            if is_str == "true":
                arguments[name] = raw
            else:
                try:
                    arguments[name] = json.loads(raw)
                except json.JSONDecodeError:
                    return None
            pos = skip_ws(param.end())
        if not block.startswith(INVOKE_END, pos):
            return None
        pos = skip_ws(pos + len(INVOKE_END))
        calls.append({"id": _new_call_id(), "type": "function",
                      "function": {"name": invoke.group(1), "arguments": _json(arguments)}})
    if not calls or not block.startswith(TOOL_CALLS_END, pos):
        return None
    if block[pos + len(TOOL_CALLS_END):].strip():
        return None
    return calls


def parse_completion(text: str, thinking_mode: str = "chat") -> dict[str, Any]:
    """Split a generated completion into ``reasoning_content``, ``content`` and ``tool_calls``.

    ``text`` is what the model produced after the prompt; generation ends at the first EOS,
    which is dropped along with anything after it. In thinking mode the reasoning runs up to
    ``</think>`` (all of it when the tag never came, e.g. the output was truncated); in chat
    mode ``reasoning_content`` is None. A trailing DSML ``tool_calls`` block becomes OpenAI
    tool calls with JSON-string arguments (``string="true"`` values as strings, the rest parsed
    as JSON). Never raises on model output: when the tool block is malformed, everything
    after the reasoning is returned verbatim as ``content`` with no tool calls.
    """
    thinking = _check_mode(thinking_mode)
    text = text.split(EOS, 1)[0]
    reasoning = None
    if thinking:
        reasoning, closed, text = text.partition(THINK_END)
        if not closed:
            return {"reasoning_content": reasoning, "content": "", "tool_calls": []}
    content, found, block = text.partition(TOOL_CALLS_START)
    calls = _parse_tool_calls(found + block) if found else None
    if calls is None:
        return {"reasoning_content": reasoning, "content": text, "tool_calls": []}
    # The encoder separates content from the block by a blank line; undo exactly that.
    return {"reasoning_content": reasoning, "content": content.removesuffix("\n\n"),
            "tool_calls": calls}


def _partial_suffix(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some marker."""
    best = 0
    for marker in markers:
        for n in range(min(len(text), len(marker) - 1), best, -1):
            if text.endswith(marker[:n]):
                best = n
                break
    return best


class CompletionStreamParser:
    """Incremental :func:`parse_completion` for streaming a completion as OpenAI deltas.

    :meth:`feed` returns events ``{"reasoning_content": str}`` or ``{"content": str}``. Text
    that could still turn into ``</think>``, EOS or the start of a tool-call block (including
    its leading blank line) is held back until it is decided, and everything from a tool-call
    block on is held to the end. :meth:`flush` emits whatever was held, so that the events
    concatenate to the fields of :meth:`finish`, the :func:`parse_completion` of all text fed.
    """

    def __init__(self, thinking_mode: str = "chat") -> None:
        self._thinking_mode = thinking_mode
        self._section = "reasoning_content" if _check_mode(thinking_mode) else "content"
        self._chunks: list[str] = []  # all text fed; joined only at the end to stay linear
        self._pending = ""
        self._emitted = {"reasoning_content": 0, "content": 0}  # characters streamed per field

    def _emit(self, events: list[dict[str, str]], key: str, text: str) -> None:
        if text:
            self._emitted[key] += len(text)
            events.append({key: text})

    def feed(self, delta_text: str) -> list[dict[str, str]]:
        """Consume the next piece of generated text; return the events it makes certain."""
        self._chunks.append(delta_text)
        events: list[dict[str, str]] = []
        # "held" covers everything once a tool block starts or EOS ended the generation.
        if self._section == "held":
            return events
        self._pending += delta_text
        while True:
            if self._section == "reasoning_content":
                stops: tuple[str, ...] = (THINK_END, EOS)
            else:
                stops = (TOOL_CALLS_START, EOS)
            hits = [(p, s) for s in stops if (p := self._pending.find(s)) >= 0]
            if not hits:
                holds = stops + (("\n\n" + TOOL_CALLS_START,) if self._section == "content" else ())
                keep = _partial_suffix(self._pending, holds)
                self._emit(events, self._section, self._pending[:len(self._pending) - keep])
                self._pending = self._pending[len(self._pending) - keep:]
                return events
            at, stop = min(hits)
            before, self._pending = self._pending[:at], self._pending[at + len(stop):]
            if stop == THINK_END:
                self._emit(events, "reasoning_content", before)
                self._section = "content"
                continue
            if stop == TOOL_CALLS_START:
                before = before.removesuffix("\n\n")
            self._emit(events, self._section, before)
            self._section, self._pending = "held", ""
            return events

    def flush(self) -> list[dict[str, str]]:
        """Emit the held-back text: the part of the final result not yet streamed."""
        final = self.finish()
        events: list[dict[str, str]] = []
        for key in ("reasoning_content", "content"):
            self._emit(events, key, (final[key] or "")[self._emitted[key]:])
        return events

    def finish(self) -> dict[str, Any]:
        """The :func:`parse_completion` result for all text fed so far."""
        return parse_completion("".join(self._chunks), self._thinking_mode)
