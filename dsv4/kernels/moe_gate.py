"""The MoE gate of a decode batch in one launch: the gate's fp32 logits, the routing, the
routing plan and the experts' FP8 input (SPEC.md 7 and 3).

`gate_route_plan(u, gate, n_routed, bt, shared)` gives what four launches gave (`linear_f32`'s
GEMV, `routing.route`, `moe_plan.route_plan`'s one-program plan and `act_quant_fp8`) for up to
MAX_TOKENS tokens: each CTA computes BN experts' logits for every token (`_gemv_rows`, as the
GEMV launch computes them) and quantises one or more 128-blocks of u; the last CTA to finish,
found with an acq_rel counter after a barrier (the pattern of `moe._finish_swiglu`), routes
each token (`_route_row`, reading the logits past L1) and writes the plan (`_plan_small`). The
logits, experts, weights, activation codes and plan are those of the separate launches, bit for
bit: the same device functions in the same layouts. At batch 1 on the H200 the four launches
took ~9.5 us a layer (2.7 + 2.7 + 2.8 + 1.3) before the routed GEMMs could start.

`DSV4_MOE_GATE_FUSED=0` keeps the separate launches. The counter (one int32 a device, put back
to zero by the last CTA) is allocated by an eager call: a CUDA graph capture that would have
to allocate it keeps the separate launches.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch

from . import HAS_TRITON, use_triton
from .f32_linear import GEMV_MAX_K
from .moe_plan import SMALL_PLAN_SLOTS, plan_buffers
from .pdl import pdl
from .routing import FUNCS, INTERPRET

MAX_TOKENS = 4
FUSED = os.environ.get("DSV4_MOE_GATE_FUSED", "1") != "0"
_COUNTER: dict[torch.device, torch.Tensor] = {}


class GateArgs(NamedTuple):
    """A MoE layer's gate: the weight [E, d] (fp32 logits z = u W^T) and `routing.route`'s
    arguments."""
    weight: torch.Tensor
    func: str
    topk: int
    scaling: float
    bias: torch.Tensor | None = None
    table: torch.Tensor | None = None
    ids: torch.Tensor | None = None


def applies(u: torch.Tensor, gate: GateArgs) -> bool:
    t, d = u.shape
    e = gate.weight.shape[0]
    return (FUSED and use_triton(u) and 0 < t <= MAX_TOKENS and t * (gate.topk + 1) <= SMALL_PLAN_SLOTS
            and u.dtype in (torch.bfloat16, torch.float32) and d % 128 == 0 and d <= GEMV_MAX_K
            and gate.weight.shape[1] == d and gate.weight.dtype in (torch.bfloat16, torch.float32)
            and e <= 1024 and gate.topk <= e and gate.func in FUNCS
            and (gate.table is None) != (gate.bias is None))


def _counter(dev: torch.device) -> torch.Tensor | None:
    have = _COUNTER.get(dev)
    if have is None and not (dev.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        have = _COUNTER[dev] = torch.zeros(1, dtype=torch.int32, device=dev)
    return have


def gate_route_plan(u: torch.Tensor, gate: GateArgs, n_routed: int, bt: int, shared: bool):
    """(experts int64 [T, k], weights fp32 [T, k], (plan tensors, blocks, shared-expert blocks,
    routed blocks, e4m3 codes of u, their scales)) in one launch, or None where it does not
    apply (`applies`, or no counter under capture): the caller takes the separate ops."""
    cnt = _counter(u.device) if applies(u, gate) else None
    if cnt is None:
        return None
    u = u.contiguous()
    t, d = u.shape
    e, k = gate.weight.shape[0], gate.topk
    dev = u.device
    z = torch.empty(t, e, dtype=torch.float32, device=dev)
    idx = torch.empty(t, k, dtype=torch.int64, device=dev)
    wgt = torch.empty(t, k, dtype=torch.float32, device=dev)
    q = torch.empty(t, d, dtype=torch.float8_e4m3fn, device=dev)
    s = torch.empty(t, d // 128, dtype=torch.float32, device=dev)
    plan, n_blocks, shared_blocks, routed_blocks = plan_buffers(t, k, n_routed, bt, shared, dev)
    hashed = gate.table is not None
    bk = triton.next_power_of_2(d)
    bn = 2 if e <= 512 else 4  # the GEMV launch's rows a CTA and warps (`f32_linear._gemv`)
    nb = triton.cdiv(e, bn)
    _gate_route_plan_kernel[(nb,)](
        u, gate.weight.contiguous(), z, cnt, gate.bias if not hashed else z,
        gate.table if hashed else idx, gate.ids if hashed else idx, idx, wgt, q, s, *plan,
        t, e, d, float(gate.scaling), k, n_routed + 1, n_blocks, nb,
        BN=bn, BK=bk, FUNC=FUNCS[gate.func], K=k, KP2=triton.next_power_of_2(k),
        EP2=triton.next_power_of_2(e), HASH=hashed, PRECISE=not INTERPRET, BT=bt,
        S2=max(16, triton.next_power_of_2(t * (k + 1))),
        PEP2=triton.next_power_of_2(n_routed + 1), HAS_SHARED=shared, TP=MAX_TOKENS,
        num_warps=max(1, min(16, bn * bk // 2048)), **pdl())
    return idx, wgt, (plan, n_blocks, shared_blocks, routed_blocks, q, s)


if HAS_TRITON:
    import triton
    import triton.language as tl

    from .f32_linear import _gemv_rows
    from .moe_plan import _plan_small
    from .pdl import pdl_start
    from .quant_linear import _act_tile, _quant_block
    from .routing import _route_row

    @triton.jit(do_not_specialize=["T", "n_blocks"])
    def _gate_route_plan_kernel(u_ptr, w_ptr, z_ptr, count_ptr, bias_ptr, table_ptr, ids_ptr,
                                idx_ptr, wgt_ptr, q_ptr, s_ptr, slots_ptr, blk_exp_ptr,
                                blk_rows_ptr, T, E, D, scaling, k, n_exp, n_blocks, NB,
                                BN: tl.constexpr, BK: tl.constexpr, FUNC: tl.constexpr,
                                K: tl.constexpr, KP2: tl.constexpr, EP2: tl.constexpr,
                                HASH: tl.constexpr, PRECISE: tl.constexpr, BT: tl.constexpr,
                                S2: tl.constexpr, PEP2: tl.constexpr,
                                HAS_SHARED: tl.constexpr, TP: tl.constexpr,
                                PDL: tl.constexpr = False):
        """Grid (NB,): BN experts' logits of every token, then u's 128-blocks pid, pid + NB,
        ... as e4m3 codes and scales; the last CTA routes every token and writes the plan."""
        pdl_start(PDL)
        pid = tl.program_id(0)
        _gemv_rows(u_ptr, w_ptr, z_ptr, pid, T, E, D, BN, BK, 1.0, False)
        rows = tl.arange(0, TP)
        row_ok = rows < T
        c = tl.arange(0, 128)
        for kb in range(pid, D // 128, NB):
            qb, sb = _quant_block(_act_tile(u_ptr, rows, row_ok, kb, D, True).to(tl.float32))
            tl.store(q_ptr + rows[:, None] * D + kb * 128 + c[None, :], qb, mask=row_ok[:, None])
            tl.store(s_ptr + rows * (D // 128) + kb, sb, mask=row_ok)
        tl.debug_barrier()
        if tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu") == NB - 1:
            tl.atomic_xchg(count_ptr, 0, sem="relaxed", scope="gpu")  # ready for the next launch
            for row in range(T):
                _route_row(z_ptr, bias_ptr, table_ptr, ids_ptr, idx_ptr, wgt_ptr, E, scaling,
                           row, FUNC, K, KP2, EP2, HASH, PRECISE, True)
            tl.debug_barrier()  # the experts written above, read back by the plan
            _plan_small(idx_ptr, blk_exp_ptr, blk_rows_ptr, slots_ptr, T, k, n_exp, n_blocks, BT,
                        S2, PEP2, HAS_SHARED)
