import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from routelab import FFNExperts, MoE, Routing
from routelab.policies import CapacityPolicy, LossFreeBalancingPolicy
from routelab.routers import SoftmaxGate, SwitchGate, TopKGate
from routelab.routers.topk import topk_softmax_routing
from routelab.testing import check_routing


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
    policy = LossFreeBalancingPolicy(E, k=k, rate=0.01).train()
    gen = torch.Generator().manual_seed(1)
    history = []
    for _ in range(100):
        with torch.no_grad():
            history.append(imbalance(policy(gate(torch.randn(T, d, generator=gen)))))
    first, last = history[0], sum(history[-10:]) / 10
    assert first > 3.0  # experts 0 and 1 take (almost) everything: max/mean near E/k
    assert last < 1.6 and last < first / 2, (first, last)  # 1.25 is the sampling floor
    assert float(policy.bias[:2].max()) < 0 < float(policy.bias[2:].min())


def test_weights_come_from_the_unbiased_scores():
    torch.manual_seed(0)
    gate = TopKGate(6, 7, k=3)
    x = torch.randn(20, 6)
    routing = gate(x)
    policy = LossFreeBalancingPolicy(7, k=3).eval()
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


@given(T=st.integers(0, 30), E=st.integers(1, 8), seed=st.integers(0, 999), data=st.data())
def test_one_training_step_moves_the_bias_by_rate_towards_equal_load(T, E, seed, data):
    k = data.draw(st.integers(1, E))
    torch.manual_seed(seed)
    routing = SoftmaxGate(4, E)(torch.randn(T, 4))
    policy = LossFreeBalancingPolicy(E, k=k, rate=0.125).train()
    start = torch.randn(E)
    policy.bias.copy_(start)
    out = policy(routing)
    check_routing(out, num_tokens=T, num_experts=E, k=k)
    expected = start + 0.125 * torch.sign(T * k / E - out.load().float())
    assert torch.equal(policy.bias, expected)
    policy.eval()(routing)  # evaluation leaves the bias alone
    assert torch.equal(policy.bias, expected)


def test_bias_is_a_buffer_and_gradients_reach_the_router():
    policy = LossFreeBalancingPolicy(4, k=2)
    assert "bias" in dict(policy.named_buffers()) and not list(policy.parameters())
    assert "bias" in policy.state_dict()
    torch.manual_seed(0)
    gate = TopKGate(5, 4, k=2)
    policy(gate(torch.randn(9, 5))).weight.pow(2).sum().backward()
    assert gate.proj.weight.grad.abs().sum() > 0


def test_works_inside_moe_before_a_capacity_policy():
    torch.manual_seed(0)
    policy = LossFreeBalancingPolicy(4, k=1, rate=0.01)
    moe = MoE(SwitchGate(8, 4), FFNExperts(4, 8, 16), policies=[policy, CapacityPolicy(1.5)])
    out = moe(torch.randn(2, 5, 8))
    assert out.output.shape == (2, 5, 8)
    check_routing(out.routing, num_tokens=10, capacity=4)
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
