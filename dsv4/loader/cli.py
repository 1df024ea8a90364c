"""The `make-tiny` command: `dsv4 make-tiny OUT --format {bf16,fp8,fp4,nvfp4} [--preset
tiny|flash|pro] [--layers N] [--seed S]` writes a random checkpoint in the official layout.
`add_make_tiny_cli` registers it on the `dsv4` CLI; `python -m dsv4.loader.make_tiny` runs it alone."""
from __future__ import annotations

import argparse
import sys

from ..config import PRESETS
from .writer import DEFAULT_SHARD_BYTES, FORMATS, write_tiny_checkpoint

HELP = "write a random DeepSeek-V4 checkpoint directory in the official layout"


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2GB, 500MB, 1048576)")


def configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("out", metavar="OUT", help="directory to write (created if missing)")
    p.add_argument("--format", choices=FORMATS, default="bf16",
                   help="weight storage: bf16; fp8 (FP8 linears and experts); fp4 (the official "
                        "release: FP8 linears, MXFP4 experts); nvfp4 (ModelOpt NVFP4 experts)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                   help="model shape (tiny: CPU-sized; flash / pro: published sizes)")
    p.add_argument("--layers", type=int, default=None,
                   help="keep only the first N main layers (plus the MTP layer)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", type=_size, default=DEFAULT_SHARD_BYTES,
                   help="bytes per safetensors shard (default 2GB)")
    p.add_argument("--device", default="cpu",
                   help="where tensors are generated and quantised (cuda is much faster for "
                        "flash/pro layers)")
    p.set_defaults(func=run)
    return p


def add_make_tiny_cli(subparsers) -> argparse.ArgumentParser:
    """Register `make-tiny` on an argparse subparsers object; the parsed args carry
    `func=run`, which returns an exit status."""
    return configure(subparsers.add_parser("make-tiny", help=HELP, description=HELP))


def run(args: argparse.Namespace) -> int:
    out = write_tiny_checkpoint(args.out, fmt=args.format, preset=args.preset, layers=args.layers,
                                seed=args.seed, shard_bytes=args.shard_size, device=args.device)
    print(f"wrote {args.format} {args.preset} checkpoint to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = configure(argparse.ArgumentParser(prog="dsv4 make-tiny", description=HELP)).parse_args(argv)
    try:
        return run(args)
    except ValueError as e:  # bad --layers for the preset, invalid config
        print(f"dsv4 make-tiny: error: {e}", file=sys.stderr)
        return 2
