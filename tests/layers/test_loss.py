"""next_token_loss equals the shifted F.cross_entropy, values and gradients (fp32, bf16, ignored labels)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.layers.loss import next_token_loss


def reference(logits_BTV, labels_BT):
    v = logits_BTV.shape[-1]
    return F.cross_entropy(logits_BTV[:, :-1].reshape(-1, v).float(), labels_BT[:, 1:].reshape(-1), ignore_index=-100)


@settings(max_examples=30, deadline=None)
@given(
    b=st.integers(1, 3),
    t=st.integers(2, 9),
    v=st.integers(2, 40),
    ignore_frac=st.sampled_from([0.0, 0.3, 0.9]),
    seed=st.integers(0, 2**16),
)
def test_equals_shifted_cross_entropy(b, t, v, ignore_frac, seed):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, t, v, generator=g, dtype=torch.float64) * 3).requires_grad_()
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[torch.rand(b, t, generator=g) < ignore_frac] = -100
    labels[0, 1] = 0  # at least one label counts
    ours = next_token_loss(logits, labels)
    (g_ours,) = torch.autograd.grad(ours * 1.7, logits)
    ref = reference(logits.double(), labels)
    (g_ref,) = torch.autograd.grad(ref * 1.7, logits)
    torch.testing.assert_close(ours, ref.to(ours.dtype))
    torch.testing.assert_close(g_ours, g_ref)


def test_bf16_logits_get_bf16_gradient_close_to_fp32():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 50)
    labels = torch.randint(0, 50, (2, 6))
    lb = logits.bfloat16().requires_grad_()
    loss = next_token_loss(lb, labels)
    loss.backward()
    assert loss.dtype == torch.float32 and lb.grad.dtype == torch.bfloat16
    ref_logits = lb.detach().float().requires_grad_()
    ref = reference(ref_logits, labels)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(lb.grad.float(), ref_logits.grad, atol=2e-3, rtol=2e-2)


def test_all_ignored_is_nan_like_cross_entropy_and_bad_shape_is_refused():
    logits = torch.randn(1, 4, 5, requires_grad=True)
    labels = torch.full((1, 4), -100)
    assert torch.isnan(next_token_loss(logits, labels)) and torch.isnan(reference(logits, labels))
    with pytest.raises(ValueError, match="labels must be"):
        next_token_loss(logits, torch.zeros(1, 3, dtype=torch.long))


def test_second_backward_through_a_retained_graph_is_refused_not_wrong():
    logits = torch.randn(1, 4, 5, requires_grad=True)
    loss = next_token_loss(logits, torch.randint(0, 5, (1, 4)))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
