import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy.stats import entropy as scipy_entropy

from analysis import (
    LoadCounter,
    LoadStats,
    coefficient_of_variation,
    concat_routings,
    gini,
    importance,
    load_stats,
    normalised_entropy,
)
from routelab import Routing
from routelab.policies import CapacityPolicy
from routelab.testing import routings


def _routing(experts, num_experts, tokens=None, weights=None, probs=None):
    expert = torch.tensor(experts, dtype=torch.int64)
    token = torch.arange(len(experts)) if tokens is None else torch.tensor(tokens)
    weight = torch.ones(len(experts)) if weights is None else torch.tensor(weights)
    num_tokens = int(token.max()) + 1 if len(experts) else 0
    return Routing(token, expert, weight.float(), num_tokens, num_experts, probs=probs)


def test_hand_computed_case():
    # load [3, 1, 0, 0]
    stats = load_stats(_routing([0, 0, 0, 1], 4))
    assert stats.load.tolist() == [3, 1, 0, 0]
    assert stats.cv_load == pytest.approx(math.sqrt(1.5))  # std sqrt(6/4), mean 1
    assert stats.max_over_mean == pytest.approx(3.0)
    assert stats.min_over_mean == 0.0
    assert stats.gini == pytest.approx(20 / 32)  # sum_ij |l_i - l_j| = 20, 2 E sum = 32
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert stats.entropy == pytest.approx(h / math.log(4))
    assert stats.unused_fraction == 0.5
    assert stats.dropped_fraction == 0.0
    assert stats.capacity_utilisation is None
    assert stats.num_tokens == 4 and stats.num_entries == 4 and stats.unrouted_fraction == 0.0


def test_importance_uses_probs_when_present_else_weights():
    probs = torch.tensor([[0.5, 0.5], [0.25, 0.75], [1.0, 0.0]])
    r = _routing([0, 1, 0], 2, weights=[1.0, 1.0, 1.0], probs=probs)
    assert importance(r).tolist() == pytest.approx([1.75, 1.25])
    r = _routing([0, 1, 0, 1], 2, tokens=[0, 0, 1, 2], weights=[0.25, 0.75, 1.0, 0.5])
    assert importance(r).tolist() == pytest.approx([1.25, 1.25])
    stats = load_stats(r)
    assert stats.cv_importance == 0.0
    assert stats.cv_load == 0.0


def test_one_expert():
    stats = load_stats(_routing([0, 0, 0], 1))
    assert stats.cv_load == 0.0 and stats.cv_importance == 0.0
    assert stats.gini == 0.0
    assert stats.entropy == 1.0  # documented convention for E = 1
    assert stats.max_over_mean == 1.0 and stats.min_over_mean == 1.0
    assert stats.unused_fraction == 0.0


def test_all_load_on_one_expert():
    stats = load_stats(_routing([2] * 6, 4))
    assert stats.cv_load == pytest.approx(math.sqrt(3))  # [0,0,6,0]: std 6*sqrt(3)/4, mean 1.5
    assert stats.gini == pytest.approx(0.75)  # (E - 1) / E
    assert stats.entropy == 0.0
    assert stats.max_over_mean == pytest.approx(4.0)
    assert stats.min_over_mean == 0.0
    assert stats.unused_fraction == 0.75


def test_empty_routing():
    empty = Routing(
        torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), torch.zeros(0), 0, 3
    )
    stats = load_stats(empty)
    assert stats.load.tolist() == [0, 0, 0]
    assert stats.cv_load == 0.0 and stats.cv_importance == 0.0 and stats.gini == 0.0
    assert stats.entropy == 1.0
    assert stats.max_over_mean == 1.0 and stats.min_over_mean == 1.0
    assert stats.unused_fraction == 1.0
    assert stats.dropped_fraction == 0.0 and stats.unrouted_fraction == 0.0
    dropped = CapacityPolicy(capacity=2)(empty)
    assert load_stats(dropped).capacity_utilisation == 0.0


def test_dropped_and_capacity_utilisation():
    # 5 tokens to expert 0, 1 token to expert 1; capacity 2 drops 3 entries
    r = CapacityPolicy(capacity=2)(_routing([0, 0, 0, 0, 0, 1], 3))
    stats = load_stats(r)
    assert stats.load.tolist() == [2, 1, 0]
    assert stats.dropped_fraction == pytest.approx(3 / 6)
    assert stats.capacity_utilisation == pytest.approx(3 / (2 * 3))
    assert stats.unrouted_fraction == pytest.approx(3 / 6)
    assert stats.num_dropped == 3


def _reference(load):
    load = np.asarray(load, dtype=np.float64)
    mean = load.mean()
    out = {}
    out["cv"] = 0.0 if mean == 0 else load.std() / mean
    if load.sum() == 0:
        out["gini"], out["entropy"] = 0.0, 1.0
    else:
        xs = np.sort(load)
        n = xs.size
        ranks = np.arange(1, n + 1)
        out["gini"] = (2 * (ranks * xs).sum()) / (n * xs.sum()) - (n + 1) / n
        out["entropy"] = 1.0 if n == 1 else scipy_entropy(load / load.sum()) / np.log(n)
    return out


