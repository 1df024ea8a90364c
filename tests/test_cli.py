"""The `dsv4` command line: `generate` streams text; shared engine flags; optional subcommands."""
import inspect
import shutil
import subprocess
import sys

import pytest

from dsv4 import LLM, SamplingParams
from dsv4.cli import _add_optional_cli, build_parser, engine_kwargs, main, run_generate
from dsv4.engine.llm_engine import LLMEngine

ENGINE = ["--model", "tiny", "--dtype", "float32", "--device", "cpu",
          "--cpu-cache-bytes", str(16 << 20), "--max-num-seqs", "4"]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("tiny", dtype="float32", device="cpu", cpu_cache_bytes=16 << 20, max_num_seqs=4)


def expected_text(llm, prompt, chat=False, max_tokens=8) -> str:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    if chat:
        return llm.chat([{"role": "user", "content": prompt}], params, use_tqdm=False)[0].outputs[0].text
    return llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].text


class Recorder:
    def __init__(self):
        self.writes: list[str] = []

    def write(self, s: str) -> None:
        self.writes.append(s)

    def flush(self) -> None:
        pass


def test_generate_prints_the_greedy_completion_of_the_offline_api(llm, capsys):
    assert main(["generate", *ENGINE, "--prompt", "Hello", "--max-tokens", "8"]) == 0
    assert capsys.readouterr().out == expected_text(llm, "Hello") + "\n"


def test_generate_streams_text_as_tokens_arrive(llm):
    args = build_parser().parse_args(["generate", *ENGINE, "--prompt", "Hello", "--max-tokens", "24"])
    rec = Recorder()
    run_generate(args, rec)
    assert "".join(rec.writes) == expected_text(llm, "Hello", max_tokens=24) + "\n"
    assert len([w for w in rec.writes if w]) > 3, f"not streamed: {rec.writes}"


def test_input_file_prints_each_completion_on_its_own_line_in_input_order(llm, tmp_path, capsys):
    f = tmp_path / "prompts.txt"
    f.write_text("first prompt\n\nsecond, a longer prompt than the first\nthird\n")
    assert main(["generate", *ENGINE, "--input-file", str(f), "--max-tokens", "8"]) == 0
    want = [expected_text(llm, p) for p in
            ("first prompt", "second, a longer prompt than the first", "third")]
    assert capsys.readouterr().out == "".join(t + "\n" for t in want)


def test_chat_flag_applies_the_chat_encoding(llm, capsys):
    assert main(["generate", *ENGINE, "--prompt", "Hi!", "--chat", "--max-tokens", "8"]) == 0
    assert capsys.readouterr().out == expected_text(llm, "Hi!", chat=True) + "\n"


def test_unknown_model_exits_with_a_clear_error(capsys):
    assert main(["generate", "--model", "/no/such/dir", "--device", "cpu", "--prompt", "x"]) == 1
    assert "/no/such/dir" in capsys.readouterr().err


def test_engine_kwargs_are_exactly_from_args_parameters():
    import argparse

    from dsv4.cli import add_engine_args

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    kw = engine_kwargs(parser.parse_args(["--model", "m", "--dtype", "float32",
                                          "--max-num-seqs", "3", "--skip-tokenizer-init"]))
    params = set(inspect.signature(LLMEngine.from_args).parameters) - {"cls"}
    assert set(kw) == params
    assert (kw["model"], kw["dtype"], kw["max_num_seqs"], kw["skip_tokenizer_init"]) == \
        ("m", "float32", 3, True)
    assert engine_kwargs(parser.parse_args([]))["dtype"] == "bfloat16"  # auto


def test_a_subcommand_whose_module_is_missing_says_it_is_unavailable(capsys):
    import argparse

    parser = argparse.ArgumentParser(prog="dsv4")
    _add_optional_cli(parser.add_subparsers(), "nope", "dsv4.no_such_module", "help")
    args = parser.parse_args(["nope", "--model", "x"])
    assert args.func(args) == 2
    assert "dsv4 nope is unavailable" in capsys.readouterr().err


