"""The launch policy of `kernels/pdl.py` (programmatic dependent launch): which launches get
it, by GPU and by the size of the step. The launches themselves run on the device
(tests/gpu/test_pdl_gpu.py)."""
from __future__ import annotations

import torch

from dsv4.kernels import pdl as pdl_mod
from model_helpers import make_cache, make_model, run_chunks

ON = {"PDL": True, "launch_pdl": True}


def test_on_exactly_on_hopper_gpus(monkeypatch):
    """Off on the CPU (and in Triton's interpreter); on with every GPU sm_90+; DSV4_PDL=0 off."""
    hopper = torch.cuda.is_available() and all(
        torch.cuda.get_device_capability(i) >= (9, 0) for i in range(torch.cuda.device_count()))
    monkeypatch.setattr(pdl_mod, "_ARGS", None)
    monkeypatch.setattr(pdl_mod, "_HOPPER", [])
    monkeypatch.delenv("DSV4_PDL", raising=False)
    assert pdl_mod.pdl() == (ON if hopper and pdl_mod._HAS_GDC else {})
    monkeypatch.setattr(pdl_mod, "_ARGS", None)
    monkeypatch.setattr(pdl_mod, "_HOPPER", [True])
    monkeypatch.setenv("DSV4_PDL", "0")
    assert pdl_mod.pdl() == {}
    monkeypatch.setattr(pdl_mod, "_ARGS", None)
    monkeypatch.delenv("DSV4_PDL")
    assert pdl_mod.pdl() == ON


def test_small_steps_only(monkeypatch):
    monkeypatch.setattr(pdl_mod, "_ARGS", ON)  # as on an H200
    n = pdl_mod.PDL_MAX_TOKENS
    assert pdl_mod.pdl() == ON
    with pdl_mod.for_tokens(n):
        assert pdl_mod.pdl() == ON
        with pdl_mod.for_tokens(n + 1):
            assert pdl_mod.pdl() == {}
        assert pdl_mod.pdl() == ON
    try:
        with pdl_mod.for_tokens(4096):
            raise KeyError
    except KeyError:
        pass
    assert pdl_mod.pdl() == ON  # restored after an exception too


def test_model_forward_and_head_choose_by_their_token_count(monkeypatch):
    """The main layers and the head see the policy of their own row count."""
    monkeypatch.setattr(pdl_mod, "_ARGS", ON)
    model = make_model()
    seen = []
    blk = type(model.layers[0])
    real = blk.forward

    def spy(self, *a, **k):
        seen.append(("block", bool(pdl_mod.pdl())))
        return real(self, *a, **k)

    monkeypatch.setattr(blk, "forward", spy)
    import dsv4.model.model as model_mod
    real_f32 = model_mod.linear_f32

    def head_spy(x, w):
        seen.append(("head", x.shape[0], bool(pdl_mod.pdl())))
        return real_f32(x, w)

    monkeypatch.setattr(model_mod, "linear_f32", head_spy)
    cache = make_cache(model)
    n = pdl_mod.PDL_MAX_TOKENS
    ids = list(range(3, 3 + n + 1))
    run_chunks(model, cache, ids, [n + 1])  # one step over n + 1 tokens, logits at each
    layers = model.cfg.num_hidden_layers
    assert seen == [("block", False)] * layers + [("head", n + 1, False)]
    seen.clear()
    run_chunks(make_model(), make_cache(model), ids[:2], [1, 1])
    assert seen == ([("block", True)] * layers + [("head", 1, True)]) * 2
    assert pdl_mod.pdl() == ON


def test_l2_prefetch_depth_reads_its_variable(monkeypatch):
    import pytest
    monkeypatch.setattr(pdl_mod, "_HOPPER", [True])  # as on an H200
    for value, depth in (("4", 4), ("0", 0), ("", 0), ("-3", 0)):
        monkeypatch.setenv("DSV4_L2_PREFETCH", value)
        assert pdl_mod.l2_prefetch_depth() == depth
    monkeypatch.delenv("DSV4_L2_PREFETCH")
    assert pdl_mod.l2_prefetch_depth() == 0  # off by default
    monkeypatch.setenv("DSV4_L2_PREFETCH", "lots")
    with pytest.raises(ValueError, match="DSV4_L2_PREFETCH"):
        pdl_mod.l2_prefetch_depth()
    monkeypatch.setenv("DSV4_L2_PREFETCH", "4")
    monkeypatch.setattr(pdl_mod, "_HOPPER", [False])  # no sm_90 GPU: never
    assert pdl_mod.l2_prefetch_depth() == 0


def test_launch_policy_line(monkeypatch):
    monkeypatch.setattr(pdl_mod, "_HOPPER", [True])
    monkeypatch.setattr(pdl_mod, "_ARGS", ON)
    monkeypatch.setenv("DSV4_L2_PREFETCH", "4")
    line = pdl_mod.launch_policy()
    assert f"up to {pdl_mod.PDL_MAX_TOKENS} tokens" in line and "4 K-blocks ahead" in line
    monkeypatch.setattr(pdl_mod, "_ARGS", {})
    monkeypatch.delenv("DSV4_L2_PREFETCH")
    assert pdl_mod.launch_policy() == "plain launches (DSV4_PDL=0)"
    monkeypatch.setattr(pdl_mod, "_HOPPER", [False])
    assert "needs sm_90+" in pdl_mod.launch_policy()
