"""Layout-independent checkpoints, sharded loading and inference over ranks (``moekit.parallel.loading``,
``moekit.parallel.inference``), on gloo at 2 and 4 processes.

The multi-process halves run in the one launch per world size (``dist_loading.py`` inside
``dist_cases.py``); this module checks their results and does the one-process halves:
- a checkpoint written at ep 2 loads in one process with every expert (and its AdamW moments) in
  its place; a one-process checkpoint loads at ep 2 / etp 2 with each rank holding exactly its slice;
- tiny Hugging Face checkpoints (mixtral, deepseek_v3; hub layout in several files and transformers
  5's fused layout; gpt-oss's interleaved and Llama 4's concatenated fused-only layouts) load sharded at every layout with transformers' logits (rel <= 1e-5), each rank
  reading and holding exactly its share of the expert bytes; greedy generation equals one process;
- a missing shard, a mismatched shard, an index naming a file outside the folder, a tied config
  with a distinct head and a read failing on one rank alone raise on every rank;
- ``moekit generate`` under the launch prints on rank 0 alone the one-process text;
- ``moekit train`` at ep 4 resumed at ep 2, at ep 2 x etp 2 and in one process (and a one-process
  run resumed at ep 4) gives the uninterrupted run's losses.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from moekit.cli import main
from moekit.config import AttentionConfig, ModelConfig, MoEConfig
from moekit.errors import CheckpointError
from moekit.interop.hf_weights import Piece, UnsupportedError, resolve
from moekit.interop.pretrained import from_pretrained, open_checkpoint
from moekit.models.transformer import MoETransformer
from moekit.parallel import Layout, load_sharded
from moekit.parallel.loading import _compose, check_readable
from moekit.training.checkpoint import load_checkpoint
from moekit.training.metrics import read_metrics

pytest.importorskip("transformers")

TOL = 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b| / |b|`` (Frobenius norms, as in dist_cases.py)."""
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def loading(dist_results) -> dict:
    return {**dist_results["loading"], "root": Path(dist_results["root"]), "world": dist_results["world"]}


def test_sharded_hf_logits_equal_transformers_and_ranks_hold_their_share(loading):
    cases = loading["sharded_hf"]
    layouts = (
        {"dp2-ep2-etp1", "dp1-ep1-etp2"} if loading["world"] == 2 else {"dp4-ep4-etp1", "dp2-ep2-etp2", "dp1-ep1-etp4"}
    )
    folders = {
        "mixtral-hub",
        "mixtral-fused",
        "deepseek_v3-hub",
        "deepseek_v3-fused",
        "gpt_oss-hub",
        "llama4_text-hub",
        "granitemoeshared-hub",
    }
    assert set(cases) == {f"{f}/{lay}" for f in folders for lay in layouts}
    for name, ranks in cases.items():
        assert len(ranks) == loading["world"]
        if name.startswith("gpt_oss") and "etp1" not in name:  # expert biases: etp refused on every rank
            assert all("ConfigError" in r["refused"] and "expert_bias" in r["refused"] for r in ranks), ranks
            continue
        for r, res in enumerate(ranks):
            assert res["rel_hf"] <= TOL, (name, r, res["rel_hf"])
            assert res["rel_one_process"] <= TOL, (name, r, res["rel_one_process"])
            assert res["expert_params"] == res["expected_expert_params"] > 0, (name, r)
            assert res["expert_bytes_read"] == res["expected_expert_bytes"] > 0, (name, r)
            assert res["bytes_read"] == res["expected_bytes"], (name, r)
            if "tokens" in res:
                assert res["tokens"] == res["tokens_one_process"], (name, r)


def test_missing_or_mismatched_shard_fails_on_every_rank(loading):
    bad = loading["bad_folders"]
    for name in ("missing-shard", "mismatched-shard", "rank1-read-fails", "outside-index", "tied-distinct-head"):
        raised = [r["raised"] for r in bad[name]]
        assert raised == ["CheckpointError"] * loading["world"], (name, bad[name])
    missing = [r["message"] for r in bad["missing-shard"]]
    assert all("is missing from" in m and "model.safetensors.index.json" in m for m in missing), missing
    mismatched = [r["message"] for r in bad["mismatched-shard"]]
    assert all(bad["mismatched-tensor"] in m and "has shape" in m and "mismatched-shard:" in m for m in mismatched)
    # the same checks as one process: files stay inside the folder, a tied head equals the embedding
    for name, says in (("outside-index", "a path outside"), ("tied-distinct-head", "ties the output head")):
        messages = [r["message"] for r in bad[name]]
        assert all(says in m for m in messages), (name, messages)
        with pytest.raises(CheckpointError, match=says):
            from_pretrained(loading["root"] / "bad" / name)
    rank0, rank1 = bad["rank1-read-fails"][0]["message"], bad["rank1-read-fails"][1]["message"]
    assert "injected failure" in rank1 and "(on rank" not in rank1
    assert "injected failure" in rank0 and rank0.endswith("(on rank 1)")


