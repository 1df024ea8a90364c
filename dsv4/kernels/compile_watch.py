"""Triton compiles as they happen (its `jit_cache_hook` / `jit_post_compile_hook` knobs).

A kernel compiles the first time it meets a new set of launch arguments: constexprs, integer
arguments that Triton specialises (equal to 1, divisible by 16), pointer alignment. In a server
that is seconds inside some request, so the engine warms the step shapes up at start-up and
watches for compiles afterwards (`LLMEngine`: a warning and a counter per compile while
serving). `benchmarks/jit_compiles.py` lists them with the argument that made each new.
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable

logger = logging.getLogger(__name__)


@dataclass
class Compile:
    kernel: str
    seconds: float
    args: dict[str, Any]  # constexpr values; other arguments as their type, "/16" if aligned
    new: dict[str, str] | None  # what differs from the closest earlier variant (None: first)

    def constants(self) -> dict[str, Any]:
        """The launch arguments that are values (constexprs, warps, stages), not types."""
        return {k: v for k, v in self.args.items() if not isinstance(v, str)}


class CompileWatch:
    """Calls `on_compile(Compile)` after every Triton compile in this process until `close()`;
    chains any hooks that were installed before. Without Triton (or a Triton without these
    knobs) it watches nothing (`active` False)."""

    def __init__(self, on_compile: Callable[[Compile], None], runtime: Any = None):
        """`runtime`: where the hooks go (tests); by default `triton.knobs.runtime`."""
        self.on_compile = on_compile
        self._variants: dict[str, list[dict]] = defaultdict(list)
        self._start: dict[str, float] = {}
        self._runtime = runtime
        if runtime is None:
            try:
                from triton import knobs
                self._runtime = knobs.runtime
                self._runtime.jit_post_compile_hook  # noqa: B018 - present since Triton 3.4
            except (ImportError, AttributeError):
                self._runtime = None
                return
        self._prev = (self._runtime.jit_cache_hook, self._runtime.jit_post_compile_hook)
        self._runtime.jit_cache_hook = self._before
        self._runtime.jit_post_compile_hook = self._after

    @property
    def active(self) -> bool:
        return self._runtime is not None and not self._closed

    def close(self) -> None:
        """Stop watching: the hooks before this watch come back if this watch's are still the
        installed ones; if a later watch chained them, this one only passes calls on."""
        if self._runtime is None:
            return
        if (self._runtime.jit_cache_hook == self._before
                and self._runtime.jit_post_compile_hook == self._after):
            self._runtime.jit_cache_hook, self._runtime.jit_post_compile_hook = self._prev
        self._closed = True

    _closed = False

    def _before(self, **kw):
        if not self._closed:
            self._start[str(kw.get("key"))] = time.perf_counter()
        prev = self._prev[0]
        return prev(**kw) if prev is not None else False  # False: compile

    def _after(self, **kw):
        if not self._closed:
            try:
                self._record(kw)
            except Exception as e:  # noqa: BLE001 - a watch must never fail a compile
                logger.debug("compile watch: unexpected hook arguments (%s)", e)
        prev = self._prev[1]
        return prev(**kw) if prev is not None else None

    def _record(self, kw: dict) -> None:
        seconds = time.perf_counter() - self._start.pop(str(kw.get("key")), time.perf_counter())
        name = kw["fn"].name
        args = launch_args(kw["fn"].jit_function.arg_names, kw["compile"])
        seen = self._variants[name]
        new = None
        if seen:
            near = min(seen, key=lambda v: sum(v.get(k) != x for k, x in args.items()))
            new = {k: f"{near.get(k)} -> {x}" for k, x in args.items() if near.get(k) != x}
        seen.append(args)
        self.on_compile(Compile(name, seconds, args, new))


def launch_args(names: list[str], compile: dict) -> dict[str, Any]:
    """A compile's arguments by name (`compile`: the hooks' `compile` keyword)."""
    attrs = compile["configs"][0]
    out: dict[str, Any] = {}
    for i, name in enumerate(names):
        if (i,) in compile["constants"]:
            value = compile["constants"][(i,)]
            out[name] = getattr(value, "value", value)
        else:
            aligned = any(a[0] == "tt.divisibility" for a in attrs.get((i,), []))
            out[name] = str(compile["signature"].get(name, "?")) + ("/16" if aligned else "")
    out["num_warps"], out["num_stages"] = compile["num_warps"], compile["num_stages"]
    return out
