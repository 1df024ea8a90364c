"""dsv4: a DeepSeek-V4 inference engine.

`from dsv4 import LLM, SamplingParams` is the offline API. Names are imported lazily, so that
`import dsv4.config` (or the CLI's --help) does not pay for building the engine's imports.
"""
from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

__all__ = ["LLM", "SamplingParams", "StructuredOutputs", "RequestOutput", "CompletionOutput",
           "RequestOutputKind"]

_EXPORTS = {
    "LLM": "dsv4.llm",
    "SamplingParams": "dsv4.engine.sampler",
    "StructuredOutputs": "dsv4.engine.structured",
    "RequestOutput": "dsv4.engine.outputs",
    "CompletionOutput": "dsv4.engine.outputs",
    "RequestOutputKind": "dsv4.engine.outputs",
}

if TYPE_CHECKING:
    from .engine.outputs import CompletionOutput, RequestOutput, RequestOutputKind
    from .engine.sampler import SamplingParams
    from .engine.structured import StructuredOutputs
    from .llm import LLM


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dsv4' has no attribute {name!r}")


# Like vLLM, show the engine's start-up lines (capacity) on stderr unless the application
# configures logging itself; DSV4_CONFIGURE_LOGGING=0 turns this off.
_logger = logging.getLogger("dsv4")
if os.environ.get("DSV4_CONFIGURE_LOGGING", "1") != "0" and not _logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    _logger.addHandler(_handler)
    _logger.setLevel(logging.INFO)