def test_generate_cli_prints_on_rank0_the_one_process_text(loading, capsys):
    ranks = loading["cli_generate"]["per_rank"]
    assert [r["code"] for r in ranks] == [0] * loading["world"]
    assert all(r["stdout"] == "" and r["stderr"] == "" for r in ranks[1:]), ranks
    sharded = json.loads(ranks[0]["stdout"])
    assert sharded["layout"] == {"dp": 1, "ep": 1, "etp": loading["world"]}  # default: each expert sliced
    argv = ["generate", str(loading["root"] / "gen_run"), "--prompt", "def f(", "--max-new-tokens", "10"]
    assert main([*argv, "--ignore-eos", "--json"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert sharded["text"] == one["text"] and sharded["new_tokens"] == one["new_tokens"] == 10


@pytest.mark.parametrize("dist_results", [2], indirect=True)  # written by the 2-process launch
def test_ep2_checkpoint_loads_in_one_process_with_every_expert_in_place(loading):
    placement = loading["expert_placement"]
    original = torch.load(placement["original"])
    folder = Path(placement["many"])
    model = from_pretrained(folder)
    state = load_checkpoint(folder, MoETransformer(model.config))
    sd = model.state_dict()
    opt_state = state["optimizer"]["state"]
    opt_original = original["optimizer"]["state"]
    names = list(original["model"])
    param_names = [n for n in names if n in dict(MoETransformer(model.config).named_parameters())]
    n_checked = 0
    for key in [k for k in names if k.endswith(("experts.w1", "experts.w3", "experts.w2"))]:
        want, got = original["model"][key], sd[key]
        i = param_names.index(key)
        for e in range(want.shape[0]):  # expert by expert: a renumbered expert fails here
            assert rel(got[e], want[e]) <= TOL, (key, e, rel(got[e], want[e]))
            assert rel(got[e], want[(e + 1) % want.shape[0]]) > 0.5  # experts differ: the check could fail
            for moment in ("exp_avg", "exp_avg_sq"):
                error = rel(opt_state[i][moment][e], opt_original[i][moment][e])
                assert error <= 1e-4, (key, e, moment, error)  # one AdamW step at 2 ranks vs 1 (fp32)
            n_checked += 1
    assert n_checked == 2 * 3 * 8  # 2 MoE layers x (w1, w3, w2) x 8 experts


@pytest.mark.parametrize("dist_results", [2], indirect=True)
def test_one_process_checkpoint_loads_at_ep2_and_etp2_with_each_slice_in_place(loading):
    placement = loading["expert_placement"]
    for layout in ("dp2-ep2-etp1", "dp1-ep1-etp2"):
        ranks = placement[f"one-process-to-{layout}"]
        assert all(r["wrong"] == [] and r["checked"] == 2 * 3 * 4 for r in ranks), ranks


@pytest.mark.parametrize("dist_results", [4], indirect=True)  # trained by the 4-process launch
def test_resume_across_layouts_gives_the_uninterrupted_losses(loading):
    resume = loading["resume"]
    assert all(set(codes.values()) == {0} for codes in resume["codes"]), resume["codes"]
    runs = Path(resume["runs"])
    args = json.loads((runs / "args.json").read_text())
    assert "--ep" not in args
    # The ep-4 run resumed in one process.
    shutil.copytree(runs / "ep4", runs / "ep4-then-one")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", "--resume", "--steps", "5", "--out", str(runs / "ep4-then-one"), "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
    ref = [r["loss"] for r in read_metrics(runs / "ref5")]
    assert len(ref) == 5
    assert [r["loss"] for r in read_metrics(runs / "ep4")] == pytest.approx(ref[:3], rel=TOL)
    for name in ("ep4-then-ep2", "ep4-then-ep2-etp2", "ep4-then-one", "one-then-ep4"):
        metrics = read_metrics(runs / name)
        assert [r["step"] for r in metrics] == [1, 2, 3, 4, 5], name
        assert [r["loss"] for r in metrics] == pytest.approx(ref, rel=TOL), name


def test_compose_reads_a_slice_of_a_piece_in_one_index(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    t = torch.arange(2 * 6 * 4).view(2, 6, 4)
    save_file({"t": t}, tmp_path / "t.safetensors")
    cases = [
        (Piece("t", (1, slice(3, 6))), (slice(1, 3),)),  # up rows of a fused gate_up_proj, then an etp slice
        (Piece("t", (1,)), (slice(None), slice(2, 4))),  # one expert of down_proj, then its F columns
        (Piece("t"), (slice(0, 1), slice(None), slice(1, 3))),  # a stacked tensor's expert block and columns
        (Piece("t", (0, slice(0, 3))), ()),
        # gpt-oss's interleaved [E, D, 2F] gate_up_proj: gate at even, up at odd columns, read as [E, F, D]
        (Piece("t", (slice(None), slice(None), slice(0, 4, 2)), transpose=True), (slice(1, 2), slice(1, 2))),
        (Piece("t", (slice(None), slice(None), slice(1, 4, 2)), transpose=True), (slice(0, 2), slice(0, 1))),
        (Piece("t", (slice(None), slice(None), slice(1, 4, 2)), transpose=True), (1, slice(1, 2), slice(2, 5))),
        # Llama 4's concatenated layout, and a transposed down_proj [E, F, D] read as [E, D, F]
        (Piece("t", (slice(None), slice(None), slice(2, 4)), transpose=True), (slice(1, 2), slice(0, 1))),
        (Piece("t", transpose=True), (slice(0, 2), slice(None), slice(3, 6))),
        (Piece("t", (slice(None), slice(1, 6, 2))), (slice(None), slice(1, 3))),  # interleaved biases
    ]
    with safe_open(tmp_path / "t.safetensors", framework="pt") as f:
        for piece, sub in cases:
            read = f.get_slice("t")[_compose(piece, sub, tuple(t.shape))]
            read = read.transpose(-1, -2) if piece.transpose else read
            assert torch.equal(read, resolve({"t": t}, piece)[sub]), (piece, sub)


def test_load_sharded_in_one_process_is_from_pretrained(tmp_path):
    cfg = ModelConfig(
        vocab_size=50, d_model=16, n_layers=2, dense_ffn_dim=24,
        attention=AttentionConfig(n_heads=2), moe=MoEConfig(n_routed_experts=4, top_k=2, expert_ffn_dim=8),
    )  # fmt: skip
    model = MoETransformer(cfg).eval()
    model.save_pretrained(tmp_path / "m", format="moekit")
    loaded = load_sharded(tmp_path / "m", Layout())
    ids = torch.randint(0, 50, (1, 5))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded.load_report.bytes_read == loaded.load_report.checkpoint_bytes


def test_load_sharded_in_one_process_reads_hf_experts_as_from_pretrained(loading):
    for name in ("mixtral-hub", "deepseek_v3-fused", "gpt_oss-hub", "llama4_text-hub"):
        folder = loading["root"] / "hf" / name
        sharded, one = load_sharded(folder, Layout()), from_pretrained(folder)
        a, b = sharded.state_dict(), one.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        report = sharded.load_report
        assert (
            report.bytes_read == report.checkpoint_bytes and report.expert_bytes_read == report.checkpoint_expert_bytes
        )
        assert report.checkpoint_expert_bytes > 0, name


REWRITTEN = ("phimoe", "granitemoeshared", "ernie4_5_moe", "dbrx")  # renames; fused experts; views; fused experts


@pytest.mark.parametrize("case", REWRITTEN)
def test_load_sharded_reads_through_a_types_file_rewrite(case, tmp_path):
    """Types whose files moekit rewrites at load (HFLayout.from_file): renamed tensors are read
    under their file names, views of a fused file tensor as that view of it; in one process every
    tensor equals from_pretrained's. Sharded, routed experts must be file tensors (or pieces of
    them): DBRX's, split from one fused tensor, are refused in one line before anything is read."""
    from tests.interop.test_hf_parity_group_b import build_hf

    build_hf(case).save_pretrained(tmp_path, max_shard_size="100KB")
    one, sharded = from_pretrained(tmp_path), load_sharded(tmp_path, Layout())
    a, b = sharded.state_dict(), one.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ckpt = open_checkpoint(tmp_path)
    experts = [k for k in ckpt.sources if ".ffn.experts." in k]
    if case == "dbrx":
        with pytest.raises(UnsupportedError, match=r"sharded loading cannot read model_type dbrx: .*moekit convert"):
            check_readable(ckpt, experts)
    else:
        check_readable(ckpt, experts)
