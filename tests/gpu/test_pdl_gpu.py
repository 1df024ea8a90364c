"""Programmatic dependent launch (`kernels/pdl.py`): on an H200 every Triton kernel is launched
with it, so a kernel may start while its predecessor runs; it must still see exactly its
predecessor's results. A chain of dependent launches (each reads what the previous one wrote,
with torch ops in between) gives bit-identical results with and without PDL, eagerly and
replayed from a CUDA graph."""
import pytest
import torch

pytestmark = pytest.mark.gpu
DEV = "cuda"


def test_pdl_on_for_hopper_and_chains_match_plain_launches(monkeypatch):
    from dsv4.kernels import pdl as pdl_mod
    from dsv4.kernels.rmsnorm import rmsnorm_triton
    from dsv4.kernels.rope import rope_

    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("PDL needs sm_90")
    assert pdl_mod.pdl() == {"PDL": True, "launch_pdl": True}
    gen = torch.Generator(device=DEV).manual_seed(0)
    T, d = 3000, 4096  # many CTAs a launch: the next launch is placed while they run
    x0 = torch.randn(T, d, generator=gen, device=DEV).bfloat16()
    ws = torch.rand(24, d, generator=gen, device=DEV) + 0.5
    pos = torch.arange(T, device=DEV)
    freqs = torch.rand(32, generator=gen, device=DEV)

    def chain(x):
        outs = []
        for i in range(24):
            x = rmsnorm_triton(x, ws[i], 1e-6)  # reads the previous launch's output
            if i % 5 == 2:  # a torch op in between (launched without PDL)
                x = x * 1.5
            if i % 3 == 1:  # in-place: a later kernel must not read before this one wrote
                rope_(x.view(T, 32, 128), pos, freqs, 64)
            outs.append(x)
        return torch.stack(outs)

    with_pdl = chain(x0)
    monkeypatch.setattr(pdl_mod, "_ARGS", {})
    plain = chain(x0)
    assert torch.equal(with_pdl, plain)
    monkeypatch.setattr(pdl_mod, "_ARGS", {"PDL": True, "launch_pdl": True})
    static = x0.clone()
    chain(static)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain(static)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, plain)
