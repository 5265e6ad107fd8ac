"""``moekit trace MODEL --text TEXT``: the experts every token chose in every MoE layer, and what it touched.

MODEL is a Hugging Face folder, a moekit checkpoint folder or a ``moekit train`` run directory.
Prints one row per token (the experts of each MoE layer with their gate weights, highest first,
and the parameters the token touched) next to the model's total and active counts; ``--json``
prints ``moekit.tracing.Trace.to_dict()``; ``--plot FILE`` writes a PNG (tokens x layers,
coloured by expert). ``--data PATH`` instead runs over a corpus (a text file or a folder of them)
and reports each MoE layer's expert load (the PNG then shows its distribution per layer).
"""

from __future__ import annotations

import argparse
import json

from moekit.cli.args import positive_int
from moekit.errors import MoekitError
from moekit.files import check_may_replace_file


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "trace",
        help="show which experts each token chose, and the parameters it touched",
        description="Route a text (or a corpus with --data) through an MoE checkpoint or run and show, per "
        "token and MoE layer, the experts chosen and their gate weights, and the parameters each token touched.",
    )
    p.add_argument("model", metavar="MODEL", help="checkpoint folder or `moekit train` run directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="the text to trace, token by token")
    src.add_argument("--data", metavar="PATH", help="a text file or folder: report each MoE layer's expert load")
    p.add_argument(
        "--max-tokens", type=positive_int, default=None, help="tokens read (default: 256 of --text, 20000 of --data)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--plot", metavar="FILE", help="also write a PNG")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from moekit.interop.pretrained import from_pretrained
    from moekit.training.loop import resolve_device

    if args.plot:
        check_may_replace_file(args.plot, "--plot")
    model = from_pretrained(args.model, device=resolve_device(args.device)).eval()
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise MoekitError(f"{args.model} has no tokenizer (tokenizer.json); cannot encode text")
    cfg = model.config
    if cfg.moe is None or not cfg.moe_layer_ids:
        raise MoekitError(f"{args.model} has no MoE layers: there are no experts to trace")
    if args.data is not None:
        return _run_corpus(args, model, tokenizer, torch)
    from moekit.tracing import plot_trace, trace_text

    limit = min(args.max_tokens or 256, cfg.max_seq_len)
    ids = tokenizer.encode(args.text)[:limit]
    trace = trace_text(model, ids, tokenizer.decode)
    if args.json:
        print(json.dumps(trace.to_dict(), indent=2))
    else:
        _print_trace(trace)
    if args.plot:
        plot_trace(trace, args.plot)
        if not args.json:
            print(f"Plot written to {args.plot}.")
    return 0


def _run_corpus(args, model, tokenizer, torch) -> int:
    from moekit.tracing import expert_load, plot_load
    from moekit.training.data import load_corpus

    corpus = load_corpus(args.data, 0.0)
    limit = args.max_tokens or 20000
    seq = min(model.config.max_seq_len, 256)
    ids: list[int] = []
    for doc in corpus.train + corpus.val:
        ids += tokenizer.encode(doc.text)
        if len(ids) >= limit:
            break
    ids = ids[:limit]
    if not ids:
        raise MoekitError(f"--data {args.data} encodes to no tokens")
    device = next(model.parameters()).device
    chunks = [torch.tensor([ids[i : i + seq]], device=device) for i in range(0, len(ids), seq)]
    loads = expert_load(model, chunks)
    if args.json:
        print(json.dumps({"data": str(args.data), "tokens": len(ids), "layers": [vars(x) for x in loads]}, indent=2))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"expert load over {len(ids):,} tokens of {args.data}", title_justify="left")
        for col in ("layer", "assignments", "busiest expert (share)", "idlest expert (share)", "MaxVio", "unused"):
            table.add_column(col, justify="right")
        for load in loads:
            total = sum(load.counts) or 1
            hi = max(range(len(load.counts)), key=load.counts.__getitem__)
            lo = min(range(len(load.counts)), key=load.counts.__getitem__)
            table.add_row(
                str(load.layer),
                f"{sum(load.counts):,}",
                f"{hi} ({load.counts[hi] / total:.3f})",
                f"{lo} ({load.counts[lo] / total:.3f})",
                f"{load.max_vio:.3f}",
                str(load.unused),
            )
        Console(highlight=False).print(table)
        print(f"uniform share: {1 / len(loads[0].counts):.3f}; MaxVio = (max load - mean) / mean")
    if args.plot:
        plot_load(loads, args.plot, f"expert load per MoE layer, {len(ids):,} tokens of {args.data}")
        if not args.json:
            print(f"Plot written to {args.plot}.")
    return 0


def _print_trace(trace) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = max(console.width, 160)
    table = Table(
        title=f"{trace.model or 'model'}: experts per token (gate weight), top-{trace.top_k} of "
        f"{trace.n_routed_experts} routed + {trace.n_shared_experts} shared",
        title_justify="left",
    )
    table.add_column("#", justify="right")
    table.add_column("token")
    for layer in trace.moe_layers:
        table.add_column(f"layer {layer}")
    table.add_column("params touched", justify="right")
    for tok in trace.tokens:
        cells = [" ".join(f"{e}:{w:.2f}" for e, w in zip(c.experts, c.weights, strict=True)) for c in tok.layers]
        table.add_row(str(tok.position), repr(tok.text)[1:-1], *cells, f"{tok.touched_params:,}")
    console.print(table)
    touched = [t.touched_params for t in trace.tokens]
    n_moe = len(trace.moe_layers)
    console.print(
        "\n".join(
            [
                f"total parameters                {trace.total_params:>14,}",
                f"active parameters (accounting)  {trace.active_params:>14,}  "
                f"= always-active + {n_moe} MoE layers x top-{trace.top_k} x {trace.params_per_expert:,}",
                f"always-active (modules)         {trace.always_active_params:>14,}  "
                "embedding, attention, norms, routers, shared experts, dense FFNs, head",
                f"touched per token               {min(touched):>14,} .. {max(touched):,}  "
                f"(always-active + its chosen experts x {trace.params_per_expert:,})",
            ]
        )
    )
