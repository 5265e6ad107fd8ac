"""``moekit generate MODEL --prompt TEXT``: stream a continuation from a checkpoint folder or a run.

MODEL is a Hugging Face folder, a moekit checkpoint folder or a ``moekit train`` run directory
(its newest checkpoint). The text is written as it is produced, then prefill and decode speeds on
stderr; ``--json`` prints one object instead. Settings left unset come from the folder's
``generation_config.json``, else greedy decoding of 64 tokens.

Under ``torchrun --nproc-per-node N -m moekit generate ...`` each process loads only its shard of
the experts (``moekit.parallel.load_sharded``): by default each expert's width split N ways
(``--etp N``, distributed-llama's layout), or whole experts with ``--ep``. Rank 0 prints.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from moekit.cli.args import positive_int
from moekit.errors import MoekitError


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate text from a checkpoint folder or a trained run",
        description="Continue a prompt with a Hugging Face or moekit checkpoint folder, or a moekit run directory.",
    )
    p.add_argument("model", metavar="MODEL", help="checkpoint folder or `moekit train` run directory")
    p.add_argument("--prompt", required=True, help="the text to continue (the user message with --chat)")
    p.add_argument("--max-new-tokens", type=positive_int, default=None, help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=_non_negative, default=None, help="0 is greedy (the default)")
    p.add_argument("--top-k", type=positive_int, default=None, help="sample among the k most likely tokens")
    p.add_argument(
        "--top-p", type=_probability, default=None, help="sample from the smallest set holding p of the mass"
    )
    p.add_argument("--seed", type=int, default=None, help="sampling seed (same seed, same text)")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="compute dtype (default: the checkpoint's, memory-mapped)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence (for timing)")
    p.add_argument("--json", action="store_true", help="print one JSON object (text and speeds) at the end")
    par = p.add_argument_group(
        "several processes (torchrun --nproc-per-node N -m moekit generate ...; default: --etp N)"
    )
    par.add_argument("--ep", type=positive_int, help="expert-parallel size: ranks sharing out whole experts")
    par.add_argument("--etp", type=positive_int, help="expert tensor-parallel size: ranks slicing each expert")
    par.add_argument("--backend", default="auto", help="torch.distributed backend: gloo, nccl or auto (default)")
    p.set_defaults(func=run)


class _Timing:
    """Streams text (unless quiet) and records when each token came."""

    def __init__(self, text_streamer: Any | None):
        self.inner = text_streamer
        self.times: list[float] = []

    def put(self, tokens_B: Any) -> None:
        self.times.append(time.perf_counter())
        if self.inner is not None:
            self.inner.put(tokens_B)

    def quarters(self) -> list[float] | None:
        """Decode tokens/s over each quarter of the decode steps (flat when a step's cost does not
        grow with the length generated)."""
        steps = [b - a for a, b in zip(self.times[:-1], self.times[1:], strict=True)]
        if len(steps) < 8:
            return None
        q = len(steps) // 4
        return [q / sum(steps[i * q : (i + 1) * q]) for i in range(4)]

    def end(self) -> None:
        if self.inner is not None:
            self.inner.end()


def run(args: argparse.Namespace) -> int:
    import warnings

    from moekit.training.distributed import Distributed, launched_ranks

    world = launched_ranks()
    etp = args.etp if args.ep or args.etp else world  # no flags: each expert sliced over the ranks
    parallel = Distributed(ep=args.ep, etp=etp, backend=args.backend)
    if not parallel.is_main:
        warnings.simplefilter("ignore")  # rank 0 alone speaks; the others would repeat it
    try:
        return _generate(args, parallel)
    finally:
        parallel.close()


def _generate(args: argparse.Namespace, parallel: Any) -> int:
    import torch

    from moekit.interop.pretrained import from_pretrained
    from moekit.models.generation import TextStreamer
    from moekit.parallel import load_sharded
    from moekit.parallel.inference import generate
    from moekit.tokenizer import render_chat
    from moekit.training.loop import resolve_device

    device = resolve_device(parallel.device(args.device))
    if parallel.active:
        model = load_sharded(args.model, parallel.layout, dtype=args.dtype, device=device)
    else:
        parallel.layout.validate(1, None, None)  # --ep / --etp above 1 need torchrun
        model = from_pretrained(args.model, dtype=args.dtype, device=device)
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise MoekitError(f"{args.model} has no tokenizer (tokenizer.json); cannot encode a text prompt")
    if args.chat:
        text = render_chat(tokenizer, [{"role": "user", "content": args.prompt}])
        ids = tokenizer.encode(text, add_special_tokens=False)  # the template writes its own special tokens
    else:
        ids = tokenizer.encode(args.prompt)
    if not ids:
        raise MoekitError("--prompt encodes to no tokens; give some text")
    defaults = model.generation_config
    eos = defaults.eos_token_id if defaults is not None and defaults.eos_token_id else tokenizer.eos_token_ids
    eos = [] if args.ignore_eos else list(eos)

    def write(s: str) -> None:
        sys.stdout.write(s)
        sys.stdout.flush()

    quiet = args.json or not parallel.is_main
    text_streamer = None if quiet else TextStreamer(tokenizer.decode, write, stop_ids=eos)
    timing = _Timing(text_streamer)
    if text_streamer is not None and not args.chat:
        write(args.prompt)  # the continuation reads on from the prompt
    input_ids = torch.tensor([ids], device=device)
    start = time.perf_counter()
    out = generate(
        model,
        input_ids,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eos_token_id=eos,
        seed=args.seed,
        streamer=timing,
    )
    new_ids = out[0, len(ids) :].tolist()
    stopped = bool(new_ids) and new_ids[-1] in eos
    prefill_s = timing.times[0] - start
    decode_s = timing.times[-1] - timing.times[0]
    n_decoded = len(timing.times) - 1  # the first token comes from the prefill pass
    result = {
        "model": str(args.model),
        "prompt_tokens": len(ids),
        "new_tokens": len(new_ids),
        "stopped_at_eos": stopped,
        "text": tokenizer.decode([i for i in new_ids if i not in eos]),
        "prefill_tokens_per_s": len(ids) / prefill_s if prefill_s > 0 else None,
        "decode_tokens_per_s": n_decoded / decode_s if n_decoded and decode_s > 0 else None,
        "decode_tokens_per_s_by_quarter": timing.quarters(),
        "dtype": str(model.embed.weight.dtype).removeprefix("torch."),
        "device": str(device),
        "layout": parallel.layout.to_dict() if parallel.active else None,
    }
    if not parallel.is_main:
        return 0
    if args.json:
        print(json.dumps(result))
        return 0
    write("\n")
    pre, dec, quarters = result["prefill_tokens_per_s"], result["decode_tokens_per_s"], timing.quarters()
    line = f"prefill: {len(ids)} tokens, {pre:,.1f} tokens/s; decode: {len(new_ids)} tokens"
    if dec:
        line += f", {dec:,.1f} tokens/s"
    if quarters:
        line += f" (by quarter: {', '.join(f'{v:,.1f}' for v in quarters)})"
    print(line + (" (stopped at end-of-sequence)" if stopped else ""), file=sys.stderr)
    return 0
