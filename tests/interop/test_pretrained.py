"""Checkpoint folders without transformers: round trips, sharding, meta loading, atomic writes,
tokenizers, the ``convert`` command, and clear errors for broken folders."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import moekit
from moekit.cli import main
from moekit.config import AttentionConfig, ConfigError, ModelConfig, MoEConfig
from moekit.errors import MoekitError
from moekit.interop import pretrained
from moekit.interop.hf_export import infer_model_type, to_hf_config
from moekit.interop.hf_weights import CheckpointError, UnsupportedError
from moekit.models.transformer import MoETransformer

GQA = dict(n_heads=4, n_kv_heads=2, rope_theta=5000.0)
MOE = dict(n_routed_experts=6, top_k=2, expert_ffn_dim=14)
# One config per Hugging Face model type, expressible in it (dense layers where the type has them).
CONFIGS = {
    "mixtral": dict(attention=AttentionConfig(**GQA), moe=MoEConfig(**MOE)),
    "qwen2_moe": dict(
        attention=AttentionConfig(**GQA, qkv_bias=True),
        moe=MoEConfig(**MOE, n_shared_experts=1, shared_ffn_dim=18, shared_expert_gate=True, moe_layers=[1]),
    ),
    "qwen3_moe": dict(
        attention=AttentionConfig(**GQA, head_dim=10, qk_norm="head"),
        moe=MoEConfig(**MOE, first_k_dense=1),
        tie_embeddings=True,
    ),
    "olmoe": dict(attention=AttentionConfig(**GQA, qk_norm="full"), moe=MoEConfig(**MOE, norm_topk_prob=False)),
    "deepseek_v3": dict(
        attention=AttentionConfig(
            n_heads=3, kind="mla", q_lora_rank=12, kv_lora_rank=10, qk_nope_head_dim=6, qk_rope_head_dim=4,
            v_head_dim=8, rope_interleave=True,
        ),
        moe=MoEConfig(
            n_routed_experts=8, top_k=2, expert_ffn_dim=10, n_shared_experts=1, score_func="sigmoid",
            n_group=2, topk_group=1, routed_scaling_factor=2.5, selection_bias=True, first_k_dense=1,
        ),
    ),
}  # fmt: skip


def make_model(model_type: str) -> MoETransformer:
    cfg = ModelConfig(vocab_size=61, d_model=24, n_layers=3, dense_ffn_dim=20, norm_eps=1e-5, **CONFIGS[model_type])
    model = MoETransformer(cfg).eval()
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("selection_bias"):
                b.uniform_(-0.1, 0.1)
    return model


def ids() -> torch.Tensor:
    return torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(0))


def assert_same(a: MoETransformer, b: MoETransformer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    # NOTE: equal weights, not equal bits of logits: loaded tensors stay memory-mapped at the file's
    # 8-byte alignment, and the CPU matmul kernels round differently on unaligned data (~1e-8).
    with torch.no_grad():
        torch.testing.assert_close(a(ids()).logits, b(ids()).logits, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
@pytest.mark.parametrize("fmt", ["hf", "moekit"])
def test_round_trip_is_exact(model_type, fmt, tmp_path):
    model = make_model(model_type)
    assert infer_model_type(model.config) == model_type
    model.save_pretrained(tmp_path / "ckpt", format=fmt)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert ("model_type" in config) == (fmt == "hf")
    loaded = moekit.from_pretrained(tmp_path / "ckpt")
    assert_same(model, loaded)
    assert not loaded.training and loaded.tokenizer is None
    if model.config.tie_embeddings:
        assert loaded.lm_head.weight is loaded.embed.weight
        assert "lm_head.weight" not in load_file(tmp_path / "ckpt" / "model.safetensors")


def test_sharded_save_and_dtype(tmp_path):
    model = make_model("deepseek_v3")
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="20KB")
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "ckpt" / "model.safetensors").exists()
    assert_same(model, pretrained.from_pretrained(tmp_path / "ckpt"))
    half = pretrained.from_pretrained(tmp_path / "ckpt", dtype="bfloat16")
    assert half.embed.weight.dtype == torch.bfloat16
    assert half.layers[1].ffn.router.selection_bias.dtype == torch.float32  # buffers stay fp32


def test_meta_loading_reads_no_data(tmp_path, monkeypatch):
    model = make_model("qwen2_moe")
    model.save_pretrained(tmp_path / "ckpt")
    real_open = pretrained.safe_open

    class HeaderOnly:
        def __init__(self, *args, **kwargs):
            self.f = real_open(*args, **kwargs)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def get_slice(self, name):
            return self.f.get_slice(name)

        def get_tensor(self, name):
            raise AssertionError(f"read {name}")

    monkeypatch.setattr(pretrained, "safe_open", HeaderOnly)
    meta = moekit.from_pretrained(tmp_path / "ckpt", device="meta")
    assert all(p.is_meta for p in meta.parameters())
    assert meta.num_parameters() == model.num_parameters()
    assert {k: v.shape for k, v in meta.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_tokenizer_is_loaded_and_saved(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    make_model("mixtral").save_pretrained(tmp_path / "a")
    tok.save(str(tmp_path / "a" / "tokenizer.json"))
    model = moekit.from_pretrained(tmp_path / "a")
    assert model.tokenizer.encode("hello world") == [1, 2]
    assert moekit.load_tokenizer(tmp_path / "a").encode("world") == [2]
    model.save_pretrained(tmp_path / "b", format="moekit")
    assert moekit.from_pretrained(tmp_path / "b").tokenizer.encode("hello") == [1]


def test_save_is_atomic(tmp_path, monkeypatch):
    model = make_model("mixtral")
    model.save_pretrained(tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pretrained, "_write_tensors", fail)
    with pytest.raises(OSError, match="disk full"):
        make_model("olmoe").save_pretrained(tmp_path / "ckpt")
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary folders left
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        model.save_pretrained(tmp_path / "other")


def test_save_replaces_an_existing_checkpoint(tmp_path):
    make_model("mixtral").save_pretrained(tmp_path / "ckpt", max_shard_size="20KB")
    model = make_model("olmoe")
    model.save_pretrained(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / "model.safetensors.index.json").exists()
    assert_same(model, moekit.from_pretrained(tmp_path / "ckpt"))


# Broken folders ---------------------------------------------------------------------------------


@pytest.fixture
def hf_folder(tmp_path) -> Path:
    make_model("olmoe").save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def edit_tensors(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_missing_tensor_is_named(hf_folder):
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    edit_tensors(hf_folder, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=r"missing 1 tensor.*experts\.3\.up_proj"):
        moekit.from_pretrained(hf_folder)


def test_unexpected_tensor_is_named(hf_folder):
    edit_tensors(hf_folder, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected 1 tensor.*mlp\.extra\.weight"):
        moekit.from_pretrained(hf_folder, device="meta")


def test_transposed_tensor_names_both_shapes(hf_folder):
    name = "model.layers.2.self_attn.k_proj.weight"
    edit_tensors(hf_folder, lambda t: t.update({name: t[name].T.contiguous()}))
    with pytest.raises(CheckpointError, match=r"shape \(24, 12\), expected \(12, 24\)") as err:
        moekit.from_pretrained(hf_folder)
    assert name in str(err.value)
    edit_tensors(hf_folder, lambda t: t.update({name: t[name].T.contiguous()}))
    name = "model.layers.0.mlp.experts.0.down_proj.weight"
    edit_tensors(hf_folder, lambda t: t.update({name: t[name].T.contiguous()}))
    with pytest.raises(CheckpointError, match=r"shape \(14, 24\), expected \(24, 14\)") as err:
        moekit.from_pretrained(hf_folder)
    assert name in str(err.value)


def test_fused_tensor_with_wrong_shape_is_named(hf_folder):
    def fuse(t):
        prefix = "model.layers.1.mlp.experts"
        gate = torch.stack([t.pop(f"{prefix}.{j}.gate_proj.weight") for j in range(6)])
        up = torch.stack([t.pop(f"{prefix}.{j}.up_proj.weight") for j in range(6)])
        t[f"{prefix}.gate_up_proj"] = torch.cat([gate, up], dim=1).transpose(1, 2).contiguous()

    edit_tensors(hf_folder, fuse)
    with pytest.raises(CheckpointError, match=r"gate_up_proj'? has shape \(6, 24, 28\), expected \(6, 28, 24\)"):
        moekit.from_pretrained(hf_folder)


@pytest.mark.parametrize(
    "changes, error, field",
    [
        ({"model_type": "fancy_moe"}, ConfigError, "fancy_moe"),
        ({"clip_qkv": 8.0}, UnsupportedError, "clip_qkv"),
        ({"hidden_act": "gelu"}, UnsupportedError, "hidden_act"),
        ({"quantization_config": {"quant_method": "fp8"}}, UnsupportedError, "quantization_config"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, ConfigError, "rope_scaling"),
        ({"num_experts": 7}, CheckpointError, r"missing 9 tensor\(s\).*experts\.6\."),
    ],
)
def test_bad_config_is_named(hf_folder, changes, error, field):
    edit_config(hf_folder, **changes)
    with pytest.raises(error, match=field):
        moekit.from_pretrained(hf_folder)


def test_missing_files(tmp_path, hf_folder):
    with pytest.raises(CheckpointError, match="does not exist"):
        moekit.from_pretrained(tmp_path / "nowhere")
    (hf_folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="neither model.safetensors"):
        moekit.from_pretrained(hf_folder)
    (hf_folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json does not exist"):
        moekit.from_pretrained(hf_folder)


def test_moekit_folder_is_strict_too(tmp_path):
    make_model("mixtral").save_pretrained(tmp_path / "ckpt", format="moekit")
    edit_tensors(tmp_path / "ckpt", lambda t: t.pop("layers.1.ffn.experts.w3"))
    with pytest.raises(CheckpointError, match=r"moekit checkpoint.*layers\.1\.ffn\.experts\.w3"):
        moekit.from_pretrained(tmp_path / "ckpt")


# Export -----------------------------------------------------------------------------------------


def test_export_names_the_field_it_cannot_write(tmp_path):
    cfg = make_model("mixtral").config
    with pytest.raises(UnsupportedError, match="moe.capacity_factor"):
        to_hf_config(cfg.replace(moe={**cfg.moe.__dict__, "capacity_factor": 1.25}))
    with pytest.raises(UnsupportedError, match="moe layers"):
        to_hf_config(cfg.replace(moe={**cfg.moe.__dict__, "first_k_dense": 1}), "mixtral")
    with pytest.raises(UnsupportedError, match="attention.qk_norm"):
        to_hf_config(make_model("olmoe").config, "qwen3_moe")
    with pytest.raises(UnsupportedError, match="model_type 'gpt2'"):
        to_hf_config(cfg, "gpt2")
    with torch.device("meta"):
        meta = MoETransformer(cfg)
    with pytest.raises(CheckpointError, match="meta device"):
        meta.save_pretrained(tmp_path / "x")


def test_hf_config_keys():
    d = to_hf_config(make_model("qwen2_moe").config)
    assert d["model_type"] == "qwen2_moe" and d["architectures"] == ["Qwen2MoeForCausalLM"]
    assert d["mlp_only_layers"] == [0, 2] and d["decoder_sparse_step"] == 1
    assert d["shared_expert_intermediate_size"] == 18 and d["qkv_bias"] is True
    d = to_hf_config(make_model("deepseek_v3").config)
    assert d["first_k_dense_replace"] == 1 and d["n_shared_experts"] == 1 and d["n_group"] == 2


# CLI and import weight -------------------------------------------------------------------------


def test_convert_command(tmp_path, capsys):
    model = make_model("qwen3_moe")
    model.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "generation_config.json").write_text('{"eos_token_id": 2}')
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "mk"), "--format", "moekit"]) == 0
    assert main(["convert", str(tmp_path / "mk"), str(tmp_path / "hf2")]) == 0
    assert "wrote hf checkpoint" in capsys.readouterr().out
    assert (tmp_path / "hf2" / "generation_config.json").read_text() == '{"eos_token_id": 2}'
    assert_same(model, moekit.from_pretrained(tmp_path / "hf2"))
    assert main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moekit convert: error:") and err.count("\n") == 1


def test_import_stays_light(tmp_path):
    """``moekit.from_pretrained`` is imported on first use, and loading HF weights needs no transformers."""
    make_model("mixtral").save_pretrained(tmp_path / "ckpt")
    code = (
        "import sys, moekit; assert 'moekit.interop.pretrained' not in sys.modules; "
        f"m = moekit.from_pretrained({str(tmp_path / 'ckpt')!r}); "
        "assert 'transformers' not in sys.modules, 'transformers imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_errors_are_moekit_errors():
    assert issubclass(CheckpointError, MoekitError) and issubclass(UnsupportedError, MoekitError)
