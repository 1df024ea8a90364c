"""`dsv4 bench` measures the real engine and reports speculative-decoding acceptance."""
import json
import subprocess
import sys


def test_bench_latency_with_speculation_reports_every_number(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "-m", "dsv4.cli", "bench", "latency", "--model", "tiny", "--device", "cpu",
         "--input-len", "16", "--output-len", "6", "--speculative-tokens", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for line in ("prefill throughput", "time to first token", "time per output token",
                 "output throughput", "peak GPU memory", "roofline fraction", "speculative decoding"):
        assert line in proc.stdout, line
    r = json.loads(out.read_text())
    assert r["tpot_ms_median"] > 0 and r["prefill_tokens_per_s"] > 0
    assert r["speculative"]["k"] == 2 and len(r["speculative"]["acceptance_rate_per_position"]) == 2
    assert r["speculative"]["mean_accepted_length"] >= 1


def test_bench_rejects_bad_lengths():
    proc = subprocess.run([sys.executable, "-m", "dsv4.cli", "bench", "latency", "--model", "tiny",
                           "--device", "cpu", "--input-len", "0"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "--input-len must be >= 1" in proc.stderr


def test_bench_repeats_passes_with_new_prompts(tmp_path):
    """--num-iters: every pass is measured (new prompts, so nothing is served from a cache),
    the rates of each pass are reported and the headline numbers are medians over them."""
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "-m", "dsv4.cli", "bench", "throughput", "--model", "tiny", "--device",
         "cpu", "--input-len", "12", "--output-len", "4", "--num-prompts", "3", "--num-iters", "3",
         "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "3 passes" in proc.stdout
    r = json.loads(out.read_text())
    per = r["prefill_tokens_per_s_per_iteration"]
    assert r["iterations"] == 3 and len(per) == 3 and all(v > 0 for v in per)
    assert r["prefill_tokens_per_s"] == sorted(per)[1]
    proc = subprocess.run([sys.executable, "-m", "dsv4.cli", "bench", "latency", "--model", "tiny",
                           "--device", "cpu", "--num-iters", "0"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "--num-iters must be >= 1" in proc.stderr


def test_bench_warmup_runs_the_measured_passes_step_shapes():
    """The warm-up's requests decode long enough that its mixed steps (prefill chunks beside
    decodes) are the measured pass's: kernels a step shape needs compile before the clock runs."""
    from dsv4.bench import measure, warmup_tokens
    from dsv4.engine.llm_engine import LLMEngine
    engine = LLMEngine.from_args("tiny", dtype="float32", device="cpu", max_num_seqs=4,
                                 max_num_batched_tokens=24, cpu_cache_bytes=16 << 20)
    shapes: list[tuple[int, ...]] = []
    real_run = engine.runner.run

    def run(chunks):
        if any(c.num_tokens > 1 for c in chunks):  # a step with prefill in it
            shapes.append(tuple(sorted(c.num_tokens for c in chunks)))
        return real_run(chunks)

    engine.runner.run = run
    assert warmup_tokens(engine, 4, 30, 40) == -(-4 * 30 // 20) + 4 == 10
    assert warmup_tokens(engine, 4, 30, 6) == 6
    measure(engine, "throughput", 4, 30, 40)
    half = len(shapes) // 2
    assert half > 2 and any(len(s) > 1 and 1 in s for s in shapes), shapes
    assert shapes[:half] == shapes[half:], "the warm-up's prefill steps differ from the pass's"


def test_bench_with_a_shared_prefix_reports_the_prefix_cache_hit_rate(tmp_path):
    """--prefix-len: every prompt starts with the same tokens; with --enable-prefix-caching
    the warm-up leaves them cached and the measured prompts resume from them."""
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "-m", "dsv4.cli", "bench", "throughput", "--model", "tiny", "--device",
         "cpu", "--prefix-len", "256", "--input-len", "20", "--output-len", "3", "--num-prompts",
         "3", "--enable-prefix-caching", "--max-num-batched-tokens", "128", "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "256 shared + 20 in" in proc.stdout and "prefix cache hit rate" in proc.stdout
    r = json.loads(out.read_text())
    assert r["prefix_len"] == 256
    assert abs(r["prefix_cache_hit_rate"] - 256 / 276) < 1e-9  # every prompt resumed at 256


def test_bench_reports_triton_compiles_inside_the_measured_passes(capsys):
    """A compile the warm-ups missed lands inside the measured passes: the result counts it
    and the report says the times include it (none on CPU, so compiles are simulated)."""
    from dsv4.bench import measure, print_result
    from dsv4.engine.llm_engine import LLMEngine
    engine = LLMEngine.from_args("tiny", dtype="float32", device="cpu", max_num_seqs=2,
                                 cpu_cache_bytes=16 << 20)
    r = measure(engine, "latency", 1, 8, 3)
    assert "triton_compiles" not in r
    real_run, calls = engine.runner.run, []

    def run(chunks):  # every step from now on "compiles" for a quarter of a second
        calls.append(1)
        engine.triton_compiles += 1
        engine.triton_compile_seconds += 0.25
        return real_run(chunks)

    engine.runner.run = run
    r = measure(engine, "latency", 1, 8, 3)
    assert 0 < r["triton_compiles"] < len(calls)  # the warm-up's own are not counted
    assert abs(r["triton_compile_seconds"] - 0.25 * r["triton_compiles"]) < 1e-9
    print_result(r)
    assert f"Triton compiles         {r['triton_compiles']} in the measured passes" in (
        capsys.readouterr().out)


def test_runs_of_other_lengths_share_no_prefix_with_earlier_runs():
    """Random prompts of a longer run do not start with an earlier run's prompts (with the
    prefix cache on, a 32K row after an 8K row resumed a quarter of every prompt from it)."""
    from dsv4.bench import measure
    from dsv4.engine.llm_engine import LLMEngine
    engine = LLMEngine.from_args("tiny", dtype="float32", device="cpu", max_num_seqs=8,
                                 enable_prefix_caching=True, cpu_cache_bytes=128 << 20)
    assert engine.prefix_cache is not None
    measure(engine, "latency", 1, 256, 2, iters=2)
    r = measure(engine, "latency", 1, 512, 2, iters=2)
    assert r["prefix_cache_hit_rate"] == 0.0
    r = measure(engine, "throughput", 2, 256, 2)  # same length, another batch size
    assert r["prefix_cache_hit_rate"] == 0.0
