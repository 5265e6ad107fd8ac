"""Generation: cached decoding against full forward passes, padding, sampling, and transformers.

- Incremental decoding with the KV cache gives the logits of one full forward pass over the
  whole sequence (fp32, <= 1e-5 relative) for every loadable model type and the sinks / l2 q/k
  norm configs; a left-padded row gives the logits of the same row alone.
- The cache's bytes per token equal ``moekit.accounting``'s KV-cache figure.
- Greedy generation of 32 tokens matches transformers' ``generate`` on tiny random checkpoints of
  mixtral, qwen2_moe, qwen3_moe, olmoe and deepseek_v3 (odd sizes), one prompt and a left-padded
  batch: teacher-forced logits to 1e-5 and tokens equal wherever transformers' top-2 gap > 1e-4.
- Sampling: top-k / top-p keep exactly the tokens transformers' warpers keep; a seed reproduces.
"""

from __future__ import annotations

import json

import pytest
import torch

from moekit.accounting import kv_cache_bytes_per_token
from moekit.config import AttentionConfig, ConfigError, ModelConfig, MoEConfig
from moekit.interop.hf_config import config_from_hf
from moekit.layers.kv_cache import ModelCache
from moekit.models import MoETransformer
from moekit.models.generation import GenerationConfig, TextStreamer, generate, sample_next
from moekit.models.transformer import ContextLengthError

VOCAB = 101
COMMON = dict(vocab_size=VOCAB, hidden_size=30, max_position_embeddings=96, rope_theta=5000.0)
YARN = {
    "rope_type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 16,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
# Odd head, expert and width counts; dense and MoE layers mixed where the type allows.
HF_CASES = {
    "mixtral": dict(
        model_type="mixtral", num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1,
        intermediate_size=22, num_local_experts=5, num_experts_per_tok=2,
    ),
    "qwen2_moe": dict(
        model_type="qwen2_moe", num_hidden_layers=3, num_attention_heads=3, num_key_value_heads=3,
        intermediate_size=26, moe_intermediate_size=14, shared_expert_intermediate_size=18, num_experts=7,
        num_experts_per_tok=3, decoder_sparse_step=1, mlp_only_layers=[1],
    ),
    "qwen3_moe": dict(
        model_type="qwen3_moe", num_hidden_layers=2, num_attention_heads=5, num_key_value_heads=1, head_dim=6,
        intermediate_size=26, moe_intermediate_size=14, num_experts=7, num_experts_per_tok=3, norm_topk_prob=True,
        tie_word_embeddings=True,
    ),
    "olmoe": dict(
        model_type="olmoe", num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=3, intermediate_size=14,
        num_experts=5, num_experts_per_tok=3,
    ),
    "deepseek_v3": dict(
        model_type="deepseek_v3", num_hidden_layers=3, num_attention_heads=3, num_key_value_heads=3,
        intermediate_size=26, moe_intermediate_size=10, n_routed_experts=8, num_experts_per_tok=3, n_group=4,
        topk_group=2, n_shared_experts=1, routed_scaling_factor=1.7, first_k_dense_replace=1, q_lora_rank=18,
        kv_lora_rank=14, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=10, rope_interleave=True,
    ),
    # Positions run past YaRN's original 16; no q compression; rotary pairs not interleaved.
    "deepseek_v3_yarn": dict(
        model_type="deepseek_v3", num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=3,
        intermediate_size=26, moe_intermediate_size=10, n_routed_experts=6, num_experts_per_tok=2, n_group=2,
        topk_group=1, n_shared_experts=1, routed_scaling_factor=2.5, first_k_dense_replace=1, q_lora_rank=None,
        kv_lora_rank=14, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=10, rope_interleave=False,
        rope_scaling=YARN,
    ),
}  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread():
    """NOTE: one intra-op thread: these are tiny models, and on a busy shared CPU two OpenMP threads
    that spin waiting for each other made this module ~40x slower (as in tests/training)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def moekit_case(name: str) -> ModelConfig:
    """HF cases through moekit's own config reader; plus two configs no HF type loads here."""
    if name in HF_CASES:
        return config_from_hf({**COMMON, **HF_CASES[name]})
    moe = MoEConfig(n_routed_experts=5, top_k=2, expert_ffn_dim=14, n_shared_experts=1, first_k_dense=1)
    if name == "sinks":  # gpt-oss-like: attention sinks, biases, yarn
        att = AttentionConfig(n_heads=6, n_kv_heads=2, head_dim=6, sinks=True, qkv_bias=True, o_bias=True)
        att.rope_scaling = YARN
    else:  # "l2_llama3": Llama-4-like parameter-free q/k norm and llama3 rope scaling
        llama3 = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 16}
        att = AttentionConfig(n_heads=5, n_kv_heads=1, head_dim=8, qk_norm="l2", rope_scaling=llama3)
    return ModelConfig(vocab_size=VOCAB, d_model=30, n_layers=3, dense_ffn_dim=26, attention=att, moe=moe)


