import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from routelab import FFNExperts, MoE, Routing
from routelab.balancing import update_balancing
from routelab.policies import CapacityPolicy, PausingPolicy
from routelab.routers import SoftmaxGate, SwitchGate
from routelab.routers.topk import topk_softmax_routing
from routelab.testing import PolicyContract, check_routing, routings


def _topk(logits, k):
    return topk_softmax_routing(torch.as_tensor(logits, dtype=torch.float64), k)


def _paused_reference(totals, margin):
    """Eigen et al. 2013: an expert is paused when its running total assignment exceeds
    the mean of all experts' totals by more than the margin m (plain Python)."""
    mean = sum(totals) / len(totals)
    return [t - mean > margin for t in totals]


@given(data=st.data())
def test_never_routes_to_a_paused_expert_and_top_k_is_the_top_k_of_the_unpaused(data):
    E = data.draw(st.integers(2, 7))
    T = data.draw(st.integers(0, 20))
    k = data.draw(st.integers(1, E))
    margin = data.draw(st.sampled_from([0.0, 0.5, 3.0]))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    policy = PausingPolicy(E, margin=margin)
    totals = torch.randint(0, 50, (E,), generator=gen).double()
    policy.totals.copy_(totals)
    paused = policy.paused_experts().clone()
    assert paused.tolist() == _paused_reference(totals.tolist(), margin)
    assert not bool(paused.all())  # some expert is always at or below the mean
    logits = torch.randn(T, E, generator=gen, dtype=torch.float64)
    out = policy(_topk(logits, k))
    check_routing(out, num_tokens=T, num_experts=E)
    assert not bool(paused[out.expert].any())
    # independent: top-min(k, free) over the unpaused experts, softmax over those chosen
    free = int((~paused).sum())
    masked = logits.masked_fill(paused, float("-inf"))
    ref = _topk(masked, min(k, free)) if T else None
    if T:
        torch.testing.assert_close(out.to_dense(), ref.to_dense())
    assert bool((out.entries_per_token() == min(k, free)).all())


def test_dense_softmax_weights_still_sum_to_one():
    torch.manual_seed(0)
    gate = SoftmaxGate(6, 5)
    x = torch.randn(40, 6)
    routing = gate(x)
    policy = PausingPolicy(5, margin=0.0)
    policy.totals.copy_(torch.tensor([10.0, 0.0, 9.0, 1.0, 0.0]))  # mean 4: 0 and 2 paused
    out = policy(routing)
    check_routing(out, num_tokens=40, k=3)  # three experts per token, weights sum to 1
    # paused experts leave the softmax's normalisation: softmax over experts 1, 3, 4
    logits = gate.proj(x)[:, [1, 3, 4]]
    torch.testing.assert_close(out.to_dense()[:, [1, 3, 4]], torch.softmax(logits, dim=-1))
    assert out.dropped.num_entries == 80


def test_switch_reroute_takes_the_new_experts_probability():
    torch.manual_seed(0)
    gate = SwitchGate(6, 4)
    routing = gate(torch.randn(12, 6))
    policy = PausingPolicy(4, margin=0.0)
    policy.totals.copy_(torch.tensor([100.0, 100.0, 100.0, 0.0]))
    out = policy(routing)
    # every token now on its best unpaused expert; Switch's weight is that expert's p,
    # not renormalised to 1
    assert out.expert.tolist() == [3] * 12
    torch.testing.assert_close(out.weight, routing.probs[:, 3])
    assert float(out.weight.detach().max()) < 1.0


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
    # the totals move only in the update step, by the assigned mass (gate values)
    assert torch.equal(policy.totals, totals.double())
    policy.update()
    mass = torch.zeros(E, dtype=torch.float64).index_add(0, out.expert, out.weight.double())
    torch.testing.assert_close(policy.totals, totals.double() + mass)


def test_an_expert_is_paused_then_released():
    policy = PausingPolicy(2, margin=0.0)
    logits = torch.tensor([[2.0, 0.0]] * 4)  # every token prefers expert 0
    first = policy(_topk(logits, 1))
    assert first.expert.tolist() == [0, 0, 0, 0]
    policy.update()
    assert policy.totals.tolist() == [4.0, 0.0]
    second = policy(_topk(logits, 1))  # 4 - mean 2 > 0: expert 0 paused, re-routed to 1
    assert policy.paused.tolist() == [True, False]
    assert second.expert.tolist() == [1, 1, 1, 1] and second.weight.tolist() == [1.0] * 4
    policy.update()
    assert policy.totals.tolist() == [4.0, 4.0]
    third = policy(_topk(logits, 1))  # 4 - mean 4 = 0: released
    assert policy.paused.tolist() == [False, False]
    assert third.expert.tolist() == [0, 0, 0, 0]