def test_readme_first_command_runs_with_no_files_and_no_network():
    exe = shutil.which("dsv4")
    cmd = [exe] if exe else [sys.executable, "-m", "dsv4.cli"]
    r = subprocess.run(cmd + ["generate", "--model", "tiny", "--prompt", "Hello", "--max-tokens",
                              "4", "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith("\n") and len(r.stdout) > 1
    assert "KV cache:" in r.stderr and "blocks" in r.stderr


def test_vllm_style_speculative_config_sets_the_draft_count(capsys):
    import argparse

    from dsv4.cli import add_engine_args

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    spec = '{"method": "deepseek_mtp", "num_speculative_tokens": 2}'
    assert engine_kwargs(parser.parse_args(["--speculative-config", spec]))["speculative_tokens"] == 2
    assert engine_kwargs(parser.parse_args(["--speculative-config", '{"num_speculative_tokens": 1}',
                                            "--speculative-tokens", "1"]))["speculative_tokens"] == 1
    with pytest.raises(ValueError, match="disagree"):
        engine_kwargs(parser.parse_args(["--speculative-config", spec, "--speculative-tokens", "3"]))
    for bad, why in (("{nope", "not JSON"), ('{"method": "eagle", "num_speculative_tokens": 1}',
                                             "only"),
                     ('{"num_speculative_tokens": -1}', ">= 0"),
                     ('{"model": "x", "num_speculative_tokens": 1}', "unsupported keys")):
        with pytest.raises(SystemExit):
            parser.parse_args(["--speculative-config", bad])
        assert why in capsys.readouterr().err


def parsed(*argv):
    """`dsv4 serve` arguments as its parser and its checks leave them."""
    import argparse

    from dsv4.server.cli import add_serve_args, check_serve_args
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    args = parser.parse_args(list(argv))
    check_serve_args(args)
    return args


def test_serve_takes_vllm_command_lines():
    """`dsv4 serve MODEL` with vLLM's DeepSeek flags parses as `--model MODEL`; a parser of
    another model family, or two different models, is refused with the flag named."""
    args = parsed("deepseek-ai/DeepSeek-V4-Flash", "--trust-remote-code", "-tp", "8",
                  "--tool-call-parser", "deepseek_v4", "--enable-auto-tool-choice",
                  "--reasoning-parser", "deepseek_v4")
    assert args.model == "deepseek-ai/DeepSeek-V4-Flash" and args.tensor_parallel_size == 8
    assert engine_kwargs(args)["model"] == "deepseek-ai/DeepSeek-V4-Flash"
    assert parsed("--model", "/m").model == "/m" and parsed().model == "tiny"
    assert parsed("/m", "--model", "/m").model == "/m"
    with pytest.raises(ValueError, match="--tool-call-parser 'hermes'"):
        parsed("tiny", "--tool-call-parser", "hermes")
    with pytest.raises(ValueError, match="--reasoning-parser 'qwen3'"):
        parsed("--reasoning-parser", "qwen3")
    with pytest.raises(ValueError, match="given twice"):
        parsed("/a", "--model", "/b")
    # argparse gives a model after --served-model-name's names to them: refused, not "tiny"
    with pytest.raises(ValueError, match="looks like the model: put MODEL first"):
        parsed("--served-model-name", "alias", "deepseek-ai/DeepSeek-V4-Flash")
    assert parsed("--served-model-name", "a", "b").served_model_name == ["a", "b"]


def test_serve_accepts_vllms_deployment_flags(caplog, monkeypatch):
    """A vLLM deployment line for DeepSeek-V4 runs: flags that mean nothing here are ignored
    (with a warning where a user might expect an effect), --disable-custom-all-reduce keeps
    NCCL's ring; flags that would change what is served and cannot are refused, reason named."""
    import logging
    import os

    monkeypatch.setenv("DSV4_TP_ALLREDUCE", "one-shot")  # restored after the test
    with caplog.at_level(logging.WARNING, logger="dsv4.server"):
        args = parsed("deepseek-ai/DeepSeek-V4-Flash", "-tp", "8", "--enable-expert-parallel",
                      "--enable-chunked-prefill", "--block-size", "256", "--swap-space", "16",
                      "--disable-log-requests", "--disable-custom-all-reduce",
                      "--uvicorn-log-level", "warning", "--max-model-len", "65536",
                      "--gpu-memory-utilization", "0.9", "--block-size", "256")
    assert args.model == "deepseek-ai/DeepSeek-V4-Flash" and args.log_level == "warning"
    assert os.environ["DSV4_TP_ALLREDUCE"] == "nccl"
    logged = caplog.text
    assert "--block-size 256 ignored" in logged and "--swap-space ignored" in logged
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dsv4.server"):
        parsed("tiny", "--block-size", "128")
    assert caplog.text == ""
    for argv, needle in ((["--no-enable-chunked-prefill"], "always prefills in chunks"),
                         (["--chat-template", "t.jinja"], "own format"),
                         (["-dp", "2"], "one dsv4 serve per replica")):
        with pytest.raises(ValueError, match=needle):
            parsed("tiny", *argv)


def test_compilation_config_sets_the_largest_graph_step(caplog):
    """vLLM's --compilation-config (-O): max_cudagraph_capture_size, or the largest of
    cudagraph_capture_sizes, becomes --max-cudagraph-capture-size (an explicit flag wins);
    other keys are ignored with a warning; malformed JSON or sizes are refused. Older vLLM's
    --cuda-graph-sizes and --max-seq-len-to-capture set the same settings."""
    import logging

    from dsv4.cli import engine_kwargs

    args = parsed("tiny", "--compilation-config", '{"max_cudagraph_capture_size": 512}')
    assert args.max_cudagraph_capture_size == 512
    assert engine_kwargs(args)["max_cudagraph_capture_size"] == 512
    assert parsed("tiny", "-O", '{"cudagraph_capture_sizes": [1, 8, 1024, 64]}'
                  ).max_cudagraph_capture_size == 1024
    assert parsed("tiny", "-O", '{"max_cudagraph_capture_size": 512}',
                  "--max-cudagraph-capture-size", "0").max_cudagraph_capture_size == 0
    assert parsed("tiny").max_cudagraph_capture_size is None
    # older vLLM flags for the same settings
    args = parsed("tiny", "--cuda-graph-sizes", "8", "640", "--max-seq-len-to-capture", "8192")
    assert (args.max_cudagraph_capture_size, args.cuda_graph_max_len) == (640, 8192)
    with caplog.at_level(logging.WARNING, logger="dsv4.server"):
        parsed("tiny", "-O", '{"level": 3, "max_cudagraph_capture_size": 256}')
    assert "['level'] ignored" in caplog.text
    for bad, needle in (("{level: 3}", "not JSON"), ("[512]", "JSON object"),
                        ('{"max_cudagraph_capture_size": -1}', "integer >= 0"),
                        ('{"cudagraph_capture_sizes": "512"}', "list of integers")):
        with pytest.raises(ValueError, match=needle):
            parsed("tiny", "--compilation-config", bad)


def test_max_cudagraph_capture_size_is_validated():
    from dsv4.config import ConfigError, EngineConfig

    EngineConfig(max_cudagraph_capture_size=0).validate()
    with pytest.raises(ConfigError, match="max_cudagraph_capture_size -1"):
        EngineConfig(max_cudagraph_capture_size=-1).validate()


def test_serve_errors_exit_with_the_message(capsys):
    assert main(["serve", "tiny", "--tool-call-parser", "hermes"]) == 1
    assert "hermes" in capsys.readouterr().err


def test_vllm_style_lengths_and_cache_dtypes_parse():
    """--max-model-len 64k / 1m (vLLM's suffixes), --kv-cache-dtype fp8_e4m3 (vLLM's name for
    dsv4's fp8 rows); a malformed length or e5m2 rows are refused by the parser."""
    import argparse

    from dsv4.cli import add_engine_args

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    for text, n in (("65536", 65536), ("64k", 65536), ("64K", 65536), ("1m", 1 << 20)):
        assert parser.parse_args(["--max-model-len", text]).max_model_len == n
    assert parser.parse_args(["--kv-cache-dtype", "fp8_e4m3"]).kv_cache_dtype == "fp8"
    for argv in (["--max-model-len", "lots"], ["--max-model-len", "0"],
                 ["--kv-cache-dtype", "fp8_e5m2"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
