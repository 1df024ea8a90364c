"""Hugging Face Hub names (`owner/name`) resolve to the Hub cache's snapshot of the repository,
as vLLM resolves them: here a cache laid out by hand, read with the Hub offline."""
from __future__ import annotations

import pytest

import huggingface_hub.constants

from dsv4 import LLM, SamplingParams
from dsv4.cli import main
from dsv4.loader import write_tiny_checkpoint
from dsv4.loader.hub import is_repo_id, resolve_model

REPO = "dsv4-test/tiny-v4"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A Hub cache holding REPO at COMMIT, `main` pointing at it."""
    cache = tmp_path_factory.mktemp("hub")
    repo = cache / ("models--" + REPO.replace("/", "--"))
    write_tiny_checkpoint(repo / "snapshots" / COMMIT, fmt="bf16", seed=3)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return cache


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_repo_ids_are_owner_slash_name_and_not_local_paths(tmp_path, monkeypatch):
    assert is_repo_id("deepseek-ai/DeepSeek-V4-Flash")
    assert not is_repo_id("tiny") and not is_repo_id("a/b/c") and not is_repo_id("./a")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner" / "name").mkdir(parents=True)
    assert not is_repo_id("owner/name")  # a directory here wins, as in vLLM
    assert resolve_model("owner/name") == "owner/name"


def test_a_cached_repository_loads_as_its_directory_would(hub_cache, offline):
    path = resolve_model(REPO, download_dir=str(hub_cache))
    assert path.endswith(COMMIT)
    assert resolve_model(REPO, revision=COMMIT, download_dir=str(hub_cache)) == path
    params = SamplingParams(temperature=0, max_tokens=6)
    kw = dict(dtype="float32", device="cpu", max_num_seqs=2)
    by_name = LLM(REPO, download_dir=str(hub_cache), **kw).generate([[5, 6, 7]], params,
                                                                    use_tqdm=False)
    by_path = LLM(path, **kw).generate([[5, 6, 7]], params, use_tqdm=False)
    assert by_name[0].outputs[0].token_ids == by_path[0].outputs[0].token_ids


def test_missing_repository_or_revision_names_the_model(hub_cache, offline, capsys):
    with pytest.raises(FileNotFoundError, match="dsv4-test/absent.*Hugging Face Hub cache"):
        resolve_model("dsv4-test/absent", download_dir=str(hub_cache))
    with pytest.raises(FileNotFoundError, match=REPO):
        resolve_model(REPO, revision="v9", download_dir=str(hub_cache))
    with pytest.raises(ValueError, match="--revision"):
        resolve_model("tiny", revision="main")
    assert main(["generate", "--model", "dsv4-test/absent", "--download-dir", str(hub_cache),
                 "--device", "cpu", "--prompt", "x"]) == 1
    assert "dsv4-test/absent" in capsys.readouterr().err


def test_dummy_weights_fetch_no_weight_files(monkeypatch):
    """`--load-format dummy` with a Hub name asks the Hub for config and tokenizer files only
    (a real checkpoint's weights are hundreds of GB)."""
    import huggingface_hub

    asked = {}

    def fake(repo_id, **kw):
        asked[repo_id] = kw["allow_patterns"]
        return "/nowhere"

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    resolve_model("owner/a", weights=False)
    resolve_model("owner/b")
    assert "*.safetensors" not in asked["owner/a"] and "*.json" in asked["owner/a"]
    assert "*.safetensors" in asked["owner/b"]
