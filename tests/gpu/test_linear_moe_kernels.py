"""Hopper kernels for the quantised linears and the MoE against their torch references.

The activation quantisation must match bit for bit; a GEMM may differ from the reference only
by fp32 summation order, so bf16 outputs agree to bf16 rounding (relative Frobenius error
~1e-3 at most) and fp32 outputs far closer (FP4 kernels ~1e-8: bf16 MMA on exact operands; FP8
kernels ~1e-4: Hopper's FP8 MMA accumulates each 128-deep block with reduced precision, as
cuBLAS _scaled_mm does). The MoE compares less tightly, by design of the model, not the kernel:
h is re-quantised to e4m3 (3 mantissa bits) before w2, so a last-bit difference upstream flips
an e4m3 rounding now and then (SPEC.md 10); measured on an H200 (bf16): median 2e-3, max
1e-2 (one token: few elements, so one flip weighs more). A wrong weight or expert gives O(1).
Run on the device: pytest -m gpu tests/gpu.
"""
import pytest
import torch

from dsv4.config import ModelConfig
from dsv4.kernels import quant_linear as ql
from dsv4.kernels import moe as moe_kernels
from dsv4.kernels.moe import moe_forward, moe_forward_ref
from dsv4.model.moe import Expert, MoE
from dsv4.quant.formats import quantize_fp8, quantize_mxfp4, quantize_nvfp4
from dsv4.quant.scheme import QuantScheme
from dsv4.quant.sim import act_quant

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
DEV = "cuda"


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert torch.isfinite(got).all(), "non-finite output"
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


# ------------------------------------------------------------------------------- act quant
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_act_quant_is_bit_exact(dtype):
    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randn(333, 1024, device=DEV, generator=g) * torch.logspace(-6, 3, 333, device=DEV)[:, None]
    x[0] = 0.0                                  # amax 0 -> clamped to 1e-4
    x[1, :128] = 448.0 * 2.0 ** -3              # amax exactly a power of two times 448
    x[2, :128] = torch.arange(128, device=DEV) * 0.5 + 0.25  # e4m3 rounding ties after scaling
    x = x.to(dtype)
    q, s = ql.act_quant_fp8(x)
    q_ref, s_ref = act_quant(x)
    assert torch.equal(s, s_ref), f"scales differ in {(s != s_ref).sum()} blocks"
    bad = (q.view(torch.uint8) != q_ref.view(torch.uint8)).sum().item()
    assert bad == 0, f"{bad} e4m3 values differ"


# ------------------------------------------------------------------------------- linears
LINEAR_SHAPES = [(4096, 1024), (1024, 32768), (8192, 4096), (7168, 1536)]  # (K, N)
EXPERT_SHAPES = [(4096, 2048), (2048, 4096), (7168, 3072), (3072, 7168)]


def _weights(fmt: str, n: int, k: int):
    w = torch.randn(n, k, device=DEV) / k ** 0.5
    if fmt == "fp8":
        q, s = quantize_fp8(w)
        return (q, s), ql.fp8_linear_ref, ql.FMT_FP8, (q, s.view(torch.uint8), None)
    if fmt == "fp4":
        q, s = quantize_mxfp4(w)
        return (q, s), ql.mxfp4_linear_ref, ql.FMT_MXFP4, (q.view(torch.uint8), s.view(torch.uint8), None)
    q, s, g2 = quantize_nvfp4(w)
    return ((q, s, g2), ql.nvfp4_linear_ref, ql.FMT_NVFP4,
            (q, s.view(torch.uint8), g2.float().reshape(1)))


def _check_linear(fmt, k, n, ms, dtype=torch.bfloat16, paths=("fused", "triton")):
    args, ref_fn, code, kargs = _weights(fmt, n, k)
    tol = 3e-3 if dtype == torch.bfloat16 else (1e-3 if fmt == "fp8" else 1e-5)
    for m in ms:
        x = torch.randn(m, k, device=DEV).to(dtype)
        want = ref_fn(x, *args)
        for path in paths:
            if path == "fused" and m > ql.SMALL_M:  # fusion exists for small M only
                continue
            got = ql._qlinear_cuda(x, code, *kargs, path=path)
            err = rel_err(got, want)
            print(f"{fmt} K={k} N={n} M={m} {path} {dtype}: rel err {err:.2e}")
            assert got.shape == want.shape and got.dtype == want.dtype
            assert err < tol, f"{fmt} K={k} N={n} M={m} path {path}: rel err {err:.2e}"


@pytest.mark.parametrize("k,n", LINEAR_SHAPES)
def test_fp8_linear_kernel_matches_reference(k, n):
    _check_linear("fp8", k, n, [1, 16, 127, 128, 129, 4096])


def test_fp8_linear_large_m_and_public_dispatch():
    (q, s), _, _, _ = _weights("fp8", 1024, 4096)
    for m in (1, 200, 16384):
        x = torch.randn(m, 4096, device=DEV).bfloat16()
        err = rel_err(ql.fp8_linear(x, q, s), ql.fp8_linear_ref(x, q, s))
        print(f"fp8_linear dispatch M={m}: rel err {err:.2e}")
        assert err < 3e-3


@pytest.mark.parametrize("d,e,hashed", [(4096, 256, False), (4096, 256, True),
                                         (7168, 384, False)])  # Flash, Flash hash layer, Pro
def test_moe_gate_in_one_launch_equals_four(d, e, hashed):
    """The gate's logits, the routing, the routing plan and the experts' FP8 input of a
    decode batch in one launch (`moe_gate.gate_route_plan`): bit for bit the four launches',
    eagerly and in CUDA-graph replays (the counter goes back to zero each time)."""
    from dsv4.kernels import f32_linear, moe_gate as mg, routing
    from dsv4.kernels.moe_plan import route_plan
    gen = torch.Generator(device=DEV).manual_seed(d + e + hashed)
    w = (torch.randn(e, d, device=DEV, generator=gen) / 64).bfloat16()
    bias = torch.randn(e, device=DEV, generator=gen) * 0.1
    table = torch.stack([torch.randperm(e, device=DEV, generator=gen)[:6]
                         for _ in range(1000)]).int()
    for t in (1, 2, 3, 4):
        u = torch.randn(t, d, device=DEV, generator=gen).bfloat16()
        ids = torch.randint(0, 1000, (t,), device=DEV, generator=gen)
        gate = mg.GateArgs(w, "sqrtsoftplus", 6, 2.5, None if hashed else bias,
                           table if hashed else None, ids if hashed else None)
        z = f32_linear.linear_f32(u, w)
        idx0, wgt0 = routing.route(z, gate.func, 6, 2.5, gate.bias, gate.table, gate.ids)
        plan0, _, nb0, _, _ = route_plan(idx0, t, e, 16, True)
        q0, s0 = ql.act_quant_fp8(u)

        def fused():
            return mg.gate_route_plan(u, gate, e, 16, True)
        got = fused()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            in_graph = fused()
        for _ in range(3):
            g.replay()
        torch.cuda.synchronize()
        for idx, wgt, (plan, nb, _, _, q, s) in (got, in_graph):
            assert torch.equal(idx, idx0) and torch.equal(wgt, wgt0), f"T={t}: routing"
            assert nb == nb0 and torch.equal(plan[1], plan0[1]) and torch.equal(plan[2], plan0[2])
            valid = (torch.arange(nb * 16, device=DEV) % 16) < plan[2].repeat_interleave(16)
            assert torch.equal(plan[0][valid], plan0[0][valid]), f"T={t}: slots"
            assert torch.equal(q.view(torch.uint8), q0.view(torch.uint8)) and torch.equal(s, s0)
        assert mg._COUNTER[u.device].item() == 0


