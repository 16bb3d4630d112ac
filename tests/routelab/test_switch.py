import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from routelab.losses import router_z_loss, switch_balance_loss
from routelab.policies import CapacityPolicy
from routelab.routers import SwitchGate
from routelab.testing import RouterContract, check_routing


class TestSwitchGate(RouterContract):
    # Switch weights are p_i(x), not summing to 1: no `k` expectation (checked below).
    def make_router(self, d_model, num_experts):
        return SwitchGate(d_model, num_experts, balance_weight=0.01, z_weight=1e-3)


class TestSwitchGateWithJitter(RouterContract):
    num_experts = 5

    def make_router(self, d_model, num_experts):
        router = SwitchGate(d_model, num_experts, jitter=0.1, bias=True)
        assert router.stochastic_in_training
        return router


@given(T=st.integers(0, 30), E=st.integers(1, 8), seed=st.integers(0, 999), train=st.booleans())
def test_one_entry_per_token_weighted_by_its_probability(T, E, seed, train):
    torch.manual_seed(seed)
    gate = SwitchGate(6, E, jitter=0.05).train(train)
    routing = gate(torch.randn(T, 6))
    check_routing(routing, num_tokens=T, num_experts=E)
    assert torch.equal(routing.entries_per_token(), torch.ones(T, dtype=torch.int64))
    assert torch.equal(routing.token, torch.arange(T))
    best, index = routing.probs.max(dim=1)
    assert torch.equal(routing.expert, index)
    assert torch.equal(routing.weight, best)  # the combine weight is p_i(x), not 1
    torch.testing.assert_close(routing.probs.sum(dim=1), torch.ones(T))


def test_balance_loss_is_alpha_when_routing_is_perfectly_uniform():
    # Tokens x and -x through a gate with logits (a, -a): f = P = (1/2, 1/2).
    gate = SwitchGate(1, 2, balance_weight=0.3)
    with torch.no_grad():
        gate.proj.weight.copy_(torch.tensor([[2.0], [-2.0]]))
    x = torch.tensor([[1.0], [-1.0], [0.5], [-0.5]])
    routing = gate(x)
    assert routing.load().tolist() == [2, 2]
    torch.testing.assert_close(routing.aux["balance"], torch.tensor(0.3))
    # and directly: uniform probs, round-robin choices, any E
    for E in (1, 3, 8):
        probs = torch.full((4 * E, E), 1.0 / E, dtype=torch.float64)
        index = torch.arange(4 * E) % E
        torch.testing.assert_close(
            switch_balance_loss(probs, index), torch.tensor(1.0, dtype=torch.float64)
        )


def test_balance_loss_is_e_when_everything_goes_to_one_expert():
    probs = torch.zeros(5, 4, dtype=torch.float64)
    probs[:, 2] = 1
    assert float(switch_balance_loss(probs, torch.full((5,), 2))) == pytest.approx(4.0)


@given(T=st.integers(0, 20), E=st.integers(1, 6), seed=st.integers(0, 999))
def test_aux_losses_match_their_formulas(T, E, seed):
    torch.manual_seed(seed)
    gate = SwitchGate(5, E, balance_weight=0.02, z_weight=0.5, bias=True).double()
    x = torch.randn(T, 5, dtype=torch.float64) * 3
    routing = gate(x)
    logits = gate.proj(x)
    z = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist())
    expected_z = 0.5 * z / T if T else 0.0
    assert routing.aux["z"].item() == pytest.approx(expected_z, rel=1e-9, abs=1e-12)
    probs = torch.softmax(logits, dim=1)
    f = [sum(1 for t in range(T) if int(probs[t].argmax()) == i) / max(T, 1) for i in range(E)]
    P = probs.mean(dim=0).tolist() if T else [0.0] * E
    expected = 0.02 * E * sum(fi * pi for fi, pi in zip(f, P))
    assert routing.aux["balance"].item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_zero_weights_switch_the_losses_off():
    routing = SwitchGate(4, 3, balance_weight=0, z_weight=0)(torch.randn(5, 4))
    assert routing.aux == {}
    assert set(SwitchGate(4, 3, z_weight=1e-3)(torch.randn(5, 4)).aux) == {"balance", "z"}


def test_gradchecks_of_the_switch_losses():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    index = torch.softmax(logits, 1).argmax(1)
    assert torch.autograd.gradcheck(
        lambda v: switch_balance_loss(torch.softmax(v, dim=1), index), (logits,)
    )
    assert torch.autograd.gradcheck(router_z_loss, (logits,))


def test_router_runs_in_fp32_for_half_inputs():
    torch.manual_seed(0)
    gate = SwitchGate(8, 4).to(torch.bfloat16)
    x = torch.randn(10, 8).to(torch.bfloat16)
    routing = gate(x)
    assert routing.probs.dtype == torch.float32 and routing.weight.dtype == torch.float32
    reference = torch.softmax(x.float() @ gate.proj.weight.float().t(), dim=1)
    torch.testing.assert_close(routing.probs, reference)


def test_jitter_only_in_training():
    torch.manual_seed(0)
    gate = SwitchGate(8, 4, jitter=0.2)
    plain = SwitchGate(8, 4)
    plain.load_state_dict(gate.state_dict())
    x = torch.randn(16, 8)
    assert torch.equal(gate.eval()(x).weight, plain.eval()(x).weight)
    torch.manual_seed(1)
    assert not torch.equal(gate.train()(x).probs, plain.train()(x).probs)


def test_gradient_reaches_the_router_through_the_task_loss():
    torch.manual_seed(0)
    gate = SwitchGate(8, 4, balance_weight=0)
    gate(torch.randn(16, 8)).weight.sum().backward()
    assert gate.proj.weight.grad is not None and gate.proj.weight.grad.abs().sum() > 0


@given(T=st.integers(0, 40), factor=st.floats(0.25, 2.0), seed=st.integers(0, 999))
def test_capacity_policy_drops_the_overflow(T, factor, seed):
    torch.manual_seed(seed)
    gate = SwitchGate(6, 4, bias=True)
    with torch.no_grad():
        gate.proj.bias[0] += 2.0  # skew towards expert 0 so something overflows
    routing = gate(torch.randn(T, 6))
    kept = CapacityPolicy(factor)(routing)
    q = Fraction(repr(factor)) * T  # the decimal written, exactly: ceil(q / E)
    capacity = -((-q.numerator) // (q.denominator * 4))
    assert kept.capacity == capacity
    check_routing(kept, capacity=capacity)
    assert kept.num_entries + kept.dropped.num_entries == T
    assert kept.aux.keys() == routing.aux.keys()


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"balance_weight": -1.0}, ValueError),
        ({"z_weight": float("nan")}, ValueError),
        ({"jitter": 1.0}, ValueError),
        ({"jitter": "0.1"}, TypeError),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        SwitchGate(4, 3, **kwargs)
