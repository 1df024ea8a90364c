"""GPU kernels and their torch references; the one place that chooses between them.

Each op file holds a Triton kernel (defined only when CUDA and Triton are present), its
launcher, and the pure-torch reference used on CPU and in tests. `use_triton(t)` is the single
dispatch rule: a CUDA tensor with Triton available and DSV4_DISABLE_TRITON unset.
"""
from __future__ import annotations

import importlib.util
import logging
import os

import torch

# TRITON_INTERPRET=1 (Triton's CPU interpreter) defines the kernels without a GPU, for debugging.
HAS_TRITON = ((torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
              and importlib.util.find_spec("triton") is not None)


def use_triton(t: torch.Tensor) -> bool:
    return HAS_TRITON and t.is_cuda and not os.environ.get("DSV4_DISABLE_TRITON")


_NUM_SMS: dict = {}


def num_sms(device) -> int:
    """Multiprocessors of a CUDA device (132 under Triton's CPU interpreter), cached."""
    device = torch.device(device)
    if device.type != "cuda":
        return 132
    if device.index not in _NUM_SMS:
        _NUM_SMS[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return _NUM_SMS[device.index]


def gluon_failed(failed: list[str], exc: Exception, what: str, fallback: str) -> None:
    """Remember that a Gluon kernel did not build or launch here (`failed`: its caller keeps
    the `fallback` kernel from then on; Gluon is an experimental API) and warn with the error's
    first line. Running out of memory is not the kernel's fault: it is raised again."""
    if isinstance(exc, torch.OutOfMemoryError):
        raise exc
    failed.append(repr(exc))
    logging.getLogger(__name__).warning(
        "%s unavailable (%s); using the %s", what,
        (str(exc).splitlines() or [type(exc).__name__])[0][:200], fallback)
