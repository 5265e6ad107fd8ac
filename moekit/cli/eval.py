"""``moekit eval DIR``: validation loss and perplexity of a trained run's checkpoint."""

from __future__ import annotations

import argparse
import json
import math

from moekit.cli.args import positive_int
from moekit.training.data import val_batches
from moekit.training.loop import evaluate, load_run, prepare_data


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="validation loss/perplexity of a trained run")
    p.add_argument("run_dir", metavar="DIR", help="a run directory written by `moekit train`")
    p.add_argument("--checkpoint", help="checkpoint folder or name (default: the newest)")
    p.add_argument("--batches", type=positive_int, help="validation batches (default: the run's train.eval_batches)")
    p.add_argument("--data", help="evaluate on the validation split of this text file or folder instead")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    loaded = load_run(args.run_dir, args.checkpoint, args.device)
    cfg = loaded.config
    if args.data is not None:
        cfg = cfg.with_overrides({"train.data": args.data})
    t = cfg.train
    data = prepare_data(cfg, loaded.tokenizer)
    batches = val_batches(data.val_tokens, t.batch_size, t.seq_len, args.batches or t.eval_batches)
    result = evaluate(loaded.model, batches, next(loaded.model.parameters()).device)
    n_tokens = sum(b.numel() for b in batches)
    out = {
        "checkpoint": str(loaded.checkpoint),
        "step": loaded.step,
        "val_loss": result["val_loss"],
        "val_ppl": math.exp(min(result["val_loss"], 50.0)),
        "max_vio": result["max_vio"],
        "tokens": n_tokens,
        "corpus": data.corpus.source,
    }
    if args.json:
        print(json.dumps(out))
    else:
        vio = "" if out["max_vio"] is None else f", MaxVio {out['max_vio']:.3f}"
        print(
            f"{loaded.checkpoint} (step {loaded.step}): val loss {out['val_loss']:.4f}, "
            f"perplexity {out['val_ppl']:.2f}{vio} on {n_tokens:,} tokens of {data.corpus.source}"
        )
    return 0
