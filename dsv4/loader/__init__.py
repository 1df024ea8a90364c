"""Checkpoints: load a downloaded DeepSeek-V4 directory with no conversion step, and write
random ones (`make-tiny`) in the same official layout."""
from .checkpoint import CheckpointError
from .loader import LoadedModel, load_model, load_tokenizer
from .cli import add_make_tiny_cli
from .writer import tiny_config, write_tiny_checkpoint

__all__ = ["CheckpointError", "LoadedModel", "add_make_tiny_cli", "load_model", "load_tokenizer",
           "tiny_config", "write_tiny_checkpoint"]
