"""Independent work of a layer on a second CUDA stream (opt-in: `DSV4_SIDE_STREAM=1`).

At batch 1 a layer is a chain of small kernels, each busy on a few SMs for a few
microseconds, and parts of the chain do not depend on each other: an attention layer's kv row
and its compressor do not need the query path. `SideBranch` issues such a part on a side
stream, beside the main stream's work, and `join()` makes the main stream wait for it. Under
CUDA-graph capture the fork and the join become edges of the graph. On the CPU (or with the
switch off) both are no-ops and the work runs in program order.

Off by default: it has not paid on the H200 (Flash-shaped 4-layer FP4 model). In
`benchmarks/launch_ab.py` decode was a little faster with it (time per output token at batch 1
/ 8 / 64: 1.073 / 2.044 / 4.016 -> 1.017 / 1.978 / 3.914 ms), but in `engine_gpu.py` the same
switch made batch-1 decode slower (1.06 -> 1.24 ms) and the eager prefill of 1K prompts 2-4x
slower (48K -> 29K tokens/s at batch 1, 98K -> 23K at batch 64).

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


def side_stream_on(device: torch.device) -> bool:
    return device.type == "cuda" and os.environ.get("DSV4_SIDE_STREAM", "0") == "1"


class SideBranch:
    """One fork of the current stream: `with branch.run(): ...` issues work on the side
    stream (forking at the first use), `branch.join()` makes the current stream wait for it."""

    def __init__(self, device: torch.device):
        self.on = side_stream_on(device)
        self._main = None

    @contextlib.contextmanager
    def run(self):
        if not self.on:
            yield
            return
        if self._main is None:
            self._main = torch.cuda.current_stream()
            self._side = _STREAMS.get(self._main.device)
            if self._side is None:
                self._side = _STREAMS[self._main.device] = torch.cuda.Stream(self._main.device)
            self._side.wait_stream(self._main)
        with torch.cuda.stream(self._side):
            yield

    def join(self) -> None:
        if self._main is not None:
            self._main.wait_stream(self._side)
            self._main = None
