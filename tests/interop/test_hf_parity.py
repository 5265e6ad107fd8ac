"""moekit against transformers on the same checkpoints: equal logits and greedy generations.

For each supported model type a tiny random transformers model (odd widths, GQA, dense and MoE
layers mixed where the type allows) is saved with ``save_pretrained``, loaded by
``moekit.from_pretrained`` and compared in fp32: max|a - b| / max|b| <= 1e-4 on random ids, and
16 greedy tokens identical. Then the reverse: moekit writes an HF folder, transformers loads it
and gives the same logits. Weights are re-drawn wider than transformers' init (std 0.02) so that
logits are spread out and argmax ties are unlikely.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moekit.interop.hf_config import config_from_hf  # noqa: E402
from moekit.interop.hf_export import to_hf_config  # noqa: E402
from moekit.interop.pretrained import from_pretrained, read_tensors  # noqa: E402

VOCAB = 97
COMMON = dict(vocab_size=VOCAB, hidden_size=36, num_attention_heads=6, max_position_embeddings=64, rope_theta=5000.0)
YARN = {
    "rope_type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 16,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
CASES = {
    "mixtral": dict(
        model_type="mixtral", num_hidden_layers=3, num_key_value_heads=2, intermediate_size=22,
        num_local_experts=5, num_experts_per_tok=2,
    ),
    # MoE layers: (i + 1) % 2 == 0 and i not in mlp_only_layers -> [1, 5]; dense 0, 2, 3, 4.
    "qwen2_moe": dict(
        model_type="qwen2_moe", num_hidden_layers=6, num_key_value_heads=3, intermediate_size=26,
        moe_intermediate_size=14, shared_expert_intermediate_size=18, num_experts=6, num_experts_per_tok=2,
        decoder_sparse_step=2, mlp_only_layers=[3],
    ),
    "qwen3_moe": dict(
        model_type="qwen3_moe", num_hidden_layers=3, num_key_value_heads=2, head_dim=10, intermediate_size=26,
        moe_intermediate_size=14, num_experts=6, num_experts_per_tok=3, norm_topk_prob=True, mlp_only_layers=[0],
        tie_word_embeddings=True,
    ),
    "olmoe": dict(
        model_type="olmoe", num_hidden_layers=3, num_key_value_heads=3, intermediate_size=14, num_experts=6,
        num_experts_per_tok=3,
    ),
    "deepseek_v3": dict(
        model_type="deepseek_v3", num_hidden_layers=3, num_key_value_heads=6, intermediate_size=26,
        moe_intermediate_size=10, n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2,
        n_shared_experts=2, routed_scaling_factor=1.7, first_k_dense_replace=1, q_lora_rank=20, kv_lora_rank=14,
        qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=10, rope_interleave=True,
        rms_norm_eps=1e-5,  # the latent norms keep eps 1e-6 (as in Moonlight's checkpoints)
    ),
    # YaRN long-context rope (beyond original_max_position_embeddings=16), no q compression,
    # non-interleaved rotary pairs.
    "deepseek_v3_yarn": dict(
        model_type="deepseek_v3", num_hidden_layers=2, num_key_value_heads=6, intermediate_size=26,
        moe_intermediate_size=10, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
        n_shared_experts=1, routed_scaling_factor=2.5, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=14,
        qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=10, rope_interleave=False, rope_scaling=YARN,
    ),
}  # fmt: skip


# transformers 5 defaults to grouped-mm experts, which on CPU need 16-byte-aligned widths; its
# eager per-expert loop is the reference anyway.
EAGER = {"experts_implementation": "eager"} if int(transformers.__version__.split(".")[0]) >= 5 else {}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def build_hf(case: str, seed: int = 0):
    kw = dict(CASES[case])
    model_type = kw.pop("model_type")
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(model_type, **COMMON, **kw)
    config.bos_token_id = config.eos_token_id = config.pad_token_id = None
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32, **EAGER).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.15)
        for name, b in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(-0.1, 0.1)  # nonzero: selection must add it, weights must not
    return hf


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    """(transformers model, moekit model loaded from its ``save_pretrained`` folder, folder)."""
    hf = build_hf(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder, max_shard_size="100KB")  # sharded, with transformers' own index
    assert (folder / "model.safetensors.index.json").exists()
    return hf, from_pretrained(folder), folder


def random_ids(batch: int = 2, t: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, t), generator=torch.Generator().manual_seed(1))


def test_logits_match_transformers(pair):
    hf, model, _ = pair
    ids = random_ids()
    with torch.no_grad():
        assert rel_err(model(ids).logits, hf(ids).logits) <= 1e-4


def test_greedy_generation_matches_transformers(pair):
    hf, model, _ = pair
    ids = random_ids(batch=1, t=8)
    ours = model.generate(ids, max_new_tokens=16)
    theirs = hf.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16, do_sample=False
    )
    assert torch.equal(ours, theirs)


def test_moekit_written_hf_folder_loads_in_transformers(pair, tmp_path):
    hf, model, folder = pair
    model.save_pretrained(tmp_path / "out", format="hf")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32, **EAGER).eval()
    ids = random_ids()
    with torch.no_grad():
        assert rel_err(again(ids).logits, hf(ids).logits) <= 1e-5
    # Same tensor names and shapes as transformers' own save (hub layout).
    theirs, ours = read_tensors(folder, meta=True), read_tensors(tmp_path / "out", meta=True)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_config_round_trip(pair):
    """HF config -> ModelConfig -> HF config -> the same ModelConfig."""
    _, model, _ = pair
    cfg = model.config
    back = config_from_hf(to_hf_config(cfg))
    assert back.to_dict() | {"name": ""} == cfg.to_dict() | {"name": ""}


def test_fused_expert_layout_loads(tmp_path):
    """A raw transformers-5 state_dict (fused gate_up_proj, Mixtral's sparse block named mlp) loads."""
    from safetensors.torch import save_file

    hf = build_hf("mixtral")
    hf.config.save_pretrained(tmp_path)
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in sd)
    save_file(sd, tmp_path / "model.safetensors")
    ids = random_ids()
    with torch.no_grad():
        assert rel_err(from_pretrained(tmp_path)(ids).logits, hf(ids).logits) <= 1e-4
