"""``POST /tokenize`` and ``POST /detokenize``, in vLLM's shapes: clients count and check
tokens with the served model's own tokenizer (and chat encoding) without generating."""

from __future__ import annotations

import asyncio
from typing import Any

from dsv4.server.protocol import DetokenizeRequest, TokenizeRequest, bad_request
from dsv4.server.serving import OpenAIServing
from dsv4.server.serving_chat import OpenAIServingChat


class OpenAIServingTokens(OpenAIServing):
    """Handler of ``/tokenize`` and ``/detokenize``; chat messages go through ``chat``'s
    encoding, so the ids are those a chat completion would feed the model."""

    def __init__(self, chat: OpenAIServingChat) -> None:
        super().__init__(chat.engine, chat.model_names, chat.metrics)
        self.chat = chat

    def _tokenizer(self, param: str) -> Any:
        if self.engine.tokenizer is None:
            raise bad_request("this server has no tokenizer (skip_tokenizer_init)", param)
        return self.engine.tokenizer

    async def create_tokenize(self, request: TokenizeRequest) -> dict[str, Any]:
        self.check_model(request.model)
        request.check()
        if request.messages is not None:
            chat_request = request.chat_request()
            chat_request.check()
            ids = (await self.chat.prompt_ids(chat_request))[0]
        else:
            tok = self._tokenizer("prompt")
            ids = await asyncio.to_thread(tok.encode, request.prompt,
                                          add_special_tokens=request.add_special_tokens)
        return {"count": len(ids), "max_model_len": self.engine.max_model_len, "tokens": ids}

    async def create_detokenize(self, request: DetokenizeRequest) -> dict[str, Any]:
        self.check_model(request.model)
        tok = self._tokenizer("tokens")
        vocab = self.engine.engine.model_config.vocab_size
        bad = [t for t in request.tokens if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"tokens out of the vocabulary [0, {vocab}): {bad[:8]}", "tokens")
        return {"prompt": tok.decode(request.tokens)}
