"""The fault and fuzz suite: every subcommand with malformed values, writers pointed at the wrong
places, injected OS errors, truncated and hostile checkpoints, non-finite training steps.

Every case must end with exactly one line on stderr (no traceback), exit 2 for bad input or 1 for
a failed run, and leave every file of the user's world byte-identical (compared before/after).
Cases run in-process through ``moekit.cli.main``; ``test_end_to_end`` runs a few as subprocesses.
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from moekit import files
from moekit.cli import main
from moekit.config import AttentionConfig, ModelConfig, MoEConfig
from moekit.models.transformer import MoETransformer

TINY = [
    "--preset", "tiny",
    "--set", "train.tokenizer=byte",
    "--set", "d_model=32",
    "--set", "n_layers=2",
    "--set", "attention.n_heads=2",
    "--set", "attention.n_kv_heads=2",
    "--set", "attention.head_dim=16",
    "--set", "moe.expert_ffn_dim=16",
    "--set", "moe.shared_ffn_dim=16",
    "--set", "train.batch_size=2",
    "--set", "train.seq_len=32",
    "--set", "train.eval_batches=1",
    "--set", "train.log_every=1",
    "--set", "train.ckpt_every=2",
    "--set", "train.keep_checkpoints=5",
    "--quiet",
]  # fmt: skip
USER_FILES = {"README.md": "# my model\n", "LICENSE": "MIT\n", "vocab.json": '{"a": 0}\n', "merges.txt": "#v\n"}


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (moekit's lock file aside: it may be created and left empty)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != files.LOCK_FILE
    }


def run_cli(capsys, argv: list) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(err: str, code: int, expected: int, *fragments: str) -> str:
    """Assert the failure contract: the exit code, one line on stderr, no traceback, the fragments."""
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert code == expected, err
    assert lines[0].startswith("moekit"), err
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def hf_model() -> MoETransformer:
    cfg = ModelConfig(
        vocab_size=61,
        d_model=24,
        n_layers=2,
        dense_ffn_dim=20,
        norm_eps=1e-5,
        attention=AttentionConfig(n_heads=4, n_kv_heads=2),
        moe=MoEConfig(n_routed_experts=4, top_k=2, expert_ffn_dim=14),
    )
    return MoETransformer(cfg).eval()


def make_hf_folder(path: Path, model: MoETransformer | None = None) -> Path:
    """A Hugging Face folder as downloaded from the hub: no moekit record, the user's side files."""
    (model or hf_model()).save_pretrained(path)
    (path / files.OWNED_FILE).unlink()
    for name, text in USER_FILES.items():
        (path / name).write_text(text)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """User files the malformed commands must not touch, and one trained 4-step run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("world")
    text = root / "text"
    shutil.copytree(Path(sysconfig.get_paths()["stdlib"]) / "json", text, ignore=shutil.ignore_patterns("__pycache__"))
    w = {"root": root, "text": text, "run": root / "run", "hf": make_hf_folder(root / "hf")}
    assert main(["train", *TINY, "--data", str(text), "--steps", "4", "--out", str(w["run"])]) == 0
    torch.set_num_threads(threads)
    (root / "file.txt").write_text("my notes\n")
    (root / "foreign").mkdir()
    (root / "foreign" / "notes.txt").write_text("mine\n")
    (root / "emptydir").mkdir()
    (root / "binary").mkdir()
    (root / "binary" / "blob.bin").write_bytes(b"\x00\xff" * 100)
    (root / "notjson.json").write_text("{not json")
    (root / "nan.json").write_text('{"vocab_size": 64, "d_model": NaN, "n_layers": 1}')
    (root / "pngs").mkdir()
    (root / "pngs" / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\n my own plot")
    w.update({k: root / k for k in ("file.txt", "foreign", "emptydir", "binary", "notjson.json", "nan.json", "pngs")})
    return w


def expand(argv: list[str], w: dict[str, Path], new: Path) -> list[str]:
    out: list[str] = []
    for a in argv:
        if a == "@tiny":
            out += TINY + ["--data", str(w["text"])]
        elif a.startswith("@"):
            name, _, rest = a[1:].partition("/")
            base = {"new": new, "missing": w["root"] / "missing", "file": w["file.txt"]}.get(name) or w[name]
            out.append(str(base / rest) if rest else str(base))
        else:
            out.append(a)
    return out


# (argv, expected exit code, a fragment of the one error line). "@x" names a path of the world;
# "@new" a path that does not exist yet (it must not exist afterwards either).
MALFORMED = [
    ([], 2, "required"),
    (["nope"], 2, "invalid choice"),
    (["--bogus"], 2, "COMMAND"),
    # params
    (["params"], 2, "SPEC"),
    (["params", "tiny", "--seq-len", "0"], 2, "--seq-len"),
    (["params", "tiny", "--seq-len", "-3"], 2, "--seq-len"),
    (["params", "tiny", "--seq-len", "x"], 2, "--seq-len"),
    (["params", "tiny", "--seq-len", "1.5"], 2, "--seq-len"),
    (["params", "tiny", "--dtype", "fp7"], 2, "--dtype"),
    (["params", "@missing"], 2, "missing"),
    (["params", "@file"], 2, "file.txt"),
    (["params", "@notjson.json"], 2, "notjson.json"),
    (["params", "@nan.json"], 2, "nan.json"),
    (["params", "@foreign"], 2, "foreign"),
    # train: values out of their meaning
    (["train", "@tiny", "--steps", "0", "--out", "@new"], 2, "train.steps"),
    (["train", "@tiny", "--steps", "-2", "--out", "@new"], 2, "train.steps"),
    (["train", "@tiny", "--steps", "x", "--out", "@new"], 2, "--steps"),
    (["train", "@tiny", "--set", "train.lr=Infinity", "--out", "@new"], 2, "train.lr must be a finite number"),
    (["train", "@tiny", "--set", "train.lr=NaN", "--out", "@new"], 2, "train.lr must be a finite number"),
    (["train", "@tiny", "--set", "train.lr=-1", "--out", "@new"], 2, "train.lr"),
    (["train", "@tiny", "--set", "train.lr=0", "--out", "@new"], 2, "train.lr"),
    (["train", "@tiny", "--set", "train.lr=1e999", "--out", "@new"], 2, "train.lr"),
    (["train", "@tiny", "--set", "norm_eps=NaN", "--out", "@new"], 2, "norm_eps must be a finite number"),
    (["train", "@tiny", "--set", "norm_eps=0", "--out", "@new"], 2, "norm_eps"),
    (["train", "@tiny", "--set", "attention.rope_theta=0", "--out", "@new"], 2, "attention.rope_theta"),
    (["train", "@tiny", "--set", "attention.rope_theta=-Infinity", "--out", "@new"], 2, "attention.rope_theta"),
    (["train", "@tiny", "--set", "train.seq_len=100000", "--out", "@new"], 2, "longer than the model's context"),
    (["train", "@tiny", "--set", "train.batch_size=0", "--out", "@new"], 2, "train.batch_size"),
    (["train", "@tiny", "--set", "train.grad_clip=NaN", "--out", "@new"], 2, "train.grad_clip"),
    (["train", "@tiny", "--set", "train.beta1=1", "--out", "@new"], 2, "train.beta1"),
    (["train", "@tiny", "--set", "train.warmup_steps=-1", "--out", "@new"], 2, "train.warmup_steps"),
    (["train", "@tiny", "--set", "moe.top_k=0", "--out", "@new"], 2, "moe.top_k"),
    (["train", "@tiny", "--set", "moe.router_noise_std=NaN", "--out", "@new"], 2, "moe.router_noise_std"),
    (["train", "@tiny", "--set", "=3", "--out", "@new"], 2, "--set expects key=value"),
    (["train", "--preset", "nope", "--out", "@new"], 2, "unknown preset"),
    (["train", "--config", "@missing", "--out", "@new"], 2, "does not exist"),
    (["train", "--config", "@notjson.json", "--out", "@new"], 2, "not valid JSON"),
    (["train", "--config", "@foreign", "--out", "@new"], 2, "foreign"),
    (["train", "--config", "@nan.json", "--out", "@new"], 2, "d_model"),
    (["train", "@tiny", "--data", "@missing", "--out", "@new"], 2, "does not exist"),
    (["train", "@tiny", "--data", "@emptydir", "--out", "@new"], 2, "emptydir"),
    (["train", "@tiny", "--data", "@binary", "--out", "@new"], 2, "not UTF-8 text"),
    (["train", "@tiny", "--device", "tpu", "--out", "@new"], 2, "tpu"),
    (["train", "@tiny", "--device", "cuda:7", "--out", "@new"], 2, "cuda"),
    (["train", "@tiny", "--resume", "--force", "--out", "@new"], 2, "not allowed with"),
    (["train", "@tiny", "--out", "@file"], 2, "is a file, not a folder"),
    (["train", "@tiny", "--out", "@file/sub"], 2, "is a file, not a folder"),
    (["train", "@tiny", "--out", "@foreign"], 2, "holds no moekit run"),
    (["train", "@tiny", "--force", "--out", "@foreign"], 2, "holds no moekit run"),
    (["train", "@tiny", "--force", "--out", "@hf"], 2, "holds no moekit run"),
    (["train", "--resume", "--out", "@hf"], 2, "holds no moekit run"),
    (["train", "--resume", "--out", "@new"], 2, "holds no run to resume"),
    (["train", "--resume", "--set", "train.lr=0.1", "--out", "@run"], 2, "--set and --data cannot change it"),
    (["train", "@tiny", "--steps", "4", "--out", "@run"], 2, "already holds this run (4 steps done)"),
    (["train", "@tiny", "--set", "moe.top_k=1", "--steps", "4", "--out", "@run"], 2, "different run"),
    # eval
    (["eval", "@missing"], 2, "not a moekit run directory"),
    (["eval", "@file"], 2, "file.txt"),
    (["eval", "@foreign"], 2, "not a moekit run directory"),
    (["eval", "@hf"], 2, "hf"),
    (["eval", "@run", "--checkpoint", "step_9"], 2, "step_9"),
    (["eval", "@run", "--checkpoint", "@file"], 2, "file.txt"),
    (["eval", "@run", "--checkpoint", "@hf"], 2, "manifest.json"),
    (["eval", "@run", "--batches", "0"], 2, "--batches"),
    (["eval", "@run", "--batches", "x"], 2, "--batches"),
    (["eval", "@run", "--device", "tpu"], 2, "tpu"),
    (["eval", "@run", "--data", "@missing"], 2, "does not exist"),
    # plot
    (["plot", "@missing"], 2, "does not exist"),
    (["plot", "@file"], 2, "is not a folder"),
    (["plot", "@foreign"], 2, "no metrics.jsonl"),
    (["plot", "@run", "--out", "@file"], 2, "is a file, not a folder"),
    (["plot", "@run", "--out", "@file/sub"], 2, "is a file, not a folder"),
    (["plot", "@run", "--out", "@pngs"], 2, "loss.png exists and was not written by moekit"),
    # convert
    (["convert", "@missing", "@new"], 2, "does not exist"),
    (["convert", "@file", "@new"], 2, "file.txt"),
    (["convert", "@foreign", "@new"], 2, "config.json"),
    (["convert", "@hf", "@new", "--format", "xx"], 2, "--format"),
    (["convert", "@hf", "@new", "--dtype", "fp7"], 2, "--dtype"),
    (["convert", "@hf", "@new", "--max-shard-size", "lots"], 2, "max_shard_size"),
    (["convert", "@hf", "@new", "--max-shard-size", "0"], 2, "max_shard_size must be positive"),
    (["convert", "@hf", "@new", "--model-type", "gpt2"], 2, "gpt2"),
    (["convert", "@hf", "@file"], 2, "is a file, not a folder"),
    (["convert", "@hf", "@file/x"], 2, "is a file, not a folder"),
    (["convert", "@hf", "@run"], 2, "is a moekit run folder"),
    (["convert", "@hf", "@run", "--overwrite"], 2, "is a moekit run folder"),
    (["convert", "@hf", "@run/checkpoints/step_0000004"], 2, "training checkpoint"),
    (["convert", "@hf", "@hf"], 2, "pass --overwrite to replace its weights and config"),
    (["convert", "@hf", "@hf", "--dtype", "bfloat16"], 2, "holds a model moekit did not write"),
    (["convert", "@hf", "@foreign"], 2, "not written by moekit"),
    (["convert", "@hf", "@emptydir/../foreign", "--format", "moekit"], 2, "notes.txt"),
    # compare
    (["compare", "--study", "nope", "--out", "@new"], 2, "--study"),
    (["compare", "--study", "balancing", "--device", "tpu", "--out", "@new"], 2, "tpu"),
    (["compare", "--study", "balancing", "--steps", "0", "--out", "@new"], 2, "--steps"),
    (["compare", "--study", "balancing", "--steps", "-1", "--out", "@new"], 2, "--steps"),
    (["compare", "--study", "balancing", "--out", "@file"], 2, "is a file, not a folder"),
    (["compare", "--study", "balancing", "--out", "@foreign"], 2, "not this study's"),
    (["compare", "--study", "balancing", "--out", "@run"], 2, "a moekit run folder"),
    (["compare", "--study", "balancing", "--set", "x", "--out", "@new"], 2, "--set expects key=value"),
    (["compare", "--study", "balancing", "--set", "train.lr=NaN", "--out", "@new"], 2, "train.lr"),
    (["compare", "--study", "architectures", "--resume", "--force", "--out", "@new"], 2, "not allowed with"),
    # bench (refused before any timing)
    (["bench", "--repeats", "0"], 2, "--repeats"),
    (["bench", "--threads", "0"], 2, "--threads"),
    (["bench", "--max-seconds", "0"], 2, "--max-seconds"),
    (["bench", "--max-seconds", "nan"], 2, "--max-seconds"),
    (["bench", "--max-seconds", "inf"], 2, "--max-seconds"),
    (["bench", "--shape", "nope"], 2, "--shape"),
    (["bench", "--impl", "nope"], 2, "--impl"),
    (["bench", "--device", "tpu"], 2, "tpu"),
    (["bench", "--device", "cuda:3"], 2, "cuda"),
    (["bench", "--save", "@foreign"], 2, "is a folder"),
    (["bench", "--save", "@missing/rows.json"], 2, "does not exist"),
    (["bench", "--save", "@file"], 2, "was not written by moekit"),
    (["bench", "--plot", "@pngs/loss.png"], 2, "was not written by moekit"),
    (["bench", "--train", "--save", "@file"], 2, "was not written by moekit"),
    (["bench", "--train", "--plot", "@pngs/loss.png"], 2, "was not written by moekit"),
    (["bench", "--train", "--device", "tpu"], 2, "tpu"),
    (["bench", "--train", "--decode"], 2, "choose one"),
    (["bench", "--decode", "--model", "moe-layer"], 2, "--model moe-layer"),
    (["bench", "--decode", "--save", "@file"], 2, "was not written by moekit"),
    (["bench", "--load-sharded", "2", "--save", "@file"], 2, "was not written by moekit"),
    (["bench", "--load-sharded", "2", "--plot", "@new"], 2, "--plot"),
    # quickstart (refused before training)
    (["quickstart", "--steps", "0", "--out", "@new"], 2, "--steps"),
    (["quickstart", "--out", "@file"], 2, "is a file, not a folder"),
    (["quickstart", "--out", "@foreign"], 2, "holds no moekit run"),
    (["quickstart", "--out", "@hf"], 2, "holds no moekit run"),
    (["quickstart", "--device", "tpu", "--out", "@new"], 2, "tpu"),
]


@pytest.mark.parametrize("argv, code, fragment", MALFORMED, ids=[" ".join(c[0])[:60] for c in MALFORMED])
def test_malformed_input_is_one_line_and_touches_nothing(world, tmp_path, capsys, argv, code, fragment):
    if "cuda" in fragment and torch.cuda.is_available():
        pytest.skip("the machine has CUDA")  # NOTE: never on the CPU machines this suite targets
    new = tmp_path / "new"
    before = snapshot(world["root"])
    got, _, err = run_cli(capsys, expand(argv, world, new))
    one_line(err, got, code, fragment)
    assert snapshot(world["root"]) == before
    assert not new.exists()


# Property-based: any text for a numeric option is either accepted or refused in one line.
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.text(max_size=8), st.integers(-(10**6), 10**6).map(str), st.floats().map(str)))
def test_params_seq_len_fuzz(capsys, text):
    assume(not text.startswith("-") or text.lstrip("-").replace(".", "").isdigit())  # argparse: "-x" is an option
    code, out, err = run_cli(capsys, ["params", "tiny", "--json", "--seq-len", text])
    try:
        valid = int(text) >= 1
    except ValueError:
        valid = False
    if valid:
        assert code == 0 and json.loads(out)["total"] > 0
    else:
        one_line(err, code, 2, "--seq-len")


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(
        ["train.lr", "train.weight_decay", "train.grad_clip", "train.beta2", "train.val_fraction", "norm_eps"]
        + ["attention.rope_theta", "moe.routed_scaling_factor", "moe.aux_loss_coef", "train.min_lr_ratio"]
    ),
    st.one_of(st.floats(), st.integers(-(10**3), 10**3)),
)
def test_config_numbers_are_finite_and_in_range_or_refused_naming_the_field(key, value):
    """``--set KEY=VALUE`` for any number: a config that holds a finite value, or a ConfigError naming KEY."""
    from moekit.config import ConfigError
    from moekit.presets import get_preset
    from moekit.training.config import RunConfig, TrainConfig

    base = RunConfig(get_preset("tiny"), TrainConfig())
    try:
        run = base.with_overrides({key: value})
    except ConfigError as e:
        assert key.removeprefix("model.") in str(e)
        return
    section, _, name = key.rpartition(".")
    holder = {"train": run.train, "attention": run.model.attention, "moe": run.model.moe, "": run.model}[section]
    got = getattr(holder, name)
    assert got == got and abs(got) != float("inf")  # finite
    if name in ("lr", "norm_eps", "rope_theta", "routed_scaling_factor"):
        assert got > 0


# Writers pointed at folders holding the user's data ---------------------------------------------


def test_convert_into_a_run_keeps_the_run(world, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    before = snapshot(run)
    code, _, err = run_cli(capsys, ["convert", world["hf"], run])
    one_line(err, code, 2, "is a moekit run folder")
    assert snapshot(run) == before


def test_convert_in_place_keeps_the_users_files(world, tmp_path, capsys):
    d = tmp_path / "d"
    shutil.copytree(world["hf"], d)
    before = snapshot(d)
    code, _, err = run_cli(capsys, ["convert", d, d, "--dtype", "bfloat16"])
    one_line(err, code, 2, "--overwrite", "README.md")
    assert snapshot(d) == before
    code, out, err = run_cli(capsys, ["convert", d, d, "--dtype", "bfloat16", "--overwrite"])
    assert code == 0 and not err, err
    assert "kept its other files: LICENSE, README.md, merges.txt, vocab.json" in out
    after = snapshot(d)
    for name in USER_FILES:
        assert after[name] == before[name]  # kept byte for byte
    assert load_file(d / "model.safetensors")["model.embed_tokens.weight"].dtype == torch.bfloat16
    owned = json.loads(after[files.OWNED_FILE])["files"]
    assert "model.safetensors" in owned and not set(USER_FILES) & set(owned)
    # Written by moekit now: a second conversion replaces its own files without --overwrite,
    # and still keeps the user's.
    code, _, err = run_cli(capsys, ["convert", d, d, "--dtype", "float32"])
    assert code == 0, err
    assert all(snapshot(d)[name] == before[name] for name in USER_FILES)


def test_convert_shards_replace_old_shards_and_keep_user_files(world, tmp_path, capsys):
    d = tmp_path / "d"
    shutil.copytree(world["hf"], d)
    code, _, err = run_cli(capsys, ["convert", world["hf"], d, "--max-shard-size", "20KB", "--overwrite"])
    assert code == 0, err
    assert (d / "model.safetensors.index.json").exists() and not (d / "model.safetensors").exists()
    assert all((d / name).read_text() == text for name, text in USER_FILES.items())


def test_train_force_replaces_only_the_runs_files(world, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    (run / "notes.md").write_text("my observations\n")
    code, _, err = run_cli(capsys, ["train", *TINY, "--data", world["text"], "--steps", "2", "--force", "--out", run])
    assert code == 0, err
    assert (run / "notes.md").read_text() == "my observations\n"
    assert (run / "train.log").read_text().count("train: starting at step 0 of") == 1  # the old log went too
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000002"]


def test_a_second_train_on_the_same_out_is_refused(world, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    before = snapshot(run)
    with files.folder_lock(run, "run directory"):  # what a running `moekit train` holds
        for argv in (
            ["train", "--resume", "--steps", "6", "--quiet", "--out", run],
            ["train", *TINY, "--force", "--out", run],
        ):
            code, _, err = run_cli(capsys, argv)
            one_line(err, code, 2, "is being written by another moekit process")
    assert snapshot(run) == before


def test_rerunning_the_same_command_says_so(world, tmp_path, capsys):
    argv = ["train", *TINY, "--data", world["text"], "--steps", "2", "--out", tmp_path / "r"]
    assert run_cli(capsys, argv)[0] == 0
    code, _, err = run_cli(capsys, argv)
    line = one_line(err, code, 2, "already holds this run (2 steps done)")
    assert "different" not in line


def test_plot_replaces_its_own_pngs_only(world, tmp_path, capsys):
    out = tmp_path / "plots"
    assert run_cli(capsys, ["plot", world["run"], "--out", out])[0] == 0
    assert files.is_moekit_file(out / "loss.png")
    assert run_cli(capsys, ["plot", world["run"], "--out", out])[0] == 0  # its own: replaced


# Injected OS errors: EACCES (root ignores permission bits) and ENOSPC (/dev/full) ----------------


def _inject(monkeypatch, kind: str, after: int = 0):
    """Make the (after+1)-th and later moekit file writes fail with EACCES, or hit /dev/full."""
    calls = {"n": 0}
    real = files._open_for_write

    def fake(path):
        calls["n"] += 1
        if calls["n"] <= after:
            return real(path)
        if kind == "eacces":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return open("/dev/full", "wb")  # noqa: SIM115

    monkeypatch.setattr(files, "_open_for_write", fake)
    return calls


WRITERS = {
    "convert": lambda w, t: ["convert", w["hf"], t / "out"],
    "convert-moekit": lambda w, t: ["convert", w["hf"], t / "out", "--format", "moekit"],
    "train": lambda w, t: ["train", *TINY, "--data", w["text"], "--steps", "2", "--out", t / "out"],
    "plot": lambda w, t: ["plot", w["run"], "--out", t / "out"],
}


@pytest.mark.parametrize("fault, code_, fragment", [("eacces", 1, "Permission denied"), ("enospc", 1, "no space left")])
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_write_faults_are_one_line(world, tmp_path, capsys, monkeypatch, writer, fault, code_, fragment):
    before = snapshot(world["root"])
    _inject(monkeypatch, fault)
    code, _, err = run_cli(capsys, WRITERS[writer](world, tmp_path))
    one_line(err, code, code_, fragment)
    assert snapshot(world["root"]) == before
    out = tmp_path / "out"
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file() and p.suffix == ".safetensors"]


def test_unwritable_destination_folder(world, tmp_path, capsys, monkeypatch):
    import moekit.atomic

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(kwargs.get("dir", "")))

    monkeypatch.setattr(moekit.atomic.tempfile, "mkdtemp", denied)
    code, _, err = run_cli(capsys, ["convert", world["hf"], tmp_path / "ro" / "x"])
    one_line(err, code, 1, "Permission denied")


def test_disk_full_during_a_checkpoint_keeps_the_last_good_one(world, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    real = files._open_for_write
    # The disk fills up just as the checkpoint of step 6 is written (inside its temporary folder).
    monkeypatch.setattr(files, "_open_for_write", lambda p: open("/dev/full", "wb") if ".step_" in str(p) else real(p))
    code, _, err = run_cli(capsys, ["train", "--resume", "--steps", "6", "--quiet", "--out", run])
    one_line(err, code, 1, "no space left on device writing checkpoint weights", "free")
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith(".")) == [
        "step_0000002",
        "step_0000004",
    ]
    monkeypatch.undo()
    assert run_cli(capsys, ["eval", run, "--json"])[0] == 0  # the newest checkpoint is intact


def test_bench_results_survive_a_failing_save(tmp_path, capsys, monkeypatch):
    _inject(monkeypatch, "enospc")
    argv = ["bench", "--quick", "--repeats", "1", "--no-memory", "--shape", "mixtral-like", "--json"]
    code, out, err = run_cli(capsys, [*argv, "--save", tmp_path / "rows.json"])
    one_line(err, code, 1, "no space left on device writing --save")
    rows = json.loads(out)  # printed before the save was tried
    assert rows and all("moekit_ms" in r for r in rows)


# Hostile and damaged checkpoints ----------------------------------------------------------------


@settings(max_examples=24, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.sampled_from(["model.safetensors", "trainer.pt", "manifest.json", "config.json"]),
    st.floats(0.0, 0.999),
)
def test_truncated_checkpoint_is_one_line(world, tmp_path_factory, capsys, name, fraction):
    run = tmp_path_factory.mktemp("trunc") / "run"
    shutil.copytree(world["run"], run)
    f = run / "checkpoints" / "step_0000004" / name
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * fraction)])
    before = snapshot(run)
    code, _, err = run_cli(capsys, ["eval", run])
    one_line(err, code, 2, "step_0000004")
    code, _, err = run_cli(capsys, ["train", "--resume", "--steps", "6", "--quiet", "--out", run])
    one_line(err, code, 2, "step_0000004")
    assert snapshot(run) == before


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.floats(0.0, 0.999))
def test_truncated_hf_weights_are_one_line(world, tmp_path_factory, capsys, fraction):
    d = tmp_path_factory.mktemp("trunc-hf") / "hf"
    shutil.copytree(world["hf"], d)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: int(f.stat().st_size * fraction)])
    code, _, err = run_cli(capsys, ["convert", d, d.parent / "out"])
    one_line(err, code, 2, "model.safetensors")
    assert not (d.parent / "out").exists()


def _sharded(world, tmp_path) -> Path:
    d = tmp_path / "sharded"
    hf_model().save_pretrained(d, max_shard_size="20KB")
    return d


@pytest.mark.parametrize("escape", ["dotdot", "absolute", "symlink"])
def test_index_naming_files_outside_the_folder_is_refused(world, tmp_path, capsys, escape):
    d = _sharded(world, tmp_path)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(d / first, outside / first)
    if escape == "dotdot":
        target = f"../outside/{first}"
    elif escape == "absolute":
        target = str(outside / first)
    else:
        (d / first).symlink_to(outside / first)
        target = first
    index["weight_map"] = {k: target if v == first else v for k, v in index["weight_map"].items()}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    code, _, err = run_cli(capsys, ["convert", d, tmp_path / "out"])
    one_line(err, code, 2, "outside")


def test_huggingface_cache_symlinks_are_followed(tmp_path):
    """snapshots/<rev>/model.safetensors -> ../../blobs/<sha>: the hub cache layout stays loadable."""
    import moekit

    repo = tmp_path / "models--x--y"
    snap = repo / "snapshots" / "abc"
    hf_model().save_pretrained(snap)
    (repo / "blobs").mkdir()
    shutil.move(snap / "model.safetensors", repo / "blobs" / "sha1")
    (snap / "model.safetensors").symlink_to("../../blobs/sha1")
    assert moekit.from_pretrained(snap).config.d_model == 24


def test_checkpoint_manifest_naming_outside_files_is_refused(world, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    ckpt = run / "checkpoints" / "step_0000004"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"]["../../config.json"] = manifest["files"]["config.json"]
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run_cli(capsys, ["eval", run])
    one_line(err, code, 2, "outside the folder")


def test_tied_config_with_a_distinct_head_is_refused(tmp_path, capsys):
    """Our choice: an error (transformers would silently use one of the two tensors)."""
    model = hf_model()
    d = tmp_path / "tied"
    model.save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (d / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(capsys, ["convert", d, tmp_path / "out"])
    one_line(err, code, 2, "ties the output head", "lm_head.weight")
    # The same folder with the head equal to the embedding is a plain tied checkpoint.
    tensors = load_file(d / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, d / "model.safetensors")
    assert run_cli(capsys, ["convert", d, tmp_path / "out"])[0] == 0


def test_a_checkpoint_of_another_architecture_is_named(world, tmp_path, capsys):
    other = tmp_path / "other"
    argv = ["train", *TINY, "--data", world["text"], "--set", "moe.top_k=1", "--steps", "2", "--out", other]
    assert run_cli(capsys, argv)[0] == 0
    ckpt = other / "checkpoints" / "step_0000002"
    code, _, err = run_cli(capsys, ["eval", world["run"], "--checkpoint", ckpt])
    one_line(err, code, 2, "different architecture", "moe.top_k: 1 -> 4")


def test_corrupt_cache_names_the_file_and_how_to_clear_it(world, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MOEKIT_CACHE_DIR", str(cache))
    argv = ["train", *TINY, "--data", world["text"], "--steps", "1", "--out", tmp_path / "a"]
    assert run_cli(capsys, argv)[0] == 0
    for f in cache.rglob("*.npy"):
        f.write_bytes(b"garbage")
    argv[-1] = tmp_path / "b"
    code, _, err = run_cli(capsys, argv)
    line = one_line(err, code, 2, "cache file", ".npy", "is corrupt", "rm ")
    assert str(cache) in line
    assert not (tmp_path / "b").exists()


# Non-finite training ----------------------------------------------------------------------------


def _nan_at(monkeypatch, bad_steps: set[int]):
    """Make the training forward of the given (1-based) optimiser steps return a NaN loss."""
    real = MoETransformer.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] in bad_steps:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MoETransformer, "forward", forward)


def test_a_nan_step_stops_training_and_keeps_the_last_good_checkpoint(world, tmp_path, capsys, monkeypatch):
    _nan_at(monkeypatch, {3})
    out = tmp_path / "r"
    code, _, err = run_cli(capsys, ["train", *TINY, "--data", world["text"], "--steps", "6", "--out", out])
    one_line(err, code, 1, "step 3: non-finite loss nan", "step_0000002", "--skip-nonfinite")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002"]
    assert not (out / "summary.json").exists()
    monkeypatch.undo()
    assert run_cli(capsys, ["train", "--resume", "--quiet", "--out", out])[0] == 0  # continues from step 2


def test_skip_nonfinite_counts_the_skipped_steps(world, tmp_path, capsys, monkeypatch):
    _nan_at(monkeypatch, {2, 3})
    out = tmp_path / "r"
    argv = ["train", *TINY, "--data", world["text"], "--steps", "4", "--skip-nonfinite", "--out", out]
    code, printed, err = run_cli(capsys, argv)
    assert code == 0, err
    assert "2 non-finite steps skipped" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_steps"] == 2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records] == [0, 1, 2, 2]


def test_under_torchrun_one_rank_prints_the_error_and_every_rank_exits_with_its_code(
    world, tmp_path, capsys, monkeypatch
):
    from moekit.errors import RunError
    from moekit.training.distributed import OtherRankFailed

    bad = ["train", *TINY, "--data", world["text"], "--set", "train.lr=-1", "--out", tmp_path / "r"]
    monkeypatch.setenv("RANK", "1")  # every rank met this error: rank 0 says it, the others exit silently
    code, _, err = run_cli(capsys, bad)
    assert (code, err) == (2, "")
    monkeypatch.setenv("RANK", "0")
    code, _, err = run_cli(capsys, bad)
    one_line(err, code, 2, "train.lr")

    def fails_on_rank_1(*args, **kwargs):  # what Distributed.together raises on each rank
        raise error

    monkeypatch.setattr("moekit.cli.train.train", fails_on_rank_1)
    monkeypatch.setenv("RANK", "1")
    error = RunError("no space left on device writing checkpoint x")
    error.speaks = True  # rank 1 failed first
    code, _, err = run_cli(capsys, ["train", *TINY, "--data", world["text"], "--out", tmp_path / "s"])
    one_line(err, code, 1, "moekit train: error (rank 1): no space left")
    monkeypatch.setenv("RANK", "0")
    error = OtherRankFailed("rank 1 failed (it printed why)", 1)
    code, _, err = run_cli(capsys, ["train", *TINY, "--data", world["text"], "--out", tmp_path / "s"])
    assert (code, err) == (1, "")


def test_a_learning_rate_that_is_merely_too_large_stops(world, tmp_path, capsys):
    argv = ["train", *TINY, "--data", world["text"], "--set", "train.lr=1e6", "--set", "train.warmup_steps=0"]
    code, _, err = run_cli(capsys, [*argv, "--steps", "30", "--out", tmp_path / "r"])
    one_line(err, code, 1, "non-finite", "lower train.lr")


def test_interrupt_before_the_first_logged_step_then_resume(world, tmp_path, capsys, monkeypatch):
    import moekit.cli.train as cli_train
    from moekit.training import loop

    class Interrupt(loop.TrainCallback):
        def on_step(self, step, record):
            if step == 1:
                import os
                import signal

                os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: the loop saves and returns

    real = loop.train
    monkeypatch.setattr(cli_train, "train", lambda *a, **k: real(*a, **{**k, "callback": Interrupt()}))
    out = tmp_path / "r"
    argv = ["train", *TINY, "--set", "train.log_every=10", "--data", world["text"], "--steps", "3", "--out", out]
    assert run_cli(capsys, argv)[0] == 130
    monkeypatch.undo()
    code, printed, err = run_cli(capsys, ["train", "--resume", "--steps", "1", "--quiet", "--out", out])
    assert code == 0, err
    assert "train loss -" in printed
    assert run_cli(capsys, ["train", "--resume", "--quiet", "--out", out])[0] == 0


# Messages and progress --------------------------------------------------------------------------


def test_version(capsys):
    import moekit

    code, out, _ = run_cli(capsys, ["--version"])
    assert code == 0 and out.strip() == f"moekit {moekit.__version__}"


def test_progress_lines_when_stderr_is_not_a_terminal():
    import io

    from rich.console import Console

    from moekit.training.progress import LINE_EVERY_S, RichProgress

    buf = io.StringIO()
    p = RichProgress("train", Console(file=buf, force_terminal=False))
    now = {"t": 0.0}
    p.clock = lambda: now["t"]
    p.on_start(0, 100)
    for step in range(1, 101):
        now["t"] += LINE_EVERY_S / 4  # four steps per interval
        p.on_step(step, {"loss": 2.5, "tokens_per_s": 1000.0} if step % 10 == 0 else None)
    p.on_end()
    lines = buf.getvalue().splitlines()
    assert lines[0] == "train: starting at step 0 of 100"
    assert len(lines) == 1 + 25 and lines[-1].startswith("train step 100/100 (100%) loss 2.500 1,000 tok/s")


def test_end_to_end(world, tmp_path):
    """A few cases through a real process: the installed entry point, one line, the right code."""
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[2]), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    env["MOEKIT_CACHE_DIR"] = str(tmp_path / "cache")

    def moekit(*argv) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "moekit", *map(str, argv)]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)

    r = moekit("--version")
    assert r.returncode == 0 and r.stdout.startswith("moekit ")
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    before = snapshot(run)
    r = moekit("convert", world["hf"], run)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert snapshot(run) == before
    r = moekit("train", "--resume", "--steps", "6", "--out", run)
    assert r.returncode == 0, r.stderr
    assert "train step 6/6" in r.stderr  # progress lines in a log, not a terminal
    assert "train step 6/6" in (run / "train.log").read_text()  # and in the run's own log
