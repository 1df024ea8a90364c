"""Which tensors a checkpoint must hold for a given model.

Parameter names are the checkpoint's names (SPEC.md section 2), so the layout is read off the
model itself: every linear contributes the tensors of its storage format (`weight`, `scale`,
`weight_scale`, ...), every other parameter one tensor. The one exception is `attn.wo_a` in a
format other than FP8 or bf16 (an NVFP4 build that quantised it): the model applies wo_a as a
working-dtype weight (SPEC.md 2), so it holds that one dequantised. FP8 `wo_a` (official
checkpoints) stays FP8: its dequantised values are exactly bf16.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..quant.linear import Linear, make_linear
from ..quant.scheme import QuantScheme

FLOATS = frozenset({torch.bfloat16, torch.float16, torch.float32})
INTS = frozenset({torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64})
PACKED_FP4 = frozenset({torch.int8, torch.uint8, torch.float4_e2m1fn_x2})


@dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor: its shape, the dtype official checkpoints (and make-tiny) store,
    and the dtypes the loader accepts for it."""
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    accepts: frozenset


@dataclass(frozen=True)
class LinearSpec:
    """A linear layer of the checkpoint: its format and the tensors that format stores."""
    prefix: str
    in_features: int
    out_features: int
    fmt: str
    tensors: tuple[TensorSpec, ...]
    dequantize_at_load: bool = False  # wo_a held as a working-dtype weight


@dataclass(frozen=True)
class ParamSpec:
    """A parameter that is not part of a linear (norms, hc_*, embed, gate, sink, ape)."""
    tensor: TensorSpec

    @property
    def tensors(self) -> tuple[TensorSpec, ...]:
        return (self.tensor,)


@dataclass
class CheckpointLayout:
    """Every tensor a checkpoint holds for one model, grouped by linear / parameter, in the
    model's module order (also the order make-tiny writes them)."""
    entries: list[LinearSpec | ParamSpec] = field(default_factory=list)

    def tensors(self) -> dict[str, TensorSpec]:
        return {t.name: t for e in self.entries for t in e.tensors}

    def linears(self) -> list[LinearSpec]:
        return [e for e in self.entries if isinstance(e, LinearSpec)]


class LoaderScheme(QuantScheme):
    """A QuantScheme whose per-module `overrides` win: an NVFP4 checkpoint keeps the modules of
    its exclude list "in their original format" (SPEC.md 2), which is bf16 or, in builds made
    from the official release, FP8. The checkpoint's own tensors tell which."""

    def __init__(self, base: QuantScheme, overrides: dict[str, str] | None = None):
        super().__init__(linear=base.linear, experts=base.experts, exclude=list(base.exclude),
                         quantized=base.quantized)
        self.overrides = dict(overrides or {})

    def format_for(self, name: str, expert: bool = False) -> str:
        return self.overrides.get(name) or super().format_for(name, expert)


def stored_dtype(name: str, p: torch.Tensor) -> torch.dtype:
    """Dtype of a non-linear parameter in official checkpoints: fp32 for hc_*, attn_sink, ape and
    gate.bias, int32 for tid2eid, bf16 for the rest (norms are bf16 on disk, fp32 in the model)."""
    if not p.is_floating_point():
        return torch.int32
    leaf = name.rsplit(".", 1)[-1]
    if leaf.startswith("hc_") or leaf in ("attn_sink", "ape") or name.endswith("gate.bias"):
        return torch.float32
    return torch.bfloat16


def _linear_tensors(prefix: str, lin: Linear) -> tuple[TensorSpec, ...]:
    out = []
    for pname, p in lin.named_parameters():
        if lin.fmt == "bf16":
            dtype, accepts = torch.bfloat16, FLOATS
        elif lin.fmt in ("fp4", "nvfp4") and pname == "weight":
            dtype, accepts = p.dtype, PACKED_FP4
        else:
            dtype, accepts = p.dtype, frozenset({p.dtype})
        out.append(TensorSpec(f"{prefix}.{pname}", tuple(p.shape), dtype, accepts))
    return tuple(out)


def checkpoint_layout(model: nn.Module, scheme: QuantScheme) -> CheckpointLayout:
    """The tensors a checkpoint needs for `model` (which may live on the meta device)."""
    layout = CheckpointLayout()
    for prefix, mod in model.named_modules():
        if isinstance(mod, Linear):
            # wo_a in a format the model does not hold it in (anything but FP8 and bf16)
            held_dequantized = (prefix.endswith("attn.wo_a")
                                and scheme.format_for(prefix) != mod.fmt)
            if held_dequantized:
                fmt = scheme.format_for(prefix)
                with torch.device("meta"):
                    stored = make_linear(mod.in_features, mod.out_features, fmt)
            else:
                fmt, stored = mod.fmt, mod
            layout.entries.append(LinearSpec(prefix, mod.in_features, mod.out_features, fmt,
                                             _linear_tensors(prefix, stored), held_dequantized))
            continue
        for pname, p in mod.named_parameters(recurse=False):
            name = f"{prefix}.{pname}" if prefix else pname
            accepts = FLOATS if p.is_floating_point() else INTS
            layout.entries.append(ParamSpec(TensorSpec(name, tuple(p.shape),
                                                       stored_dtype(name, p), accepts)))
    return layout


def check_tensor(spec: TensorSpec, dtype: torch.dtype, shape: tuple[int, ...]) -> list[str]:
    """Problems of one found tensor against its spec (empty when it fits)."""
    problems = []
    if dtype not in spec.accepts:
        want = " or ".join(sorted(str(d).removeprefix("torch.") for d in spec.accepts))
        problems.append(f"tensor {spec.name!r}: wrong dtype: expected {want}, "
                        f"found {str(dtype).removeprefix('torch.')}")
    scalar = spec.shape == () and tuple(shape) in ((), (1,))
    if tuple(shape) != spec.shape and not scalar:
        problems.append(f"tensor {spec.name!r}: wrong shape: expected {list(spec.shape)}, "
                        f"found {list(shape)}")
    return problems
