import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.checkpoint import checkpoint

from routelab import FFNExperts, MoE, Routing
from routelab.balancing import update_balancing
from routelab.policies import CapacityPolicy, LossFreeBalancingPolicy
from routelab.routers import BASERouter, ExpertChoiceRouter, SoftmaxGate, SwitchGate, TopKGate
from routelab.routers.topk import topk_softmax_routing
from routelab.testing import PolicyContract, check_routing


def skewed_gate(d, E, k, seed=0):
    torch.manual_seed(seed)
    gate = TopKGate(d, E, k=k)
    with torch.no_grad():
        gate.proj.bias.zero_()
        gate.proj.bias[:2] = 2.0  # experts 0 and 1 are favoured by every token
    return gate


def imbalance(routing):
    load = routing.load().double()
    return float(load.max() / load.mean())


def test_load_imbalance_shrinks_over_steps():
    d, E, k, T = 8, 8, 2, 256
    gate = skewed_gate(d, E, k)
    policy = LossFreeBalancingPolicy(E, rate=0.01).train()
    gen = torch.Generator().manual_seed(1)
    history = []
    for _ in range(100):
        with torch.no_grad():
            history.append(imbalance(policy(gate(torch.randn(T, d, generator=gen)))))
        policy.update()  # the explicit update step
    first, last = history[0], sum(history[-10:]) / 10
    assert first > 3.0  # experts 0 and 1 take (almost) everything: max/mean near E/k
    assert last < 1.6 and last < first / 2, (first, last)  # 1.25 is the sampling floor
    assert float(policy.bias[:2].max()) < 0 < float(policy.bias[2:].min())


def test_forward_never_changes_the_bias():
    gate = skewed_gate(8, 8, 2)
    policy = LossFreeBalancingPolicy(8, rate=0.5).train()
    for _ in range(3):
        policy(gate(torch.randn(32, 8)))
    assert torch.equal(policy.bias, torch.zeros(8))
    assert update_balancing(policy) == 1 and policy.bias.abs().sum() > 0


def test_weights_come_from_the_unbiased_scores():
    torch.manual_seed(0)
    gate = TopKGate(6, 7, k=3)
    x = torch.randn(20, 6)
    routing = gate(x)
    policy = LossFreeBalancingPolicy(7).eval()
    policy.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 5.0, 5.0, 5.0]))  # forces 4, 5, 6
    out = policy(routing)
    check_routing(out, num_tokens=20, num_experts=7, k=3)
    assert torch.equal(out.expert.view(20, 3).sort(dim=1).values, torch.tensor([[4, 5, 6]] * 20))
    probs = routing.probs[:, 4:]
    torch.testing.assert_close(out.to_dense()[:, 4:], probs / probs.sum(dim=1, keepdim=True))
    # the same as softmax over the chosen logits, selected on the biased scores
    logits = gate.proj(x)
    reference = topk_softmax_routing(logits, 3, select_logits=routing.probs + policy.bias)
    torch.testing.assert_close(out.to_dense(), reference.to_dense())


def test_after_switch_the_weight_stays_the_router_probability():
    torch.manual_seed(0)
    gate = SwitchGate(6, 4)
    x = torch.randn(12, 6)
    routing = gate(x)
    policy = LossFreeBalancingPolicy(4)
    policy.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 9.0]))  # every token goes to expert 3
    out = policy(routing)
    assert out.expert.tolist() == [3] * 12
    # independent: Switch's weight is softmax(x W^T)_3, not 1
    expected = torch.softmax(x @ gate.proj.weight.t(), dim=-1)[:, 3]
    torch.testing.assert_close(out.weight, expected)
    assert float(out.weight.detach().max()) < 0.9
    out.weight.sum().backward()  # the task gradient still reaches the router
    assert gate.proj.weight.grad.abs().sum() > 0


def test_k_is_the_routers_and_a_different_k_is_refused():
    routing = TopKGate(4, 6, k=2)(torch.randn(5, 4))
    out = LossFreeBalancingPolicy(6)(routing)
    check_routing(out, k=2)
    assert LossFreeBalancingPolicy(6, k=2)(routing).num_entries == 10
    with pytest.raises(ValueError, match="k = 3 but the router gives 2"):
        LossFreeBalancingPolicy(6, k=3)(routing)


def test_routers_without_a_token_choice_weight_rule_are_refused():
    with pytest.raises(ValueError, match="weight rule"):
        LossFreeBalancingPolicy(4)(BASERouter(4, 4).eval()(torch.randn(6, 4)))
    with pytest.raises(ValueError, match="same number"):
        LossFreeBalancingPolicy(4)(ExpertChoiceRouter(4, 4, capacity_factor=1.0)(torch.randn(9, 4)))


