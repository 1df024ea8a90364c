"""Programmatic dependent launch (PDL, sm_90+) for the Triton and Gluon kernels.

A decode step is ~190 small kernels (batch 1), each a few microseconds, so the launch and the
ramp-up of each one cost as much as its work. With PDL a kernel is launched while its
predecessor in the stream still runs: its CTAs are placed and start, and wait
(`griddepcontrol.wait`) until the predecessor has finished and its writes are visible. Every
kernel launched this way starts with `pdl_start(PDL)`: the wait first (nothing is read or
written before it, so a kernel sees exactly what it would without PDL, also through kernels
that do not use it), then `griddepcontrol.launch_dependents`, which lets the next kernel be
placed while this one works. CUDA graphs keep the launches' dependencies as programmatic edges.

Before its wait a kernel may read what no earlier kernel writes: `l2_prefetch` starts
bringing its weights into L2 while the predecessor still runs (`DSV4_L2_PREFETCH=n`,
`l2_prefetch_depth()`). Off by default: on the H200 it made every batch size slower (batch 1
1.068 -> 1.218 ms, batch 64 3.981 -> 4.407; `benchmarks/launch_ab.py`), the prefetches
competing with the running kernel's own loads.

`pdl()` gives a launch's keywords: `PDL=True, launch_pdl=True` on sm_90+ GPUs, nothing
elsewhere (older GPUs, Triton's CPU interpreter, `DSV4_PDL=0`) and inside `for_tokens(n)` with
n over PDL_MAX_TOKENS. H200, Flash-shaped 4-layer FP4 model, CUDA graphs (`engine_gpu.py`):
batch-1 decode 1.16 -> 1.06 ms a step, while batch 64 went 5.48 -> 5.55 ms and batch 256
8.90 -> 9.18 ms (large launches gain nothing from an earlier start, and the waiting CTAs of
the next one take SM slots), so the model's forward turns it on for small steps only. Policy
by batch size (`benchmarks/launch_ab.py`, 1K prompts, time per output token, plain -> PDL):
1 1.093 -> 1.068, 8 2.075 -> 2.020, 16 2.900 -> 2.825, 32 3.820 -> 3.799, 64 4.110 -> 3.981,
256 3.905 -> 4.024 ms: the threshold is 64.
"""
from __future__ import annotations

import contextlib
import os

import torch

from . import HAS_TRITON

# Steps of up to this many tokens launch with PDL (measured from 1 to 256: see the module)
PDL_MAX_TOKENS = 64

_ARGS: dict | None = None
_HOPPER: list[bool] = []  # cached: Triton with PDL, every GPU sm_90+, not the interpreter
_OFF: list[bool] = [False]  # inside for_tokens(n) with n > PDL_MAX_TOKENS


def _hopper() -> bool:
    if not _HOPPER:
        _HOPPER.append(HAS_TRITON and _HAS_GDC and os.environ.get("TRITON_INTERPRET") != "1"
                       and torch.cuda.is_available()
                       and all(torch.cuda.get_device_capability(i) >= (9, 0)
                               for i in range(torch.cuda.device_count())))
    return _HOPPER[0]


def pdl() -> dict:
    """Launch keywords that turn PDL on for one launch of a kernel with a `PDL` constexpr."""
    global _ARGS
    if _ARGS is None:
        on = _hopper() and os.environ.get("DSV4_PDL", "1") != "0"
        _ARGS = {"PDL": True, "launch_pdl": True} if on else {}
    return {} if _OFF[-1] else _ARGS


def l2_prefetch_depth() -> int:
    """`DSV4_L2_PREFETCH` (sm_90+ only): 0 (the default) no prefetch; n > 0: the small-batch
    linears request their CTA's weight bytes into L2 before the PDL wait, and the MoE GEMMs
    keep n K-blocks of weights (4 KB a 64-row group) requested ahead of their pipeline."""
    try:
        n = int(os.environ.get("DSV4_L2_PREFETCH", "0") or 0)
    except ValueError:
        raise ValueError("DSV4_L2_PREFETCH must be a whole number of K-blocks (0: off)") from None
    return max(0, n) if _hopper() else 0


def launch_policy() -> str:
    """One line for the start-up log: how the GPU kernels are launched."""
    if pdl() or _ARGS:
        how = f"programmatic dependent launch in steps of up to {PDL_MAX_TOKENS} tokens"
    else:
        how = ("plain launches (DSV4_PDL=0)" if _hopper() else
               "plain launches (programmatic dependent launch needs sm_90+ and Triton 3.6)")
    depth = l2_prefetch_depth()
    return how + (f"; L2 weight prefetch {depth} K-blocks ahead" if depth else "")


@contextlib.contextmanager
def for_tokens(n: int):
    """The launches of a forward over n tokens: PDL only up to PDL_MAX_TOKENS (a CUDA graph
    keeps what its capture chose)."""
    _OFF.append(n > PDL_MAX_TOKENS)
    try:
        yield
    finally:
        _OFF.pop()


_HAS_GDC = False
if HAS_TRITON:
    import triton
    import triton.language as tl

    try:
        import dataclasses

        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
        # the launch option and the instructions: Triton 3.6 has both
        _HAS_GDC = "launch_pdl" in {f.name for f in dataclasses.fields(CUDAOptions)}
    except ImportError:  # an older Triton: launches stay plain
        gdc_wait = gdc_launch_dependents = None

    @triton.jit
    def pdl_start(PDL: tl.constexpr):
        """First statement of a kernel that may be launched with PDL (see the module)."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()

    @triton.jit
    def l2_prefetch(ptr, nbytes, ON: tl.constexpr):
        """Hint: start bringing `nbytes` (int32, a multiple of 16, > 0) from each address of the
        pointer tensor `ptr` (16-byte aligned) into L2 (`cp.async.bulk.prefetch.L2`, sm_90).
        It only reads, and L2 is coherent, so it may precede `pdl_start` for bytes that no
        earlier kernel is writing (weights)."""
        if ON:
            addr = ptr.to(tl.int64, bitcast=True)
            size = tl.zeros(addr.shape, tl.int32) + nbytes
            tl.inline_asm_elementwise(
                asm="cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0;",
                constraints="=r,l,r", args=[addr, size], dtype=tl.int32, is_pure=False,
                pack=1)

    @triton.jit
    def l2_prefetch_one(ptr, nbytes, ON: tl.constexpr):
        """`l2_prefetch` of one run of bytes (scalar pointer and size), issued by thread 0."""
        if ON:
            tl.inline_asm_elementwise(
                asm="""{
                .reg .pred p;
                .reg .u32 t;
                mov.u32 t, %tid.x;
                setp.eq.u32 p, t, 0;
                @p cp.async.bulk.prefetch.L2.global [$1], $2;
                mov.u32 $0, 0;
                }""",
                constraints="=r,l,r", args=[ptr.to(tl.int64, bitcast=True), nbytes],
                dtype=tl.int32, is_pure=False, pack=1)


try:  # the Gluon kernels' form (`moe_mx_gluon.py`, `indexer_wg.py`); Gluon is experimental
    from triton.experimental import gluon as _gluon
    from triton.experimental.gluon import language as _gl

    @_gluon.jit
    def gluon_pdl_start(PDL: _gl.constexpr):
        """`pdl_start` for a Gluon kernel: wait, then let the next kernel be placed."""
        if PDL:
            _gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=_gl.int32,
                                       is_pure=False, pack=1)
            _gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [],
                                       dtype=_gl.int32, is_pure=False, pack=1)
except Exception:  # noqa: BLE001
    gluon_pdl_start = None
