"""Putting checkpoint tensors into a model's parameters, one tensor at a time.

Shared by the file loader and the dummy (random) loader. Packed FP4 bytes are reinterpreted,
everything else converted to the parameter's dtype on its device. With tensor parallelism each
rank takes only its slice (`dsv4.model.parallel.tp_slice`), and the file loader reads only that
slice from disk. An `attn.wo_a` that the model holds dequantised waits until all its parts have
arrived (they may sit in different shards), is dequantised whole, then sliced.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from ..distributed import SINGLE, ParallelGroup
from ..model.parallel import tp_slice
from ..quant.formats import dequant_fp8, dequant_mxfp4, dequant_nvfp4
from .checkpoint import CheckpointError
from .layout import PACKED_FP4, CheckpointLayout, LinearSpec


@torch.no_grad()
def assign(param: torch.Tensor, t: torch.Tensor) -> None:
    """Copy checkpoint tensor `t` into `param` on its device (int8 / uint8 / float4_e2m1fn_x2
    are the same packed FP4 bytes)."""
    if param.dtype in (torch.int8, torch.uint8) and t.dtype in PACKED_FP4:
        t = t.view(param.dtype)
    param.copy_(t.reshape(param.shape).to(param.device))


def dequantize(fmt: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """fp32 weight of a linear from its checkpoint tensors (by leaf name)."""
    w = parts["weight"]
    if fmt == "bf16":
        return w.float()
    if fmt == "fp8":
        return dequant_fp8(w, parts["scale"])
    if fmt == "fp4":
        return dequant_mxfp4(w.view(torch.int8), parts["scale"])
    if fmt == "nvfp4":
        return dequant_nvfp4(w.view(torch.uint8), parts["weight_scale"],
                             parts["weight_scale_2"].reshape(()))
    raise ValueError(f"unknown weight format {fmt!r}")


class ParamFiller:
    """Receives the tensors of a checkpoint layout by name and fills the model's parameters."""

    def __init__(self, model: torch.nn.Module, layout: CheckpointLayout,
                 tp: ParallelGroup = SINGLE):
        self.params = dict(model.named_parameters())
        self.cfg, self.tp = model.cfg, tp
        self.pending: dict[str, LinearSpec] = {
            t.name: lin for lin in layout.linears() if lin.dequantize_at_load for t in lin.tensors}
        self.parts: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)

    def index(self, name: str, shape: tuple[int, ...]):
        """What to read of tensor `name` (full `shape`): `()` all of it, a tuple of slices, or
        None when this rank holds none of it."""
        return () if name in self.pending else tp_slice(name, shape, self.cfg, self.tp)

    def put(self, name: str, t: torch.Tensor) -> None:
        """`t` is `index(name, ...)` of the checkpoint tensor."""
        lin = self.pending.get(name)
        if lin is None:
            _check_values(name, t, self.cfg)
            assign(self.params[name], t)
            return
        parts = self.parts[lin.prefix]
        parts[name.rpartition(".")[2]] = t
        if len(parts) == len(lin.tensors):
            w = dequantize(lin.fmt, self.parts.pop(lin.prefix))
            idx = tp_slice(f"{lin.prefix}.weight", tuple(w.shape), self.cfg, self.tp)
            if idx is not None:
                assign(self.params[f"{lin.prefix}.weight"], w[idx] if idx else w)


def _check_values(name: str, t: torch.Tensor, cfg) -> None:
    if name.endswith("tid2eid") and t.numel():
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= cfg.n_routed_experts:
            raise CheckpointError(name, [f"tensor {name!r}: expert ids must lie in "
                                         f"[0, {cfg.n_routed_experts}), found [{lo}, {hi}]"])