ALL_CASES = [*HF_CASES, "sinks", "l2_llama3"]


def random_model(cfg: ModelConfig, seed: int = 0) -> MoETransformer:
    """Weights wider than the default init so that logits spread out."""
    torch.manual_seed(seed)
    model = MoETransformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if name.endswith("norm.weight") else torch.randn_like(p) * 0.15)
        for name, b in model.named_buffers():
            if name.endswith("selection_bias"):
                b.uniform_(-0.1, 0.1)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def incremental_logits(model: MoETransformer, ids: torch.Tensor, chunks: list[int], mask=None) -> torch.Tensor:
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    out, start = [], 0
    with torch.no_grad():
        for i, size in enumerate(chunks):
            m = None if mask is None or i else mask[:, :size]
            out.append(model(ids[:, start : start + size], cache=cache, attention_mask=m).logits)
            start += size
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("case", ALL_CASES)
def test_cached_decoding_equals_full_forward(case):
    """Prefill 7, a chunk of 4, then 29 single tokens: positions 0..39 (past yarn's original 16)."""
    model = random_model(moekit_case(case))
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
    assert rel_err(incremental_logits(model, ids, [7, 4] + [1] * 29), full) <= 1e-5


@pytest.mark.parametrize("case", ["mixtral", "deepseek_v3_yarn", "sinks"])
def test_left_padded_row_equals_the_row_alone(case):
    """Padding takes no position and no attention: a padded row's logits are the unpadded row's."""
    model = random_model(moekit_case(case))
    ids = torch.randint(1, VOCAB, (2, 20), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    ids[0, :5] = 0
    with torch.no_grad():
        alone = model(ids[:1, 5:]).logits[0]
        batch_full = model(ids, attention_mask=mask).logits[0, 5:]
    batch_cached = incremental_logits(model, ids, [9] + [1] * 11, mask)[0, 5:]
    assert rel_err(batch_full, alone) <= 1e-5 and rel_err(batch_cached, alone) <= 1e-5


def test_padding_is_not_routed_or_counted():
    """Padding gets no routed slot; with capacity dropping it takes no capacity from real tokens."""
    cfg = moekit_case("mixtral").replace(
        moe=MoEConfig(n_routed_experts=5, top_k=2, expert_ffn_dim=14, capacity_factor=1.0)
    )
    model = random_model(cfg)
    ids = torch.randint(1, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
    for r in out.routing:
        assert r.counts_E.sum() <= 14 * 2 and not r.keep_TK[:6].any() and not r.chosen_TK[:6].any()
        assert r.capacity == -(-14 * 2 // 5)  # ceil(real tokens * K * cf / E): padding is not counted
        assert (r.weights_TK[:6] == 0).all()


@pytest.mark.parametrize("case", ["mixtral", "deepseek_v3", "qwen3_moe"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_bytes_per_token_equal_accounting(case, dtype):
    cfg = moekit_case(case)
    model = MoETransformer(cfg).to(dtype)
    cache = model.new_cache(2, 8)
    name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    assert cache.bytes_per_token == kv_cache_bytes_per_token(cfg, name)
    storage = sum(
        t.numel() * t.element_size() for layer in cache.layers for t in vars(layer).values() if torch.is_tensor(t)
    )
    assert storage == cache.bytes_per_token * 2 * 8  # batch 2, 8 slots: nothing else is stored


def test_deepseek_v3_cache_is_the_compressed_latent():
    """576 values per token per layer for DeepSeek-V3's shape (not 40,960 for expanded K and V)."""
    att = AttentionConfig(n_heads=128, kind="mla", q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64)
    cfg = ModelConfig(vocab_size=10, d_model=7168, n_layers=1, dense_ffn_dim=8, attention=att)
    assert ModelCache(cfg, 1, 4, torch.bfloat16, "meta").bytes_per_token == 576 * 2


def test_generate_greedy_and_left_padded_batch_equal_one_by_one():
    model = random_model(moekit_case("deepseek_v3"))
    prompts = [torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(n)) for n in (9, 4, 6)]
    alone = [generate(model, p[None], 12, temperature=0.0)[0, len(p) :] for p in prompts]
    ids = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, 9 - len(p) :], mask[i, 9 - len(p) :] = p, 1
    batch = generate(model, ids, 12, temperature=0.0, attention_mask=mask)[:, 9:]
    for i in range(3):
        assert torch.equal(batch[i], alone[i])


def test_eos_stops_rows_and_pads_finished_ones():
    model = random_model(moekit_case("mixtral"))
    ids = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(4))
    free = generate(model, ids, 10, temperature=0.0)
    eos = int(free[0, 5 + 2])  # row 0's third new token
    out = generate(model, ids, 10, temperature=0.0, eos_token_id=[VOCAB + 5, eos], pad_token_id=VOCAB - 1)
    row0 = out[0, 5:].tolist()
    assert row0[: row0.index(eos) + 1] == free[0, 5 : 5 + row0.index(eos) + 1].tolist()
    assert all(t == VOCAB - 1 for t in row0[row0.index(eos) + 1 :])
    if eos not in free[1, 5:].tolist():
        assert out.shape[1] == 15 and torch.equal(out[1], free[1])
    one = generate(model, ids[:1], 10, temperature=0.0, eos_token_id=eos)
    assert one.shape[1] == 5 + row0.index(eos) + 1  # a lone row stops at once


def test_sampling_is_reproducible_with_a_seed_and_greedy_at_top_k_1():
    model = random_model(moekit_case("qwen3_moe"))
    ids = torch.randint(0, VOCAB, (2, 4), generator=torch.Generator().manual_seed(5))
    a = generate(model, ids, 16, temperature=1.3, top_p=0.95, seed=7)
    b = generate(model, ids, 16, temperature=1.3, top_p=0.95, seed=7)
    c = generate(model, ids, 16, temperature=1.3, top_p=0.95, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(generate(model, ids, 8, temperature=1.0, top_k=1, seed=1), generate(model, ids, 8))


def test_top_k_top_p_keep_what_transformers_keeps():
    transformers = pytest.importorskip("transformers")
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(6)) * 3
    for top_k, top_p in [(5, None), (None, 0.8), (None, 0.3), (10, 0.9)]:
        want = logits.clone()
        if top_k:
            want = TopKLogitsWarper(top_k)(None, want)
        if top_p:
            want = TopPLogitsWarper(top_p)(None, want)
        allowed = torch.isfinite(want)
        draws = torch.stack(
            [sample_next(logits, 1.0, top_k, top_p, torch.Generator().manual_seed(s)) for s in range(400)]
        )
        seen = torch.zeros_like(allowed).scatter_(1, draws.t(), True)
        assert not (seen & ~allowed).any()  # never outside transformers' set ...
        assert (seen | ~allowed).all() or top_p == 0.9  # ... and its (likely) members all show up
    assert transformers  # the warpers' reference


def test_top_p_hand_worked():
    """p = (0.5, 0.3, 0.15, 0.05): top_p 0.8 keeps the first two (0.5 + 0.3 reaches 0.8)."""
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    draws = {int(sample_next(logits, 1.0, None, 0.8, torch.Generator().manual_seed(s))) for s in range(200)}
    assert draws == {0, 1}


def test_context_and_setting_errors():
    model = random_model(moekit_case("mixtral"))
    with pytest.raises(ContextLengthError, match="max_seq_len 96"):
        generate(model, torch.zeros(1, 90, dtype=torch.long), 7)
    with pytest.raises(ContextLengthError, match="max_seq_len 96"):
        model(torch.zeros(1, 97, dtype=torch.long))
    with pytest.raises(ConfigError, match="top_p"):
        generate(model, torch.zeros(1, 3, dtype=torch.long), 2, temperature=1.0, top_p=1.5)
    with pytest.raises(ConfigError, match="left-padded"):
        generate(model, torch.ones(1, 3, dtype=torch.long), 2, attention_mask=torch.tensor([[1, 1, 0]]))


def test_generation_config_defaults_and_streamer(tmp_path):
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"do_sample": False, "temperature": 0.6, "eos_token_id": [3, 4], "max_new_tokens": 5})
    )
    gc = GenerationConfig.from_folder(tmp_path)
    assert gc == GenerationConfig(max_new_tokens=5, temperature=0.0, eos_token_id=[3, 4])
    sampled = GenerationConfig.from_dict({"do_sample": True, "top_k": 0, "top_p": 0.9})
    assert (sampled.temperature, sampled.top_k, sampled.top_p) == (1.0, None, 0.9)
    model = random_model(moekit_case("olmoe"))
    model.generation_config = GenerationConfig(max_new_tokens=6)
    ids = torch.randint(0, VOCAB, (1, 3), generator=torch.Generator().manual_seed(9))
    written: list[str] = []
    streamer = TextStreamer(lambda xs: " ".join(map(str, xs)), written.append)
    out = model.generate(ids, streamer=streamer)
    assert out.shape == (1, 9) and "".join(written) == " ".join(map(str, out[0, 3:].tolist()))


