"""``moekit convert SRC DST --format hf|moekit``: rewrite a checkpoint folder in either layout.

SRC is a Hugging Face folder of a loadable type (``moekit.interop.types.loadable_types()``: mixtral,
qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3, glm4_moe, dots1, gpt_oss, llama4_text, ...) or a
moekit folder; DST is written atomically. Tokenizer and generation files are carried across. DST must be
new, empty, or written by moekit; ``--overwrite`` lets it replace the weights and config of another
folder (even SRC itself), keeping every other file there (README.md, LICENSE, tokenizer files).
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
    p.add_argument("dst", metavar="DST", help="folder to write: new, empty, or one moekit wrote")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="DST holds a model moekit did not write: replace its weights and config (other files are kept)",
    )
    p.add_argument("--format", choices=["hf", "moekit"], default="hf", help="layout to write (default: hf)")
    p.add_argument("--model-type", default=None, help="HF model_type to write (default: inferred from the config)")
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="cast weights (default: keep)"
    )
    p.add_argument("--max-shard-size", default="5GB", help="shard the weights above this size (default: 5GB)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moekit.files import foreign_entries, listing
    from moekit.interop.pretrained import convert
    from moekit.interop.safety import PRETRAINED_KIND

    dst = convert(
        args.src,
        args.dst,
        args.format,
        model_type=args.model_type,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
    )
    kept = foreign_entries(dst, PRETRAINED_KIND)
    print(f"wrote {args.format} checkpoint to {dst}" + (f"; kept its other files: {listing(kept)}" if kept else ""))
    return 0
