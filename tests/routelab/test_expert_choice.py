from fractions import Fraction

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from routelab.routers import ExpertChoiceRouter
from routelab.testing import RouterContract, check_routing


class TestExpertChoiceRouter(RouterContract):
    def make_router(self, d_model, num_experts):
        return ExpertChoiceRouter(d_model, num_experts, capacity_factor=2.0)

    def expectations(self, router, x):
        c = router.capacity_for(x.shape[0])
        return {"capacity": c, "balanced": torch.full((self.num_experts,), c)}


class TestExpertChoiceRouterSmallFactor(TestExpertChoiceRouter):
    num_experts = 7

    def make_router(self, d_model, num_experts):
        return ExpertChoiceRouter(d_model, num_experts, capacity_factor=0.3, bias=False)


@given(
    T=st.integers(0, 40), E=st.integers(1, 9), factor=st.floats(0.1, 12.0), seed=st.integers(0, 999)
)
def test_every_expert_gets_exactly_its_capacity(T, E, factor, seed):
    torch.manual_seed(seed)
    router = ExpertChoiceRouter(5, E, capacity_factor=factor)
    routing = router(torch.randn(T, 5))
    q = Fraction(repr(factor)) * T  # the decimal written, exactly
    c = min(T, -((-q.numerator) // (q.denominator * E)))
    assert router.capacity_for(T) == c and routing.capacity == c
    check_routing(routing, num_tokens=T, capacity=c, balanced=torch.full((E,), c))
    assert routing.num_entries == E * c


@given(T=st.integers(0, 12), E=st.integers(1, 6), seed=st.integers(0, 999))
def test_each_expert_takes_its_top_c_tokens_by_affinity(T, E, seed):
    torch.manual_seed(seed)
    router = ExpertChoiceRouter(3, E, capacity_factor=1.5).double()
    x = torch.randn(T, 3, dtype=torch.float64)
    routing = router(x)
    scores = torch.softmax(router.proj(x), dim=1)  # affinity: softmax over experts
    torch.testing.assert_close(routing.probs, scores)
    c = router.capacity_for(T)
    dense = routing.to_dense()
    for e in range(E):
        taken = sorted(routing.token[routing.expert == e].tolist())
        best = sorted(scores[:, e].argsort(descending=True)[:c].tolist())  # distinct scores
        assert taken == best
        torch.testing.assert_close(dense[taken, e], scores[taken, e])


def test_a_token_may_get_zero_or_several_experts():
    torch.manual_seed(0)
    router = ExpertChoiceRouter(4, 4, capacity_factor=1.0)
    routing = router(torch.randn(64, 4) * 3)
    per_token = routing.entries_per_token()
    assert int(per_token.max()) > 1 and int(per_token.min()) == 0
    assert int(per_token.sum()) == 64  # E * c with c = T / E


def test_gradient_reaches_the_router_through_the_weights():
    torch.manual_seed(0)
    router = ExpertChoiceRouter(6, 3)
    router(torch.randn(10, 6)).weight.sum().backward()
    assert router.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("factor", "error"),
    [
        (0, ValueError),
        (-1.0, ValueError),
        (float("inf"), ValueError),
        (float("nan"), ValueError),
        ("2", TypeError),
        (True, TypeError),
        (None, TypeError),
    ],
)
def test_bad_capacity_factor_is_a_clear_error(factor, error):
    with pytest.raises(error, match="capacity_factor"):
        ExpertChoiceRouter(4, 3, capacity_factor=factor)


@pytest.mark.parametrize("text", ["0.3", "1.1", "1.15", "1.2", "2.0", "2.2", "2.675", "3.3"])
def test_capacity_is_exact_on_the_written_decimal(text):

    for E in (1, 3, 8, 10, 64):
        router = ExpertChoiceRouter(4, E, capacity_factor=float(text))
        for T in (0, 1, 5, 10, 100, 640, 1000, 4096):
            q = Fraction(text) * T
            expected = min(T, -((-q.numerator) // (q.denominator * E)))
            assert router.capacity_for(T) == expected, (text, T, E)
    router = ExpertChoiceRouter(4, 10, capacity_factor=1.1)
    routing = router(torch.randn(100, 4))
    assert routing.capacity == 11 and routing.num_entries == 110  # the float product gives 12


def test_the_capacity_factor_can_be_changed_exactly():
    router = ExpertChoiceRouter(4, 10, capacity_factor=1.1)
    assert router.capacity_fraction == Fraction(11, 10)
    router.set_capacity_factor(Fraction(1, 3))  # exact: ceil(100 / 30) = 4
    assert router.capacity_for(100) == 4 and router.capacity_fraction == Fraction(1, 3)
    with pytest.raises(ValueError, match="capacity_factor"):
        router.set_capacity_factor(float("inf"))
