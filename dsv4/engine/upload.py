"""Small host lists (row indices, per-row sampling parameters) onto the device without waiting.

`torch.tensor(values, device="cuda")` copies from pageable memory, and such a copy first waits
for every kernel already queued on the stream: the host stalls until the GPU has finished the
step, then launches the rest of it while the GPU idles. From pinned memory the copy is queued
like a kernel (PyTorch keeps the pinned block alive until the copy has run).
"""
from __future__ import annotations

import torch


def upload(values, device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    device = torch.device(device)
    t = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
    return t.to(device, non_blocking=True)
