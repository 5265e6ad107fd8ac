"""Comparative studies: train several models on one corpus and token budget, tabulate the results.

A ``Study`` is a list of model variants plus the training settings they share (so every variant
sees the same tokens in the same order), registered by name in ``STUDIES``; ``moekit compare
--study NAME`` runs one. Adding a study is one ``register_study`` call; two are registered here:
"architectures" (the DeepSeekMoE paper's line-up at equal FLOPs) and "balancing" (one DeepSeekMoE
model trained with no balancing, an auxiliary loss, DeepSeekMoE's expert + device losses and
auxiliary-loss-free bias balancing).

``run_study`` trains each variant into ``DIR/<variant>/`` (a normal run directory: ``--resume``
picks up where an interrupted study stopped) and writes

- ``DIR/results.json``: a list of rows with ``name``, ``total_params``, ``active_params``,
  ``flops_per_token``, ``val_loss``, ``max_vio``, ... (plus what the study's ``analyse`` adds);
- ``DIR/results.md``: the same as a Markdown table, with the study's notes;
- ``DIR/val_curves.png``: validation loss against training tokens, one line per variant (and, for
  studies with ``plot_max_vio``, a second panel: training-batch MaxVio against step).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from moekit.accounting import account
from moekit.config import AttentionConfig, ModelConfig, MoEConfig, fine_grained
from moekit.errors import MoekitError
from moekit.files import (
    check_folder_arg,
    listing,
    read_owned,
    record_owned,
    save_png,
    user_entries,
    write_errors,
    write_json,
    write_text,
)
from moekit.training.ablation import specialisation_test
from moekit.training.config import RunConfig, TrainConfig
from moekit.training.loop import TrainCallback, resolve_device, train
from moekit.training.metrics import read_metrics
from moekit.training.plots import _pyplot, plot_val_curves

RESULTS_JSON, RESULTS_MD, CURVES_PNG = "results.json", "results.md", "val_curves.png"
STUDY_KIND = "study"  # the kind recorded in a study folder's .moekit-files.json


class StudyError(MoekitError):
    """A study is unknown or its variants break the study's own invariant (e.g. equal FLOPs)."""


@dataclass
class Variant:
    name: str  # table row and sub-folder of the study directory
    model: ModelConfig
    label: str = ""  # what the row is, for humans: "GShard top-2, 8 x 256"


@dataclass
class Study:
    name: str
    title: str
    variants: Callable[[], list[Variant]]
    train: Callable[[int], TrainConfig]  # the shared training settings for a number of steps
    default_steps: int
    notes: str = ""  # Markdown printed under the table
    # Forward FLOPs per token of every variant must lie within this fraction of each other.
    flops_tolerance: float | None = None
    # After training: adds fields to the rows (in place) and returns Markdown for results.md.
    analyse: Callable[[Path, list[dict[str, Any]], str | None], str] | None = None
    plot_max_vio: bool = False  # val_curves.png gets a second panel: MaxVio of the training batches


STUDIES: dict[str, Study] = {}


def register_study(study: Study) -> Study:
    STUDIES[study.name] = study
    return study


def get_study(name: str) -> Study:
    try:
        return STUDIES[name]
    except KeyError:
        raise StudyError(f"unknown study {name!r}; known studies: {', '.join(STUDIES)}") from None


def study_runs(study: Study, steps: int, overrides: dict[str, Any] | None = None) -> list[tuple[Variant, RunConfig]]:
    """Each variant with its run config; checks the study's FLOPs tolerance."""
    runs = []
    train_cfg = study.train(steps)
    for v in study.variants():
        run = RunConfig(v.model, train_cfg)
        runs.append((v, run.with_overrides(overrides) if overrides else run))
    if study.flops_tolerance is not None:
        check_flops_match({v.name: r for v, r in runs}, study.flops_tolerance)
    return runs


