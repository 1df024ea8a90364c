"""The offline API: `LLM(model=...).generate(prompts, SamplingParams(...))`, as in vLLM."""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from .engine.llm_engine import LLMEngine, PromptType
from .engine.outputs import RequestOutput
from .engine.sampler import SamplingParams
from .tokenizer import Tokenizer


def _is_single_prompt(prompts: Any) -> bool:
    return isinstance(prompts, (str, dict)) or (
        isinstance(prompts, (list, tuple)) and bool(prompts) and all(isinstance(t, int) for t in prompts))


class LLM:
    """A thin synchronous wrapper over `LLMEngine`: submit a batch, step until it is done.

    `model` is a model directory or a preset ("tiny", "flash", "pro": random weights, no files);
    the keyword arguments are `LLMEngine.from_args`'s (dtype, device, max_model_len, ...).
    """

    def __init__(self, model: str, **engine_args: Any):
        self.llm_engine = LLMEngine.from_args(model, **engine_args)
        self._ids = itertools.count()

    def get_tokenizer(self) -> Tokenizer | None:
        return self.llm_engine.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """One finished `RequestOutput` per prompt, in input order.

        A prompt is a string, a list of token ids or `{"prompt_token_ids": [...]}`; one prompt
        may be passed on its own. `sampling_params` is one for all prompts or one per prompt.
        """
        if _is_single_prompt(prompts):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")

        engine = self.llm_engine
        ids = [f"llm-{next(self._ids)}" for _ in prompts]
        try:
            for rid, prompt, p in zip(ids, prompts, params):
                engine.add_request(rid, prompt, p)
        except Exception:
            for rid in ids:  # all or nothing: a bad prompt leaves no half-submitted batch behind
                engine.abort_request(rid)
            raise

        done: dict[str, RequestOutput] = {}
        with tqdm(total=len(prompts), desc="Generating", unit="req", disable=not use_tqdm) as bar:
            while len(done) < len(ids):
                for out in engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
        return [done[rid] for rid in ids]

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             thinking: bool = False, tools: list[dict] | None = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them (DeepSeek-V4 chat encoding)."""
        from .chat import encode_messages

        tokenizer = self.get_tokenizer()
        if tokenizer is None:
            raise ValueError("chat needs a tokenizer, but the engine was started without one")
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        mode = "thinking" if thinking else "chat"
        # The encoded text starts with BOS itself, so no special tokens are added.
        prompts = [{"prompt": text, "prompt_token_ids": tokenizer.encode(text)}
                   for text in (encode_messages(c, mode, tools) for c in convs)]
        return self.generate(prompts, sampling_params, use_tqdm)
