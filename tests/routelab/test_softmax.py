import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from routelab.routers import SoftmaxGate
from routelab.testing import RouterContract


class TestSoftmaxGate(RouterContract):
    expect = {"k": RouterContract.num_experts}  # dense: every expert, weights sum to 1

    def make_router(self, d_model, num_experts):
        return SoftmaxGate(d_model, num_experts, temperature=0.5)


@given(
    T=st.integers(0, 12), E=st.integers(1, 7), temp=st.floats(0.05, 20.0), seed=st.integers(0, 99)
)
def test_softmax_matches_its_formula(T, E, temp, seed):
    torch.manual_seed(seed)
    gate = SoftmaxGate(4, E, temperature=temp).double()
    x = torch.randn(T, 4, dtype=torch.float64)
    expected = torch.softmax(gate.proj(x) / temp, dim=1)
    routing = gate(x)
    assert routing.num_entries == T * E
    torch.testing.assert_close(routing.to_dense(), expected)
    torch.testing.assert_close(routing.probs, expected)


def test_every_entry_is_kept_even_when_a_weight_underflows():
    torch.manual_seed(0)
    gate = SoftmaxGate(3, 5, temperature=1e-3)
    routing = gate(torch.randn(7, 3) * 100)
    assert (routing.weight == 0).any()  # underflowed, but still an entry
    assert routing.num_entries == 7 * 5
    assert torch.equal(routing.entries_per_token(), torch.full((7,), 5))


@pytest.mark.parametrize(
    ("temperature", "error"),
    [
        (0, ValueError),
        (-1.0, ValueError),
        (float("inf"), ValueError),
        (float("nan"), ValueError),
        (1e-40, ValueError),
        (1e-7, ValueError),
        (1e7, ValueError),
        ("1", TypeError),
        (True, TypeError),
    ],
)
def test_bad_temperature_is_a_clear_error(temperature, error):
    with pytest.raises(error, match="temperature"):
        SoftmaxGate(4, 3, temperature=temperature)
