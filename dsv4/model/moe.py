"""Mixture of experts: hash or sqrt-softplus routing, clamped SwiGLU experts, a shared expert
(SPEC.md 7)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from ..distributed import SINGLE, ParallelGroup
from ..kernels.f32_linear import linear_f32
from ..kernels.moe import moe_forward, moe_gate_forward
from ..kernels.moe_gate import GateArgs
from ..kernels.routing import route
from ..quant.linear import make_linear


class Gate(nn.Module):
    """Routing in fp32. Hash layers look the experts up by token id (`tid2eid`); dense layers
    take the top-k of score + bias. Weights are the scores of the chosen experts, normalised
    (unless softmax) and multiplied by routed_scaling_factor."""

    def __init__(self, cfg, hash_layer: bool, dtype: torch.dtype):
        super().__init__()
        self.topk, self.func = cfg.num_experts_per_tok, cfg.scoring_func
        self.scaling, self.hash = cfg.routed_scaling_factor, hash_layer
        self.weight = nn.Parameter(torch.zeros(cfg.n_routed_experts, cfg.hidden_size, dtype=dtype),
                                   requires_grad=False)
        if hash_layer:
            self.tid2eid = nn.Parameter(torch.zeros(cfg.vocab_size, self.topk, dtype=torch.int32),
                                        requires_grad=False)
        else:
            self.bias = nn.Parameter(torch.zeros(cfg.n_routed_experts), requires_grad=False)

    def args(self, input_ids: torch.Tensor) -> GateArgs:
        if self.hash:
            return GateArgs(self.weight, self.func, self.topk, self.scaling, table=self.tid2eid,
                            ids=input_ids)
        return GateArgs(self.weight, self.func, self.topk, self.scaling, bias=self.bias)

    def forward(self, u: torch.Tensor, input_ids: torch.Tensor):
        a = self.args(input_ids)
        z = linear_f32(u, self.weight)  # [T, E], fp32
        return route(z, a.func, a.topk, a.scaling, a.bias, a.table, a.ids)


class Expert(nn.Module):
    """SwiGLU with clamping: silu(min(w1 x, L)) * clamp(w3 x, -L, L) * weight, then w2."""

    def __init__(self, dim: int, inter: int, fmt: str, limit: float, dtype: torch.dtype):
        super().__init__()
        self.limit = limit
        self.w1 = make_linear(dim, inter, fmt, dtype)
        self.w2 = make_linear(inter, dim, fmt, dtype)
        self.w3 = make_linear(dim, inter, fmt, dtype)

    def forward(self, u: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        g, v = self.w1(u).float(), self.w3(u).float()
        if self.limit > 0:
            v = v.clamp(-self.limit, self.limit)
            g = g.clamp(max=self.limit)
        h = F.silu(g) * v
        if weight is not None:  # routing weight applied before w2, as the model was trained
            h = h * weight[:, None]
        return self.w2(h.to(u.dtype))


def expert_format(scheme, name: str, expert: bool = False) -> str:
    """One storage format for the expert module `name` and its linears w1, w2, w3. Exclude
    patterns (NVFP4 checkpoints) may name the linears (`*.ffn.shared_experts.*`, ModelOpt's
    way) or the module (`*.shared_experts`), and a loader may override each linear."""
    default = scheme.experts if expert else scheme.linear
    per_linear = {scheme.format_for(f"{name}.{w}", expert) for w in ("w1", "w2", "w3")}
    if len(per_linear) > 1:
        raise ConfigError(f"{name}: its linears w1, w2, w3 come in different formats "
                          f"({', '.join(sorted(per_linear))}); an expert takes one")
    fmt = per_linear.pop()
    if fmt == default and scheme.quantized is None:  # a pattern may name the module itself
        return scheme.format_for(name, expert)
    return fmt


class MoE(nn.Module):
    """Routed experts + shared expert. With expert parallelism each rank holds a contiguous
    range of the routed experts (keyed by their global id, as in the checkpoint) and a slice of
    the shared expert's intermediate channels; every rank sees every token (attention output is
    replicated), computes its part, and one all-reduce sums the parts. On one rank the GPU
    kernels may return the slot rows [S, T, k+1, d] (`moe_forward(parts=True)`) instead of
    their sum: the block's hyper-connection post update sums them in its own pass."""

    def __init__(self, cfg, layer: int, scheme, prefix: str, dtype: torch.dtype,
                 tp: ParallelGroup = SINGLE):
        super().__init__()
        d = cfg.hidden_size
        self.tp = tp
        self.gate = Gate(cfg, layer < cfg.num_hash_layers, dtype)
        self.first, n_local = tp.split(cfg.n_routed_experts, "n_routed_experts")
        self.experts = nn.ModuleDict({
            str(e): Expert(d, cfg.moe_intermediate_size,
                           expert_format(scheme, f"{prefix}.experts.{e}", expert=True),
                           cfg.swiglu_limit, dtype)
            for e in range(self.first, self.first + n_local)})
        _, inter = tp.split(cfg.moe_intermediate_size, "moe_intermediate_size")
        self.shared_experts = Expert(d, inter, expert_format(scheme, f"{prefix}.shared_experts"),
                                     cfg.swiglu_limit, dtype)
        self._local = list(self.experts.values())

    def forward(self, u: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:  # on the GPU kernels possibly the slot rows, which hc_post sums
            return moe_gate_forward(u, self.gate.args(input_ids), self._local,
                                    self.shared_experts, parts=True)
        idx, wgt = self.gate(u, input_ids)  # [T, k]
        # other ranks' experts: marked n_local, computed nowhere here; this rank's slice of
        # the shared expert (narrower than a routed expert) runs on its own linears
        n_local = len(self._local)
        local = (idx >= self.first) & (idx < self.first + n_local)
        idx = torch.where(local, idx - self.first, n_local)
        wgt = torch.where(local, wgt, 0.0)
        y = moe_forward(u, idx, wgt, self._local, None, total_experts=n_local * self.tp.size)
        return self.tp.all_reduce((y.float() + self.shared_experts(u).float()).to(u.dtype))
