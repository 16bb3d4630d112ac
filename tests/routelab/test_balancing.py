"""routelab.balancing: the explicit, all-reduced, recompute-safe update step."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.checkpoint import checkpoint

from routelab.balancing import SelectionBias, update_balancing
from routelab.routers.topk import TopKSelection
from tests.routelab._dist_workers import run_group


def test_selection_is_top_k_of_the_biased_scores_and_is_observed():
    bias = SelectionBias(4, rate=0.5)
    bias.bias.copy_(torch.tensor([0.0, 0.0, 1.0, 0.0]))
    scores = torch.tensor([[0.9, 0.5, 0.1, 0.2], [0.1, 0.8, 0.3, 0.7]])
    biased = bias.biased(scores)  # s + b = [.9 .5 1.1 .2], [.1 .8 1.3 .7]
    torch.testing.assert_close(biased, scores + torch.tensor([0.0, 0.0, 1.0, 0.0]))
    chosen = TopKSelection(2).select_scores(scores, selection_bias=bias).indices
    assert chosen.tolist() == [[2, 0], [2, 1]]
    assert bias.pending("load").tolist() == [1.0, 1.0, 2.0, 0.0]
    assert torch.equal(bias.bias, torch.tensor([0.0, 0.0, 1.0, 0.0]))  # forward: no change
    bias.update()
    # mean load 1: expert 2 over (-0.5), expert 3 under (+0.5), 0 and 1 at the mean
    assert bias.bias.tolist() == [0.0, 0.0, 0.5, 0.5]
    assert bias.pending("load").tolist() == [0.0] * 4


@given(
    E=st.integers(1, 7),
    batches=st.lists(st.lists(st.integers(0, 6), min_size=0, max_size=12), max_size=4),
    rate=st.sampled_from([0.0, 1e-3, 0.25]),
)
def test_update_is_the_papers_rule_on_the_summed_loads(E, batches, rate):
    bias = SelectionBias(E, rate=rate)
    start = torch.randn(E, generator=torch.Generator().manual_seed(E))
    bias.bias.copy_(start)
    counts = [0] * E
    for ids in batches:
        ids = [i % E for i in ids]
        bias.observe_selection(torch.tensor(ids, dtype=torch.int64))
        for i in ids:
            counts[i] += 1
    applied = bias.update()
    assert applied == bool(batches)
    mean = sum(counts) / E
    sign = [(mean > c) - (mean < c) for c in counts]  # plain Python sign(mean - load)
    expected = [float(b) + (rate * s if batches else 0.0) for b, s in zip(start, sign)]
    assert bias.bias.tolist() == pytest.approx(expected, abs=1e-6)


def test_eval_and_backward_recompute_are_not_observed():
    bias = SelectionBias(3).eval()
    assert not bias.observe_selection(torch.tensor([0, 1]))
    bias.train()
    w = torch.randn(4, 3, requires_grad=True)

    def forward(x):
        scores = x @ w
        bias.observe_selection(torch.topk(bias.biased(scores), 1).indices)
        return scores

    for reentrant in (True, False):
        bias.pending("load").zero_()
        bias.pending_observations.zero_()
        x = torch.randn(5, 4, requires_grad=True)
        checkpoint(forward, x, use_reentrant=reentrant).sum().backward()
        assert float(bias.pending_observations) == 1.0
        assert float(bias.pending("load").sum()) == 5.0


def test_non_finite_state_is_refused_on_load():
    bias = SelectionBias(3)
    for key in ("bias", "pending_load", "pending_observations"):
        state = bias.state_dict()
        state[key] = torch.full_like(state[key], float("nan"))
        with pytest.raises(ValueError, match=key):
            bias.load_state_dict(state)
    state = bias.state_dict()
    state["bias"] = torch.tensor([0.5, -0.5, 0.0])
    bias.load_state_dict(state)
    assert bias.bias.tolist() == [0.5, -0.5, 0.0]


def test_bad_arguments():
    with pytest.raises(ValueError, match="rate"):
        SelectionBias(3, rate=-1e-3)
    with pytest.raises(ValueError, match="rate"):
        SelectionBias(3, rate=float("nan"))
    with pytest.raises(TypeError, match="rate"):
        SelectionBias(3, rate=None)
    with pytest.raises(ValueError, match="num_experts"):
        SelectionBias(0)
    with pytest.raises(TypeError, match="num_experts"):
        SelectionBias(True)
    bias = SelectionBias(3)
    with pytest.raises(ValueError, match="out of range"):
        bias.observe_selection(torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="out of range"):
        bias.observe_selection(torch.tensor([-1]))
    with pytest.raises(TypeError, match="integer"):
        bias.observe_selection(torch.tensor([0.0]))
    with pytest.raises(ValueError, match="shape"):
        bias.observe_load(torch.ones(4))
    with pytest.raises(ValueError, match="last dimension"):
        bias.biased(torch.zeros(2, 4))
    with pytest.raises(TypeError, match="module"):
        update_balancing("model")
    assert bias.observe_selection(torch.zeros(0, dtype=torch.int64))  # empty batch counts


@pytest.mark.slow
def test_ranks_hold_the_same_state_and_it_is_the_all_reduced_update():
    steps = 4
    outcomes = run_group("balancing_state", 2, config={"steps": steps}, deadline_s=120)
    for o in outcomes:
        assert o.exitcode == 0 and o.error is None, o.error
    a, b = (o.result for o in outcomes)
    assert torch.equal(a["bias"], b["bias"]) and torch.equal(a["totals"], b["totals"])
    assert a["observations"] == b["observations"] == 0.0  # cleared by the update
    # the ranks saw different loads, so a local update would have made them differ
    assert not torch.equal(a["loads"], b["loads"])
    # independent recomputation of the update from both ranks' loads and masses
    bias = torch.zeros(4, dtype=torch.float64)
    totals = torch.zeros(4, dtype=torch.float64)
    for step in range(steps):
        load = a["loads"][step] + b["loads"][step]
        bias += 0.25 * torch.sign(load.mean() - load)
        totals += a["masses"][step] + b["masses"][step]
        # each micro-batch observed once although one of them was recomputed in backward
        assert float(a["loads"][step].sum()) == 2 * 2 * (6 + step)  # 2 micro-batches * T * k
    torch.testing.assert_close(a["bias"].double(), bias)
    torch.testing.assert_close(a["totals"], totals)


def test_casting_the_model_keeps_the_state_exact():
    from routelab import FFNExperts, MoE
    from routelab.policies import LossFreeBalancingPolicy, PausingPolicy
    from routelab.routers import TopKGate

    bias, pausing = LossFreeBalancingPolicy(4), PausingPolicy(4)
    moe = MoE(TopKGate(6, 4, k=2), FFNExperts(4, 6, 8), policies=[bias, pausing])
    bias.pending("load").fill_(1001.0)  # not representable in bf16 (8 bits of mantissa)
    bias.bias.fill_(0.123)
    pausing.totals.fill_(4097.0)
    moe = moe.to(torch.bfloat16)
    assert moe.router.proj.weight.dtype == torch.bfloat16  # the model was cast ...
    assert bias.pending("load").dtype == torch.float64  # ... its balancing state was not
    assert bias.pending("load").tolist() == [1001.0] * 4
    assert bias.bias.dtype == torch.float32 and bias.bias.tolist() == pytest.approx([0.123] * 4)
    assert pausing.totals.tolist() == [4097.0] * 4
    moe.double()
    assert bias.bias.dtype == torch.float32 and pausing.totals.dtype == torch.float64
