"""The MoE op's reference (`dsv4.kernels.moe.moe_forward` on CPU) is SPEC.md 7: every token's
output is the fp32 sum of its routed experts' outputs (routing weight applied before w2) and
the shared expert's, cast once to the working dtype."""
import pytest
import torch

from dsv4.config import ModelConfig
from dsv4.kernels.moe import moe_forward, moe_forward_ref
from dsv4.model.moe import MoE, Expert
from dsv4.quant.scheme import QuantScheme

D, INTER, E, K = 128, 128, 6, 2  # multiples of 128: the quantised formats need whole blocks


def _experts(fmt: str, shared_fmt: str, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    experts = torch.nn.ModuleList(Expert(D, INTER, fmt, 10.0, dtype) for _ in range(E))
    shared = Expert(D, INTER, shared_fmt, 10.0, dtype)
    for m in [*experts, shared]:
        for lin in (m.w1, m.w2, m.w3):
            w = torch.randn(lin.out_features, lin.in_features, generator=g) * 3 / lin.in_features ** 0.5
            lin.set_float(w.to(dtype).float() if fmt == "bf16" else w)
    return experts, shared


def _per_token(u, idx, wgt, experts, shared):
    """SPEC.md 7 written token by token."""
    rows = []
    for t in range(u.shape[0]):
        y = shared(u[t:t + 1]).float()
        for j in range(idx.shape[1]):
            y = y + experts[int(idx[t, j])](u[t:t + 1], wgt[t, j:j + 1]).float()
        rows.append(y)
    return torch.cat(rows).to(u.dtype)


@pytest.mark.parametrize("fmt,shared_fmt", [("fp4", "fp8"), ("fp8", "fp8"), ("nvfp4", "nvfp4"),
                                            ("bf16", "bf16")])
def test_reference_is_the_per_token_sum(fmt, shared_fmt):
    experts, shared = _experts(fmt, shared_fmt, torch.float32)
    g = torch.Generator().manual_seed(1)
    u = torch.randn(5, D, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(5)])
    wgt = torch.rand(5, K, generator=g) + 0.1
    got, want = moe_forward_ref(u, idx, wgt, experts, shared), _per_token(u, idx, wgt, experts, shared)
    err = ((got - want).norm() / want.norm()).item()
    assert err < 1e-6, f"{fmt}: relative error {err:.2e} between per-expert and per-token sums"


def test_duplicate_experts_of_a_token_count_twice():
    """A hash table may send a token to one expert twice; both slots contribute."""
    experts, shared = _experts("fp8", "fp8", torch.float32)
    u = torch.randn(3, D, generator=torch.Generator().manual_seed(3))
    idx = torch.tensor([[2, 2], [0, 2], [5, 5]])
    wgt = torch.tensor([[0.5, 0.25], [1.0, 2.0], [0.3, 0.3]])
    got, want = moe_forward_ref(u, idx, wgt, experts, shared), _per_token(u, idx, wgt, experts, shared)
    err = ((got - want).norm() / want.norm()).item()
    assert err < 1e-6, f"relative error {err:.2e}"


def test_empty_and_skewed_loads():
    """Every token on one expert, the other experts empty; a single token."""
    experts, shared = _experts("fp4", "fp8", torch.bfloat16)
    u = torch.randn(9, D, generator=torch.Generator().manual_seed(4)).bfloat16()
    idx = torch.tensor([[3, 1]] * 9)
    wgt = torch.rand(9, K) + 0.1
    got, want = moe_forward_ref(u, idx, wgt, experts, shared), _per_token(u, idx, wgt, experts, shared)
    assert ((got.float() - want.float()).norm() / want.float().norm()) < 1e-2
    one = moe_forward_ref(u[:1], idx[:1], wgt[:1], experts, shared)
    assert torch.equal(one, moe_forward(u[:1], idx[:1], wgt[:1], experts, shared))


