import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from routelab import FFNExperts, MoE
from routelab.policies import CapacityPolicy
from routelab.routers import TopPGate
from routelab.routers.top_p import router_entropy_loss, top_p_routing
from routelab.testing import RouterContract


class TestTopPGate(RouterContract):
    def make_router(self, d_model, num_experts):
        return TopPGate(d_model, num_experts, p=0.6)


class TestTopPGateAllMass(RouterContract):
    num_experts = 4

    def make_router(self, d_model, num_experts):
        return TopPGate(d_model, num_experts, p=1.0, bias=True, dynamic_weight=0.0)


def paper_top_p(probs: np.ndarray, p: float) -> list[tuple[int, int, float]]:
    """Huang et al. 2024: per token, experts in descending probability until the sum
    reaches p (a plain loop over sorted probabilities)."""
    out = []
    for t, row in enumerate(probs):
        order = sorted(range(len(row)), key=lambda e: (-row[e], e))
        total = 0.0
        for e in order:
            out.append((t, e, float(row[e])))
            total += row[e]
            if total >= p:
                break
    return out


@given(
    T=st.integers(0, 16),
    E=st.integers(1, 9),
    p=st.floats(0.05, 1.0),
    seed=st.integers(0, 1000),
)
def test_top_p_matches_the_papers_loop(T, E, p, seed):
    torch.manual_seed(seed)
    gate = TopPGate(5, E, p=p, bias=True).double()
    x = torch.randn(T, 5, dtype=torch.float64) * 2
    routing = gate(x)
    probs = torch.softmax(x @ gate.proj.weight.T + gate.proj.bias, dim=1).detach().numpy()
    got = sorted(
        zip(routing.token.tolist(), routing.expert.tolist(), routing.weight.detach().tolist())
    )
    expected = sorted(paper_top_p(probs, p))
    assert [g[:2] for g in got] == [e[:2] for e in expected]
    np.testing.assert_allclose([g[2] for g in got], [e[2] for e in expected], atol=1e-12)
    np.testing.assert_allclose(routing.probs.detach().numpy(), probs, atol=1e-12)


def test_entries_are_token_major_in_descending_probability():
    probs = torch.tensor([[0.1, 0.5, 0.4], [0.7, 0.2, 0.1], [0.2, 0.2, 0.6]])
    routing = top_p_routing(probs, 0.8)
    assert routing.token.tolist() == [0, 0, 1, 1, 2, 2]
    # ties (0.2, 0.2) go to the lower expert id
    assert routing.expert.tolist() == [1, 2, 0, 1, 2, 0]
    assert routing.entries_per_token().tolist() == [2, 2, 2]


def test_a_confident_token_takes_one_expert_an_uncertain_one_many():
    probs = torch.tensor([[0.97, 0.01, 0.01, 0.01], [0.25, 0.25, 0.25, 0.25]])
    assert top_p_routing(probs, 0.9).entries_per_token().tolist() == [1, 4]
    assert top_p_routing(probs, 0.2).entries_per_token().tolist() == [1, 1]


@given(T=st.integers(0, 12), E=st.integers(1, 8), seed=st.integers(0, 1000))
def test_dynamic_and_balance_losses_match_their_formulas(T, E, seed):
    torch.manual_seed(seed)
    gate = TopPGate(4, E, p=0.5, dynamic_weight=0.3, balance_weight=0.7).double()
    x = torch.randn(T, 4, dtype=torch.float64)
    routing = gate(x)
    probs = routing.probs.detach().numpy()
    entropy = -sum(q * np.log(q) for row in probs for q in row if q > 0) / T if T else 0.0
    np.testing.assert_allclose(routing.aux["dynamic"].item(), 0.3 * entropy, atol=1e-12)
    load = np.bincount(routing.expert.numpy(), minlength=E)
    n = load.sum()
    balance = E * sum(load[i] / n * probs[:, i].mean() for i in range(E)) if n else 0.0
    np.testing.assert_allclose(routing.aux["balance"].item(), 0.7 * balance, atol=1e-12)


def test_entropy_loss_has_finite_gradients_where_probabilities_underflow():
    logits = torch.tensor([[0.0, -1e4, 3.0]], requires_grad=True)
    loss = router_entropy_loss(torch.softmax(logits, dim=-1))
    loss.backward()
    assert torch.isfinite(loss) and bool(torch.isfinite(logits.grad).all())
    assert float(router_entropy_loss(torch.zeros(0, 3))) == 0.0


def test_the_dynamic_loss_sharpens_the_router():
    torch.manual_seed(0)
    gate = TopPGate(8, 8, p=0.5, dynamic_weight=1.0, balance_weight=0.0)
    x = torch.randn(64, 8)
    opt = torch.optim.SGD(gate.parameters(), lr=0.5)
    before = gate(x).entries_per_token().double().mean()
    for _ in range(30):
        loss = gate(x).aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert gate(x).entries_per_token().double().mean() < before


def test_variable_entries_run_through_capacity_and_experts():
    torch.manual_seed(1)
    gate = TopPGate(6, 5, p=0.7)
    experts = FFNExperts(5, 6, 8)
    layer = MoE(gate, experts, [CapacityPolicy(1.0)])
    x = torch.randn(30, 6)
    out = layer(x)
    routing = out.routing
    assert routing.capacity == -(-(routing.num_entries + routing.dropped.num_entries) // 5)
    routing.validate(capacity=routing.capacity)
    reference = torch.zeros_like(x)  # sum over kept entries of weight * FFN_e(x_t)
    for t, e, w in zip(routing.token.tolist(), routing.expert.tolist(), routing.weight):
        reference[t] += w * experts.expert_forward(e, x[t : t + 1])[0]
    torch.testing.assert_close(out.output, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("p", "error"), [(0.0, ValueError), (1.5, ValueError), (True, TypeError)])
def test_bad_threshold_is_a_clear_error(p, error):
    with pytest.raises(error, match="p"):
        TopPGate(4, 4, p=p)


@given(T=st.integers(1, 12), E=st.integers(1, 8), p=st.floats(0.01, 1.0), seed=st.integers(0, 99))
def test_each_token_keeps_the_smallest_prefix_reaching_p(T, E, p, seed):
    probs = torch.softmax(torch.randn(T, E, generator=torch.Generator().manual_seed(seed)), 1)
    routing = top_p_routing(probs.double(), p)
    for t in range(T):
        weights = routing.weight[routing.token == t]
        assert bool((weights[:-1] >= weights[1:]).all())  # descending
        reached = float(weights.sum()) >= p - 1e-12
        assert reached or weights.numel() == E  # reaches p (or takes every expert)
        assert float(weights[:-1].sum()) < p  # without its last expert it would not
