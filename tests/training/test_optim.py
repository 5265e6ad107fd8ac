"""The training optimiser: fused AdamW where torch has it, equal to the per-parameter loop, and kept
fused when a checkpoint's state (whose param groups carry their own 'fused' flag) is loaded."""

import copy

import pytest
import torch

from moekit.models import MoETransformer
from moekit.training.config import RunConfig, TrainConfig
from moekit.training.optim import build_optimizer, fused_supported, keep_fused


def _steps(model, opt, n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randint(0, model.config.vocab_size, (2, 12), generator=g)
        opt.zero_grad(set_to_none=True)
        model(x, labels=x).loss.backward()
        opt.step()


def test_fused_adamw_equals_the_loop(tiny_model):
    run = RunConfig(tiny_model(), TrainConfig(lr=3e-3, weight_decay=0.1))
    model = MoETransformer(run.model)
    ref = copy.deepcopy(model)
    opt = build_optimizer(model, run)
    assert all(g["fused"] for g in opt.param_groups)
    opt_ref = build_optimizer(ref, run)
    for group in opt_ref.param_groups:
        group["fused"] = None  # the plain per-parameter loop
    _steps(model, opt)
    _steps(ref, opt_ref)
    changed = 0
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, p_ref, rtol=1e-5, atol=1e-6, msg=name)
        changed += not torch.equal(p, MoETransformer(run.model).state_dict()[name])
    assert changed > 0
    # decay on matrices only
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_loaded_state_keeps_the_fused_kernel(tiny_model):
    run = RunConfig(tiny_model(), TrainConfig())
    model = MoETransformer(run.model)
    old = build_optimizer(model, run)
    for group in old.param_groups:
        group["fused"] = None  # as written by a run before the fused optimiser
    _steps(model, old, n=1)
    opt = build_optimizer(model, run)
    opt.load_state_dict(old.state_dict())
    assert not any(g["fused"] for g in opt.param_groups)
    keep_fused(opt)
    assert all(g["fused"] for g in opt.param_groups)
    _steps(model, opt, n=1)  # and it steps


@pytest.mark.parametrize(
    "params, ok",
    [
        ([torch.zeros(2)], True),
        ([torch.zeros(2, dtype=torch.bfloat16)], True),
        ([torch.zeros(2, device="meta")], False),
        ([torch.zeros(2, dtype=torch.int64)], False),
    ],
)
def test_fused_supported(params, ok):
    assert fused_supported(params) is ok