@given(routing=routings(max_tokens=30, max_experts=9))
def test_metrics_match_an_independent_reference(routing):
    stats = load_stats(routing)
    load = np.bincount(routing.expert.numpy(), minlength=routing.num_experts)
    ref = _reference(load)
    assert stats.load.numpy() == pytest.approx(load)
    assert stats.cv_load == pytest.approx(ref["cv"], abs=1e-9)
    assert stats.gini == pytest.approx(ref["gini"], abs=1e-9)
    assert stats.entropy == pytest.approx(ref["entropy"], abs=1e-9)
    assert stats.unused_fraction == pytest.approx((load == 0).mean())
    imp = np.zeros(routing.num_experts)
    np.add.at(imp, routing.expert.numpy(), routing.weight.double().numpy())
    assert stats.importance.numpy() == pytest.approx(imp)
    assert stats.cv_importance == pytest.approx(_reference(imp)["cv"], abs=1e-9)
    assert 0.0 <= stats.gini < 1.0 and 0.0 <= stats.entropy <= 1.0 + 1e-12


@given(routing=routings(max_tokens=30, max_experts=6), data=st.data())
def test_counter_over_batches_equals_one_concatenated_routing(routing, data):
    cut = data.draw(st.integers(0, routing.num_tokens))
    keep_a = routing.token < cut
    a = routing.select(keep_a)
    a = Routing(a.token, a.expert, a.weight, cut, routing.num_experts)
    b = routing.select(~keep_a)
    b = Routing(b.token - cut, b.expert, b.weight, routing.num_tokens - cut, routing.num_experts)
    counter = LoadCounter(routing.num_experts).update(a).update(b)
    whole, streamed = load_stats(concat_routings([a, b])), counter.stats()
    assert torch.equal(whole.load, streamed.load)
    assert torch.allclose(whole.importance, streamed.importance)
    assert whole.cv_load == pytest.approx(streamed.cv_load)
    merged = LoadStats.merge([load_stats(a), load_stats(b)])
    assert merged.cv_importance == pytest.approx(streamed.cv_importance)
    assert merged.unrouted_fraction == pytest.approx(streamed.unrouted_fraction)


def test_to_dict_is_json_ready():
    import json

    stats = load_stats(CapacityPolicy(capacity=1)(_routing([0, 0, 1], 2)))
    data = json.loads(json.dumps(stats.to_dict()))
    assert data["load"] == [1, 1] and data["dropped_fraction"] == pytest.approx(1 / 3)


def test_bad_input_is_rejected():
    with pytest.raises(TypeError, match="routing"):
        load_stats("not a routing")
    with pytest.raises(ValueError, match="load"):
        LoadStats.from_counts(torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="values"):
        coefficient_of_variation(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="num_experts"):
        LoadCounter(0)
    with pytest.raises(ValueError, match="num_experts"):
        LoadCounter(3).update(_routing([0], 2))
    with pytest.raises(ValueError, match="non-empty"):
        concat_routings([])
    assert gini(torch.tensor([1.0, 1.0])) == 0.0
    assert normalised_entropy(torch.tensor([2.0, 2.0])) == pytest.approx(1.0)


# ---------------------------------------------------------------------- variable compute
@given(routing=routings(max_tokens=20, max_experts=7), data=st.data())
def test_experts_per_token_fields_match_a_count_by_hand(routing, data):
    E, T = routing.num_experts, routing.num_tokens
    null = data.draw(st.lists(st.integers(0, E - 1), max_size=E, unique=True))
    k = data.draw(st.integers(1, 4))
    stats = load_stats(routing, null_experts=null, reference_k=k)
    per_token = [0] * T
    ffn = 0
    for t, e in zip(routing.token.tolist(), routing.expert.tolist()):
        per_token[t] += 1
        ffn += e not in null
    hist = [sum(1 for n in per_token if n == m) for m in range(E + 1)]
    assert stats.experts_per_token_hist.tolist() == hist
    assert stats.experts_per_token_mean == pytest.approx(sum(per_token) / T if T else 0.0)
    assert stats.ffn_entries_per_token == pytest.approx(ffn / T if T else 0.0)
    assert stats.flops_vs_topk == pytest.approx(stats.ffn_entries_per_token / k)
    assert stats.to_dict()["experts_per_token_hist"] == hist
    assert load_stats(routing).flops_vs_topk is None


def test_variable_compute_streams_and_merges_like_the_concatenation():
    torch.manual_seed(0)
    parts = [
        Routing(torch.tensor([0, 0, 1]), torch.tensor([0, 3, 2]), torch.ones(3), 3, 4),
        Routing(torch.tensor([0, 1, 1, 1]), torch.tensor([1, 0, 1, 3]), torch.ones(4), 2, 4),
    ]
    whole = load_stats(concat_routings(parts), null_experts=[3], reference_k=2)
    counter = LoadCounter(4, null_experts=[3], reference_k=2)
    for part in parts:
        counter.update(part)
    merged = LoadStats.merge([load_stats(p, null_experts=[3], reference_k=2) for p in parts])
    for stats in (counter.stats(), merged):
        assert stats.experts_per_token_hist.tolist() == [1, 2, 1, 1, 0]
        assert stats.experts_per_token_mean == whole.experts_per_token_mean == 7 / 5
        assert stats.ffn_entries_per_token == whole.ffn_entries_per_token == 5 / 5
        assert stats.flops_vs_topk == 0.5
    with pytest.raises(ValueError, match="share"):
        LoadStats.merge([load_stats(parts[0]), load_stats(parts[1], reference_k=2)])


def test_variable_compute_arguments_are_checked():
    routing = Routing(torch.tensor([0]), torch.tensor([1]), torch.ones(1), 1, 3)
    with pytest.raises(ValueError, match="null_experts"):
        load_stats(routing, null_experts=[3])
    with pytest.raises(ValueError, match="reference_k"):
        load_stats(routing, reference_k=0)