def check_flops_match(runs: dict[str, RunConfig], tolerance: float) -> dict[str, int]:
    """Forward FLOPs per token of each run (at its seq_len); ``StudyError`` unless max/min - 1 <= tolerance."""
    flops = {name: account(r.model, seq_len=r.train.seq_len).flops.forward_per_token for name, r in runs.items()}
    lo, hi = min(flops.values()), max(flops.values())
    if hi / lo - 1 > tolerance:
        raise StudyError(f"FLOPs per token differ by {hi / lo - 1:.1%} > {tolerance:.0%} between variants: {flops}")
    return flops


def run_study(
    name: str,
    out: str | Path,
    *,
    steps: int | None = None,
    overrides: dict[str, Any] | None = None,
    resume: bool = False,
    force: bool = False,
    device: str | None = None,
    progress: Callable[[str], TrainCallback] | None = None,
) -> list[dict[str, Any]]:
    """Train every variant of study ``name`` into ``out`` and write the results files."""
    study = get_study(name)
    out = Path(out)
    steps = steps or study.default_steps
    runs = study_runs(study, steps, overrides)
    if (out / RESULTS_JSON).exists() and not (resume or force):
        raise StudyError(f"{out} already holds study results; pass --resume to continue or --force to start over")
    resolve_device(device)  # a bad --device is refused before the folder is claimed
    _claim_study_dir(out, [v.name for v, _ in runs])
    start = time.perf_counter()
    rows = []
    for v, run in runs:
        result = train(
            run,
            out / v.name,
            resume=resume,
            force=force,
            device=device,
            callback=progress(v.name) if progress else None,
        )
        if result.interrupted:  # a checkpoint was written: --resume continues with this variant
            raise KeyboardInterrupt(v.name)
        s = result.summary
        assert s is not None
        rows.append(
            {
                "name": v.name,
                "label": v.label,
                "total_params": s["total_params"],
                "active_params": s["active_params"],
                "flops_per_token": s["flops_per_token"],
                "val_loss": s["val_loss"],
                "val_ppl": s["val_ppl"],
                "max_vio": s["max_vio"],
                "train_loss": s["train_loss"],
                "tokens": s["tokens"],
                "train_time_s": s["train_time_s"],
            }
        )
    write_json(out / RESULTS_JSON, rows, "study results")  # first: what follows may fail
    analysis = study.analyse(out, rows, device) if study.analyse else ""
    elapsed = time.perf_counter() - start
    write_json(out / RESULTS_JSON, rows, "study results")  # again: the analysis may add columns
    curves = {r["name"]: read_metrics(out / r["name"]) for r in rows}
    if study.plot_max_vio:
        plot_val_and_max_vio(curves, out / CURVES_PNG, title=study.title)
    else:
        plot_val_curves(curves, out / CURVES_PNG, title=f"{study.title}: validation loss")
    write_text(out / RESULTS_MD, results_markdown(study, rows, runs[0][1], elapsed, analysis), "study results")
    return rows


def _claim_study_dir(out: Path, variants: list[str]) -> None:
    """``out`` must be new, empty or this study's own folder; it then records what the study writes."""
    out = check_folder_arg(out, "--out")
    names = [*variants, RESULTS_JSON, RESULTS_MD, CURVES_PNG]
    kind, _ = read_owned(out)
    foreign = [n for n in user_entries(out) if n not in names]
    if kind not in (None, STUDY_KIND) or foreign:
        what = f"a moekit {kind} folder" if kind not in (None, STUDY_KIND) else f"not this study's: {listing(foreign)}"
        raise StudyError(f"--out {out} holds files that are {what}; choose a new --out")
    with write_errors(out, "study folder"):
        out.mkdir(parents=True, exist_ok=True)
    record_owned(out, STUDY_KIND, names)


