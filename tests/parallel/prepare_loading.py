"""Folders the distributed loading cases read (written by the pytest process before the launch):
tiny Hugging Face checkpoints with transformers' logits, broken copies, a run directory for
``moekit generate``, and one-process training runs for the resume cases.

Layout of ``root``: ``hf/<case>/`` (a checkpoint folder) and ``hf/<case>.pt`` (ids and transformers'
logits); ``bad/<case>/``; ``gen_run/``; ``train/ref5`` and ``train/one3`` (one-process runs of 5
and 3 steps) with ``train/args.json`` (the shared ``moekit train`` arguments).
"""

from __future__ import annotations

import json
import shlex
import shutil
import sysconfig
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moekit.config import AttentionConfig, ModelConfig, MoEConfig
from moekit.models.transformer import MoETransformer
from moekit.training.checkpoint import save_checkpoint
from moekit.training.config import RunConfig, TrainConfig

VOCAB = 97
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, max_position_embeddings=64, rope_theta=5000.0)
# Widths and expert counts divisible by 4: every layout of 2 and 4 ranks applies.
HF_CASES = {
    "mixtral": dict(
        model_type="mixtral", num_hidden_layers=2, num_key_value_heads=2, intermediate_size=24,
        num_local_experts=8, num_experts_per_tok=2,
    ),
    "deepseek_v3": dict(
        model_type="deepseek_v3", num_hidden_layers=3, num_key_value_heads=4, intermediate_size=40,
        moe_intermediate_size=12, n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2,
        n_shared_experts=1, routed_scaling_factor=1.7, first_k_dense_replace=1, q_lora_rank=20, kv_lora_rank=14,
        qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=10, rope_interleave=True,
    ),
    # Fused-only types (HFLayout.fused): gpt-oss's interleaved gate/up columns with expert biases
    # (so etp is refused: ep layouts only), Llama 4's concatenated ones; [in, out] tensors.
    "gpt_oss": dict(
        model_type="gpt_oss", num_hidden_layers=2, num_key_value_heads=2, head_dim=8, intermediate_size=24,
        num_local_experts=8, num_experts_per_tok=2, sliding_window=5, swiglu_limit=0.6,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
    ),
    "llama4_text": dict(
        model_type="llama4_text", num_hidden_layers=2, num_key_value_heads=2, head_dim=8, intermediate_size=24,
        intermediate_size_mlp=40, num_local_experts=8, num_experts_per_tok=2, interleave_moe_layer_step=1,
        no_rope_layer_interval=2, attention_chunk_size=5, use_qk_norm=True,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
    ),
    # Files moekit rewrites at load (HFLayout.from_file): fused experts under Granite's names, and
    # the shared expert's input_linear split into gate and up (views the reader takes of it).
    "granitemoeshared": dict(
        model_type="granitemoeshared", num_hidden_layers=2, num_key_value_heads=2, intermediate_size=24,
        num_local_experts=8, num_experts_per_tok=2, shared_intermediate_size=16, embedding_multiplier=2.0,
        residual_multiplier=0.5, logits_scaling=1.5, attention_multiplier=0.3,
    ),
}  # fmt: skip
# Their checkpoints hold fused tensors in the type's own names only: no transformers-5 "-fused" copy.
FUSED_ONLY = ("gpt_oss", "llama4_text", "granitemoeshared")
TRAIN_ARGS = (
    "train --preset tiny --set train.tokenizer=byte --set train.batch_size=4 --set train.seq_len=32 "
    "--set train.log_every=1 --set train.eval_every=4 --set train.eval_batches=2 --set train.warmup_steps=1 --quiet"
)


def build_hf(model_type: str, seed: int = 0):
    import transformers

    kw = dict(HF_CASES[model_type])
    kw.pop("model_type")
    torch.manual_seed(seed)
    common = {k: v for k, v in COMMON.items() if not (k == "rope_theta" and "rope_parameters" in kw)}
    config = transformers.AutoConfig.for_model(model_type, **common, **kw)
    config.bos_token_id = config.eos_token_id = config.pad_token_id = None
    hf = transformers.AutoModelForCausalLM.from_config(
        config, dtype=torch.float32, experts_implementation="eager"
    ).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.15)
        for name, b in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(-0.1, 0.1)
    return hf


