"""Which storage format each linear of a checkpoint uses (SPEC.md section 2)."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field


@dataclass
class QuantScheme:
    """`linear`: format of the FP8-class linears (wq_a, wq_b, wkv, wo_b, indexer.wq_b, shared
    experts, e_proj, h_proj); `experts`: format of the routed experts; `exclude`: module-name
    patterns (fnmatch, official names) that an NVFP4 checkpoint keeps in bf16."""
    linear: str = "bf16"
    experts: str = "bf16"
    exclude: list[str] = field(default_factory=list)

    @classmethod
    def from_config(cls, cfg) -> "QuantScheme":
        fmt = cfg.weight_format
        if fmt == "nvfp4":
            q = cfg.quantization_config or {}
            exclude = list(q.get("exclude_modules") or q.get("ignore") or [])
            return cls(linear="nvfp4", experts="nvfp4", exclude=exclude)
        experts = "fp4" if cfg.expert_dtype == "fp4" else fmt
        return cls(linear=fmt, experts=experts)

    def format_for(self, name: str, expert: bool = False) -> str:
        if any(fnmatch.fnmatch(name, pat) for pat in self.exclude):
            return "bf16"
        return self.experts if expert else self.linear
