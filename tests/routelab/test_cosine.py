import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from routelab.routers import CosineTopKGate
from routelab.testing import RouterContract


class TestCosineTopKGate(RouterContract):
    expect = {"k": 2}

    def make_router(self, d_model, num_experts):
        return CosineTopKGate(d_model, num_experts, k=2, d_proj=4)


class TestCosineTop1FixedTemperature(RouterContract):
    expect = {"k": 1}

    def make_router(self, d_model, num_experts):
        return CosineTopKGate(d_model, num_experts, k=1, learn_temperature=False)


def xmoe_reference(x, proj, emb, tau, k):
    """Chi et al. 2022: s_i = (x W . e_i) / (|x W| |e_i| tau), then softmax over the top k
    (plain loops over tokens and experts, numpy)."""
    T, E = x.shape[0], emb.shape[0]
    dense = np.zeros((T, E))
    scores = np.zeros((T, E))
    for t in range(T):
        h = x[t] @ proj
        for i in range(E):
            scores[t, i] = h @ emb[i] / (max(np.linalg.norm(h), 1e-12) * np.linalg.norm(emb[i]))
            scores[t, i] /= tau
        top = sorted(range(E), key=lambda i: (-scores[t, i], i))[:k]
        z = sum(math.exp(scores[t, i]) for i in top)
        for i in top:
            dense[t, i] = math.exp(scores[t, i]) / z
    return scores, dense


@given(T=st.integers(0, 12), E=st.integers(1, 7), seed=st.integers(0, 1000))
def test_cosine_routing_matches_the_papers_formula(T, E, seed):
    torch.manual_seed(seed)
    k = 1 + seed % E
    gate = CosineTopKGate(6, E, k=k, d_proj=3, temperature=0.3).double()
    x = torch.randn(T, 6, dtype=torch.float64)
    routing = gate(x)
    scores, dense = xmoe_reference(
        x.numpy(), gate.proj.detach().numpy(), gate.expert_embeddings.detach().numpy(), 0.3, k
    )
    np.testing.assert_allclose(gate.logits(x).detach().numpy(), scores, atol=1e-10)
    np.testing.assert_allclose(routing.to_dense().detach().numpy(), dense, atol=1e-10)
    routing.validate(k=k)


def test_scores_are_bounded_by_the_inverse_temperature():
    torch.manual_seed(0)
    gate = CosineTopKGate(8, 5, temperature=0.5)
    scores = gate.logits(torch.randn(50, 8) * 1e3)
    assert scores.abs().max().item() <= 2.0 + 1e-5


def test_temperature_and_embeddings_learn():
    torch.manual_seed(0)
    gate = CosineTopKGate(8, 4, k=2)
    routing = gate(torch.randn(16, 8))
    (routing.weight * torch.randn(routing.num_entries)).sum().backward()
    assert gate.log_temperature.grad is not None and gate.log_temperature.grad != 0
    assert float(gate.expert_embeddings.grad.abs().sum()) > 0
    assert float(gate.proj.grad.abs().sum()) > 0


def test_balance_loss_is_the_switch_form_over_the_k_entries():
    torch.manual_seed(2)
    gate = CosineTopKGate(6, 4, k=2, balance_weight=0.5)
    routing = gate(torch.randn(30, 6))
    load = routing.load().double()
    probs = routing.probs.detach().double()
    expected = 0.5 * 4 * float((load / load.sum() * probs.mean(0)).sum())
    assert routing.aux["balance"].item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"d_proj": 0}, ValueError),
        ({"temperature": 0.0}, ValueError),
        ({"temperature": 0.001}, ValueError),  # below min_temperature
        ({"k": 5}, ValueError),
    ],
)
def test_bad_options_are_clear_errors(kwargs, error):
    with pytest.raises(error):
        CosineTopKGate(4, 4, **kwargs)
