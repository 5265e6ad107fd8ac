"""Dispatch's pure permutations: sorting by expert and the rank-major -> expert-major reorder."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.layers.dispatch import expert_major_order, inverse_order, sort_by_expert


def test_expert_major_order_hand_worked():
    # 2 source ranks, 2 local experts: rank 0 sends 2 rows to expert 0 and 1 to expert 1,
    # rank 1 sends 0 to expert 0 and 2 to expert 1. Received rank-major: a a b | c c
    counts_RL = torch.tensor([[2, 1], [0, 2]])
    perm = expert_major_order(counts_RL)
    assert perm.tolist() == [0, 1, 2, 3, 4]  # expert 0: rows 0, 1; expert 1: rank 0's row 2, rank 1's 3, 4
    counts_RL = torch.tensor([[1, 2], [2, 0], [0, 1]])  # received: e0 | e1 e1 | e0 e0 | e1
    assert expert_major_order(counts_RL).tolist() == [0, 3, 4, 1, 2, 5]


def test_expert_major_order_empty():
    assert expert_major_order(torch.zeros(3, 2, dtype=torch.long)).tolist() == []


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.data())
def test_expert_major_order_groups_rows_by_expert(n_ranks, n_local, data):
    counts = data.draw(st.lists(st.integers(0, 3), min_size=n_ranks * n_local, max_size=n_ranks * n_local))
    counts_RL = torch.tensor(counts).view(n_ranks, n_local)
    # Label each received row with (expert, source rank, position within its block).
    labels = [(e, r, i) for r in range(n_ranks) for e in range(n_local) for i in range(int(counts_RL[r, e]))]
    perm = expert_major_order(counts_RL)
    reordered = [labels[j] for j in perm.tolist()]
    assert reordered == sorted(labels)  # expert-major, then source rank, order kept within a block
    inv = inverse_order(perm)
    assert torch.equal(perm[inv], torch.arange(len(labels)))


def test_sort_reuses_the_routers_counts():
    idx_TK = torch.tensor([[2, 0], [1, 2], [2, 1]])
    counts = torch.bincount(idx_TK.flatten(), minlength=4)
    d = sort_by_expert(idx_TK, 4, counts_E=counts)
    assert d.counts_E is counts
    assert idx_TK.flatten()[d.order_N].tolist() == [0, 1, 1, 2, 2, 2]
    assert torch.equal(sort_by_expert(idx_TK, 4).counts_E, counts)
