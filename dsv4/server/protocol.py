"""OpenAI wire format: request schemas, response objects and the JSON error shape.

Requests are pydantic models that accept OpenAI's fields plus vLLM's sampling extensions
(``top_k``, ``min_p``, ``repetition_penalty``, ...); unknown fields are allowed and ignored, as
OpenAI's own API tolerates new client fields. Responses are plain dicts built by the serving
classes: they are written once and never read back, so a schema for them would only repeat
OpenAI's documentation.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from dsv4.engine.outputs import RequestOutputKind
from dsv4.engine.sampler import SamplingParams

logger = logging.getLogger(__name__)

# Request fields that ask for structured outputs (OpenAI's, then vLLM's).
STRUCTURED_FIELDS = ("response_format", "structured_outputs", "guided_json", "guided_regex",
                     "guided_choice", "guided_grammar")

class OpenAIError(Exception):
    """An error to return as ``{"error": {"message", "type", "param", "code"}}`` with a status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_request(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, "invalid_request_error", param)


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class StreamOptions(BaseModel):
    """``stream_options``: a final chunk with ``usage`` (and ``choices: []``) when asked;
    vLLM's ``continuous_usage_stats`` adds the usage so far to every chunk."""

    model_config = ConfigDict(extra="allow")
    include_usage: bool = False
    continuous_usage_stats: bool = False


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    """``tool_choice: {"type": "function", "function": {"name": ...}}``."""

    type: Literal["function"] = "function"
    function: NamedFunction