@given(T=st.integers(0, 30), E=st.integers(1, 8), seed=st.integers(0, 999), data=st.data())
def test_one_update_moves_the_bias_by_rate_towards_equal_load(T, E, seed, data):
    torch.manual_seed(seed)
    k = data.draw(st.integers(1, E))
    logits = torch.randn(T, E)
    routing = topk_softmax_routing(logits, k)
    policy = LossFreeBalancingPolicy(E, rate=0.125).train()
    start = torch.randn(E)
    policy.bias.copy_(start)
    micro = data.draw(st.integers(1, 3))  # gradient-accumulation micro-batches
    loads = []
    for _ in range(micro):
        out = policy(routing)
        check_routing(out, num_tokens=T, num_experts=E, k=k)
        loads.append(out.load())
    policy.eval()(routing)  # evaluation is not observed
    policy.train()
    assert torch.equal(policy.bias, start)
    policy.update()
    total = torch.stack(loads).sum(0).double()
    # Wang et al. 2024, Algorithm 1: b_i += u * sign(mean load - load_i)
    expected = [
        float(b) + 0.125 * float(torch.sign(total.mean() - c)) for b, c in zip(start, total)
    ]
    assert policy.bias.tolist() == pytest.approx(expected)


def test_bias_is_a_buffer_and_gradients_reach_the_router():
    policy = LossFreeBalancingPolicy(4, k=2)
    assert "bias" in dict(policy.named_buffers()) and not list(policy.parameters())
    assert "bias" in policy.state_dict()
    torch.manual_seed(0)
    gate = TopKGate(5, 4, k=2)
    policy(gate(torch.randn(9, 5))).weight.pow(2).sum().backward()
    assert gate.proj.weight.grad.abs().sum() > 0


def test_a_non_finite_bias_is_refused_on_load():
    policy = LossFreeBalancingPolicy(3)
    for bad in (float("nan"), float("inf")):
        state = policy.state_dict()
        state["bias"] = torch.tensor([0.0, bad, 0.0])
        with pytest.raises(ValueError, match="bias"):
            policy.load_state_dict(state)
    assert torch.equal(policy.bias, torch.zeros(3))


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpoint_recompute_does_not_count_twice(reentrant):
    torch.manual_seed(0)
    policy = LossFreeBalancingPolicy(4, rate=1.0)
    moe = MoE(TopKGate(6, 4, k=2), FFNExperts(4, 6, 8), policies=[policy])
    x = torch.randn(10, 6, requires_grad=True)
    y = checkpoint(lambda t: moe(t).output, x, use_reentrant=reentrant)
    y.sum().backward()
    assert float(policy.pending_observations) == 1.0
    assert float(policy.pending("load").sum()) == 20.0  # T * k, once


def test_works_inside_moe_before_a_capacity_policy():
    torch.manual_seed(0)
    policy = LossFreeBalancingPolicy(4, rate=0.01)
    moe = MoE(SwitchGate(8, 4), FFNExperts(4, 8, 16), policies=[policy, CapacityPolicy(1.5)])
    out = moe(torch.randn(2, 5, 8))
    assert out.output.shape == (2, 5, 8)
    check_routing(out.routing, num_tokens=10, capacity=4)
    update_balancing(moe)
    assert policy.bias.abs().sum() > 0


def test_bad_input_is_a_clear_error():
    policy = LossFreeBalancingPolicy(3, k=2)
    no_probs = Routing.from_topk(torch.zeros(2, 1, dtype=torch.int64), torch.ones(2, 1), 3)
    with pytest.raises(ValueError, match="probs"):
        policy(no_probs)
    with pytest.raises(ValueError, match="num_experts"):
        policy(SoftmaxGate(4, 5)(torch.randn(3, 4)))
    with pytest.raises(ValueError, match="capacity"):
        policy(CapacityPolicy(1.0)(TopKGate(4, 3)(torch.randn(6, 4))))
    with pytest.raises(TypeError, match="routing"):
        policy(torch.zeros(3))
    with pytest.raises(ValueError, match="k"):
        LossFreeBalancingPolicy(3, k=4)
    with pytest.raises(ValueError, match="rate"):
        LossFreeBalancingPolicy(3, k=1, rate=-1.0)
    for rate in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="rate"):
            LossFreeBalancingPolicy(3, rate=rate)
    with pytest.raises(TypeError, match="rate"):
        LossFreeBalancingPolicy(3, rate="0.1")
    with pytest.raises(TypeError, match="k"):
        LossFreeBalancingPolicy(3, k=2.0)
    with pytest.raises(TypeError, match="num_experts"):
        LossFreeBalancingPolicy(3.0)


class TestLossFreeBalancingContract(PolicyContract):
    def make_policy(self, num_experts):
        return LossFreeBalancingPolicy(num_experts, rate=0.1)

    def make_router(self, d_model, num_experts):
        return TopKGate(d_model, num_experts, k=min(2, num_experts))
