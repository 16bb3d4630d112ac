import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from routelab import FFNExperts, MoE
from routelab.null_experts import NullExperts
from routelab.routers import MoEPlusPlusGate
from routelab.testing import RouterContract


class TestMoEPlusPlusGate(RouterContract):
    expect = {"k": 2}

    def make_router(self, d_model, num_experts):
        return MoEPlusPlusGate(d_model, num_experts, k=2, num_null=3)


def _topk_softmax(row: np.ndarray, k: int) -> np.ndarray:
    top = sorted(range(len(row)), key=lambda i: (-row[i], i))[:k]
    out = np.zeros_like(row)
    z = sum(np.exp(row[i]) for i in top)
    for i in top:
        out[i] = np.exp(row[i]) / z
    return out


@given(T=st.integers(0, 10), map_residual=st.booleans(), seed=st.integers(0, 1000))
def test_gating_residual_matches_the_papers_formula(T, map_residual, seed):
    torch.manual_seed(seed)
    first = MoEPlusPlusGate(5, 6, k=2, num_null=2).double()
    second = MoEPlusPlusGate(
        5, 6, k=2, num_null=2, residual_from=first, residual_map=map_residual
    ).double()
    x1, x2 = torch.randn(T, 5, dtype=torch.float64), torch.randn(T, 5, dtype=torch.float64)
    first(x1)
    routing = second(x2)
    w1, w2 = first.proj.weight.detach().numpy(), second.proj.weight.detach().numpy()
    r1 = x1.numpy() @ w1.T  # r^{j-1} = x W^{j-1}
    previous = r1 @ second.residual_map.weight.detach().numpy().T if map_residual else r1
    r2 = x2.numpy() @ w2.T + previous  # r^j = x W^j + r^{j-1} W_g
    expected = np.stack([_topk_softmax(row, 2) for row in r2]) if T else np.zeros((0, 6))
    np.testing.assert_allclose(routing.to_dense().detach().numpy(), expected, atol=1e-10)


def test_residual_gradient_reaches_the_previous_gate():
    torch.manual_seed(0)
    first = MoEPlusPlusGate(4, 5, k=2)
    second = MoEPlusPlusGate(4, 5, k=2, residual_from=first)
    x = torch.randn(7, 4)
    first(x)
    routing = second(x)
    (routing.weight * torch.randn(routing.num_entries)).sum().backward()
    assert float(first.proj.weight.grad.abs().sum()) > 0
    assert float(second.residual_map.weight.grad.abs().sum()) > 0
    assert "residual_map.weight" in second.state_dict()
    assert not any(k.startswith("_residual") for k in second.state_dict())


def test_residual_needs_the_previous_layer_to_run_first():
    first = MoEPlusPlusGate(4, 5)
    second = MoEPlusPlusGate(4, 5, residual_from=first)
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="previous"):
        second(x)
    first(x)
    second(x)
    with pytest.raises(RuntimeError, match="previous"):
        second(x)  # stale: layer j-1 has not run again
    first(torch.randn(4, 4))
    with pytest.raises(ValueError, match="tokens"):
        second(x)
    with pytest.raises(ValueError, match="same num_experts"):
        MoEPlusPlusGate(4, 6, residual_from=first, residual_map=False)


def test_heterogeneous_balance_loss_weights_null_experts_by_tau():
    torch.manual_seed(3)
    gate = MoEPlusPlusGate(6, 6, k=2, num_null=2, tau=0.25, balance_weight=1.0)
    routing = gate(torch.randn(40, 6))
    load = routing.load().double().numpy()
    probs = routing.probs.detach().double().numpy()
    eta = np.array([1, 1, 1, 1, 0.25, 0.25])
    expected = 6 * sum(eta[i] * load[i] / load.sum() * probs[:, i].mean() for i in range(6))
    assert routing.aux["balance"].item() == pytest.approx(expected, rel=1e-6)


def test_two_moe_plus_plus_layers_train_end_to_end():
    torch.manual_seed(0)
    first = MoEPlusPlusGate(6, 6, k=2, num_null=2)
    second = MoEPlusPlusGate(6, 6, k=2, num_null=2, residual_from=first)
    layers = [
        MoE(g, NullExperts(FFNExperts(4, 6, 8), num_zero=1, num_copy=1, num_constant=0))
        for g in (first, second)
    ]
    x = torch.randn(20, 6)
    h = layers[0](x)
    out = layers[1](h.output)
    (out.output.square().mean() + h.aux_loss + out.aux_loss).backward()
    assert all(p.grad is not None for p in first.parameters())


def test_deep_moe_links_consecutive_moe_plus_plus_gates():
    from routelab.deep_moe import DeepMoE
    from routelab.routers import TopKGate
    from routelab.routers.moe_plus_plus import link_gating_residuals

    def layer(i):
        gate = MoEPlusPlusGate(8, 6, k=2, num_null=2) if i != 2 else TopKGate(8, 6)
        return MoE(gate, NullExperts(FFNExperts(4, 8, 8), num_constant=0))

    torch.manual_seed(0)
    model = DeepMoE(5, 3, d_model=8, num_experts=6, num_layers=4, make_layer=layer)
    gates = [m.router for m in model.layers]
    assert gates[1].residual_from is gates[0]  # linked
    assert gates[0].residual_from is None and gates[3].residual_from is None  # after top-k
    assert gates[1].residual_map is not None
    out = model(torch.randn(7, 5))
    out.logits.sum().backward()
    assert gates[0].proj.weight.grad is not None
    assert link_gating_residuals(model.layers) == 0  # already linked
    lone = MoEPlusPlusGate(8, 6, gating_residual=False)
    assert link_gating_residuals([gates[0], lone]) == 0
