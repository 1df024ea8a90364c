"""Model names on the Hugging Face Hub, as vLLM takes them: `deepseek-ai/DeepSeek-V4-Flash`
becomes the directory of its files in the Hub's cache (downloaded on first use, with progress
bars; `HF_HUB_OFFLINE=1` reads the cache only, `HF_TOKEN` reaches gated repositories)."""
from __future__ import annotations

import re
from pathlib import Path

# What the engine reads: config, weights and their index, tokenizer and generation config.
# The official repositories also hold the reference inference code and docs; skipped.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_repo_id(model: str) -> bool:
    """`owner/name` that is not a path on this machine."""
    return bool(_REPO_ID.match(model)) and not Path(model).exists()


def resolve_model(model: str, revision: str | None = None, download_dir: str | None = None,
                  weights: bool = True) -> str:
    """`model` itself when it is a local path (or anything but `owner/name`); else the local
    directory of the Hub repository `model` at `revision` (a branch, tag or commit; default
    main), downloaded into `download_dir` (default: the Hub's cache) where missing; without
    `weights` (`--load-format dummy`) its config and tokenizer files only."""
    if not is_repo_id(model):
        if revision is not None:
            raise ValueError(f"--revision {revision!r} names a version of a Hugging Face Hub "
                             f"repository; model {model!r} is not one (owner/name)")
        return model
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as e:
        raise RuntimeError(f"model {model!r} is no local directory; to fetch it from the "
                           f"Hugging Face Hub install huggingface_hub ({e})") from e
    try:
        patterns = [p for p in ALLOW_PATTERNS if weights or p != "*.safetensors"]
        path = snapshot_download(model, revision=revision, cache_dir=download_dir,
                                 allow_patterns=patterns)
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(
            f"model {model!r}: no such directory, and not in the Hugging Face Hub cache "
            f"{'(' + download_dir + ') ' if download_dir else ''}while the Hub cannot be "
            f"reached (HF_HUB_OFFLINE, or no network): {str(e).splitlines()[0]}") from e
    except (HfHubHTTPError, ValueError) as e:  # not found, gated, bad revision
        raise FileNotFoundError(f"model {model!r}: no such directory, and the Hugging Face Hub "
                                f"gives no such repository or revision to this machine: "
                                f"{str(e).splitlines()[0]}") from e
    return path
