"""moekit against transformers for phimoe, granitemoe(shared), dbrx, ernie4_5_moe, minimax_m2, hunyuan_v1_moe.

For each case a tiny random transformers model (odd widths, every option of its type switched on)
is saved with ``save_pretrained`` and loaded by ``moekit.from_pretrained``; in fp32:
- logits equal transformers' (max|a - b| / max|b| <= 1e-5) on a batch of random ids;
- greedy generation with moekit's KV cache gives transformers' 12 tokens, and incremental
  decoding (prefill, a chunk, single tokens) gives the logits of one full forward pass;
- moekit writes the folder back (same tensor names and shapes as transformers' own save) and
  transformers loads it with the same logits; config.json reads back to the same ``ModelConfig``;
- the tensors of transformers 5's in-memory layout (a raw ``state_dict()``) load too;
- a quantised checkpoint is refused with one line naming the quantisation.
Weights are drawn wider than transformers' init (std 0.15) so that logits and routing spread out.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import save_file  # noqa: E402

from moekit.errors import MoekitError  # noqa: E402
from moekit.interop.hf_config import config_from_hf  # noqa: E402
from moekit.interop.hf_export import infer_model_type, to_hf_config  # noqa: E402
from moekit.interop.pretrained import from_pretrained, load_config, read_tensors  # noqa: E402

VOCAB = 89
COMMON = dict(vocab_size=VOCAB, hidden_size=30, num_attention_heads=5, max_position_embeddings=64, rope_theta=5000.0)
CASES = {
    # A loose sparsemixer threshold (2 * 0.3 relative) so that several logits join each softmax.
    "phimoe": dict(
        model_type="phimoe", num_hidden_layers=2, num_key_value_heads=1, intermediate_size=22, num_local_experts=5,
        num_experts_per_tok=2, attention_bias=True, lm_head_bias=True, router_jitter_noise=0.3, rms_norm_eps=1e-5,
    ),
    # LongRoPE (Phi-3.5-MoE's): per-frequency factors; positions run past original_max (16).
    "phimoe_longrope": dict(
        model_type="phimoe", num_hidden_layers=2, num_key_value_heads=5, intermediate_size=14, num_local_experts=4,
        num_experts_per_tok=2, rope_parameters={
            "rope_type": "longrope", "rope_theta": 5000.0, "original_max_position_embeddings": 16,
            "short_factor": [1.0, 1.7, 3.1], "long_factor": [1.2, 2.5, 9.0], "short_mscale": 1.1, "long_mscale": 1.1,
        },
    ),
    # Every multiplier away from 1, attention biases, tied embeddings.
    "granitemoe": dict(
        model_type="granitemoe", num_hidden_layers=2, num_key_value_heads=1, intermediate_size=14,
        num_local_experts=5, num_experts_per_tok=3, attention_bias=True, tie_word_embeddings=True,
        embedding_multiplier=3.0, residual_multiplier=0.7, logits_scaling=2.5, attention_multiplier=0.2,
    ),
    "granitemoeshared": dict(
        model_type="granitemoeshared", num_hidden_layers=2, num_key_value_heads=5, intermediate_size=14,
        num_local_experts=7, num_experts_per_tok=2, shared_intermediate_size=18, embedding_multiplier=2.0,
        residual_multiplier=0.5, logits_scaling=1.5, attention_multiplier=0.3,
    ),
    # Nested config; clip_qkv low enough to clamp some q/k/v entries; rope theta in both places.
    "dbrx": dict(
        model_type="dbrx", d_model=30, n_heads=5, n_layers=2, max_seq_len=64, vocab_size=VOCAB, rope_theta=5000.0,
        attn_config=dict(kv_n_heads=1, clip_qkv=0.9, rope_theta=5000.0),
        ffn_config=dict(ffn_hidden_size=14, moe_num_experts=5, moe_top_k=3, moe_normalize_expert_weights=1.0),
    ),
    "dbrx_unnormalised": dict(
        model_type="dbrx", d_model=30, n_heads=5, n_layers=2, max_seq_len=64, vocab_size=VOCAB, rope_theta=5000.0,
        attn_config=dict(kv_n_heads=5, clip_qkv=100.0, rope_theta=5000.0),  # transformers needs a clip
        ffn_config=dict(ffn_hidden_size=14, moe_num_experts=4, moe_top_k=2, moe_normalize_expert_weights=None),
    ),
    # Dense first layer, MoE every 2nd layer up to 4 (1, 3), two shared experts, biases on attention
    # and on the dense and shared FFNs (use_bias), tied embeddings; a nonzero selection bias.
    "ernie4_5_moe": dict(
        model_type="ernie4_5_moe", num_hidden_layers=6, num_key_value_heads=1, intermediate_size=26,
        moe_intermediate_size=10, moe_num_experts=7, moe_k=3, moe_num_shared_experts=2, moe_layer_start_index=1,
        moe_layer_end_index=4, moe_layer_interval=2, use_bias=True, tie_word_embeddings=True,
    ),
    # q/k norms after rotary, attention biases, per-layer lists (all equal), NTK-alpha rope.
    "hunyuan_v1_moe": dict(
        model_type="hunyuan_v1_moe", num_hidden_layers=2, num_key_value_heads=1, head_dim=8, intermediate_size=14,
        num_experts=7, moe_topk=[3, 3], attention_bias=True,
        rope_parameters={"rope_type": "dynamic", "alpha": 10.0, "factor": 1.0, "rope_theta": 5000.0},
    ),
    # Half the head rotated (rotary_dim 4 of head_dim 8), q/k norms over whole projections,
    # sigmoid routing with a nonzero selection bias.
    "minimax_m2": dict(
        model_type="minimax_m2", num_hidden_layers=2, num_key_value_heads=1, head_dim=8, rotary_dim=4,
        intermediate_size=14, num_local_experts=7, num_experts_per_tok=3,
    ),
}  # fmt: skip

EAGER = {"experts_implementation": "eager"}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def hf_config(case: str):
    kw = dict(CASES[case]) if CASES[case]["model_type"] == "dbrx" else {**COMMON, **CASES[case]}
    model_type = kw.pop("model_type")
    config = transformers.AutoConfig.for_model(model_type, **kw)
    config.bos_token_id = config.eos_token_id = config.pad_token_id = None
    return config


def build_hf(case: str, seed: int = 0):
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config(case), dtype=torch.float32, **EAGER).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(("norm.weight", "layernorm.weight", "norm_1.weight", "norm_2.weight")):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.15)
        for name, b in [*hf.named_buffers(), *hf.named_parameters()]:
            if name.endswith("e_score_correction_bias"):
                b.uniform_(-0.1, 0.1)  # nonzero: selection must add it, weights must not
    return hf


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    """(case, transformers model, moekit model loaded from its ``save_pretrained`` folder, folder)."""
    hf = build_hf(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder, max_shard_size="100KB")
    return request.param, hf, from_pretrained(folder), folder


def random_ids(batch: int = 2, t: int = 21) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, t), generator=torch.Generator().manual_seed(1))


def test_logits_match_transformers(pair):
    _, hf, model, _ = pair
    ids = random_ids()
    with torch.no_grad():
        assert rel_err(model(ids).logits, hf(ids).logits) <= 1e-5


def test_cached_decoding_equals_full_forward_and_greedy_matches_transformers(pair):
    _, hf, model, _ = pair
    ids = random_ids(batch=2, t=30)
    cache = model.new_cache(2, 30)
    with torch.no_grad():
        full = model(ids).logits
        parts, start = [], 0
        for size in [6, 3] + [1] * 21:
            parts.append(model(ids[:, start : start + size], cache=cache).logits)
            start += size
    assert rel_err(torch.cat(parts, dim=1), full) <= 1e-5
    prompt = random_ids(batch=1, t=7)
    ours = model.generate(prompt, max_new_tokens=12)
    theirs = hf.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, min_new_tokens=12, do_sample=False
    )
    assert torch.equal(ours, theirs)


def test_moekit_written_hf_folder_loads_in_transformers(pair, tmp_path):
    case, hf, model, folder = pair
    assert infer_model_type(model.config) == CASES[case]["model_type"]  # what save_pretrained writes
    model.save_pretrained(tmp_path / "out", format="hf")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32, **EAGER).eval()
    ids = random_ids()
    with torch.no_grad():
        assert rel_err(again(ids).logits, hf(ids).logits) <= 1e-5
    theirs, ours = read_tensors(folder, meta=True), read_tensors(tmp_path / "out", meta=True)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_config_round_trip(pair):
    _, _, model, _ = pair
    cfg = model.config
    back = config_from_hf(to_hf_config(cfg))
    assert back.to_dict() | {"name": ""} == cfg.to_dict() | {"name": ""}


def test_in_memory_layout_loads(pair, tmp_path):
    """A raw transformers-5 ``state_dict()`` (fused experts, in-memory module names) loads."""
    _, hf, _, _ = pair
    hf.config.save_pretrained(tmp_path)
    save_file({k: v.clone() for k, v in hf.state_dict().items()}, tmp_path / "model.safetensors")
    ids = random_ids()
    with torch.no_grad():
        assert rel_err(from_pretrained(tmp_path)(ids).logits, hf(ids).logits) <= 1e-5


@pytest.mark.parametrize(
    "quant, name",
    [
        ({"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}, "fp8"),
        ({"quant_method": "mxfp4"}, "mxfp4"),
    ],
)
def test_quantized_checkpoints_are_refused(pair, tmp_path, quant, name):
    _, _, _, folder = pair
    d = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(d, quantization_config=quant)))
    with pytest.raises(MoekitError, match=rf"quantization_config.*{name}") as e:
        from_pretrained(tmp_path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "case, change, match",
    [
        ("phimoe", {"sliding_window": 8}, "'sliding_window' = 8 is not supported"),
        ("dbrx", {"ffn_config": {"moe_normalize_expert_weights": 2.0}}, "moe_normalize_expert_weights' = 2.0"),
        ("dbrx", {"ffn_config": {"ffn_act_fn": {"name": "gelu"}}}, "ffn_act_fn' = 'gelu'"),
        ("ernie4_5_moe", {"moe_norm_min": 0.5}, "'moe_norm_min' = 0.5 is not supported"),
    ],
)
def test_options_moekit_does_not_compute_are_refused(tmp_path, case, change, match):
    d = json.loads(hf_config(case).to_json_string())
    for key, value in change.items():
        d[key] = {**d[key], **value} if isinstance(d.get(key), dict) and key.endswith("_config") else value
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(MoekitError, match=match):
        load_config(tmp_path)


def test_dbrx_hub_config_takes_rope_theta_from_attn_config():
    """Hub DBRX configs have no top-level rope settings; their theta is attn_config.rope_theta."""
    d = dict(CASES["dbrx"], attn_config=dict(kv_n_heads=1, clip_qkv=8.0, rope_theta=5e5))
    assert config_from_hf({k: v for k, v in d.items() if k != "rope_theta"}).attention.rope_theta == 5e5
    assert config_from_hf(d).attention.rope_theta == 5000.0  # transformers 5 writes the top-level one


def test_meta_load_checks_headers_only(pair):
    """``device="meta"``: the rewrites (splits, renames) work on header-only tensors."""
    _, _, model, folder = pair
    meta = from_pretrained(folder, device="meta")
    assert {k: v.shape for k, v in meta.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert all(t.is_meta for t in meta.state_dict().values())


def test_misshapen_fused_tensor_is_named(tmp_path):
    """A DBRX Wqkv of the wrong height is reported under its own file name."""
    hf = build_hf("dbrx")
    hf.save_pretrained(tmp_path)
    tensors = read_tensors(tmp_path)
    name = "transformer.blocks.1.norm_attn_norm.attn.Wqkv.weight"
    tensors[name] = tensors[name][:-2].clone()
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(MoekitError, match=rf"'{name}' has shape \(40, 30\), expected \(42, ...\)") as e:
        from_pretrained(tmp_path)
    assert "\n" not in str(e.value)
