"""Which storage format each linear of a checkpoint uses (SPEC.md section 2)."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from ..config import ConfigError


@dataclass
class QuantScheme:
    """`linear`: format of the FP8-class linears (wq_a, wq_b, wkv, wo_b, indexer.wq_b, shared
    experts, e_proj, h_proj); `experts`: format of the routed experts; `exclude`: module-name
    patterns (fnmatch, official names) that an NVFP4 checkpoint keeps in their original format
    (bf16, or FP8 where the loader finds it stored so); `quantized`: for ModelOpt's
    MIXED_PRECISION exports, the linears stored in NVFP4 (every other one is excluded)."""
    linear: str = "bf16"
    experts: str = "bf16"
    exclude: list[str] = field(default_factory=list)
    quantized: frozenset[str] | None = None

    @classmethod
    def from_config(cls, cfg) -> "QuantScheme":
        fmt = cfg.weight_format
        if fmt == "nvfp4":
            q = cfg.quantization_config or {}
            exclude = list(q.get("exclude_modules") or q.get("ignore") or [])
            return cls(linear="nvfp4", experts="nvfp4", exclude=exclude,
                       quantized=_mixed_precision_layers(q))
        experts = "fp4" if cfg.expert_dtype == "fp4" else fmt
        return cls(linear=fmt, experts=experts)

    def excludes(self, name: str) -> bool:
        """Whether the linear `name` keeps its original format."""
        if any(fnmatch.fnmatch(name, pat) for pat in self.exclude):
            return True
        return self.quantized is not None and name not in self.quantized

    def format_for(self, name: str, expert: bool = False) -> str:
        if self.excludes(name):
            return "bf16"
        return self.experts if expert else self.linear


def _mixed_precision_layers(q: dict) -> frozenset[str] | None:
    """The NVFP4 linears of a ModelOpt MIXED_PRECISION config (`quantized_layers`: name ->
    {"quant_algo": ..., "group_size": ...}), or None for a single-algorithm config."""
    if str(q.get("quant_algo", "")).upper() != "MIXED_PRECISION":
        return None
    layers = q.get("quantized_layers")
    if not isinstance(layers, dict) or not layers:
        raise ConfigError("quantization_config: quant_algo MIXED_PRECISION needs "
                          "`quantized_layers`, a mapping of layer names to their quant_algo")
    names = set()
    for name, spec in layers.items():
        algo = str((spec or {}).get("quant_algo", "")).upper() if isinstance(spec, dict) else ""
        if "NVFP4" not in algo or (spec.get("group_size") or 16) != 16:
            raise ConfigError(f"quantized_layers[{name!r}] = {spec!r}: dsv4 reads NVFP4 "
                              f"(group size 16) layers only")
        names.add(name.removeprefix("model."))
    return frozenset(names)
