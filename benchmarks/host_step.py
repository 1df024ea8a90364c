"""Host time to describe one decode step to a CUDA graph (no GPU needed).

    python benchmarks/host_step.py

A graph step builds its ForwardBatch on the host and copies it into the graph's StaticBatch
(`StaticBatch.load`); the GPU waits for this every step (the engine reads the sampled ids
back before it builds the next step), so it adds to the time per output token. Flash
attention shapes (window 128, CSA m=4 and HCA m=128), one decode token per sequence.
"""
from __future__ import annotations

import time

from dsv4.cache.kv_cache import overlap_factor
from dsv4.config import ModelConfig
from dsv4.model.batch import ForwardBatch, SeqChunk, StaticBatch


def main() -> None:
    cfg = ModelConfig.preset("flash")
    w = cfg.sliding_window
    ratios = {m for m in cfg.compress_ratios if m}
    margin = 8  # the engine's ring margin without speculative decoding
    state_rows = {m: overlap_factor(m) * m + margin for m in ratios}  # as ModelCache.state_rows
    rows = w + margin
    print("| batch | ForwardBatch + StaticBatch.load (us) | ForwardBatch alone (us) |")
    print("|---|---|---|")
    for b in (1, 64, 256):
        slots = b + 1
        sb = StaticBatch(b, 1, ratios, state_rows, w, rows, slots, 4096, b, 10_000, "cpu")
        chunks = []
        for i in range(b):
            pos = 1030 + 7 * i
            nblk = pos // 128 + 1
            chunks.append(SeqChunk([5], pos, i, list(range(32 * i, 32 * i + nblk))))

        def build():
            return ForwardBatch(chunks, w, rows, slots, "cpu", logits_indices=list(range(b)))

        def timed(fn, n=200):
            for _ in range(5):
                fn()
            t = time.perf_counter()
            for _ in range(n):
                fn()
            return (time.perf_counter() - t) / n * 1e6

        print(f"| {b} | {timed(lambda: sb.load(build())):.0f} | {timed(build):.0f} |")


if __name__ == "__main__":
    main()
