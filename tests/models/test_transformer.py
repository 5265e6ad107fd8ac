"""The decoder-only LM: shapes, loss, causality, placement, tying, latent attention."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moekit.config import AttentionConfig, ModelConfig, MoEConfig
from moekit.models import MoETransformer
from tests.conftest import small_config


def mla_config() -> ModelConfig:
    return ModelConfig(
        vocab_size=61,
        d_model=40,
        n_layers=3,
        attention=AttentionConfig(
            n_heads=4,
            kind="mla",
            q_lora_rank=24,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=6,
            v_head_dim=10,
        ),
        dense_ffn_dim=56,
        moe=MoEConfig(
            n_routed_experts=8,
            top_k=3,
            expert_ffn_dim=12,
            n_shared_experts=1,
            score_func="sigmoid",
            n_group=4,
            topk_group=2,
            selection_bias=True,
            routed_scaling_factor=2.5,
            first_k_dense=1,
        ),
    )


@pytest.mark.parametrize("make", [small_config, mla_config])
def test_forward_shapes_loss_and_routing(make):
    cfg = make()
    model = MoETransformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 11))
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 11, cfg.vocab_size)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    # A freshly initialised model predicts nearly uniformly.
    assert abs(out.loss.item() - math.log(cfg.vocab_size)) < 0.5
    assert out.moe_layer_ids == cfg.moe_layer_ids
    assert len(out.routing) == len(cfg.moe_layer_ids)
    assert all(r.idx_TK.shape == (22, cfg.moe.top_k) for r in out.routing)


@pytest.mark.parametrize("make", [small_config, mla_config])
def test_causal(make):
    cfg = make()
    model = MoETransformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    changed = ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % cfg.vocab_size
    a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_layer_placement_and_dense_model():
    cfg = small_config(first_k_dense=1, moe_every=2)
    model = MoETransformer(cfg)
    assert [b.is_moe for b in model.layers] == [False, True, False]
    dense = MoETransformer(cfg.replace(moe=None))
    assert not any(b.is_moe for b in dense.layers)
    assert dense(torch.randint(0, 97, (1, 5))).routing == []


def test_tied_embeddings_share_storage():
    model = MoETransformer(small_config().replace(tie_embeddings=True))
    assert model.lm_head.weight is model.embed.weight
    untied = MoETransformer(small_config())
    assert model.num_parameters() == untied.num_parameters() - 97 * 32


def test_labels_ignore_index_and_backward():
    cfg = small_config()
    model = MoETransformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    labels = ids.clone()
    labels[:, :5] = -100
    out = model(ids, labels=labels)
    out.loss.backward()
    assert model.embed.weight.grad is not None and torch.isfinite(out.loss)


def test_impls_agree_in_the_model():
    cfg = mla_config()
    model = MoETransformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    fast = model(ids).logits
    model.set_moe_impl("reference")
    torch.testing.assert_close(model(ids).logits, fast, atol=1e-5, rtol=1e-5)


def test_greedy_generate_extends_with_argmax():
    cfg = small_config()
    model = MoETransformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 4))
    out = model.generate(ids, max_new_tokens=3)
    assert out.shape == (1, 7) and torch.equal(out[:, :4], ids)
    assert out[0, 4] == model(ids).logits[0, -1].argmax()


def test_meta_device_instantiation_is_free():
    with torch.device("meta"):
        model = MoETransformer(small_config())
    assert all(p.is_meta for p in model.parameters())
    assert model.num_parameters() == MoETransformer(small_config()).num_parameters()


def test_granite_multipliers_equal_scaled_weights():
    """embedding_multiplier a, residual_multiplier r and logits_divisor c are linear: the same as
    embeddings times a, every branch's output projection times r and the head divided by c."""
    a, r, c = 3.0, 0.6, 2.5
    cfg = small_config(n_shared_experts=1)
    torch.manual_seed(0)
    plain = MoETransformer(cfg).double().eval()
    scaled = MoETransformer(cfg.replace(embedding_multiplier=a, residual_multiplier=r, logits_divisor=c)).double()
    scaled.load_state_dict(plain.state_dict())
    scaled.eval()
    with torch.no_grad():
        plain.embed.weight.mul_(a)
        plain.lm_head.weight.div_(c)
        for name, p in plain.named_parameters():
            if name.endswith(("o_proj.weight", "w2.weight", "experts.w2")):
                p.mul_(r)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    torch.testing.assert_close(scaled(ids).logits, plain(ids).logits, rtol=1e-10, atol=1e-10)


def test_ffn_biases_are_built_and_counted():
    """ERNIE-4.5's use_bias: dense FFN and shared-expert biases exist, start at zero and are counted."""
    from moekit.accounting import count_params

    cfg = small_config(n_shared_experts=2)
    cfg = cfg.replace(dense_ffn_bias=True, moe=dict(cfg.to_dict()["moe"], shared_expert_bias=True))
    model = MoETransformer(cfg)
    dense = next(b for b in model.layers if not b.is_moe).ffn
    shared = next(b for b in model.layers if b.is_moe).ffn.shared_experts
    for ffn in (dense, shared):
        assert all(lin.bias is not None and not lin.bias.any() for lin in (ffn.w1, ffn.w3, ffn.w2))
    assert count_params(cfg).total == model.num_parameters()