@pytest.mark.parametrize("d,n1,n2", [(4096, 512, 1024), (4096, 1024, 1024)])
def test_fp8_linear_pair_is_two_launches_in_one(d, n1, n2):
    """The attention's wkv and wq_a of one decode batch in one launch (`fp8_linear_pair`,
    Flash shapes): every split-K partial bit for bit what each linear's own launch writes.
    Pro's (512 and 1536 rows of 7168) take different K splits alone: no pair, two launches."""
    pro = [quantize_fp8(torch.randn(n, 7168, device=DEV) / 64) for n in (512, 1536)]
    assert ql.fp8_linear_pair(torch.randn(1, 7168, device=DEV).bfloat16(), *pro[0], *pro[1]) is None
    gen = torch.Generator(device=DEV).manual_seed(d + n2)
    w1 = quantize_fp8(torch.randn(n1, d, device=DEV, generator=gen) / 64)
    w2 = quantize_fp8(torch.randn(n2, d, device=DEV, generator=gen) / 64)
    for m in (1, 2, 5, 16):
        x = torch.randn(m, d, device=DEV, generator=gen).bfloat16()
        got = ql.fp8_linear_pair(x, w1[0], w1[1], w2[0], w2[1])
        assert got is not None, f"M={m}: the pair did not apply"
        for g, (q, s) in zip(got, (w1, w2)):
            want = ql.fp8_linear(x, q, s, parts=True)
            assert g.shape == want.shape and torch.equal(g, want), f"M={m}"
    assert ql.fp8_linear_pair(torch.randn(17, d, device=DEV).bfloat16(), *w1, *w2) is None


def test_fp8_scaled_mm_takes_any_m(monkeypatch):
    """cuBLAS's block-scaled GEMM rejects M % 4 != 0; the dispatch pads the rows instead of
    failing over. A failure used to switch that weight shape to the slow Triton path for good:
    after one 714-token engine step, 8K prefills ran 20% slower."""
    monkeypatch.setattr(ql, "_SCALED_MM_OK", {})
    (q, s), _, _, _ = _weights("fp8", 1024, 4096)
    for m in (257, 258, 259, 714, 5001, 8193):
        x = torch.randn(m, 4096, device=DEV).bfloat16()
        got = ql.fp8_linear(x, q, s)
        err = rel_err(got, ql.fp8_linear_ref(x, q, s))
        print(f"fp8_linear M={m} (scaled_mm): rel err {err:.2e}")
        assert got.shape == (m, 1024) and err < 3e-3
    assert ql._SCALED_MM_OK == {}, f"_scaled_mm failed over: {ql._SCALED_MM_OK}"
    x = torch.randn(5, 4096, device=DEV).bfloat16()
    qp, sp = ql._act_quant_cuda(x, pad_to=4)
    q0, s0 = ql._act_quant_cuda(x)
    assert qp.shape == (8, 4096) and sp.shape == (8, 32)
    assert torch.equal(qp[:5].view(torch.uint8), q0.view(torch.uint8))
    assert torch.equal(sp[:5], s0) and not qp[5:].view(torch.uint8).any()
    assert torch.isfinite(sp[5:]).all()
    qt, st = ql._act_quant_cuda(x, pad_to=4, scales_t=True)  # cuBLAS's layout: no copy
    assert st.stride() == (1, 8) and torch.equal(st, sp)
    assert torch.equal(qt.view(torch.uint8), qp.view(torch.uint8))


@pytest.mark.parametrize("k,n", LINEAR_SHAPES[:2])
def test_fp8_scaled_mm_blockwise_matches_reference(k, n):
    (w, s), _, _, _ = _weights("fp8", n, k)
    x = torch.randn(4096, k, device=DEV).bfloat16()
    xq, xs = ql.act_quant_fp8(x)
    try:
        got = ql._scaled_mm_blockwise(xq, xs, w, s.view(torch.uint8), torch.bfloat16)
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"_scaled_mm blockwise unavailable: {exc}")
    err = rel_err(got, ql.fp8_linear_ref(x, w, s))
    print(f"_scaled_mm K={k} N={n}: rel err {err:.2e}")
    assert err < 3e-3
    xq, xs = ql._act_quant_cuda(x, pad_to=4, scales_t=True)  # the dispatch's column-major scales
    again = ql._scaled_mm_blockwise(xq, xs, w, s.view(torch.uint8), torch.bfloat16)
    assert torch.equal(again, got)


@pytest.mark.parametrize("fmt", ["fp4", "nvfp4"])
@pytest.mark.parametrize("k,n", EXPERT_SHAPES)
def test_fp4_linear_kernels_match_reference(fmt, k, n):
    _check_linear(fmt, k, n, [1, 16, 128, 129, 1000])


@pytest.mark.parametrize("fmt", ["fp8", "fp4", "nvfp4"])
def test_linears_in_float32_mode(fmt):
    _check_linear(fmt, 2048, 1024, [1, 33, 300], dtype=torch.float32)


# ------------------------------------------------------------------------------- MoE
def _random_moe(n_exp, d, inter, fmt, shared_fmt, dtype, seed=0):
    """Experts with random packed codes and realistic scales, built directly in their formats."""
    torch.manual_seed(seed)
    with torch.device(DEV):
        experts = torch.nn.ModuleList(Expert(d, inter, fmt, 10.0, dtype) for _ in range(n_exp))
        shared = Expert(d, inter, shared_fmt, 10.0, dtype)
    for m in [*experts, shared]:
        for lin in (m.w1, m.w2, m.w3):
            kk = lin.in_features
            if lin.fmt == "fp8":
                lin.weight.copy_((torch.randn_like(lin.weight, dtype=torch.float32) * 64).clamp(-448, 448))
                e = 127 - 6 - (kk.bit_length() - 1) // 2   # ~ kk^-0.5 / 64
                lin.scale.view(torch.uint8).copy_(torch.randint_like(lin.scale, e - 1, e + 2, dtype=torch.uint8))
            elif lin.fmt == "fp4":
                lin.weight.view(torch.uint8).copy_(torch.randint_like(lin.weight, 0, 256, dtype=torch.uint8))
                e = 127 - 2 - (kk.bit_length() - 1) // 2
                lin.scale.view(torch.uint8).copy_(torch.randint_like(lin.scale, e - 1, e + 2, dtype=torch.uint8))
            elif lin.fmt == "bf16":
                lin.weight.copy_(torch.randn_like(lin.weight) * 2 / kk ** 0.5)
            else:
                lin.weight.copy_(torch.randint_like(lin.weight, 0, 256))
                lin.weight_scale.copy_(torch.rand_like(lin.weight_scale, dtype=torch.float32) * 3.5 + 0.5)
                lin.weight_scale_2.fill_(0.25 / kk ** 0.5)
    return experts, shared


