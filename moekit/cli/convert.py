"""``moekit convert SRC DST --format hf|moekit``: rewrite a checkpoint folder in either layout.

SRC is a Hugging Face folder of a loadable type (``moekit.interop.types.loadable_types()``) or a
moekit folder (a training run loads its newest checkpoint); DST is written atomically. Tokenizer and generation files are carried across.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert a checkpoint folder between Hugging Face and moekit layouts",
        description="Load a Hugging Face or moekit checkpoint folder and write it in the chosen layout.",
    )
    p.add_argument("src", metavar="SRC", help="checkpoint folder (config.json + safetensors)")
    p.add_argument("dst", metavar="DST", help="folder to write (replaced if it is a checkpoint folder)")
    p.add_argument("--format", choices=["hf", "moekit"], default="hf", help="layout to write (default: hf)")
    p.add_argument("--model-type", default=None, help="HF model_type to write (default: inferred from the config)")
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="cast weights (default: keep)"
    )
    p.add_argument("--max-shard-size", default="5GB", help="shard the weights above this size (default: 5GB)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moekit.interop.pretrained import convert

    dst = convert(
        args.src,
        args.dst,
        args.format,
        model_type=args.model_type,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
    )
    print(f"wrote {args.format} checkpoint to {dst}")
    return 0
