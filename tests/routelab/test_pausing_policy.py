import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from routelab import Routing
from routelab.policies import CapacityPolicy, PausingPolicy
from routelab.routers.topk import topk_softmax_routing
from routelab.testing import check_routing, routings


def _topk(logits, k):
    return topk_softmax_routing(torch.as_tensor(logits, dtype=torch.float64), k)


@given(data=st.data())
def test_never_routes_to_a_paused_expert(data):
    E = data.draw(st.integers(2, 7))
    T = data.draw(st.integers(0, 20))
    k = data.draw(st.integers(1, E))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    policy = PausingPolicy(E, margin=data.draw(st.sampled_from([0.0, 0.1, 0.5])))
    totals = torch.randint(0, 50, (E,), generator=gen).double()
    policy.totals.copy_(totals)
    paused = policy.paused_experts().clone()
    assert not bool(paused.all())  # some expert is always at or below the mean
    routing = _topk(torch.randn(T, E, generator=gen), k)
    out = policy(routing)
    check_routing(out, num_tokens=T, num_experts=E)
    assert not bool(paused[out.expert].any())
    assert torch.equal(policy.paused, paused)
    # re-routing: a token keeps min(k, free experts) entries and its weights
    free = int((~paused).sum())
    assert bool((out.entries_per_token() == min(k, free)).all())
    moved = out.num_entries + (0 if out.dropped is None else out.dropped.num_entries)
    assert moved == routing.num_entries
    # the running totals grew by exactly what was kept
    assert torch.equal(policy.totals, totals + out.load().double())


@given(routing=routings(max_tokens=20, max_experts=6), data=st.data())
def test_without_probs_paused_entries_are_dropped(routing, data):
    E = routing.num_experts
    policy = PausingPolicy(E, margin=0.0)
    totals = torch.tensor(data.draw(st.lists(st.integers(0, 9), min_size=E, max_size=E)))
    policy.totals.copy_(totals.double())
    paused = policy.paused_experts().clone()
    out = policy(routing)
    assert not bool(paused[out.expert].any())
    hit = paused[routing.expert]
    assert out.num_entries == int((~hit).sum())
    if bool(hit.any()):
        assert out.dropped.num_entries == int(hit.sum())
        assert bool(paused[out.dropped.expert].all())
    assert torch.equal(policy.totals, totals.double() + out.load().double())


def test_an_expert_is_paused_then_released():
    policy = PausingPolicy(2, margin=0.0)
    # every token prefers expert 0
    logits = torch.tensor([[2.0, 0.0]] * 4)
    first = policy(_topk(logits, 1))
    assert first.expert.tolist() == [0, 0, 0, 0]
    assert policy.totals.tolist() == [4.0, 0.0]
    second = policy(_topk(logits, 1))  # 4 > mean 2: expert 0 paused, re-routed to 1
    assert policy.paused.tolist() == [True, False]
    assert second.expert.tolist() == [1, 1, 1, 1] and second.weight.tolist() == [1.0] * 4
    assert policy.totals.tolist() == [4.0, 4.0]
    third = policy(_topk(logits, 1))  # 4 <= mean 4: released
    assert policy.paused.tolist() == [False, False]
    assert third.expert.tolist() == [0, 0, 0, 0]


def test_eval_passes_through_and_composes_with_capacity():
    policy = PausingPolicy(2, margin=0.0)
    policy.totals.copy_(torch.tensor([10.0, 0.0]))
    routing = _topk(torch.tensor([[2.0, 0.0]] * 3), 1)
    policy.eval()
    assert policy(routing) is routing
    policy.train()
    no_reroute = PausingPolicy(2, margin=0.0, reroute=False)
    no_reroute.totals.copy_(torch.tensor([10.0, 0.0]))
    out = no_reroute(CapacityPolicy(capacity=2)(routing))
    assert out.num_entries == 0
    assert out.dropped.num_entries == 3 and out.capacity == 2


def test_bad_arguments():
    with pytest.raises(ValueError, match="margin"):
        PausingPolicy(3, margin=-1)
    with pytest.raises(ValueError, match="num_experts"):
        PausingPolicy(0)
    with pytest.raises(ValueError, match="num_experts"):
        PausingPolicy(3)(_topk(torch.zeros(2, 4), 1))
    with pytest.raises(TypeError, match="Routing"):
        PausingPolicy(3)("routing")
    assert isinstance(PausingPolicy(2)(_topk(torch.zeros(0, 2), 1)), Routing)