def _routing(t, n_exp, k, kind, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    if kind == "uniform":
        idx = torch.rand(t, n_exp, device=DEV, generator=g).topk(k, dim=-1).indices
    elif kind == "skewed":  # every token on the same k experts, all others empty
        idx = torch.arange(k, device=DEV).expand(t, k).contiguous()
    else:  # "hash": lookups that can repeat an expert within a token
        idx = torch.randint(0, n_exp, (t, k), device=DEV, generator=g)
    wgt = torch.rand(t, k, device=DEV, generator=g) + 0.05
    return idx, wgt * (1.5 / wgt.sum(-1, keepdim=True))


def _check_moe(experts, shared, tokens, kinds, monkeypatch, dtype=torch.bfloat16, tol=2e-2,
               cfg=None):
    d, k = experts[0].w1.in_features, 6
    for t in tokens:
        for kind in kinds:
            u = torch.randn(t, d, device=DEV).to(dtype)
            idx, wgt = _routing(t, len(experts), k, kind, seed=t)
            got = (moe_forward(u, idx, wgt, experts, shared) if cfg is None
                   else moe_kernels._moe_cuda(u, idx, wgt, experts, shared, cfg))
            with monkeypatch.context() as mp:
                mp.setenv("DSV4_DISABLE_TRITON", "1")
                want = moe_forward_ref(u, idx, wgt, experts, shared)
            err = rel_err(got, want)
            print(f"MoE E={len(experts)} d={d} {experts[0].w1.fmt}+{shared.w1.fmt} T={t} {kind} "
                  f"{dtype}: rel err {err:.2e}")
            assert err < tol, f"T={t} {kind}: rel err {err:.2e}"
            # the slot rows the model's hc_post sums stand for the same output (the combine's
            # sums; the reference's order of the token's slots may round otherwise)
            rows = (moe_forward(u, idx, wgt, experts, shared, parts=True) if cfg is None
                    else moe_kernels._moe_cuda(u, idx, wgt, experts, shared, cfg, parts=True))
            assert rows.dim() == 2 or rows.shape[1:] == (t, k + 1, d), rows.shape
            assert rel_err(moe_kernels.sum_slots(rows, dtype), got) < 1e-3, f"T={t} {kind} slots"


@pytest.fixture(scope="module")
def flash_fp4():
    return _random_moe(256, 4096, 2048, "fp4", "fp8", torch.bfloat16)


def test_moe_flash_fp4(flash_fp4, monkeypatch):
    # 4100 tokens: the largest launch (128-token blocks, fused SwiGLU epilogue, bf16 inputs)
    _check_moe(*flash_fp4, [1, 7, 64, 1000, 4100], ["uniform", "skewed", "hash"], monkeypatch)


def test_moe_pro_fp4(monkeypatch):
    experts, shared = _random_moe(384, 7168, 3072, "fp4", "fp8", torch.bfloat16, seed=1)
    _check_moe(experts, shared, [1, 300], ["uniform", "skewed"], monkeypatch)


@pytest.mark.parametrize("cfg", [
    dict(bw1=64, bw2=64, kc=64, split1=4, split2=2),       # split K, partial sums
    dict(bw1=128, bw2=32, kc=128, split1=1, split2=8),      # fused SwiGLU epilogue, split down
    dict(bw1=64, bw2=128, kc=32, split1=1, split2=1, bt=32, warps=8, stages=2),
    # moe_config's launch for 16-32 slots an expert (Flash 683-1365 tokens)
    dict(bw1=128, bw2=128, kc=64, split1=1, split2=1, bt=32, warps=4, stages=3, dec=2,
         prefetch=0),
], ids=["split", "fused-gate", "unsplit", "e4m3-unsplit"])
@pytest.mark.parametrize("fmt", ["fp4", "nvfp4", "fp8"])
def test_moe_launch_configs(fmt, cfg, monkeypatch):
    """Every launch shape the config chooser (or the benchmark sweep) may pick is exact."""
    experts, shared = _random_moe(32, 4096, 2048, fmt, "fp8" if fmt == "fp4" else fmt,
                                  torch.bfloat16, seed=5)
    # 18 tokens: the last single-program routing plan (126 slots); 19: the first two-kernel one
    _check_moe(experts, shared, [1, 5, 18, 19, 40], ["uniform", "skewed"], monkeypatch, cfg=cfg)


@pytest.mark.parametrize("cfg", [dict(bw1=64, split1=4), dict(bw1=128, split1=2)],
                         ids=["bw64-split4", "bw128-split2"])
@pytest.mark.parametrize("fmt", ["fp4", "nvfp4", "fp8"])
def test_moe_swiglu_finished_in_the_gate_up_launch(fmt, cfg, monkeypatch):
    """`moe.FINISH_SWIGLU`: the last CTA of each (block, 128 channels) sums the split gate/up
    partials and writes h: bit-equal to the `_swiglu_kernel` launch, under CUDA graphs too
    (counters allocated before the capture), counters back at zero."""
    experts, shared = _random_moe(32, 4096, 2048, fmt, "fp8" if fmt == "fp4" else fmt,
                                  torch.bfloat16, seed=6)
    # (gluon=False: MXFP4's 64-wide tiles would take the Gluon kernel, which writes partials)
    base = dict(bw2=64, kc=128, split2=2, bt=16, warps=4, stages=3, dec=2, finish=True,
                gluon=False)
    for t in (1, 5, 19, 40):
        u = torch.randn(t, 4096, device=DEV).bfloat16()
        idx, wgt = _routing(t, len(experts), 6, "uniform", seed=t)
        c = dict(base, **cfg)
        monkeypatch.setattr(moe_kernels, "FINISH_SWIGLU", False)
        want = moe_kernels._moe_cuda(u, idx, wgt, experts, shared, c)
        monkeypatch.setattr(moe_kernels, "FINISH_SWIGLU", True)
        got = moe_kernels._moe_cuda(u, idx, wgt, experts, shared, c)
        assert torch.equal(got, want), f"T={t}"
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = moe_kernels._moe_cuda(u, idx, wgt, experts, shared, c)
        for _ in range(3):
            graph.replay()
            assert torch.equal(out, want), f"T={t}, graph replay"
        assert not moe_kernels._COUNTS[u.device].any()


@pytest.mark.parametrize("dec", [0, 1, 2], ids=["bf16", "e4m3-ops", "e4m3-asm"])
@pytest.mark.parametrize("base", [
    dict(bw1=64, bw2=64, kc=128, split1=8, split2=4),
    dict(bw1=128, bw2=128, kc=32, split1=1, split2=1, bt=64, warps=8),
], ids=["split", "large"])
def test_moe_mxfp4_fp8_tensor_core_decodes(dec, base, monkeypatch):
    """The MXFP4 decodes (to bf16 with the scale folded in, or e2m1 -> e4m3 per 32-block for
    FP8 tensor cores), all reading the kernels' code order, give the reference's products:
    same tolerance as the bf16 decode, T from 1 to past the large-batch switch."""
    experts, shared = _random_moe(32, 4096, 2048, "fp4", "fp8", torch.bfloat16, seed=6)
    _check_moe(experts, shared, [1, 5, 40, 300], ["uniform", "skewed"], monkeypatch,
               cfg=dict(base, dec=dec))


@pytest.mark.parametrize("shape", [(32, 4096, 2048), (24, 7168, 3072)], ids=["flash", "pro"])
def test_moe_gluon_kernel_equals_triton_kernel(shape, monkeypatch):
    """`moe_mx_gluon._moe_mx_wg_kernel` (MXFP4 experts, decode launches: 8- or 16-column
    products by the block's rows) computes what `_moe_gemm_kernel` does with the same launch,
    bit for bit: the same 32-deep FP8 products, promoted in the same order; K splits, unsplit
    down, 64- and 128-row tiles, weight words through registers or a shared ring, blocks of
    1-16 rows (skewed routing fills whole 16-row blocks), and the reference."""
    experts, shared = _random_moe(*shape, "fp4", "fp8", torch.bfloat16, seed=7)
    assert moe_kernels._gluon_applies(moe_kernels.moe_config(1, 6, shape[0], shape[1], shape[2],
                                                             132), moe_kernels.FMT_MXFP4)
    for t in (1, 2, 5, 8, 9, 16, 17, 40, 300):
        for kind in ("uniform", "skewed", "hash"):
            u = torch.randn(t, shape[1], device=DEV).bfloat16()
            idx, wgt = _routing(t, len(experts), 6, kind, seed=t)
            c = moe_kernels.moe_config(t, 6, shape[0], shape[1], shape[2], 132)
            if not moe_kernels._gluon_applies(c, moe_kernels.FMT_MXFP4):
                continue
            for cfg in (dict(c, split1=c.get("gsplit1", 1), split2=c.get("gsplit2", 1)),
                        dict(c, split1=3, split2=1, gsplit1=3, gsplit2=1),
                        dict(c, split1=1, split2=4, gsplit1=1, gsplit2=4),
                        dict(c, split1=2, split2=2, gsplit1=2, gsplit2=2, gbw1=128, gbw2=128),
                        # the weight words through registers or the shared ring: the other
                        # path than the default's at this T
                        dict(c, split1=c.get("gsplit1", 1), split2=c.get("gsplit2", 1),
                             gwsmem=not c.get("gwsmem", False))):
                got = moe_kernels._moe_cuda(u, idx, wgt, experts, shared, cfg)
                want = moe_kernels._moe_cuda(u, idx, wgt, experts, shared, dict(cfg, gluon=False))
                assert torch.equal(got, want), f"T={t} {kind} {cfg}: {rel_err(got, want):.2e}"
    assert not moe_kernels._GLUON_FAILED
    assert not any(c.any() for c in moe_kernels._COUNTS.values())
    _check_moe(experts, shared, [1, 7, 40], ["uniform", "skewed"], monkeypatch)


@pytest.mark.parametrize("fmt", ["fp8", "fp4", "nvfp4"])
def test_l2_prefetch_changes_no_result(fmt):
    """The L2 prefetch hint (`pdl.l2_prefetch`, DSV4_L2_PREFETCH=n): bit-identical outputs,
    for the linears (issued before the PDL wait) and the MoE GEMMs (every launch shape: split
    K, 64- and 128-row tiles, the fused epilogue, the FP8 shared expert's launch; 1 and 8
    blocks ahead)."""
    args, _, code, kargs = _weights(fmt, 4096, 7168)
    for m in (1, 16, 100):
        x = torch.randn(m, 7168, device=DEV).bfloat16()
        plain = ql._qlinear_cuda(x, code, *kargs, cfg=dict(prefetch=False))
        assert torch.equal(ql._qlinear_cuda(x, code, *kargs, cfg=dict(prefetch=True)), plain)
    experts, shared = _random_moe(32, 4096, 2048, fmt, "fp8" if fmt == "fp4" else fmt,
                                  torch.bfloat16, seed=7)
    for t in (1, 5, 40, 300):
        u = torch.randn(t, 4096, device=DEV).bfloat16()
        idx, wgt = _routing(t, len(experts), 6, "uniform", seed=t)
        plain = moe_kernels._moe_cuda(u, idx, wgt, experts, shared, dict(prefetch=0))
        for depth in (1, 8):
            got = moe_kernels._moe_cuda(u, idx, wgt, experts, shared, dict(prefetch=depth))
            assert torch.equal(got, plain), (fmt, t, depth)


@pytest.mark.parametrize("fmt,shared_fmt", [("fp4", "fp8"), ("nvfp4", "fp8"), ("nvfp4", "nvfp4")])
@pytest.mark.parametrize("base", [
    dict(bw1=128, bw2=128, kc=64, split1=2, split2=1, bt=64, warps=8),
    dict(bw1=128, bw2=64, kc=32, split1=1, split2=2, bt=32, warps=4),
    dict(bw1=64, bw2=64, kc=128, split1=1, split2=1, bt=16, warps=4),  # batch 64-256 decode
], ids=["split-gate", "fused-gate", "bt16-kc128"])
def test_moe_exact_bf16_activation_values(fmt, shared_fmt, base, monkeypatch):
    """`abf` (large batches, bf16 MMA decode): the GEMMs take the exact bf16 values of the FP8
    activations and of h instead of codes and scales, and the FP8 shared expert quantises them
    again. The products are the same, so the output is bit for bit the FP8-input path's."""
    experts, shared = _random_moe(32, 4096, 2048, fmt, shared_fmt, torch.bfloat16, seed=9)
    for t in (1, 40, 300, 1000):
        u = torch.randn(t, 4096, device=DEV).bfloat16()
        idx, wgt = _routing(t, 32, 6, "uniform", seed=t)
        cfg = dict(base, dec=0)
        want = moe_kernels._moe_cuda(u, idx, wgt, experts, shared, dict(cfg, abf=False))
        got = moe_kernels._moe_cuda(u, idx, wgt, experts, shared, dict(cfg, abf=True))
        assert torch.equal(got, want), f"T={t}: max diff {(got - want).abs().max().item()}"
    _check_moe(experts, shared, [300], ["skewed"], monkeypatch, cfg=dict(base, dec=0, abf=True))


@pytest.mark.parametrize("fmt,shared_fmt", [("fp4", "fp8"), ("fp8", "fp8")])
def test_moe_grouped_mm_path(fmt, shared_fmt, monkeypatch):
    """`moe_grouped_mm.py`: dequantised bf16 experts through torch's grouped GEMM, against the
    reference and the fused kernels, over uniform, skewed (experts with no token) and hash
    routings, plus through the dispatch (DSV4_MOE_GROUPED_MM's and the default threshold);
    NVFP4 experts keep the fused kernels."""
    from dsv4.kernels import moe_grouped_mm as gm
    experts, shared = _random_moe(64, 4096, 2048, fmt, shared_fmt, torch.bfloat16, seed=11)
    _check_moe(experts, shared, [1, 19, 700, 3000], ["uniform", "skewed", "hash"], monkeypatch,
               cfg=dict(grouped_mm=True))
    u = torch.randn(600, 4096, device=DEV).bfloat16()
    idx, wgt = _routing(600, 64, 6, "uniform", seed=1)
    fused = moe_kernels._moe_cuda(u, idx, wgt, experts, shared, dict(grouped_mm=False))
    monkeypatch.setenv("DSV4_MOE_GROUPED_MM", "512")
    assert gm.grouped_mm_min_tokens() == 512
    got = moe_forward(u, idx, wgt, experts, shared)
    assert rel_err(got, fused) < 1e-2
    assert torch.equal(got, moe_kernels._moe_cuda(u, idx, wgt, experts, shared,
                                                  dict(grouped_mm=True)))
    # the default: from 72 routed slots per expert (64 experts, top-6: 768 tokens)
    monkeypatch.delenv("DSV4_MOE_GROUPED_MM")
    u = torch.randn(768, 4096, device=DEV).bfloat16()
    idx, wgt = _routing(768, 64, 6, "uniform", seed=2)
    assert gm.takes(768, 6, 64) and not gm.takes(767, 6, 64)
    # MXFP4 experts the GEMM decodes in place: from 32 slots per expert (342 tokens)
    main, extra = moe_kernels._tables(experts, shared, u.device)
    assert gm.takes(342, 6, 64, main, extra) == (fmt == "fp4")
    assert not gm.takes(341, 6, 64, main, extra)
    assert torch.equal(moe_forward(u, idx, wgt, experts, shared),
                       moe_kernels._moe_cuda(u, idx, wgt, experts, shared, dict(grouped_mm=True)))
    nv, nv_shared = _random_moe(16, 1024, 512, "nvfp4", "fp8", torch.bfloat16, seed=2)
    main, extra = moe_kernels._tables(nv, nv_shared, u.device)
    assert not gm.applies(u, main, extra)


@pytest.mark.parametrize("fmt", ["fp4", "fp8"])
def test_moe_grouped_mm_shared_expert_apart(fmt, monkeypatch, caplog):
    """The grouped path's FP8 shared expert on cuBLAS's block-scaled GEMM, out of the plan
    (`moe_grouped_mm._shared_fp8`), against the same expert inside the grouped GEMMs (the same
    products in another summation order) and the reference; MXFP4 routed experts (the shared
    one in its own table) and FP8 ones (one table, the shared expert's entry skipped); and
    the fallback when cuBLAS fails."""
    from dsv4.kernels import moe_grouped_mm as gm
    experts, shared = _random_moe(64, 4096, 2048, fmt, "fp8", torch.bfloat16, seed=13)
    calls = []
    real = gm._shared_fp8
    monkeypatch.setattr(gm, "_shared_fp8", lambda *a: calls.append(1) or real(*a))
    for t in (1, 5, 700, 3001):
        u = torch.randn(t, 4096, device=DEV).bfloat16()
        idx, wgt = _routing(t, 64, 6, "skewed" if t == 700 else "uniform", seed=t)
        monkeypatch.setattr(gm, "_CUBLAS_FAILED", [True])
        inside = moe_kernels._moe_cuda(u, idx, wgt, experts, shared, dict(grouped_mm=True))
        assert not calls
        monkeypatch.setattr(gm, "_CUBLAS_FAILED", [False])
        with torch.inference_mode():  # as the engine runs it (no version counters there)
            apart = moe_kernels._moe_cuda(u, idx, wgt, experts, shared, dict(grouped_mm=True))
        assert calls, "the shared expert did not run apart"
        calls.clear()
        want = moe_forward_ref(u, idx, wgt, experts, shared)
        # (FP8 roundings of h flip where the two summation orders' bf16 g, v differ, as
        # between the FP8 and bf16 grouped paths: 2.6-5.0e-3 measured)
        assert rel_err(apart, inside) < 1e-2, f"T={t}"
        assert rel_err(apart, want) < 1e-2, f"T={t}"

    def broken(*a, **k):
        raise RuntimeError("CUBLAS_STATUS_NOT_SUPPORTED")
    monkeypatch.setattr(gm, "_scaled_mm_blockwise", broken)
    with caplog.at_level("WARNING", logger="dsv4.kernels.moe_grouped_mm"):
        got = moe_kernels._moe_cuda(u, idx, wgt, experts, shared, dict(grouped_mm=True))
    assert gm._CUBLAS_FAILED[0] and "cuBLAS block-scaled FP8 GEMM failed" in caplog.text
    assert torch.equal(got, inside)


@pytest.mark.parametrize("m,groups,k", [(4099, [0, 1000, 1, 3000, 98], 4096),
                                         (4099, [0, 1000, 1, 3000, 98], 2048),
                                         (61440, None, 4096)])
def test_grouped_fp8_gemm_matches_reference(m, groups, k):
    """The grouped FP8 GEMM (1 x 128 scales both sides) against fp32 dequantisation and a
    matmul per group: ragged and empty groups, rows past every group; Flash's w13 shape and
    w2's depth, each through the default launch (the TMA kernel at these row counts), the
    pointer kernel and 3 stages (Pro's), with scales as strided views too."""
    from dsv4.kernels.grouped_fp8_gemm import grouped_fp8_gemm, grouped_fp8_gemm_ref
    g = torch.Generator(device=DEV).manual_seed(m)
    n = 4096
    sizes = torch.tensor(groups) if groups else torch.full((16,), m // 16)
    ends = sizes.cumsum(0).to(torch.int32).to(DEV)
    a = (torch.randn(m, k, device=DEV, generator=g) * 3).to(torch.float8_e4m3fn)
    sa = 2.0 ** torch.randint(-4, 4, (m, k // 128), device=DEV, generator=g).float()
    b = (torch.randn(len(sizes), n, k, device=DEV, generator=g) * 3).to(torch.float8_e4m3fn)
    sb = 2.0 ** torch.randint(-12, -6, (len(sizes), n, k // 128), device=DEV, generator=g).float()
    want = grouped_fp8_gemm_ref(a, sa, b, sb, ends)
    rows = int(ends[-1])
    for cfg in ({"tma": False}, {"tma": True, "stages": 3}, None):
        got = grouped_fp8_gemm(a, sa, b, sb, ends, cfg)
        assert rel_err(got[:rows], want[:rows]) < 4e-3, cfg
    # block-major scales (as `_act_quant_cuda(scales_t=True)` and `to_fp8` write them)
    sa_t, sb_t = sa.t().contiguous().t(), sb.transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(grouped_fp8_gemm(a, sa_t, b, sb_t, ends)[:rows], got[:rows])
    # one scale a weight row (the MXFP4 copies' row scales), applied after the K loop
    sb_row = sb[..., 0].contiguous()
    want = grouped_fp8_gemm_ref(a, sa, b, sb_row, ends)
    for cfg in ({"tma": False}, {"tma": True, "stages": 3}, None):
        got = grouped_fp8_gemm(a, sa_t, b, sb_row, ends, cfg)
        assert rel_err(got[:rows], want[:rows]) < 4e-3, ("row scales", cfg)


@pytest.mark.parametrize("fmt,shared_fmt", [("fp4", "fp8"), ("fp8", "fp8")])
def test_moe_fp8_gemm_path(fmt, shared_fmt, monkeypatch):
    """DSV4_MOE_FP8_GEMM=1: the grouped path on FP8 copies and FP8 GEMMs against the
    reference (uniform, skewed, hash routings) and the bf16 grouped path."""
    monkeypatch.setenv("DSV4_MOE_FP8_GEMM", "1")
    experts, shared = _random_moe(64, 4096, 2048, fmt, shared_fmt, torch.bfloat16, seed=12)
    _check_moe(experts, shared, [700, 3000], ["uniform", "skewed", "hash"], monkeypatch,
               cfg=dict(grouped_mm=True))
    u = torch.randn(3000, 4096, device=DEV).bfloat16()
    idx, wgt = _routing(3000, 64, 6, "uniform", seed=3)
    got = moe_kernels._moe_cuda(u, idx, wgt, experts, shared, dict(grouped_mm=True))
    main, _ = moe_kernels._tables(experts, shared, u.device)
    assert main.fp8_exact
    monkeypatch.setenv("DSV4_MOE_FP8_GEMM", "0")
    bf16 = moe_kernels._moe_cuda(u, idx, wgt, experts, shared, dict(grouped_mm=True))
    # unset: by size (3000 tokens over 64 experts: 281 slots an expert): FP8 experts past 256
    # on bf16, MXFP4 ones (rows fold exactly: row scales) on FP8 GEMMs at any size
    monkeypatch.delenv("DSV4_MOE_FP8_GEMM")
    assert main.fp8_row_exact is (fmt == "fp4")
    assert torch.equal(moe_kernels._moe_cuda(u, idx, wgt, experts, shared,
                                             dict(grouped_mm=True)), got if fmt == "fp4" else bf16)
    # both paths sit ~5e-3 from the reference (FP8 roundings of the SwiGLU output flip where
    # bf16 sums differ); measured between them: 4.7-4.9e-3
    assert rel_err(got, bf16) < 1e-2


def test_moe_fp4_gemm_path(monkeypatch):
    """The grouped FP8 GEMM decoding the MXFP4 weights in place (forced: DSV4_MOE_FP4_GEMM=1)
    gives the products of the e4m3 copies' GEMM (each weight row's K-block the same
    folded codes and scale), and the MoE through it (after a first call on the copies found
    the layer exact) agrees with the reference and the copies' path."""
    from dsv4.kernels import moe_grouped_mm as gm
    from dsv4.kernels.grouped_fp8_gemm import grouped_fp8_gemm
    experts, shared = _random_moe(64, 4096, 2048, "fp4", "fp8", torch.bfloat16, seed=14)
    u = torch.randn(3000, 4096, device=DEV).bfloat16()
    main, extra = moe_kernels._tables(experts, shared, u.device)  # (the kernels' key: cuda:0)
    g = torch.Generator(device=DEV).manual_seed(14)
    counts = torch.tensor([0] + [48] * 30 + [0] + [17] * 33, dtype=torch.int32)  # 65 groups
    ends = counts.cumsum(0).to(torch.int32).to(DEV)
    m = int(ends[-1])
    a = (torch.randn(m, 4096, device=DEV, generator=g) * 3).to(torch.float8_e4m3fn)
    sa = 2.0 ** torch.randint(-4, 4, (4096 // 128, m), device=DEV, generator=g).float()
    flag = torch.zeros(1, dtype=torch.int32, device=DEV)
    q, sc = gm.to_fp8(main, extra, ("w1", "w3"), 65, 2048, 4096, u.device, flag)
    assert int(flag) == 0
    want = grouped_fp8_gemm(a, sa.t(), q, sc, ends)
    pt = main.ptrs
    got = gm.grouped_mxfp4_gemm(a, sa.t(), (pt["w1w"], pt["w3w"]), (pt["w1s"], pt["w3s"]), 2048,
                                ends, 1)
    assert rel_err(got, want) < 1e-3
    # each row folded into its largest scale: the same weights, so the same products
    q, sc = gm.to_fp8(main, extra, ("w1", "w3"), 65, 2048, 4096, u.device, flag,
                      skip_shared=True, row=True)  # (group 0, the FP8 shared expert's: empty)
    assert int(flag) == 0 and sc.shape == (65, 4096)
    want_row = grouped_fp8_gemm(a, sa.t(), q, sc, ends)
    got_row = gm.grouped_mxfp4_gemm(a, sa.t(), (pt["w1w"], pt["w3w"]), (pt["w1s"], pt["w3s"]),
                                    2048, ends, 1, row=True)
    assert rel_err(want_row, want) < 1e-3 and rel_err(got_row, want_row) < 1e-3
    idx, wgt = _routing(3000, 64, 6, "skewed", seed=4)
    monkeypatch.setenv("DSV4_MOE_FP8_GEMM", "1")
    copies = moe_kernels._moe_cuda(u, idx, wgt, experts, shared, dict(grouped_mm=True))
    assert main.fp8_exact and main.fp8_row_exact  # (later calls: row scales)
    assert rel_err(moe_kernels._moe_cuda(u, idx, wgt, experts, shared, dict(grouped_mm=True)),
                   copies) < 1e-3
    calls = []
    real = gm._experts_fp4
    monkeypatch.setattr(gm, "_experts_fp4", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("DSV4_MOE_FP4_GEMM", "1")
    got = moe_kernels._moe_cuda(u, idx, wgt, experts, shared, dict(grouped_mm=True))
    assert calls, "the MXFP4-decoding GEMM did not run"
    assert rel_err(got, copies) < 1e-2
    assert rel_err(got, moe_forward_ref(u, idx, wgt, experts, shared)) < 2e-2


@pytest.mark.parametrize("fmt", ["fp4", "fp8"])
def test_moe_other_ranks_slots_add_nothing(fmt, monkeypatch):
    """Expert parallelism: the slots of another rank's experts (idx = len(experts)) are left
    out of the routing plan and add nothing, on the fused kernels (small and large plans) and
    the grouped GEMMs, against the reference; a token with no local expert keeps its shared
    expert's output; without the shared expert (left to the model) likewise."""
    experts, shared = _random_moe(32, 4096, 2048, fmt, "fp8", torch.bfloat16, seed=5)
    for t in (1, 7, 64, 700, 3000):
        u = torch.randn(t, 4096, device=DEV).bfloat16()
        idx, wgt = _routing(t, 256, 6, "uniform", seed=t)  # 256 experts, 32 of them here
        idx = torch.where(idx < 32, idx, 32)
        idx[0] = 32
        for sh in (shared, None):  # None: the shared expert left to the model (tensor parallel)
            with monkeypatch.context() as mp:
                mp.setenv("DSV4_DISABLE_TRITON", "1")
                want = moe_forward_ref(u, idx, wgt, experts, sh)
            cfgs = [None, dict(grouped_mm=True)] if t >= 64 else [None]
            for cfg in cfgs:
                got = moe_kernels._moe_cuda(u, idx, wgt, experts, sh, cfg, total_experts=256)
                assert torch.equal(got[0], want[0]) or sh is not None  # no expert here: 0
                if t > 1 or sh is not None:
                    assert rel_err(got, want) < 2e-2, \
                        f"T={t} {cfg} shared {sh is not None}: rel err {rel_err(got, want):.2e}"


@pytest.mark.parametrize("fmt", ["fp4", "nvfp4"])
def test_moe_reloaded_fp4_experts_keep_the_kernels_layout(fmt, monkeypatch):
    """The first CUDA forward re-lays out FP4 experts in place (`to_kernel_layout`); loading a
    checkpoint-layout state dict afterwards is converted on the way in, so the kernels (whose
    pointer tables stay valid) and the torch reference both see the new weights."""
    experts, shared = _random_moe(16, 1024, 512, fmt, "fp8", torch.bfloat16, seed=7)
    fresh, _ = _random_moe(16, 1024, 512, fmt, "fp8", torch.bfloat16, seed=8)
    _check_moe(experts, shared, [3], ["uniform"], monkeypatch)
    assert experts[0].w1.kernel_layout
    experts.load_state_dict(fresh.state_dict())
    assert torch.equal(experts[3].w2.dequantize(), fresh[3].w2.dequantize())
    _check_moe(experts, shared, [3, 40], ["uniform", "skewed"], monkeypatch)


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_moe_same_format_shared_expert_rides_along(fmt, monkeypatch):
    experts, shared = _random_moe(32, 4096, 2048, fmt, fmt, torch.bfloat16, seed=2)
    _check_moe(experts, shared, [1, 200], ["uniform", "hash"], monkeypatch)


@pytest.mark.parametrize("cfg", [None, dict(bw1=64, bw2=64, kc=64, split1=4, split2=2),
                                 dict(bw1=128, bw2=32, kc=128, split1=1, split2=8),
                                 dict(bw1=64, bw2=64, kc=128, split1=2, split2=1, finish=False)],
                         ids=["default", "split", "fused-gate", "swiglu-launch"])
def test_moe_bf16_experts_take_the_kernels(cfg, monkeypatch):
    """bf16 checkpoints' experts (and shared expert) run the grouped kernels with bf16 inputs,
    weights and h, nothing quantised, as their reference linears; the float32 model keeps the
    torch path."""
    experts, shared = _random_moe(64, 4096, 2048, "bf16", "bf16", torch.bfloat16, seed=13)
    assert moe_kernels._tables(experts, shared, torch.device(DEV)) is not None
    tokens = [1, 2, 7, 16, 64, 700, 1500] if cfg is None else [1, 7, 64]
    _check_moe(experts, shared, tokens, ["uniform", "skewed", "hash"], monkeypatch,
               tol=1e-2, cfg=cfg)
    f32, sh32 = _random_moe(4, 1024, 512, "bf16", "bf16", torch.float32, seed=14)
    assert moe_kernels._tables(f32, sh32, torch.device(DEV)) is None


@pytest.mark.parametrize("fmt", ["nvfp4", "fp4"])
def test_moe_bf16_shared_expert_beside_quantised_experts(fmt, monkeypatch):
    """NVFP4 checkpoints that leave `shared_experts` unquantised (their exclude list): the
    routed experts take the kernels, the bf16 shared expert its own linears, summed as the
    reference sums them (and as slot rows for hc_post), eager and under CUDA graphs."""
    experts, shared = _random_moe(32, 4096, 2048, fmt, "bf16", torch.bfloat16, seed=15)
    main, extra = moe_kernels._tables(experts, shared, torch.device(DEV))
    assert extra is not None and extra.fmt == moe_kernels.FMT_BF16
    _check_moe(experts, shared, [1, 2, 7, 64, 300], ["uniform", "skewed", "hash"], monkeypatch)
    u = torch.randn(4, 4096, device=DEV).bfloat16()
    idx, wgt = _routing(4, 32, 6, "uniform")
    eager = moe_forward(u, idx, wgt, experts, shared)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = moe_forward(u, idx, wgt, experts, shared)
    g.replay()
    assert torch.equal(out, eager)


def test_moe_float32_mode(monkeypatch):
    experts, shared = _random_moe(16, 1024, 512, "fp4", "fp8", torch.float32, seed=3)
    _check_moe(experts, shared, [5, 100], ["uniform"], monkeypatch, dtype=torch.float32, tol=5e-3)


def test_moe_runs_without_host_synchronisation(flash_fp4):
    experts, shared = flash_fp4
    u = torch.randn(64, 4096, device=DEV).bfloat16()
    idx, wgt = _routing(64, 256, 6, "uniform")
    moe_forward(u, idx, wgt, experts, shared)  # compile and build the pointer tables first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        moe_forward(u, idx, wgt, experts, shared)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("fmt", ["fp4", "bf16"])
@pytest.mark.parametrize("layer", [0, 5], ids=["hash", "dense"])
def test_moe_module_kernels_equal_torch_path(layer, fmt, monkeypatch):
    cfg = ModelConfig.preset("flash").replace(n_routed_experts=32)
    linear = "fp8" if fmt == "fp4" else fmt
    with torch.device(DEV):
        moe = MoE(cfg, layer, QuantScheme(linear=linear, experts=fmt), f"layers.{layer}.ffn",
                  torch.bfloat16)
    fresh, shared = _random_moe(32, 4096, 2048, fmt, linear, torch.bfloat16, seed=4)
    moe.experts.load_state_dict(fresh.state_dict())
    moe.shared_experts.load_state_dict(shared.state_dict())
    moe.gate.weight.copy_(torch.randn_like(moe.gate.weight) / 64)
    if moe.gate.hash:
        moe.gate.tid2eid.copy_(torch.randint_like(moe.gate.tid2eid, 0, 32))
    u = torch.randn(50, 4096, device=DEV).bfloat16()
    ids = torch.randint(0, cfg.vocab_size, (50,), device=DEV)
    from dsv4.kernels.moe import sum_slots
    rows = moe(u, ids)  # one rank: the slot rows, which the block's hc_post sums
    assert rows.shape[1:] == (50, cfg.num_experts_per_tok + 1, 4096), rows.shape
    got = sum_slots(rows, u.dtype)
    monkeypatch.setenv("DSV4_DISABLE_TRITON", "1")
    err = rel_err(got, moe(u, ids))
    print(f"MoE module layer {layer} {fmt}: rel err {err:.2e}")
    assert err < 1e-2


# ------------------------------------------------------------------------------- wo_a
@pytest.mark.parametrize("groups,inputs", [(8, 4096), (16, 4096), (4, 256)])  # Flash, Pro, tiny
@pytest.mark.parametrize("t", [1, 2, 15, 16, 17, 33, 64, 65, 128, 256, 1000])
def test_grouped_fp8_linear_matches_dequantised_einsum(groups, inputs, t):
    """wo_a kept in FP8 gives the bf16 einsum of its dequantised weight (SPEC.md 5.5) up to
    fp32 summation order; beyond SMALL_T tokens it is that bf16 GEMM on a kernel-dequantised
    copy (written token-major, so cuBLAS may tile, and sum, otherwise than the einsum)."""
    from dsv4.kernels.grouped_linear import SMALL_T, grouped_linear, grouped_linear_ref
    o_lora = 1024 if inputs > 256 else 128
    g = torch.Generator(device=DEV).manual_seed(t)
    w = torch.randn(groups * o_lora, inputs, device=DEV, generator=g) / inputs ** 0.5
    w[:128] *= 2.0 ** -12  # block scales far from 1
    q, s = quantize_fp8(w)
    x = torch.randn(t, groups, inputs, device=DEV, generator=g).bfloat16()
    got = grouped_linear(x, q, s)
    want = grouped_linear_ref(x.double(), q, s)  # exact products, float64 sums
    ref = grouped_linear_ref(x, q, s)  # the bf16 einsum the model used before
    err, ref_err = rel_err(got, want), rel_err(ref, want)
    print(f"G={groups} I={inputs} T={t} (kernel {t <= SMALL_T}): rel err {err:.2e}, "
          f"bf16 einsum {ref_err:.2e}")
    assert got.shape == (t, groups, o_lora) and got.dtype == torch.bfloat16
    assert err < 4e-3 and err < 2 * ref_err + 1e-3
    if t > SMALL_T:  # a bf16 copy dequantised by the kernel: the einsum up to summation order
        assert rel_err(got, ref) < 1e-3
    if t <= 2 or t > 32:  # the MMA kernel too (one token: its CUDA-core path ran; past 32
        # tokens its 128-row tiles, beyond SMALL_T the launch the bf16 GEMM stands in for)
        from dsv4.kernels.grouped_linear import _grouped_fp8_cuda
        mma = rel_err(_grouped_fp8_cuda(x, q, s, o_lora, dict(gemv=False)), want)
        assert mma < 4e-3 and mma < 2 * ref_err + 1e-3, f"MMA kernel rel err {mma:.2e}"


# ------------------------------------------------------------------------------- fp32 head
@pytest.mark.parametrize("t", [1, 7, 64, 300])
def test_linear_f32_split_equals_fp32_reference(t):
    """The head's bf16x3 GEMM equals x.float() @ w.float()^T up to fp32 summation order."""
    from dsv4.kernels import f32_linear
    w = (torch.randn(129280, 4096, device=DEV) / 64).bfloat16()
    x = torch.randn(t, 4096, device=DEV) * 3
    got = f32_linear.linear_f32(x, w)
    assert f32_linear._MM_DTYPE_OK.get(x.device, True), "torch.mm(out_dtype=) unavailable"
    want = x.double() @ w.double().t()
    ref = f32_linear.linear_f32_ref(x, w)
    hi_only = x.bfloat16().float() @ w.float().t()  # what dropping the split would give
    err = (got - want).abs().max().item()
    ref_err = (ref - want).abs().max().item()
    hi_err = (hi_only - want).abs().max().item()
    print(f"T={t}: max |err| split {err:.2e}, fp32 CUDA-core reference {ref_err:.2e}, "
          f"bf16 x {hi_err:.2e} (|logit| <= {want.abs().max().item():.1f})")
    # Tensor-core fp32 accumulation is a little less exact than CUDA-core FMAs (H200: ~7e-5
    # against 2e-6 here); both are far below rounding x to bf16.
    assert got.dtype == torch.float32 and err < 2e-4 and err < hi_err / 20
    xb = x.bfloat16()  # a bf16 x takes one part
    assert (f32_linear.linear_f32(xb, w) - f32_linear.linear_f32_ref(xb, w)).abs().max() < 2e-4


@pytest.mark.parametrize("m", [1, 2, 4])
@pytest.mark.parametrize("n,k,wdtype", [(256, 4096, torch.bfloat16), (1024, 4096, torch.bfloat16),
                                        (384, 7168, torch.bfloat16), (256, 4096, torch.float32),
                                        (130, 1000, torch.bfloat16)])
def test_linear_f32_gemv_equals_fp32_reference(m, n, k, wdtype):
    """Decode-sized fp32 linears (the gate, the compressors) in the GEMV kernel: fp32 products
    and sums, so as close to the float64 result as torch's own fp32 GEMM."""
    from dsv4.kernels import f32_linear
    g = torch.Generator(device=DEV).manual_seed(m * n)
    w = (torch.randn(n, k, device=DEV, generator=g) / k ** 0.5).to(wdtype)
    for x in (torch.randn(m, k, device=DEV, generator=g), torch.randn(m, k, device=DEV).bfloat16()):
        got = f32_linear.linear_f32(x, w)
        want = x.double() @ w.double().t()
        err = (got - want).abs().max().item()
        ref_err = (f32_linear.linear_f32_ref(x, w) - want).abs().max().item()
        print(f"M={m} N={n} K={k} w {wdtype} x {x.dtype}: max |err| {err:.2e}, torch fp32 {ref_err:.2e}")
        assert got.shape == (m, n) and got.dtype == torch.float32
        assert err <= 4 * ref_err + 1e-6
        w2 = w.flip(0)  # the compressors' wkv and wgate share one launch: the same bits
        a, b = f32_linear.linear_f32_pair(x, w, w2)
        assert torch.equal(a, got) and torch.equal(b, f32_linear.linear_f32(x, w2))


def test_head_gemv_for_one_row_equals_fp32_reference():
    """A batch-1 step's vocabulary head (one row, 129280 x 4096) takes the GEMV kernel: fp32
    products and sums, as close to float64 as torch's fp32 GEMM."""
    from dsv4.kernels import f32_linear
    g = torch.Generator(device=DEV).manual_seed(5)
    w = (torch.randn(129280, 4096, device=DEV, generator=g) / 64).bfloat16()
    x = torch.randn(1, 4096, device=DEV, generator=g) * 3
    assert f32_linear.gemv_applies(x, w)
    got, want = f32_linear.linear_f32(x, w), x.double() @ w.double().t()
    ref_err = (f32_linear.linear_f32_ref(x, w) - want).abs().max().item()
    err = (got - want).abs().max().item()
    assert got.shape == (1, 129280) and err <= 4 * ref_err + 1e-6, (err, ref_err)


@pytest.mark.parametrize("m", [1, 3, 4, 5])
def test_bf16_linear_decode_rows_take_the_gemv(m):
    """BF16Linear (the indexer's weights_proj, 4096 -> 64) at up to GEMV_MAX_M bf16 rows is
    the GEMV kernel rounded to bf16 in its store: within one bf16 ulp of the exact product,
    as cuBLAS's GEMM, whose fp32 sums it rounds once as well; past GEMV_MAX_M rows it is
    cuBLAS's."""
    from dsv4.kernels import f32_linear
    from dsv4.quant.linear import BF16Linear
    g = torch.Generator(device=DEV).manual_seed(m)
    lin = BF16Linear(4096, 64).to(DEV)
    lin.set_float(torch.randn(64, 4096, device=DEV, generator=g) / 64)
    x = torch.randn(m, 4096, device=DEV, generator=g).bfloat16()
    got = lin(x)
    assert got.dtype == torch.bfloat16 and got.shape == (m, 64)
    if m <= f32_linear.GEMV_MAX_M:
        assert torch.equal(got, f32_linear.linear_f32(x, lin.weight).bfloat16())
    else:
        assert torch.equal(got, torch.nn.functional.linear(x, lin.weight))
    want = (x.double() @ lin.weight.double().t())
    assert ((got.double() - want).abs() <= want.abs() * 2.0 ** -8 + 1e-6).all()
    scale = 128 ** -0.5 * 64 ** -0.5  # the indexer's head weights: scaled in the GEMV's store
    assert torch.equal(lin.scaled(x, scale), got * scale)


@pytest.mark.parametrize("func", ["sqrtsoftplus", "sigmoid", "softmax"])
@pytest.mark.parametrize("e,k,t", [(256, 6, 1), (256, 6, 300), (384, 6, 64), (16, 4, 7)])
def test_route_kernel_matches_reference(func, e, k, t):
    """Fused routing (scores, top-k or hash lookup, normalised weights) against the torch ops:
    the same experts in the same order, weights to fp32 rounding."""
    from dsv4.kernels.routing import route, route_ref
    g = torch.Generator(device=DEV).manual_seed(t)
    z = torch.randn(t, e, device=DEV, generator=g) * 3
    z[0, 0] = 30.0  # past softplus's linear threshold
    bias = torch.randn(e, device=DEV, generator=g) * 0.1
    got = route(z, func, k, 2.5, bias=bias)
    want = route_ref(z, func, k, 2.5, bias=bias)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=2e-6, atol=1e-7)
    table = torch.randint(0, e, (1000, k), device=DEV, generator=g, dtype=torch.int32)
    ids = torch.randint(0, 1000, (t,), device=DEV, generator=g)
    got = route(z, func, k, 2.5, table=table, ids=ids)
    want = route_ref(z, func, k, 2.5, table=table, ids=ids)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=2e-6, atol=1e-7)
