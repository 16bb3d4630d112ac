"""routelab.losses.expert_load: the fixed-size count that replaces bincount (issue 17)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from routelab.losses import expert_load


@given(
    num_experts=st.integers(1, 12),
    ids=st.lists(st.integers(0, 11), max_size=40),
    rows=st.sampled_from([1, 2]),
)
def test_expert_load_counts_like_a_python_loop(num_experts, ids, rows):
    ids = [i % num_experts for i in ids][: len(ids) // rows * rows]
    want = [0] * num_experts
    for i in ids:  # independent reference: count by hand
        want[i] += 1
    got = expert_load(torch.tensor(ids, dtype=torch.int64).view(rows, -1), num_experts)
    assert got.dtype == torch.int64 and got.shape == (num_experts,)  # fixed size, even T = 0
    assert got.tolist() == want


def test_expert_load_rejects_out_of_range_ids():
    with pytest.raises(RuntimeError, match="out of bounds"):
        expert_load(torch.tensor([0, 3]), 3)
