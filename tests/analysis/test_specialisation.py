import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from sklearn.metrics import mutual_info_score, normalized_mutual_info_score

from analysis import (
    coactivation,
    contingency,
    frequency_buckets,
    mutual_information,
    routing_stability,
    shuffled_baseline,
    specialisation,
)
from routelab import Routing
from routelab.testing import routings


def _routing(tokens, experts, num_tokens, num_experts):
    return Routing(
        torch.tensor(tokens, dtype=torch.int64),
        torch.tensor(experts, dtype=torch.int64),
        torch.ones(len(tokens)),
        num_tokens,
        num_experts,
    )


def test_perfect_specialisation():
    r = _routing([0, 1, 2, 3], [0, 0, 1, 1], 4, 2)
    spec = specialisation(r, torch.tensor([0, 0, 1, 1]))
    assert spec.table.tolist() == [[2, 0], [0, 2]]
    assert spec.mutual_information == pytest.approx(math.log(2))
    assert spec.normalised_mi == pytest.approx(1.0)
    assert spec.purity.tolist() == [1.0, 1.0] and spec.mean_purity == 1.0
    assert spec.top_labels == [[(0, 1.0)], [(1, 1.0)]]


def test_no_specialisation():
    r = _routing([0, 1, 2, 3], [0, 1, 0, 1], 4, 2)
    spec = specialisation(r, torch.tensor([0, 0, 1, 1]))
    assert spec.table.tolist() == [[1, 1], [1, 1]]
    assert spec.mutual_information == pytest.approx(0.0, abs=1e-12)
    assert spec.normalised_mi == pytest.approx(0.0, abs=1e-12)
    assert spec.purity.tolist() == [0.5, 0.5]


def test_top_k_tokens_count_once_per_expert_and_unused_experts():
    # token 0 (label 1) goes to experts 0 and 2; expert 1 unused
    r = _routing([0, 0, 1], [0, 2, 0], 2, 3)
    table = contingency(r, torch.tensor([1, 0]), num_labels=3)
    assert table.tolist() == [[1, 1, 0], [0, 0, 0], [0, 1, 0]]
    spec = specialisation(table, top=2)
    assert spec.purity.tolist() == [0.5, 0.0, 1.0]
    assert spec.top_labels[0] == [(0, 0.5), (1, 0.5)] and spec.top_labels[1] == []


@given(routing=routings(max_tokens=30, max_experts=6), data=st.data())
def test_mutual_information_matches_sklearn(routing, data):
    num_labels = data.draw(st.integers(1, 5))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    labels = torch.randint(num_labels, (routing.num_tokens,), generator=gen)
    spec = specialisation(routing, labels, num_labels=num_labels)
    pair_experts = routing.expert.numpy()
    pair_labels = labels[routing.token].numpy()
    if routing.num_entries:
        assert spec.mutual_information == pytest.approx(
            mutual_info_score(pair_experts, pair_labels), abs=1e-9
        )
        if spec.expert_entropy == 0 and spec.label_entropy == 0:
            assert spec.normalised_mi == 0.0  # our convention; sklearn says 1.0 here
        else:
            assert spec.normalised_mi == pytest.approx(
                normalized_mutual_info_score(pair_experts, pair_labels), abs=1e-9
            )
    else:
        assert spec.mutual_information == 0.0 and spec.normalised_mi == 0.0
    assert spec.table.sum() == routing.num_entries


def test_shuffled_baseline_is_near_zero_for_a_specialised_router():
    labels = torch.arange(400) % 4
    r = _routing(list(range(400)), labels.tolist(), 400, 4)
    assert mutual_information(contingency(r, labels)) == pytest.approx(math.log(4))
    assert shuffled_baseline(r, labels, seed=0) < 0.05


def test_coactivation_hand_case():
    first = _routing([0, 0, 1, 2], [0, 1, 1, 0], 3, 2)
    second = _routing([0, 1, 2], [2, 2, 0], 3, 3)
    # token 0: {0,1} x {2}; token 1: {1} x {2}; token 2: {0} x {0}
    assert coactivation(first, second).tolist() == [[1, 0, 1], [0, 0, 2]]
    with pytest.raises(ValueError, match="same tokens"):
        coactivation(first, _routing([0], [0], 1, 3))


def test_routing_stability_hand_case():
    before = _routing([0, 1, 2, 3], [0, 1, 1, 0], 4, 2)
    after = _routing([0, 1, 2, 2], [0, 0, 1, 0], 4, 2)  # tokens 1, 2, 3 changed
    assert routing_stability(before, after) == pytest.approx(0.75)
    assert routing_stability(before, before) == 0.0
    empty = _routing([], [], 0, 2)
    assert routing_stability(empty, empty) == 0.0
    with pytest.raises(ValueError, match="same tokens"):
        routing_stability(before, empty)


def test_frequency_buckets_by_stream_mass():
    counts = torch.tensor([3, 10, 2, 5])  # order by count: ids 1, 3, 0, 2
    # cumulative share before each: id1 0, id3 .5, id0 .75, id2 .9
    assert frequency_buckets(counts, 2).tolist() == [1, 0, 1, 1]
    assert frequency_buckets(counts, 4).tolist() == [3, 0, 3, 2]
    assert frequency_buckets(torch.zeros(3), 2).tolist() == [0, 0, 0]
    b = frequency_buckets(torch.tensor(np.random.default_rng(0).zipf(1.5, 500)), 4)
    assert set(b.tolist()) <= {0, 1, 2, 3}


def test_bad_input():
    r = _routing([0, 1], [0, 1], 2, 2)
    with pytest.raises(ValueError, match="labels"):
        specialisation(r)
    with pytest.raises(ValueError, match="shape"):
        contingency(r, torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="integer"):
        contingency(r, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="num_labels"):
        contingency(r, torch.tensor([0, 5]), num_labels=3)
    with pytest.raises(ValueError, match="table"):
        specialisation(torch.ones(3))
    with pytest.raises(ValueError, match="num_buckets"):
        frequency_buckets(torch.ones(3), 0)