@pytest.mark.parametrize("layer", [0, 1], ids=["hash", "dense"])
def test_moe_module_routes_through_the_op(layer):
    cfg = ModelConfig.preset("tiny").replace(hidden_size=D, moe_intermediate_size=INTER,
                                             n_routed_experts=E, num_experts_per_tok=K)
    scheme = QuantScheme(linear="fp8", experts="fp4")
    moe = MoE(cfg, layer, scheme, f"layers.{layer}.ffn", torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    experts = list(moe.experts.values()) if isinstance(moe.experts, torch.nn.ModuleDict) \
        else list(moe.experts)
    for m in [*experts, moe.shared_experts]:
        for lin in (m.w1, m.w2, m.w3):
            lin.set_float(torch.randn(lin.out_features, lin.in_features, generator=g) / 8)
    moe.gate.weight.copy_(torch.randn(E, D, generator=g) / 8)
    if moe.gate.hash:
        moe.gate.tid2eid.copy_(torch.randint(0, E, (cfg.vocab_size, K), generator=g))
    u = torch.randn(7, D, generator=g).bfloat16()
    ids = torch.randint(0, cfg.vocab_size, (7,), generator=g)
    idx, wgt = moe.gate(u, ids)
    assert torch.equal(moe(u, ids), moe_forward_ref(u, idx, wgt, experts, moe.shared_experts))


def test_kernel_layout_round_trips_and_keeps_the_linear_exact():
    """The MoE kernels' MXFP4 layout (`mxfp4_to_kernel_layout`) holds the same codes and
    scales: codes in the halves order (byte b of each 16 = codes b, b+16 of the 32-block), each
    64-row group's 128-deep K-blocks contiguous. A linear switched to it in place computes the
    same outputs, saves the checkpoint layout, and converts what a state-dict load brings."""
    from dsv4.quant.formats import fp4_to_halves, mxfp4_to_kernel_layout, pack_fp4, unpack_fp4
    from dsv4.quant.linear import make_linear
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (3, 96), generator=g, dtype=torch.uint8)
    halves = fp4_to_halves(pack_fp4(codes))
    assert halves.dtype == torch.int8 and halves.shape == (3, 48)
    assert torch.equal(unpack_fp4(halves, halves=True), codes)
    assert halves.view(torch.uint8)[0, 0].item() == codes[0, 0].item() | codes[0, 16].item() << 4
    n, k = 128, 256
    lin = make_linear(k, n, "fp4")
    lin.set_float(torch.randn(n, k, generator=g))
    w, sc = mxfp4_to_kernel_layout(lin.weight, lin.scale)
    assert w.shape == lin.weight.shape and sc.shape == lin.scale.shape
    flat_w, flat_s = w.view(torch.uint8).flatten(), sc.view(torch.uint8).flatten()
    hw = fp4_to_halves(lin.weight).view(torch.uint8)
    for row, kb in ((0, 0), (5, 1), (64, 0), (127, 1)):  # row group, K-block, row in group
        at = (row // 64) * 64 * (k // 2) + kb * 64 * 64 + (row % 64) * 64
        assert torch.equal(flat_w[at:at + 64], hw[row, kb * 64:(kb + 1) * 64])
        at = (row // 64) * 64 * (k // 32) + kb * 64 * 4 + (row % 64) * 4
        assert torch.equal(flat_s[at:at + 4], lin.scale.view(torch.uint8)[row, kb * 4:kb * 4 + 4])
    back = mxfp4_to_kernel_layout(w, sc, inverse=True)
    assert torch.equal(back[0], lin.weight) and torch.equal(back[1].view(torch.uint8),
                                                            lin.scale.view(torch.uint8))
    with pytest.raises(ValueError, match="N % 64"):
        mxfp4_to_kernel_layout(halves, torch.zeros(3, 3, dtype=torch.uint8))


@pytest.mark.parametrize("fmt", ["fp4", "nvfp4"])
def test_linear_in_kernel_layout_is_the_same_linear(fmt):
    """Switched in place to the MoE kernels' layout, an FP4 linear computes the same outputs,
    saves the checkpoint layout, converts what a state-dict load brings, and set_float writes
    the current layout."""
    from dsv4.quant.formats import nvfp4_to_kernel_layout
    from dsv4.quant.linear import make_linear
    g = torch.Generator().manual_seed(2)
    n, k = 128, 256
    lin = make_linear(k, n, fmt)
    lin.set_float(torch.randn(n, k, generator=g))
    scale = "scale" if fmt == "fp4" else "weight_scale"
    x = torch.randn(5, k, generator=g, dtype=torch.bfloat16)
    want, w_want = lin(x), lin.dequantize()
    sd = {name: v.clone() for name, v in lin.state_dict().items()}
    lin.to_kernel_layout()
    assert lin.kernel_layout and not torch.equal(lin.weight, sd["weight"])
    assert torch.equal(lin.dequantize(), w_want) and torch.equal(lin(x), want)
    got = lin.state_dict()
    assert torch.equal(got["weight"], sd["weight"])
    assert torch.equal(got[scale].view(torch.uint8), sd[scale].view(torch.uint8))
    lin.load_state_dict(sd)
    assert lin.kernel_layout and torch.equal(lin.dequantize(), w_want)
    lin.to_kernel_layout()  # idempotent
    assert torch.equal(lin.dequantize(), w_want)
    lin.set_float(w_want)
    assert torch.equal(lin.dequantize(), w_want)
    if fmt == "nvfp4":  # 64-row groups, 64 bytes and 8 scales per row and K-block
        w, s = nvfp4_to_kernel_layout(sd["weight"], sd[scale])
        row, kb = 70, 1
        at = 64 * (k // 2) + kb * 64 * 64 + (row % 64) * 64
        assert torch.equal(w.flatten()[at:at + 64], sd["weight"][row, kb * 64:(kb + 1) * 64])
        at = 64 * (k // 16) + kb * 64 * 8 + (row % 64) * 8
        assert torch.equal(s.view(torch.uint8).flatten()[at:at + 8],
                           sd[scale].view(torch.uint8)[row, kb * 8:(kb + 1) * 8])


def test_finish_counters_are_zero_and_outlive_growth(monkeypatch):
    """`moe._counts`: the split gate/up's counters start at zero, grow on demand, keep the
    smaller buffer alive (graphs captured with it still point at it), and are not allocated
    during a CUDA graph capture (its memset would not run before eager calls)."""
    from dsv4.kernels import moe as km
    dev = torch.device("cpu")
    monkeypatch.setattr(km, "_COUNTS", {})
    monkeypatch.setattr(km, "_KEEP", [])
    small = km._counts(dev, 10)
    assert small.dtype == torch.int32 and small.numel() >= 10 and not small.any()
    assert km._counts(dev, small.numel()) is small
    big = km._counts(dev, small.numel() + 1)
    assert big.numel() > small.numel() and not big.any() and km._KEEP == [small]
    capturing = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert km._counts(capturing, 10) is None and capturing not in km._COUNTS


def test_expert_format_reads_exclude_patterns_for_the_module_or_its_linears():
    from dsv4.config import ConfigError
    from dsv4.loader.layout import LoaderScheme
    from dsv4.model.moe import expert_format
    for pat in ("*.ffn.shared_experts.*", "*.shared_experts", "layers.*.ffn.shared_experts*"):
        scheme = QuantScheme(linear="nvfp4", experts="nvfp4", exclude=[pat])
        assert expert_format(scheme, "layers.3.ffn.shared_experts") == "bf16", pat
        assert expert_format(scheme, "layers.3.ffn.experts.7", expert=True) == "nvfp4", pat
    mtp = QuantScheme(linear="nvfp4", experts="nvfp4", exclude=["mtp.*"])
    assert expert_format(mtp, "mtp.0.ffn.experts.1", expert=True) == "bf16"
    assert expert_format(QuantScheme(linear="fp8", experts="fp4"), "layers.0.ffn.experts.0",
                         expert=True) == "fp4"
    # ModelOpt MIXED_PRECISION: the listed linears are NVFP4, the rest keep their format
    listed = frozenset(f"layers.0.ffn.experts.0.{w}" for w in ("w1", "w2", "w3"))
    mixed = QuantScheme(linear="nvfp4", experts="nvfp4", quantized=listed)
    assert expert_format(mixed, "layers.0.ffn.experts.0", expert=True) == "nvfp4"
    assert expert_format(mixed, "layers.0.ffn.shared_experts") == "bf16"
    # a loader that finds one linear stored in FP8 and the others not: named, not guessed
    odd = LoaderScheme(QuantScheme(linear="nvfp4", experts="nvfp4", exclude=["*.shared_experts.*"]),
                       {"layers.0.ffn.shared_experts.w1": "fp8"})
    with pytest.raises(ConfigError, match="shared_experts: its linears w1, w2, w3 come in "
                                          "different formats"):
        expert_format(odd, "layers.0.ffn.shared_experts")