class _SamplingRequest(BaseModel):
    """Sampling fields shared by both endpoints: OpenAI's names, then vLLM's extensions."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    allowed_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    truncate_prompt_tokens: int | None = None
    bad_words: list[str] | None = None
    return_tokens_as_token_ids: bool = False  # logprobs' tokens as "token_id:N" (vLLM's)
    cache_salt: str | None = None  # prefix-cache isolation (vLLM's)
    priority: int = 0  # lower first under --scheduling-policy priority (vLLM's)
    _structured: dict[str, Any] | None = PrivateAttr(default=None)

    def _check_common(self) -> None:
        extra = self.model_extra or {}
        self._structured = self._structured_outputs(extra)
        ignored = sorted(k for k in extra if k not in STRUCTURED_FIELDS)
        if ignored:  # as vLLM: accepted (clients send newer fields), but said
            logger.warning("request fields ignored (not supported): %s", ", ".join(ignored))
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true", "stream_options")

    @staticmethod
    def _structured_outputs(extra: dict[str, Any]) -> dict[str, Any] | None:
        """The `structured_outputs` of SamplingParams from OpenAI's `response_format`
        (`json_object`, `json_schema`), vLLM's `structured_outputs` or its older `guided_json`,
        `guided_regex`, `guided_choice` and `guided_grammar`; at most one of them."""
        given = [k for k in STRUCTURED_FIELDS if extra.get(k) is not None]
        fmt = extra.get("response_format")
        if fmt is not None and isinstance(fmt, dict) and fmt.get("type") == "text":
            given.remove("response_format")
        if not given:
            return None
        if len(given) > 1:
            raise bad_request(f"give at most one of {', '.join(given)}", given[1])
        name, value = given[0], extra[given[0]]
        if name == "response_format":
            kind = value.get("type") if isinstance(value, dict) else None
            if kind == "json_object":
                return {"json_object": True}
            if kind == "json_schema":
                spec = value.get("json_schema")
                if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                    raise bad_request("response_format json_schema needs json_schema.schema, a "
                                      "JSON schema object", "response_format")
                return {"json": spec["schema"]}
            raise bad_request("response_format type must be text, json_object or json_schema, "
                              f"got {kind!r}", "response_format")
        if name == "structured_outputs":
            if not isinstance(value, dict):
                raise bad_request("structured_outputs must be an object", name)
            return dict(value)
        return {{"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar"}[name]: value}

    def _sampling_params(self, max_tokens: int, logprobs: int | None,
                         skip_special_tokens: bool, prompt_logprobs: int | None = None,
                         defaults: dict | None = None) -> SamplingParams:
        """The engine's SamplingParams; its ValueError (naming the field) becomes a 400.
        `defaults` (the model's generation config) fill the sampling fields left out."""
        given = {
            "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
            "min_p": self.min_p, "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
        }
        given = {**{k: v for k, v in (defaults or {}).items() if k in given},
                 **{k: v for k, v in given.items() if v is not None}}
        try:
            return SamplingParams(
                n=self.n, seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids,
                ignore_eos=self.ignore_eos, max_tokens=max_tokens, min_tokens=self.min_tokens,
                logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                skip_special_tokens=skip_special_tokens, logit_bias=self.logit_bias,
                allowed_token_ids=self.allowed_token_ids,
                include_stop_str_in_output=self.include_stop_str_in_output,
                truncate_prompt_tokens=self.truncate_prompt_tokens,
                structured_outputs=self._structured, bad_words=self.bad_words,
                # a response built from the final output needs no per-step copies
                output_kind=(RequestOutputKind.CUMULATIVE if self.stream
                             else RequestOutputKind.FINAL_ONLY), **given,
            )
        except (ValueError, TypeError) as exc:
            raise bad_request(str(exc)) from None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return self.include_usage and bool(self.stream_options.continuous_usage_stats)


class CompletionRequest(_SamplingRequest):
    """``POST /v1/completions``; ``prompt`` is text, token ids, or a batch of either."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    # vLLM extensions
    skip_special_tokens: bool = True
    prompt_logprobs: int | None = None

    def check(self) -> None:
        self._check_common()
        if self.suffix:
            raise bad_request("suffix is not supported", "suffix")
        if self.best_of not in (None, self.n):
            raise bad_request("best_of is not supported (it must equal n)", "best_of")
        # the upper limit is the engine's max_logprobs (20 by default, as OpenAI's and vLLM's)
        if self.logprobs is not None and self.logprobs < 0:
            raise bad_request(f"logprobs must be >= 0, got {self.logprobs}", "logprobs")
        if isinstance(self.prompt, list) and not self.prompt:
            raise bad_request("prompt must not be empty", "prompt")

    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts: one text or one token-id list per engine request."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)

    def to_sampling_params(self, max_tokens: int, defaults: dict | None = None) -> SamplingParams:
        # `echo` with `logprobs` reports the prompt's tokens too: their logprobs and top-N
        prompt_logprobs = self.prompt_logprobs
        if self.echo and self.logprobs is not None:
            prompt_logprobs = max(prompt_logprobs or 0, self.logprobs)
        return self._sampling_params(max_tokens, self.logprobs, self.skip_special_tokens,
                                     prompt_logprobs, defaults)


class ChatCompletionRequest(_SamplingRequest):
    """``POST /v1/chat/completions``.

    Thinking mode is on when ``chat_template_kwargs`` has ``thinking`` (or ``enable_thinking``)
    true, or when ``reasoning_effort`` is set to anything but ``"none"``.
    """

    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    continue_final_message: bool = False  # vLLM's; DeepSeek's API marks the message instead

    def check(self) -> None:
        self._check_common()
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
            if self.top_logprobs < 0:  # the upper bound is the engine's max_logprobs
                raise bad_request(f"top_logprobs must be >= 0, got {self.top_logprobs}",
                                  "top_logprobs")
        choice = self.tool_choice
        if choice == "required" and not self.tools:
            raise bad_request("tool_choice 'required' needs tools", "tool_choice")
        if self.prefix_completion:
            if self.thinking_mode != "chat":
                raise bad_request("prefix completion (a final assistant message with prefix: "
                                  "true, or continue_final_message) needs chat mode, not "
                                  "thinking", "messages")
            if choice == "required" or isinstance(choice, NamedToolChoice):
                raise bad_request("prefix completion and a forced tool_choice both fix the "
                                  "start of the answer: use one", "tool_choice")
        if isinstance(choice, NamedToolChoice):
            names = [t.function.name for t in self.tools or []]
            if choice.function.name not in names:
                raise bad_request(f"tool_choice names function {choice.function.name!r}, "
                                  f"which is not among the tools {names}", "tool_choice")

    @property
    def prefix_completion(self) -> bool:
        """Whether the answer continues the final assistant message (DeepSeek's chat prefix
        completion, ``"prefix": true`` on it; vLLM's ``continue_final_message``)."""
        last = self.messages[-1]
        is_assistant = isinstance(last, dict) and last.get("role") == "assistant"
        if self.continue_final_message and not is_assistant:
            raise bad_request("continue_final_message needs a final assistant message",
                              "continue_final_message")
        return is_assistant and (self.continue_final_message or bool(last.get("prefix")))

    @property
    def thinking_mode(self) -> str:
        kwargs = self.chat_template_kwargs or {}
        on = bool(kwargs.get("thinking", kwargs.get("enable_thinking", False)))
        if self.reasoning_effort is not None and self.reasoning_effort != "none":
            on = True
        return "thinking" if on else "chat"

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def to_sampling_params(self, max_tokens: int, defaults: dict | None = None) -> SamplingParams:
        # The chat parsers need </think> and the DSML markers in the text, and those are
        # special tokens: they must survive detokenisation.
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(max_tokens, logprobs, skip_special_tokens=False,
                                     defaults=defaults)


class TokenizeRequest(BaseModel):
    """``POST /tokenize`` (vLLM's): a raw ``prompt``, or chat ``messages`` encoded as
    ``/v1/chat/completions`` would (with its ``tools``, ``chat_template_kwargs`` and
    ``reasoning_effort``)."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True

    def check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise bad_request("give exactly one of prompt and messages", "prompt")

    def chat_request(self) -> ChatCompletionRequest:
        extra = {k: v for k, v in (self.model_extra or {}).items()
                 if k in ("tools", "tool_choice", "chat_template_kwargs", "reasoning_effort",
                          "continue_final_message")}
        return ChatCompletionRequest(model=self.model, messages=self.messages, **extra)


class DetokenizeRequest(BaseModel):
    """``POST /detokenize`` (vLLM's): token ids -> text."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    tokens: list[int]
