"""The offline API: `LLM(model=...).generate(prompts, SamplingParams(...))`, as in vLLM."""
from __future__ import annotations

import dataclasses
import inspect
import itertools
import time
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from .config import graph_capture_size
from .engine.llm_engine import LLMEngine, PromptType
from .engine.outputs import RequestOutput, RequestOutputKind
from .engine.sampler import SamplingParams
from .tokenizer import Tokenizer


def _is_single_prompt(prompts: Any) -> bool:
    return isinstance(prompts, (str, dict)) or (
        isinstance(prompts, (list, tuple)) and bool(prompts) and all(isinstance(t, int) for t in prompts))


class LLM:
    """A thin synchronous wrapper over `LLMEngine`: submit a batch, step until it is done.

    `model` is a model directory, a Hugging Face Hub name or a preset ("tiny", "flash", "pro":
    random weights, no files); the keyword arguments are `LLMEngine.from_args`'s (dtype,
    device, max_model_len, ...), and vLLM's `trust_remote_code`, which changes nothing here,
    and `compilation_config`: of a mapping, its largest CUDA-graph capture size is
    `max_cudagraph_capture_size` (the rest, and an optimisation level, change nothing here).
    """

    def __init__(self, model: str, **engine_args: Any):
        engine_args.pop("trust_remote_code", None)  # dsv4 implements the model itself
        cc = engine_args.pop("compilation_config", None)
        if isinstance(cc, dict):
            size, _ = graph_capture_size(cc)
            if size is not None:
                engine_args.setdefault("max_cudagraph_capture_size", size)
        unknown = sorted(set(engine_args) - set(inspect.signature(LLMEngine.from_args).parameters))
        if unknown:
            raise TypeError(f"LLM: unknown engine arguments {unknown}; see "
                            f"LLMEngine.from_args for the ones dsv4 takes")
        self.llm_engine = LLMEngine.from_args(model, **engine_args)
        self._ids = itertools.count()

    def get_tokenizer(self) -> Tokenizer | None:
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What a call without sampling params uses: the model's generation_config.json
        values (`generation_config="auto"`, the default), else SamplingParams()."""
        return SamplingParams(**self.llm_engine.default_sampling)

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: Sequence[int] | None = None,
                 lora_request: Any = None) -> list[RequestOutput]:
        """One finished `RequestOutput` per prompt, in input order.

        A prompt is a string, a list of token ids or `{"prompt_token_ids": [...]}`; one prompt
        may be passed on its own. `sampling_params` is one for all prompts or one per prompt;
        `priority` one per prompt (scheduling_policy="priority": lower runs first).
        """
        if lora_request is not None:
            raise ValueError("LoRA adapters are not supported: dsv4 serves DeepSeek-V4's own "
                             "weights (lora_request must be None)")
        if _is_single_prompt(prompts):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")

        # one output a request, when it finishes (vLLM's LLM does the same); the caller's
        # params are left as they were
        final = {id(p): p if p.output_kind == RequestOutputKind.FINAL_ONLY
                 else dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY)
                 for p in params}
        params = [final[id(p)] for p in params]
        priority = [0] * len(prompts) if priority is None else list(priority)
        if len(priority) != len(prompts):
            raise ValueError(f"{len(priority)} priorities for {len(prompts)} prompts")
        engine = self.llm_engine
        ids = [f"llm-{next(self._ids)}" for _ in prompts]
        try:
            for rid, prompt, p, rank in zip(ids, prompts, params, priority):
                engine.add_request(rid, prompt, p, priority=rank)
        except Exception:
            for rid in ids:  # all or nothing: a bad prompt leaves no half-submitted batch behind
                engine.abort_request(rid)
            raise

        done: dict[str, RequestOutput] = {}
        start, prompt_toks, out_toks = time.perf_counter(), 0, 0
        with tqdm(total=len(prompts), desc="Processed prompts", unit="req",
                  disable=not use_tqdm) as bar:
            while len(done) < len(ids):
                for out in engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        # vLLM's estimate: tokens of the finished requests over the time so far
                        prompt_toks += len(out.prompt_token_ids)
                        out_toks += sum(len(o.token_ids) for o in out.outputs)
                        dt = time.perf_counter() - start
                        bar.set_postfix_str(f"est. speed input: {prompt_toks / dt:.2f} toks/s, "
                                            f"output: {out_toks / dt:.2f} toks/s", refresh=False)
                        bar.update(1)
        return [done[rid] for rid in ids]

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             thinking: bool = False, tools: list[dict] | None = None,
             use_tqdm: bool = True, chat_template_kwargs: dict | None = None,
             lora_request: Any = None) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them (DeepSeek-V4 chat encoding).
        Thinking mode: `thinking=True`, or vLLM's `chat_template_kwargs={"thinking": True}`
        (or `"enable_thinking"`), as the server takes it."""
        from .chat import encode_messages

        kw = chat_template_kwargs or {}
        thinking = bool(thinking or kw.get("thinking", kw.get("enable_thinking", False)))

        tokenizer = self.get_tokenizer()
        if tokenizer is None:
            raise ValueError("chat needs a tokenizer, but the engine was started without one")
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        mode = "thinking" if thinking else "chat"
        # The encoded text starts with BOS itself, so no special tokens are added.
        prompts = [{"prompt": text, "prompt_token_ids": tokenizer.encode(text)}
                   for text in (encode_messages(c, mode, tools) for c in convs)]
        if thinking:  # structured outputs hold the answer, after </think>, not the reasoning
            end = tokenizer.token_to_id("</think>")
            one = sampling_params is None or isinstance(sampling_params, SamplingParams)
            given = [sampling_params] if one else list(sampling_params)
            given = [_answer_only(p, end) for p in given]
            sampling_params = given[0] if one else given
        return self.generate(prompts, sampling_params, use_tqdm, lora_request=lora_request)


def _answer_only(params: SamplingParams | None, think_end: int | None):
    """`params` with its structured outputs starting after `</think>` (a copy; as given when
    there are none or they already say where to start)."""
    so = None if params is None else params.structured_outputs
    if so is None or so.start_after is not None or think_end is None:
        return params
    return dataclasses.replace(params, structured_outputs=dataclasses.replace(
        so, start_after=think_end, compiled=None))
