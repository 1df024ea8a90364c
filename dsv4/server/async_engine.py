"""AsyncLLMEngine: one background thread owns the LLMEngine; asyncio tasks stream its outputs.

The engine is not thread-safe and its ``step()`` blocks for a whole forward pass, so it lives
on a single thread that alternates between (1) running the commands queued by the event loop
(add, abort, stop) and (2) one ``step()``. The event loop never touches the engine: it queues
a command and awaits its future, and the thread hands each step's outputs back with
``loop.call_soon_threadsafe``. Requests therefore join and leave only between steps, which is
what the scheduler expects.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from ..engine.outputs import RequestOutputKind

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread stopped (shutdown, or an exception in ``step()``)."""


class _Stream:
    """Latest cumulative output of one request, plus a wake-up for its consumer.

    Outputs are cumulative, so a slow consumer only needs the newest one: keeping one object
    instead of a queue bounds memory whatever the client's speed. A request the engine runs
    with output_kind DELTA (what `add_request` asks for a CUMULATIVE one) hands out only each
    step's new part: the parts wait in `pending` and the consumer appends them to the
    cumulative state when it takes it (`take`), so a step costs what it added, not a copy of
    a long output's every token for every request (at 256 streams of 8K tokens, ~21 ms of
    host time a step on a slow CPU against ~1 ms), and the state never changes while the
    consumer works on it.
    """

    def __init__(self, delta: bool = False) -> None:
        self.latest: Any = None
        self.delta = delta
        self.pending: list[Any] = []
        self.error: BaseException | None = None
        self.event = asyncio.Event()

    def put(self, output: Any) -> None:
        """A step's output: the new cumulative state, or (delta) its new part."""
        if self.delta:
            self.pending.append(output)
        else:
            self.latest = output

    def take(self) -> Any:
        """The cumulative state, with the parts that came since the last call appended."""
        parts, self.pending = self.pending, []
        for output in parts:
            if self.latest is None:
                self.latest = output
                continue
            acc = self.latest
            for c, d in zip(acc.outputs, output.outputs):
                c.token_ids.extend(d.token_ids)
                c.text += d.text
                if d.logprobs is not None:
                    c.logprobs.extend(d.logprobs)
                c.cumulative_logprob, c.finish_reason, c.stop_reason = (
                    d.cumulative_logprob, d.finish_reason, d.stop_reason)
            if output.prompt_logprobs:
                acc.prompt_logprobs.extend(output.prompt_logprobs)
            acc.finished, acc.metrics = output.finished, output.metrics
            acc.num_cached_tokens = output.num_cached_tokens
        return self.latest


