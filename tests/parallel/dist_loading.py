"""Checkpoint, sharded-loading, inference and resume cases, run inside ``dist_cases.py``'s launch
(one launch per world size; ``prepare_loading.py`` wrote the folders they read). Each function
returns what rank 0 writes to the results JSON; ``test_loading.py`` asserts on it.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from moekit.errors import CheckpointError
from moekit.interop.pretrained import from_pretrained
from moekit.models.transformer import MoETransformer
from moekit.parallel import (
    Layout,
    full_optimizer_state,
    full_state_dict,
    load_sharded,
    parallelize,
    rank_parameters,
    shard_optimizer_state,
    sync_gradients,
)
from moekit.parallel import loading as loading_module
from moekit.parallel.inference import generate
from moekit.training.checkpoint import load_checkpoint, save_checkpoint

LOAD_LAYOUTS = {
    2: [Layout(dp=2, ep=2), Layout(dp=1, etp=2)],
    4: [Layout(dp=4, ep=4), Layout(dp=2, ep=2, etp=2), Layout(dp=1, etp=4)],
}
EXPERT_KEYS = ("experts.w1", "experts.w3", "experts.w2", "experts.b1", "experts.b3", "experts.b2")


def gather(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _name(layout: Layout) -> str:
    return f"dp{layout.dp}-ep{layout.ep}-etp{layout.etp}"


def sharded_hf(root: Path, world: int) -> dict:
    """Each HF folder at each layout: logits against transformers', what each rank holds and read,
    and greedy tokens against one process."""
    out = {}
    for folder in sorted(p for p in (root / "hf").iterdir() if p.is_dir()):
        expected = torch.load(folder.with_suffix(".pt"))
        one = from_pretrained(folder)
        with torch.no_grad():
            one_logits = one(expected["ids"]).logits
        total_experts = sum(p.numel() for n, p in one.named_parameters() if n.endswith(EXPERT_KEYS))
        for layout in LOAD_LAYOUTS[world]:
            if one.config.moe.expert_bias and layout.etp > 1:  # gpt-oss: refused (a ConfigError on every rank)
                try:
                    load_sharded(folder, layout)
                    mine = {"refused": None}
                except Exception as e:  # noqa: BLE001 (recorded: the test says what went wrong)
                    mine = {"refused": f"{type(e).__name__}: {e}"}
                out[f"{folder.name}/{_name(layout)}"] = gather(mine)
                continue
            model = load_sharded(folder, layout)
            with torch.no_grad():
                logits = model(expected["ids"]).logits
            held = rank_parameters(model)
            report = model.load_report
            mine = {
                "rel_hf": rel(logits, expected["logits"]),
                "rel_one_process": rel(logits, one_logits),
                "expert_params": held["expert_params"],
                "expected_expert_params": total_experts // (layout.ep * layout.etp),
                "expert_bytes_read": report.expert_bytes_read,
                "expected_expert_bytes": report.checkpoint_expert_bytes // (layout.ep * layout.etp),
                "bytes_read": report.bytes_read,
                "expected_bytes": report.checkpoint_bytes
                - report.checkpoint_expert_bytes
                + report.checkpoint_expert_bytes // (layout.ep * layout.etp),
            }
            if folder.name == "mixtral-hub":
                prompt = expected["ids"][:1, :4]
                mine["tokens"] = generate(model, prompt, 12, temperature=0.0, eos_token_id=[]).tolist()
                mine["tokens_one_process"] = one.generate(prompt, 12, temperature=0.0, eos_token_id=[]).tolist()
            out[f"{folder.name}/{_name(layout)}"] = gather(mine)
    return out


def bad_folders(root: Path, world: int) -> dict:
    """A missing shard, a mismatched shard, an index naming a file outside the folder, a tied
    config with a distinct head, and a read that fails on rank 1 alone: every rank must raise (a
    hang would time the launch out)."""
    layout = LOAD_LAYOUTS[world][0]
    out = {}
    cases = {
        "missing-shard": lambda: load_sharded(root / "bad" / "missing-shard", layout),
        "mismatched-shard": lambda: load_sharded(root / "bad" / "mismatched-shard", layout),
        "rank1-read-fails": lambda: load_sharded(root / "hf" / "mixtral-hub", layout),
        "outside-index": lambda: load_sharded(root / "bad" / "outside-index", layout),
        "tied-distinct-head": lambda: load_sharded(root / "bad" / "tied-distinct-head", layout),
    }
    for name, load in cases.items():
        original = loading_module._Reader.read
        if name == "rank1-read-fails" and dist.get_rank() == 1:

            def failing(self, piece, sub=()):
                raise CheckpointError(f"cannot read tensor {piece.name!r}: injected failure")

            loading_module._Reader.read = failing
        try:
            load()
            mine = {"raised": None}
        except CheckpointError as e:
            mine = {"raised": type(e).__name__, "message": str(e)}
        except Exception as e:  # noqa: BLE001 (recorded: the test says what went wrong)
            mine = {"raised": type(e).__name__, "message": str(e)}
        finally:
            loading_module._Reader.read = original
        out[name] = gather(mine)
    out["mismatched-tensor"] = (root / "bad" / "mismatched-tensor.txt").read_text()
    return out


def cli_generate(root: Path, world: int) -> dict:
    """``moekit generate`` in every rank of the launch (what ``torchrun -m moekit generate`` runs):
    rank 0 prints one JSON object, the others nothing."""
    from moekit.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    argv = ["generate", str(root / "gen_run"), "--prompt", "def f(", "--max-new-tokens", "10", "--ignore-eos"]
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main([*argv, "--json"])
    return {"per_rank": gather({"code": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()})}


def expert_placement(root: Path, world: int, model_cfg, build, batch) -> dict:
    """World 2 only. A checkpoint written at ep 2 (weights and AdamW state gathered) and the
    unsharded original after the same step: rank 0 writes both for the pytest process to compare
    expert by expert. The reverse: a one-process checkpoint loaded at ep 2 and etp 2 (with
    ``load_checkpoint`` + ``parallelize`` and with ``load_sharded``) puts each global expert on
    the rank that holds it."""
    rank = dist.get_rank()
    cfg = model_cfg(n_shared_experts=1)
    ref = build(cfg, ())
    layout = Layout(dp=2, ep=2)
    par = parallelize(copy.deepcopy(ref), layout)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt_par = torch.optim.AdamW(par.parameters(), lr=1e-2)
    ids = batch()
    rows = slice(rank * ids.shape[0] // 2, (rank + 1) * ids.shape[0] // 2)
    ref(ids, labels=ids).loss.backward()
    par(ids[rows], labels=ids[rows]).loss.backward()
    sync_gradients(par)
    opt_ref.step()
    opt_par.step()
    many, one = root / "ckpt-ep2", root / "ckpt-one"
    tensors, opt_state = full_state_dict(par), full_optimizer_state(par, opt_par)
    if rank == 0:
        save_checkpoint(many, 1, par, {"optimizer": opt_state}, keep=1, tensors=tensors)
        save_checkpoint(one, 1, ref, {"optimizer": opt_ref.state_dict()}, keep=1)
        torch.save({"model": ref.state_dict(), "optimizer": opt_ref.state_dict()}, root / "original.pt")
    dist.barrier()
    folder = one / "checkpoints" / "step_0000001"
    out = {"many": str(many / "checkpoints" / "step_0000001"), "original": str(root / "original.pt")}
    for load_layout in (Layout(dp=2, ep=2), Layout(dp=1, etp=2)):
        model = MoETransformer(cfg)
        state = load_checkpoint(folder, model)
        model = parallelize(model, load_layout)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        opt.load_state_dict(shard_optimizer_state(model, opt, state["optimizer"]))
        sharded = load_sharded(folder, load_layout)
        wrong, checked = [], 0
        for prefix, ex in [(n, m) for n, m in model.named_modules() if hasattr(m, "shard")]:
            es, fs = ex.shard.experts, ex.shard.ffn
            loaded_ex = sharded.get_submodule(prefix)
            for w, f_axis in (("w1", 1), ("w3", 1), ("w2", 2)):
                key = f"{prefix}.{w}"
                index = [es, slice(None), slice(None)]
                index[f_axis] = fs
                want = ref.get_parameter(key)[tuple(index)]
                moments = opt_ref.state[ref.get_parameter(key)]
                got_moments = opt.state[ex.get_parameter(w)]
                for what, a, b in (
                    ("weight", getattr(ex, w), want),
                    ("load_sharded weight", getattr(loaded_ex, w), want),
                    ("exp_avg", got_moments["exp_avg"], moments["exp_avg"][tuple(index)]),
                    ("exp_avg_sq", got_moments["exp_avg_sq"], moments["exp_avg_sq"][tuple(index)]),
                ):
                    checked += 1
                    if not torch.equal(a, b):
                        wrong.append(f"{key} {what}")
        out[f"one-process-to-{_name(load_layout)}"] = gather({"wrong": wrong, "checked": checked})
    return out


def resume_across_layouts(root: Path, world: int) -> dict:
    """World 4 only. ``moekit train`` (the CLI, in this launch): 3 steps at ep 4, resumed to 5 at
    ep 2 and at ep 2 x etp 2; a one-process run of 3 steps resumed to 5 at ep 4. The pytest process
    resumes the ep-4 run in one process and compares every loss with the uninterrupted run."""
    from moekit.cli import main

    args = json.loads((root / "train" / "args.json").read_text())
    runs = root / "train"
    codes = {}
    codes["ep4"] = main([*args, "--steps", "3", "--out", str(runs / "ep4"), "--ep", "4"])
    for name, flags, src in (
        ("ep4-then-ep2", ["--ep", "2"], "ep4"),
        ("ep4-then-ep2-etp2", ["--ep", "2", "--etp", "2"], "ep4"),
        ("one-then-ep4", ["--ep", "4"], "one3"),
    ):
        if dist.get_rank() == 0:
            shutil.copytree(runs / src, runs / name)
        dist.barrier()
        codes[name] = main(["train", "--resume", "--steps", "5", "--out", str(runs / name), "--quiet", *flags])
    return {"codes": gather(codes), "runs": str(runs)}
