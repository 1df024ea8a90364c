"""The Triton compile watch (`kernels/compile_watch.py`), driven through its hooks the way
Triton calls them (no GPU, no Triton needed), and the engine's count of compiles after warm-up."""
import logging
from types import SimpleNamespace

from dsv4.engine import llm_engine
from dsv4.kernels.compile_watch import CompileWatch


def _runtime():
    return SimpleNamespace(jit_cache_hook=None, jit_post_compile_hook=None)


def _compile(rt, kernel: str, T_aligned: bool, BLOCK: int, key: str):
    """One compile as Triton reports it: arguments (x_ptr, T, BLOCK)."""
    fn = SimpleNamespace(name=kernel, jit_function=SimpleNamespace(arg_names=["x_ptr", "T",
                                                                              "BLOCK"]))
    compile = {"constants": {(2,): BLOCK}, "signature": {"x_ptr": "*bf16", "T": "i32",
                                                         "BLOCK": "constexpr"},
               "configs": [{(0,): [["tt.divisibility", 16]]} | (
                   {(1,): [["tt.divisibility", 16]]} if T_aligned else {})],
               "num_warps": 4, "num_stages": 3}
    kw = dict(key=key, repr="", fn=fn, compile=compile, is_manual_warmup=False,
              already_compiled=False)
    assert rt.jit_cache_hook(**kw) is False  # go on and compile
    rt.jit_post_compile_hook(**kw)


def test_compiles_are_reported_with_what_made_them_new():
    rt, seen = _runtime(), []
    watch = CompileWatch(seen.append, runtime=rt)
    assert watch.active
    _compile(rt, "_k", True, 256, "a")
    _compile(rt, "_k", False, 256, "b")
    _compile(rt, "_k", False, 512, "c")
    _compile(rt, "_other", False, 64, "d")
    assert [c.kernel for c in seen] == ["_k", "_k", "_k", "_other"]
    assert seen[0].args == {"x_ptr": "*bf16/16", "T": "i32/16", "BLOCK": 256, "num_warps": 4,
                            "num_stages": 3}
    assert seen[0].new is None and seen[3].new is None  # first variants
    assert seen[1].new == {"T": "i32/16 -> i32"}
    assert seen[2].new == {"BLOCK": "256 -> 512"}  # nearest earlier variant: the second
    assert all(c.seconds >= 0 for c in seen)


def test_watches_chain_earlier_hooks_and_close_restores_them():
    rt, calls, seen = _runtime(), [], []
    rt.jit_cache_hook = lambda **kw: calls.append("before") or False
    rt.jit_post_compile_hook = lambda **kw: calls.append("after")
    first = (rt.jit_cache_hook, rt.jit_post_compile_hook)
    watch = CompileWatch(seen.append, runtime=rt)
    _compile(rt, "_k", True, 256, "a")
    assert calls == ["before", "after"] and len(seen) == 1
    watch.close()
    assert (rt.jit_cache_hook, rt.jit_post_compile_hook) == first and not watch.active
    # closed under a later watch: it stays in that watch's chain and only passes calls on
    got_a, got_b = [], []
    a = CompileWatch(got_a.append, runtime=rt)
    b = CompileWatch(got_b.append, runtime=rt)
    a.close()
    _compile(rt, "_k", True, 256, "x")
    assert len(got_a) == 0 and len(got_b) == 1 and calls[-2:] == ["before", "after"]
    b.close()
    assert (rt.jit_cache_hook, rt.jit_post_compile_hook) == (a._before, a._after)


def test_engine_counts_and_logs_compiles_after_warm_up(monkeypatch, caplog):
    rt = _runtime()
    monkeypatch.setattr(llm_engine, "CompileWatch", lambda cb: CompileWatch(cb, runtime=rt))
    eng = llm_engine.LLMEngine.from_args("tiny", dtype="float32", device="cpu", max_num_seqs=2)
    # on CUDA the engine starts its watch before the graph capture and the warm-up: their
    # compiles are recorded (not counted), so a later one is named against them
    eng._warming = True
    eng._compile_watch = llm_engine.watch_compiles(eng)
    with caplog.at_level(logging.WARNING, logger="dsv4.engine.llm_engine"):
        _compile(rt, "_topk_kernel", True, 256, "a")
        assert eng.get_stats().triton_compiles == 0 and "Triton compiled" not in caplog.text
        eng._warming = False
        _compile(rt, "_topk_kernel", False, 256, "b")
        _compile(rt, "_mix_kernel", False, 64, "c")
    stats = eng.get_stats()
    assert stats.triton_compiles == 2 and stats.triton_compile_seconds >= 0
    assert "Triton compiled _topk_kernel" in caplog.text
    assert "{'T': 'i32/16 -> i32'}" in caplog.text
    assert "_mix_kernel" in caplog.text and "its first variant" in caplog.text
    eng.close()  # the hooks from before the engine come back
    assert rt.jit_cache_hook is None and rt.jit_post_compile_hook is None


def test_unexpected_hook_arguments_never_fail_a_compile():
    """A later Triton that calls the hooks differently: the watch records nothing, and the
    compile goes on (the hooks return what Triton expects)."""
    rt, seen = _runtime(), []
    CompileWatch(seen.append, runtime=rt)
    assert rt.jit_cache_hook(key="k", something_else=1) is False
    assert rt.jit_post_compile_hook(key="k", fn=None) is None
    assert seen == []
