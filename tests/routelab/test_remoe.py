import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from routelab.balancing import update_balancing
from routelab.routers import ReMoEGate
from routelab.routers.remoe import SparsityCoefficient, relu_l1_penalty
from routelab.testing import RouterContract


class TestReMoEGate(RouterContract):
    def make_router(self, d_model, num_experts):
        return ReMoEGate(d_model, num_experts, k=2, initial_coefficient=0.5)


class TestReMoEGatePlainL1(RouterContract):
    num_experts = 4

    def make_router(self, d_model, num_experts):
        return ReMoEGate(d_model, num_experts, k=1, load_balanced=False, bias=True)


@given(
    T=st.integers(0, 14),
    E=st.integers(2, 8),
    balanced=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_relu_routing_and_penalty_match_the_papers_formulas(T, E, balanced, seed):
    torch.manual_seed(seed)
    k = 1 + seed % (E - 1)
    gate = ReMoEGate(5, E, k=k, load_balanced=balanced, initial_coefficient=0.25, bias=True)
    gate = gate.double()
    x = torch.randn(T, 5, dtype=torch.float64)
    routing = gate(x)
    w = gate.proj.weight.detach().numpy()
    b = gate.proj.bias.detach().numpy()
    xs = x.numpy()
    gates = [[max(0.0, float(xs[t] @ w[e] + b[e])) for e in range(E)] for t in range(T)]
    entries = sorted((t, e, g) for t in range(T) for e, g in enumerate(gates[t]) if g > 0)
    got = sorted(
        zip(routing.token.tolist(), routing.expert.tolist(), routing.weight.detach().tolist())
    )
    assert [g[:2] for g in got] == [e[:2] for e in entries]
    np.testing.assert_allclose([g[2] for g in got], [e[2] for e in entries], atol=1e-12)
    if balanced:  # L_reg,lb = 1/T sum_t sum_e f_e G_te, f_e = E/(kT) #{t: G_te > 0}
        f = [E / (k * T) * sum(gates[t][e] > 0 for t in range(T)) if T else 0 for e in range(E)]
        penalty = sum(f[e] * gates[t][e] for t in range(T) for e in range(E)) / T if T else 0
    else:  # L_reg = 1/T sum_t ||G_t||_1
        penalty = sum(map(sum, gates)) / T if T else 0.0
    np.testing.assert_allclose(routing.aux["l1"].item(), 0.25 * penalty, atol=1e-12)
    assert routing.probs is None


def test_coefficient_changes_only_in_the_update_step():
    torch.manual_seed(0)
    gate = ReMoEGate(6, 4, k=1, initial_coefficient=1e-3, multiplier=2.0)
    x = torch.randn(20, 6)
    for _ in range(3):
        gate(x)
    assert float(gate.controller.coefficient) == 1e-3
    with torch.no_grad():
        gates = torch.relu(gate.proj(x))
    sparsity = 1 - float((gates > 0).double().mean())
    assert sparsity < 0.75  # denser than the target 1 - 1/4: lambda must grow
    assert update_balancing(gate) == 1
    assert float(gate.controller.coefficient) == pytest.approx(2e-3)
    assert update_balancing(gate) == 0  # nothing observed since
    gate.eval()
    gate(x)
    assert update_balancing(gate) == 0  # eval batches are not observed


def test_coefficient_shrinks_when_sparser_than_the_target_and_holds_at_it():
    controller = SparsityCoefficient(0.5, initial=1.0, multiplier=1.5)
    controller.train()
    controller.observe_gates(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))  # sparsity 0.75 > 0.5
    controller.update()
    assert float(controller.coefficient) == pytest.approx(1 / 1.5)
    controller.observe_gates(torch.tensor([[1.0, 1.0, 0.0, 0.0]]))  # exactly the target
    controller.update()
    assert float(controller.coefficient) == pytest.approx(1 / 1.5)


def test_a_shared_controller_measures_sparsity_over_all_layers():
    torch.manual_seed(0)
    shared = SparsityCoefficient(0.5, initial=1.0, multiplier=2.0)
    first = ReMoEGate(4, 4, k=2, controller=shared)
    second = ReMoEGate(4, 4, k=2, controller=shared)
    with torch.no_grad():
        first.proj.weight.fill_(1.0)  # every gate positive on positive inputs: sparsity 0
        second.proj.weight.fill_(-1.0)  # every gate zero: sparsity 1
    x = torch.rand(5, 4) + 0.1
    first(x)
    second(x)
    model = torch.nn.ModuleList([first, second])
    assert update_balancing(model) == 1  # one controller, updated once
    assert float(shared.coefficient) == 1.0  # sparsity 0.5 over both layers: unchanged
    with pytest.raises(ValueError, match="sparsity"):
        ReMoEGate(4, 4, k=1, controller=shared)


@pytest.mark.slow
def test_training_drives_the_sparsity_to_the_target():
    torch.manual_seed(0)
    E, k = 8, 2
    gate = ReMoEGate(16, E, k=k, initial_coefficient=1e-2, multiplier=1.2)
    target = torch.randn(16, E)
    opt = torch.optim.Adam(gate.parameters(), lr=1e-2)
    per_token = []
    for _ in range(200):
        x = torch.randn(64, 16) + 1.0
        routing = gate(x)
        # a task that wants about half the gates open, against the L1 penalty
        task = (routing.to_dense() - torch.relu(x @ target)).square().mean()
        opt.zero_grad()
        (task + routing.aux_loss).backward()
        opt.step()
        update_balancing(gate)
        per_token.append(float(routing.entries_per_token().double().mean()))
    assert sum(per_token[:10]) / 10 > 2 * k  # dense at the start
    assert abs(sum(per_token[-100:]) / 100 - k) < 0.5  # the target 1 - k/E, on average


def test_penalty_of_an_empty_batch_is_zero():
    assert float(relu_l1_penalty(torch.zeros(0, 4), 2)) == 0.0
    assert float(relu_l1_penalty(torch.zeros(0, 4))) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"k": 4}, ValueError),
        ({"multiplier": 1.0}, ValueError),
        ({"initial_coefficient": 0.0}, ValueError),
        ({"load_balanced": 1}, TypeError),
        ({"controller": object()}, TypeError),
    ],
)
def test_bad_options_are_clear_errors(kwargs, error):
    with pytest.raises(error):
        ReMoEGate(4, 4, **kwargs)