def write_hf(root: Path) -> None:
    """Per type: the hub layout in several shard files (``save_pretrained``) and transformers 5's
    fused in-memory layout (``gate_up_proj``/``down_proj``) in one file (fused-only types: the hub
    folder already is); transformers' logits."""
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    for model_type in HF_CASES:
        hf = build_hf(model_type)
        hub, fused = root / "hf" / f"{model_type}-hub", root / "hf" / f"{model_type}-fused"
        hf.save_pretrained(hub, max_shard_size="40KB")
        folders = [hub]
        if model_type not in FUSED_ONLY:
            fused.mkdir(parents=True)
            shutil.copy(hub / "config.json", fused / "config.json")
            save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, fused / "model.safetensors")
            folders.append(fused)
        with torch.no_grad():
            logits = hf(ids).logits
        for folder in folders:
            torch.save({"ids": ids, "logits": logits}, root / "hf" / f"{folder.name}.pt")


def write_bad(root: Path) -> None:
    """A shard listed in the index but missing; a shard whose expert tensor has the wrong shape; an
    index naming a file outside the folder; a tied config with a distinct head (same shape)."""
    src = root / "hf" / "mixtral-hub"
    shards = sorted(src.glob("model-*.safetensors"))
    assert len(shards) >= 3, shards
    missing = root / "bad" / "missing-shard"
    shutil.copytree(src, missing)
    (missing / shards[1].name).unlink()
    mismatched = root / "bad" / "mismatched-shard"
    shutil.copytree(src, mismatched)
    tensors = load_file(mismatched / shards[-1].name)
    name = next(k for k in sorted(tensors) if ".experts." in k)
    tensors[name] = tensors[name][:-1].clone()  # one row short
    save_file(tensors, mismatched / shards[-1].name, metadata={"format": "pt"})
    (root / "bad" / "mismatched-tensor.txt").write_text(name)
    outside = root / "bad" / "outside-index"  # the index names a shard beside the folder, not in it
    shutil.copytree(src, outside)
    index = json.loads((outside / "model.safetensors.index.json").read_text())
    key = next(k for k, v in index["weight_map"].items() if v == shards[1].name)
    index["weight_map"][key] = f"../../hf/mixtral-hub/{shards[1].name}"
    (outside / "model.safetensors.index.json").write_text(json.dumps(index))
    tied = root / "bad" / "tied-distinct-head"  # a tied config beside a different head of the same shape
    shutil.copytree(root / "hf" / "mixtral-fused", tied)
    config = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))


def write_gen_run(run_dir: Path) -> None:
    """A byte-level run directory with one checkpoint, for ``moekit generate``."""
    cfg = ModelConfig(
        vocab_size=256, d_model=32, n_layers=2, dense_ffn_dim=48, max_seq_len=64,
        attention=AttentionConfig(n_heads=4), moe=MoEConfig(n_routed_experts=8, top_k=2, expert_ffn_dim=16),
    )  # fmt: skip
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(
        json.dumps(RunConfig(cfg, TrainConfig(tokenizer="byte", seq_len=32)).to_dict())
    )
    torch.manual_seed(5)
    model = MoETransformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)  # spread logits: no argmax near-ties
    save_checkpoint(run_dir, 1, model, {"step": 1}, keep=1)


def write_train(root: Path) -> None:
    """One-process runs of the tiny preset: 5 steps uninterrupted, and 3 steps (to resume at ep 4)."""
    from moekit.cli import main

    corpus = root / "train" / "corpus"
    shutil.copytree(
        Path(sysconfig.get_paths()["stdlib"]) / "json", corpus, ignore=shutil.ignore_patterns("__pycache__")
    )
    args = [*shlex.split(TRAIN_ARGS), "--data", str(corpus)]
    (root / "train" / "args.json").write_text(json.dumps(args))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, steps in (("ref5", 5), ("one3", 3)):
            assert main([*args, "--steps", str(steps), "--out", str(root / "train" / name)]) == 0
    finally:
        torch.set_num_threads(threads)


def prepare(root: Path, world: int) -> Path:
    write_hf(root)
    write_bad(root)
    write_gen_run(root / "gen_run")
    if world == 4:
        write_train(root)
    return root