# Against transformers ---------------------------------------------------------------------------


def build_hf(case: str, transformers, seed: int = 0):
    kw = dict(HF_CASES[case])
    model_type = kw.pop("model_type")
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(model_type, **COMMON, **kw)
    config.bos_token_id = config.eos_token_id = config.pad_token_id = None
    eager = {"experts_implementation": "eager"} if int(transformers.__version__.split(".")[0]) >= 5 else {}
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32, **eager).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if name.endswith("norm.weight") else torch.randn_like(p) * 0.15)
        for name, b in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(-0.1, 0.1)
    return hf


def hf_greedy(hf, ids, mask, n):
    out = hf.generate(
        ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
        return_dict_in_generate=True, output_logits=True,
    )  # fmt: skip
    return out.sequences[:, ids.shape[1] :], torch.stack(out.logits, dim=1)  # [B, N], [B, N, V]


def teacher_forced(model, ids, mask, tokens_BN):
    """Our logits for each step when fed transformers' tokens: [B, N, V]."""
    cache = model.new_cache(ids.shape[0], ids.shape[1] + tokens_BN.shape[1])
    with torch.no_grad():
        steps = [model(ids, cache=cache, attention_mask=mask).logits[:, -1]]
        for i in range(tokens_BN.shape[1] - 1):
            steps.append(model(tokens_BN[:, i : i + 1], cache=cache).logits[:, -1])
    return torch.stack(steps, dim=1)


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_greedy_32_tokens_match_transformers(case, tmp_path):
    transformers = pytest.importorskip("transformers")
    from moekit.interop.pretrained import from_pretrained

    hf = build_hf(case, transformers)
    hf.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    g = torch.Generator().manual_seed(11)
    lengths = (11, 5, 8)
    ids = torch.zeros(3, 11, dtype=torch.long)
    mask = torch.zeros(3, 11, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, 11 - n :], mask[i, 11 - n :] = torch.randint(1, VOCAB, (n,), generator=g), 1
    for rows in ([0], [0, 1, 2]):  # one prompt, then the left-padded batch
        b_ids, b_mask = ids[rows], mask[rows]
        theirs, their_logits = hf_greedy(hf, b_ids, b_mask, 32)
        ours = generate(model, b_ids, 32, temperature=0.0, attention_mask=b_mask)[:, 11:]
        assert rel_err(teacher_forced(model, b_ids, b_mask, theirs), their_logits) <= 1e-5
        top2 = their_logits.topk(2, dim=-1).values
        gap_BN = top2[..., 0] - top2[..., 1]
        for r in range(len(rows)):
            differ = (ours[r] != theirs[r]).nonzero()
            if len(differ):  # allowed only at a near-tie, after which the sequences part ways
                assert gap_BN[r, differ[0, 0]] <= 1e-4, f"row {r} differs at step {int(differ[0, 0])}"


# On CUDA (bf16) -----------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("case", ALL_CASES)
def test_cuda_bf16_cached_decoding_close_to_full_forward(case):
    """bf16 rounds each step differently from one full pass: agreement to bf16 precision."""
    model = random_model(moekit_case(case)).to("cuda", torch.bfloat16)
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        full = model(ids).logits.float()
    cached = incremental_logits(model, ids, [7, 4] + [1] * 29).float()
    assert cached.dtype == torch.float32 and rel_err(cached, full) <= 3e-2
    assert model.new_cache(1, 4).bytes_per_token == kv_cache_bytes_per_token(model.config, "bf16")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_cuda_bf16_teacher_forced_logits_match_transformers(case, tmp_path):
    transformers = pytest.importorskip("transformers")
    from moekit.interop.pretrained import from_pretrained

    hf = build_hf(case, transformers)
    hf.save_pretrained(tmp_path)
    hf = hf.to("cuda", torch.bfloat16)
    model = from_pretrained(tmp_path, dtype="bfloat16", device="cuda")
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(12)).cuda()
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    theirs, their_logits = hf_greedy(hf, ids, mask, 32)
    ours = teacher_forced(model, ids, mask, theirs)
    assert rel_err(ours.float(), their_logits.float()) <= 5e-2
