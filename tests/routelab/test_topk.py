import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from routelab.routers import TopKGate
from routelab.testing import RouterContract


class TestTopKGate(RouterContract):
    expect = {"k": 2}

    def make_router(self, d_model, num_experts):
        return TopKGate(d_model, num_experts, k=2)


class TestTopKGateAllExperts(RouterContract):
    num_experts = 3
    expect = {"k": 3}

    def make_router(self, d_model, num_experts):
        return TopKGate(d_model, num_experts, k=num_experts, bias=False)


@given(T=st.integers(0, 20), E=st.integers(1, 10), data=st.data())
def test_topk_matches_its_formula(T, E, data):
    k = data.draw(st.integers(1, E))
    torch.manual_seed(data.draw(st.integers(0, 1000)))
    gate = TopKGate(5, E, k=k).double()
    x = torch.randn(T, 5, dtype=torch.float64)
    logits = gate.proj(x)
    masked = torch.full_like(logits, float("-inf"))
    idx = logits.topk(k, dim=1).indices
    masked.scatter_(1, idx, logits.gather(1, idx))
    expected = torch.softmax(masked, dim=1)  # softmax(KeepTopK(xW + b, k))
    routing = gate(x)
    torch.testing.assert_close(routing.to_dense(), expected)
    torch.testing.assert_close(routing.probs, torch.softmax(logits, dim=1))


@pytest.mark.parametrize(
    ("k", "error"), [(0, ValueError), (5, ValueError), (2.0, TypeError), (True, TypeError)]
)
def test_bad_k_is_a_clear_error(k, error):
    with pytest.raises(error, match="k"):
        TopKGate(8, 4, k=k)