def test_the_margin_is_in_units_of_gate_mass():
    policy = PausingPolicy(3, margin=2.0)
    policy.totals.copy_(torch.tensor([5.0, 2.0, 2.0]))  # mean 3: excess 2, not above
    assert policy.paused.tolist() == [False, False, False]
    policy.totals.copy_(torch.tensor([5.5, 2.0, 2.0]))  # mean 3.1667: excess 2.33
    assert policy.paused.tolist() == [True, False, False]
    assert PausingPolicy(3, margin=float("inf")).paused.tolist() == [False] * 3


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


def test_moe_training_loop_balances_a_skewed_gate():
    torch.manual_seed(0)
    gate = SoftmaxGate(6, 4)
    with torch.no_grad():
        gate.proj.bias.copy_(torch.tensor([3.0, 0.0, 0.0, 0.0]))
    policy = PausingPolicy(4, margin=1.0)
    moe = MoE(gate, FFNExperts(4, 6, 8), policies=[policy])
    for step in range(20):
        with torch.no_grad():
            moe(torch.randn(16, 6, generator=torch.Generator().manual_seed(step)))
        update_balancing(moe)
    totals = policy.totals
    assert float(totals.max() - totals.mean()) <= 1.0 + 16.0  # within one batch of the margin
    assert float(totals.sum()) == pytest.approx(20 * 16.0)  # every token's mass is 1


def test_bad_arguments():
    with pytest.raises(ValueError, match="margin"):
        PausingPolicy(3, margin=-1)
    with pytest.raises(ValueError, match="margin"):
        PausingPolicy(3, margin=float("nan"))
    with pytest.raises(ValueError, match="num_experts"):
        PausingPolicy(0)
    with pytest.raises(TypeError, match="num_experts"):
        PausingPolicy(3.0)
    with pytest.raises(TypeError, match="reroute"):
        PausingPolicy(3, reroute=1)
    with pytest.raises(TypeError, match="margin"):
        PausingPolicy(3, margin="0.1")
    with pytest.raises(ValueError, match="num_experts"):
        PausingPolicy(3)(_topk(torch.zeros(2, 4), 1))
    with pytest.raises(TypeError, match="Routing"):
        PausingPolicy(3)("routing")
    assert isinstance(PausingPolicy(2)(_topk(torch.zeros(0, 2), 1)), Routing)
    state = PausingPolicy(3).state_dict()
    state["totals"] = torch.tensor([1.0, float("nan"), 0.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="totals"):
        PausingPolicy(3).load_state_dict(state)


class TestPausingContract(PolicyContract):
    def make_policy(self, num_experts):
        return PausingPolicy(num_experts, margin=0.5)


class TestPausingDenseContract(PolicyContract):
    def make_policy(self, num_experts):
        return PausingPolicy(num_experts, margin=0.0, reroute=False)

    def make_router(self, d_model, num_experts):
        return SoftmaxGate(d_model, num_experts)


@given(data=st.data())
def test_a_normalised_gate_keeps_weights_summing_to_one(data):
    E = data.draw(st.integers(2, 6))
    T = data.draw(st.integers(1, 15))
    k = data.draw(st.integers(1, E))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    routing = _topk(torch.randn(T, E, generator=gen), k)
    dense = data.draw(st.booleans())
    if dense:
        routing = SoftmaxGate(3, E).double()(torch.randn(T, 3, generator=gen, dtype=torch.float64))
    reroute = data.draw(st.booleans())
    policy = PausingPolicy(E, margin=0.0, reroute=reroute)
    policy.totals.copy_(torch.randint(0, 9, (E,), generator=gen).double())
    out = policy(routing)
    sums = torch.zeros(T, dtype=torch.float64).index_add(0, out.token, out.weight.double())
    has = out.entries_per_token() > 0
    torch.testing.assert_close(sums[has], torch.ones_like(sums[has]))
    if dense or reroute:  # some expert is always unpaused: a dense gate keeps it, and a
        assert bool(has.all())  # re-routed token finds it