def plot_val_and_max_vio(curves: dict[str, list[dict[str, Any]]], path: Path, title: str = "") -> Path:
    """Two panels, one line per run: validation loss against tokens; training-batch MaxVio
    (mean over MoE layers, as ``metrics.jsonl`` logs it) against step."""
    plt = _pyplot()
    fig, (ax_val, ax_vio) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, records in curves.items():
        val = [r for r in records if r.get("val_loss") is not None]
        vio = [r for r in records if r.get("max_vio") is not None]
        ax_val.plot([r["tokens"] for r in val], [r["val_loss"] for r in val], "o-", ms=3, label=name)
        ax_vio.plot([r["step"] for r in vio], [r["max_vio"] for r in vio], lw=1, label=name)
    ax_val.set(xlabel="training tokens", ylabel="validation loss (nats/token)", title="validation loss")
    ax_vio.set(xlabel="step", ylabel="MaxVio (training batch, mean over MoE layers)", title="load imbalance")
    ax_vio.set_ylim(bottom=0)
    for ax in (ax_val, ax_vio):
        ax.legend()
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_png(fig, path, dpi=110)
    plt.close(fig)
    return Path(path)


def _fmt(value: Any, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def results_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table (the extra columns a study adds are shown too)."""
    cols = [
        ("name", "model", "s"),
        ("total_params", "total params", ","),
        ("active_params", "active params", ","),
        ("flops_per_token", "FLOPs/token", ","),
        ("val_loss", "val loss", ".4f"),
        ("val_ppl", "val ppl", ".2f"),
        ("max_vio", "MaxVio", ".3f"),
        ("train_time_s", "time (s)", ".0f"),
    ]
    known = {c[0] for c in cols} | {"label", "train_loss", "tokens"}
    extra = [k for k in rows[0] if k not in known] if rows else []
    cols += [(k, k.replace("_", " "), ".4f") for k in extra]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k), spec) for k, _, spec in cols) + " |")
    return "\n".join(lines)


def results_markdown(study: Study, rows: list[dict[str, Any]], run: RunConfig, elapsed: float, analysis: str) -> str:
    t = run.train
    corpus = "the Python standard library" if t.data is None else f"`{t.data}`"
    budget = rows[0]["tokens"] if rows else 0
    parts = [
        f"# {study.title}",
        "",
        f"{len(rows)} models, each trained {t.steps} steps x {t.batch_size} x {t.seq_len} tokens "
        f"= {budget:,} tokens on {corpus} ({t.tokenizer} tokenizer, vocab {run.model.vocab_size}); "
        f"validation loss on the held-out files. Training took {sum(r['train_time_s'] for r in rows) / 60:.1f} min "
        f"(sum over models); this `moekit compare` ran {elapsed / 60:.1f} min in all.",
        "",
        results_table(rows),
        "",
    ]
    parts += [f"- **{r['name']}**: {r['label']}" for r in rows if r.get("label")]
    if study.notes:
        parts += ["", study.notes]
    if analysis:
        parts += ["", analysis]
    return "\n".join(parts) + "\n"


# The architectures study ----------------------------------------------------------------------


def architecture_variants(
    d_model: int = 128,
    n_layers: int = 4,
    n_heads: int = 4,
    n_experts: int = 8,
    expert_ffn: int = 256,
    vocab_size: int = 4096,
) -> list[Variant]:
    """The DeepSeekMoE paper's validation line-up (Dai et al. 2024, Table 1), at one compute budget.

    Every model spends the FLOPs of a dense FFN of width ``2 * expert_ffn`` per token and layer:
    dense (that FFN); Hash and Switch top-1 (``n_experts / 2`` experts of width ``2 * expert_ffn``);
    GShard top-2 (``n_experts`` of width ``expert_ffn``); DeepSeekMoE: GShard segmented x4
    (``moekit.config.fine_grained``: ``4 n`` experts of width ``expert_ffn / 4``, top-8), of which
    one becomes an always-on shared expert, leaving ``4 n - 1`` routed and top-7 (the paper's
    1 shared + 63 routed, top-7, from 16 x 4). Every MoE has the same expert parameters; only the
    router widths differ, so FLOPs per token match to well under 1%.
    """
    base = dict(
        vocab_size=vocab_size,
        d_model=d_model,
        n_layers=n_layers,
        attention=AttentionConfig(n_heads=n_heads),
        dense_ffn_dim=2 * expert_ffn,
        max_seq_len=1024,
    )
    wide = dict(n_routed_experts=n_experts // 2, top_k=1, expert_ffn_dim=2 * expert_ffn)
    gshard = ModelConfig(
        **base,
        name="gshard",
        moe=MoEConfig(n_routed_experts=n_experts, top_k=2, expert_ffn_dim=expert_ffn, aux_loss_coef=0.01),
    )
    fine = fine_grained(gshard, 4)
    assert fine.moe is not None
    deepseek_moe = dataclasses.replace(
        fine.moe,
        n_routed_experts=fine.moe.n_routed_experts - 1,
        top_k=fine.moe.top_k - 1,
        n_shared_experts=1,
        shared_ffn_dim=fine.moe.expert_ffn_dim,
        norm_topk_prob=False,  # DeepSeekMoE keeps the raw softmax gate values
    )
    f = expert_ffn
    return [
        Variant("dense", ModelConfig(**base, name="dense"), f"dense FFN {2 * f} wide"),
        Variant(
            "hash",
            ModelConfig(**base, name="hash", moe=MoEConfig(**wide, router="hash")),
            f"Hash layer top-1, {n_experts // 2} x {2 * f}, fixed token-id routing",
        ),
        Variant(
            "switch",
            ModelConfig(**base, name="switch", moe=MoEConfig(**wide, router="switch", aux_loss_coef=0.01)),
            f"Switch top-1, {n_experts // 2} x {2 * f}, aux loss 0.01",
        ),
        Variant("gshard", gshard, f"GShard top-2, {n_experts} x {f}, aux loss 0.01"),
        Variant(
            "deepseekmoe",
            fine.replace(name="deepseekmoe", moe=deepseek_moe),
            f"DeepSeekMoE: 1 shared + {deepseek_moe.n_routed_experts} routed x {f // 4}, top-{deepseek_moe.top_k}, aux loss 0.01",
        ),
    ]


def _architectures_train(steps: int) -> TrainConfig:
    return TrainConfig(
        steps=steps,
        batch_size=8,
        seq_len=256,
        lr=2e-3,
        warmup_steps=max(1, steps // 20),
        log_every=max(1, steps // 50),
        eval_every=max(1, steps // 10),
        eval_batches=8,
        ckpt_every=max(1, steps // 4),
        keep_checkpoints=1,
    )


def _architectures_analyse(out: Path, rows: list[dict[str, Any]], device: str | None) -> str:
    """Adds the expert-ablation loss increases to learned-router MoE rows; returns the paragraph."""
    names = [r["name"] for r in rows if r["name"] in ("switch", "gshard", "deepseekmoe")]
    result = specialisation_test({n: out / n for n in names}, device=device, fractions=(None, 1 / 8))
    for r in rows:
        top1, eighth = result.get(r["name"], (None, None))
        r["ablation_delta_top1"] = None if top1 is None else top1["delta"]
        r["ablation_delta_eighth"] = None if eighth is None else eighth["delta"]
    if "gshard" not in result or "deepseekmoe" not in result:
        return ""
    (ds1, ds8), (gs1, gs8) = ([x["delta"] for x in result[n]] for n in ("deepseekmoe", "gshard"))
    ds_eighth, gs_eighth = result["deepseekmoe"][1], result["gshard"][1]
    shares = [f"{len(r['disabled'][0])} of {r['n_experts'][0]}" for r in (ds_eighth, gs_eighth)]

    def verdict(ds: float, gs: float) -> str:
        return "more" if ds > gs else "less"

    return (
        "**Specialisation test** (DeepSeekMoE paper §4.5, Fig. 4: disabling top routed experts hurts "
        "DeepSeekMoE more than GShard, because its experts are less redundant). Disabling each MoE layer's "
        f"most-routed routed expert raises validation loss by {ds1:+.4f} for DeepSeekMoE and {gs1:+.4f} for "
        f"GShard: DeepSeekMoE is {verdict(ds1, gs1)} sensitive. Disabling the same share of routed experts, "
        f"the top 1/8 ({shares[0]} vs {shares[1]} per layer), raises it by {ds8:+.4f} vs {gs8:+.4f}: "
        f"{verdict(ds8, gs8)} sensitive. "
        "Columns `ablation delta top1` / `ablation delta eighth` hold these increases."
    )


register_study(
    Study(
        name="architectures",
        title="MoE architectures at equal FLOPs per token",
        variants=architecture_variants,
        train=_architectures_train,
        default_steps=300,
        flops_tolerance=0.05,
        notes="Every model spends the same forward FLOPs per token (checked to within 5%).",
        analyse=_architectures_analyse,
    )
)


# The balancing study -------------------------------------------------------------------------

# The MoEConfig fields a balancing strategy sets; the balancing study's variants differ only in these.
BALANCING_FIELDS = (
    "aux_loss_coef",
    "device_loss_coef",
    "n_devices",
    "seq_aux_loss_coef",
    "z_loss_coef",
    "aux_free_rate",
    "selection_bias",
)


def balancing_variants(
    d_model: int = 128,
    n_layers: int = 4,
    n_heads: int = 4,
    n_experts: int = 32,
    top_k: int = 7,
    expert_ffn: int = 64,
    vocab_size: int = 4096,
    *,
    score_func: Literal["softmax", "sigmoid"] = "sigmoid",
    alpha: float = 0.01,
    alpha1: float = 0.01,
    alpha2: float = 0.05,
    n_devices: int = 4,
    gamma: float = 0.003,
) -> list[Variant]:
    """One DeepSeekMoE model balanced four ways; only ``BALANCING_FIELDS`` differ between variants.

    The model is the architectures study's DeepSeekMoE (1 shared + top-7 routed experts of width
    ``expert_ffn``, every layer MoE, same FLOPs per token) with 32 routed experts instead of 31, so
    that they split into ``n_devices`` equal groups for the device-level loss. Routing is sigmoid
    scores, top-k, then the chosen scores renormalised (DeepSeek-V3's gate): the aux-loss-free paper
    (Wang et al. 2024) gates with sigmoid, and every variant uses the same gate so that only the
    balancing differs. The balance losses read the per-token normalised scores (``router_probs``).

    - ``none``: no balancing at all;
    - ``aux_loss``: the Switch/GShard auxiliary loss with coefficient ``alpha``;
    - ``deepseek``: DeepSeekMoE's expert-level (``alpha1``) plus device-level (``alpha2``) losses,
      experts grouped into ``n_devices`` devices (Dai et al. 2024, §3.3; the 145B model used
      alpha2 = 0.05 over 4 devices, the 2B validation models alpha1 = 0.01);
    - ``aux_free``: no loss; a per-expert selection bias moved by ``gamma * sign(mean load - load)``
      after every step (Wang et al. 2024).

    Why gamma = 0.003 and not DeepSeek-V3's 0.001: a bias moves at most ``gamma * steps``, and
    0.001 is meant for runs of many thousands of steps. In the default 300-step run the biases
    trained with 0.001 ended pinned near that limit (|b| up to 0.28 of 0.30) with MaxVio still
    falling; 0.003 balances by mid-run; 0.01 balances sooner, but its larger sign steps keep
    moving tokens between experts and its validation loss was worse (the aux-free paper saw the
    same trade-off). At the default budget (one seed), gamma = 0.001 / 0.003 / 0.01 ended with
    validation loss 4.817 / 4.794 / 4.810 and validation MaxVio 0.48 / 0.26 / 0.27.
    """
    moe = MoEConfig(
        n_routed_experts=n_experts,
        top_k=top_k,
        expert_ffn_dim=expert_ffn,
        n_shared_experts=1,
        score_func=score_func,
        norm_topk_prob=True,
    )
    base = ModelConfig(
        vocab_size=vocab_size,
        d_model=d_model,
        n_layers=n_layers,
        attention=AttentionConfig(n_heads=n_heads),
        dense_ffn_dim=(top_k + 1) * expert_ffn,  # unused: every layer is MoE
        moe=moe,
        max_seq_len=1024,
        name="balancing",
    )
    shape = f"1 shared + {n_experts} routed x {expert_ffn}, top-{top_k}, {score_func}"

    def variant(name: str, label: str, **balancing: Any) -> Variant:
        return Variant(name, base.replace(name=f"balancing-{name}", moe=dataclasses.replace(moe, **balancing)), label)

    return [
        variant("none", f"{shape}; no balancing"),
        variant("aux_loss", f"{shape}; auxiliary loss alpha = {alpha}", aux_loss_coef=alpha),
        variant(
            "deepseek",
            f"{shape}; expert-level loss alpha1 = {alpha1} + device-level loss alpha2 = {alpha2} "
            f"over {n_devices} devices of {n_experts // n_devices} experts",
            aux_loss_coef=alpha1,
            device_loss_coef=alpha2,
            n_devices=n_devices,
        ),
        variant("aux_free", f"{shape}; auxiliary-loss-free bias, gamma = {gamma}", aux_free_rate=gamma),
    ]


def _balancing_analyse(out: Path, rows: list[dict[str, Any]], device: str | None) -> str:
    """Adds the mean training-batch MaxVio to each row; returns the verdict on the aux-free claim."""
    for r in rows:
        vio = [m["max_vio"] for m in read_metrics(out / r["name"]) if m.get("max_vio") is not None]
        r["max_vio_batch"] = sum(vio) / len(vio) if vio else None
    by_name = {r["name"]: r for r in rows}
    if not {"none", "aux_loss", "aux_free"} <= set(by_name):
        return ""
    free, none, aux = by_name["aux_free"], by_name["none"], by_name["aux_loss"]
    balanced = free["max_vio"] < none["max_vio"]
    no_worse = free["val_loss"] <= aux["val_loss"]
    held = "holds" if balanced and no_worse else "does not hold"
    return (
        "**Aux-loss-free claim** (Wang et al. 2024: bias balancing balances the load without the "
        "auxiliary loss's interference gradients, so it ends better balanced than no balancing and "
        f"no worse in loss than an auxiliary loss): it {held} here. MaxVio on the validation set: "
        f"aux_free {free['max_vio']:.3f} vs none {none['max_vio']:.3f} "
        f"({'lower' if balanced else 'not lower'}); validation loss: aux_free {free['val_loss']:.4f} vs "
        f"aux_loss {aux['val_loss']:.4f} ({'no worse' if no_worse else 'worse'}). "
        "`MaxVio` is measured on the validation batches at the end; `max vio batch` is the mean over "
        "the logged training steps of each batch's MaxVio (mean over MoE layers)."
    )


register_study(
    Study(
        name="balancing",
        title="Load balancing strategies on one DeepSeekMoE model",
        variants=balancing_variants,
        train=_architectures_train,
        default_steps=300,
        flops_tolerance=0.0,
        notes=(
            "Every variant is the same model (same parameters and FLOPs per token) trained on the same "
            "tokens; only the balancing differs. Validation loss is the LM loss alone (no balance terms)."
        ),
        analyse=_balancing_analyse,
        plot_max_vio=True,
    )
)


__all__ = [
    "BALANCING_FIELDS",
    "STUDIES",
    "Study",
    "StudyError",
    "Variant",
    "architecture_variants",
    "balancing_variants",
    "check_flops_match",
    "get_study",
    "plot_val_and_max_vio",
    "register_study",
    "results_table",
    "run_study",
    "study_runs",
]
