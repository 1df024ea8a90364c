"""Independent work of a layer on a second CUDA stream.

At batch 1 a layer is a chain of small kernels, each busy on a few SMs for a few
microseconds, and parts of the chain do not depend on each other: an attention layer's kv row
and its compressor do not need the query path. `SideBranch` issues such a part on a side
stream, beside the main stream's work, and `join()` makes the main stream wait for it. Under
CUDA-graph capture the fork and the join become edges of the graph. On the CPU (or with the
branch off) both are no-ops and the work runs in program order.

When: `DSV4_SIDE_STREAM` = `auto` (the default) forks decode-sized steps, of up to
SIDE_MAX_TOKENS tokens, in the layers that have a compressor (the attention layers without one
keep their kv row and query in one paired launch: a fork there only adds the fork); `1` forks
every step of those layers, `0` none; `wide` (opt-in, `side_streams_wide`) forks as `auto` with
three side streams in CSA layers. H200, Flash-shaped 4-layer FP4 model, CUDA graphs
(`benchmarks/launch_ab.py --policies no-side default side`, thirty-sixth session; two of the
four layers compress): time per output token at batch 1 / 8 0.868 / 1.585 (one stream) ->
0.845 / 1.556 (`auto`) and 0.848 / 1.555 (`1`); an earlier run, one stream against every
layer forking, 0.865 / 1.574 / 3.851 -> 0.831 / 1.541 / 3.782 ms at 1 / 8 / 64; the CSA
layer's step 200 -> 167 us (its two compressors, 33 us of small launches, ran before its
query path). Prefill chunks stay on one stream: in the ninth
session (`DSV4_SIDE_STREAM=1` on every step) eager prefill of 1K prompts was 2-4x slower.

What keeps it race-free is the caller's part:
- everything the branch reads exists before the fork and stays referenced until the join
  (batch tensors that are built on first use are built on the main stream first);
- what the branch makes is read on the main stream only after the join;
- every branch is joined before the layer returns (memory the branch allocated is then only
  reused after the main stream's later work, since the next fork waits for it).
"""
from __future__ import annotations

import contextlib
import os

import torch

_STREAMS: dict = {}
SIDE_MAX_TOKENS = 64  # `auto` forks steps of up to this many tokens (decode batches)


def side_stream_mode() -> str:
    mode = os.environ.get("DSV4_SIDE_STREAM", "auto").strip().lower() or "auto"
    if mode not in ("auto", "0", "1", "wide"):
        raise ValueError(f"DSV4_SIDE_STREAM must be auto, wide, 0 or 1, got {mode!r}")
    return mode


def side_stream_on(device: torch.device, tokens: int | None = None) -> bool:
    """Whether a step of `tokens` tokens forks (None: whether any step may)."""
    if device.type != "cuda":
        return False
    mode = side_stream_mode()
    if mode in ("auto", "wide"):
        return tokens is None or tokens <= SIDE_MAX_TOKENS
    return mode == "1"


def side_streams_wide() -> bool:
    """`wide` (opt-in; thirty-seventh session, `launch_ab.py --policies default wide`: no
    faster, 0.840 / 1.521 / 3.815 against 0.828 / 1.530 / 3.774 ms at batch 1 / 8 / 64, GPU
    tests bit-equal): the steps `auto` forks, and in CSA layers three side
    streams instead of one: the kv row with the attention's compressor, the indexer's
    compressor, and the attention's query (wq_b and its RoPE, forked once the q latent is
    made) while the main stream makes the indexer's query (the thirty-sixth session's
    batch-1 timeline: ~50 us of small launches on each of the two streams of a CSA layer)."""
    return side_stream_mode() == "wide"


def side_stream_policy() -> str:
    """For the engine's start-up line."""
    mode = side_stream_mode()
    return {"auto": f"attention side stream in steps of up to {SIDE_MAX_TOKENS} tokens",
            "wide": f"attention side streams (three in CSA layers) in steps of up to "
                    f"{SIDE_MAX_TOKENS} tokens",
            "1": "attention side stream in every step", "0": ""}[mode]


class SideBranch:
    """One fork of the current stream: `with branch.run(): ...` issues work on the side
    stream (forking at the first use), `branch.join()` makes the current stream wait for it."""

    def __init__(self, device: torch.device, tokens: int | None = None, enabled: bool = True,
                 lane: int = 0):
        self.on = enabled and side_stream_on(device, tokens)
        self.lane = lane  # branches of different lanes run on different streams
        self._main = None

    @contextlib.contextmanager
    def run(self):
        if not self.on:
            yield
            return
        if self._main is None:
            self._main = torch.cuda.current_stream()
            key = (self._main.device, self.lane)
            self._side = _STREAMS.get(key)
            if self._side is None:
                self._side = _STREAMS[key] = torch.cuda.Stream(self._main.device)
            self._side.wait_stream(self._main)
        with torch.cuda.stream(self._side):
            yield

    def join(self) -> None:
        if self._main is not None:
            self._main.wait_stream(self._side)
            self._main = None