class AsyncLLMEngine:
    """Serve one ``LLMEngine`` to many asyncio tasks (see the module docstring)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_model_len: int = engine.max_model_len
        self.default_sampling: dict = getattr(engine, "default_sampling", {})
        self._commands: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future]] = \
            queue.SimpleQueue()
        self._wake = threading.Event()
        # Guards `dead` against `_commands`: no command may be queued after the final drain.
        self._lock = threading.Lock()
        self._streams: dict[str, _Stream] = {}  # touched only on the event loop
        self._live: set[str] = set()  # engine-side ids not finished yet; engine thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.dead: BaseException | None = None
        self.stats = engine.get_stats()  # snapshot refreshed after every step

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the engine thread; call from the event loop that will consume outputs."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="dsv4-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        """Abort every unfinished request, stop the thread and wait for it."""
        if self._thread is None:
            return
        try:
            await self._call(self._stop)
        except EngineDeadError:
            pass
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        close = getattr(self.engine, "close", None)
        if close is not None:  # tensor parallel: stop the worker ranks
            close()
        for stream in self._streams.values():
            stream.error = stream.error or EngineDeadError("the server is shutting down")
            stream.event.set()

    # ------------------------------------------------------------------ requests

    async def add_request(self, request_id: str, prompt: str | list[int] | dict, params: Any,
                          priority: int = 0) -> AsyncIterator[Any]:
        """Add a request; return an iterator over its cumulative ``RequestOutput`` objects.

        The engine's validation ``ValueError`` is raised here, before anything is streamed.
        The iterator ends after the finished output; if its consumer stops early (a client
        disconnect cancels the task) the request is aborted and its cache blocks freed.
        """
        so = getattr(params, "structured_outputs", None)
        if so is not None and so.compiled is None:  # off the engine's thread (it steps)
            so.compiled = await asyncio.get_running_loop().run_in_executor(
                None, self.engine.compile_structured, so)
        delta = getattr(params, "output_kind", None) == RequestOutputKind.CUMULATIVE
        if delta:  # the stream keeps the cumulative state (`_Stream`)
            params = dataclasses.replace(params, output_kind=RequestOutputKind.DELTA)
        stream = _Stream(delta)
        self._streams[request_id] = stream
        try:
            await self._call(lambda: self._add(request_id, prompt, params, priority))
        except BaseException:
            self._streams.pop(request_id, None)
            self.abort(request_id)  # in case a cancellation raced with a successful add
            raise
        return self._iterate(request_id, stream)

    async def _iterate(self, request_id: str, stream: _Stream) -> AsyncIterator[Any]:
        finished = False
        try:
            while True:
                await stream.event.wait()
                stream.event.clear()
                if stream.error is not None:
                    raise stream.error
                output = stream.take()
                finished = output.finished
                yield output
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Queue an abort; never blocks (it is called from ``finally`` blocks of cancelled tasks)."""
        try:
            self._submit(lambda: self._abort(request_id))
        except EngineDeadError:
            pass  # nothing left to free

    # ------------------------------------------------------------------ plumbing

    def _submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self.dead is not None:
                raise EngineDeadError(f"the engine is not running: {self.dead}")
            self._commands.put((fn, future))
        self._wake.set()
        return future

    async def _call(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.wrap_future(self._submit(fn))

    def _add(self, request_id: str, prompt: str | list[int] | dict, params: Any,
             priority: int = 0) -> None:
        self.engine.add_request(request_id, prompt, params, priority=priority)
        self._live.add(request_id)

    def _abort(self, request_id: str) -> None:
        if request_id in self._live:
            self.engine.abort_request(request_id)
            self._live.discard(request_id)
            self.stats = self.engine.get_stats()

    def _stop(self) -> None:
        for request_id in list(self._live):
            self._abort(request_id)
        self._stopping = True

    def _run_commands(self) -> None:
        while True:
            try:
                fn, future = self._commands.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the awaiting task, e.g. ValueError -> 400
                future.set_exception(exc)

    def _run(self) -> None:
        try:
            device = getattr(self.engine, "device", None)
            if device is not None and device.type == "cuda" and device.index is not None:
                import torch

                # The current CUDA device is per thread; kernels must launch on the model's.
                torch.cuda.set_device(device)
            while not self._stopping:
                self._wake.clear()
                self._run_commands()
                if self._stopping:
                    break
                if not self.engine.has_unfinished_requests():
                    self._wake.wait()
                    continue
                outputs = self.engine.step()
                for output in outputs:
                    if output.finished:
                        self._live.discard(output.request_id)
                self.stats = self.engine.get_stats()
                if outputs:
                    self._loop.call_soon_threadsafe(self._deliver, outputs, None)
            reason: BaseException = EngineDeadError("the engine was shut down")
        except BaseException as exc:
            logger.exception("engine thread failed")
            reason = EngineDeadError(f"engine failed: {exc!r}")
            self._loop.call_soon_threadsafe(self._deliver, [], reason)
        with self._lock:
            self.dead = reason
            # Commands queued before `dead` was set would otherwise wait forever.
            while True:
                try:
                    _, future = self._commands.get_nowait()
                except queue.Empty:
                    break
                if future.set_running_or_notify_cancel():
                    future.set_exception(reason)

    def _deliver(self, outputs: list[Any], error: BaseException | None) -> None:
        if error is not None:
            for stream in self._streams.values():
                stream.error = error
                stream.event.set()
            return
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:  # None: aborted while this step ran
                stream.put(output)
                stream.event.set()
