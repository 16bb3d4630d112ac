"""The test kit must catch broken routers, not only pass good ones."""

import pytest
import torch
from hypothesis import given

import routelab
import routelab.policies
from routelab import Router, Routing
from routelab.routers import TopKGate
from routelab.testing import (
    PolicyContract,
    RouterContract,
    check_routing,
    probe_differentiable,
    router_inputs,
)


class _Broken(Router):
    def __init__(self, d_model, num_experts, fault):
        super().__init__(d_model, num_experts)
        self.proj = torch.nn.Linear(d_model, num_experts)
        self.fault = fault

    def route(self, x, token_ids):
        T = x.shape[0]
        logits = self.proj(x)
        if self.fault == "unseeded":  # randomness outside torch's seeded RNG
            logits = (
                logits
                + torch.from_numpy(__import__("numpy").random.rand(T, self.num_experts)).float()
            )
        idx = logits.topk(2, dim=1).indices
        w = torch.softmax(logits.gather(1, idx), dim=1)
        if self.fault == "duplicates":
            idx = idx.clone()
            idx[:, 1] = idx[:, 0]
        elif self.fault == "out_of_range":
            idx = idx + self.num_experts - 1
        elif self.fault == "nan":
            w = w * float("nan")
        elif self.fault == "negative":
            w = w - 1
        elif self.fault == "detached":
            w = w.detach()
        return Routing.from_topk(idx, w, self.num_experts)


def _fails_with(exc_type, message, check):
    """``check()`` must fail with ``exc_type`` whose text contains ``message``; hypothesis
    may wrap several distinct failures in an exception group."""
    try:
        check()
    except Exception as err:
        leaves = list(getattr(err, "exceptions", ())) or [err]
        assert any(isinstance(e, exc_type) and message in str(e) for e in leaves), repr(err)
    else:
        raise AssertionError(f"the contract did not catch the fault ({message!r})")


def _contract(fault):
    class Contract(RouterContract):
        expect = {"k": 2}

        def make_router(self, d_model, num_experts):
            return _Broken(d_model, num_experts, fault)

    return Contract()


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("duplicates", "duplicate"),
        ("out_of_range", "out of range"),
        ("nan", "finite"),
        ("negative", ">= 0"),
    ],
)
def test_contract_catches_invalid_routings(fault, message):
    _fails_with(ValueError, message, _contract(fault).test_routing_invariants)


def test_contract_catches_unseeded_randomness():
    _fails_with(AssertionError, "differs", _contract("unseeded").test_seeded_runs_repeat)


def test_contract_catches_a_gate_without_gradient():
    _fails_with(AssertionError, "gradient", _contract("detached").test_gradient_reaches_parameters)


def test_contract_catches_a_missing_width_check():
    class NoChecks(TopKGate):
        def forward(self, x, token_ids=None):  # skips the base class's validation
            return self.route(x[:, : self.d_model], token_ids)

    class Contract(RouterContract):
        def make_router(self, d_model, num_experts):
            return NoChecks(d_model, num_experts)

    with pytest.raises(pytest.fail.Exception):
        Contract().test_wrong_width_is_a_clear_error()


def test_contract_passes_a_good_router_in_full():
    class Contract(RouterContract):
        expect = {"k": 1}

        def make_router(self, d_model, num_experts):
            return TopKGate(d_model, num_experts, k=1)

    suite = Contract()
    for name in dir(suite):
        if name.startswith("test_"):
            getattr(suite, name)()


@given(router_inputs(5, max_tokens=9, vocab_size=11))
def test_router_inputs_strategy_shapes(inp):
    assert inp.x.shape[1] == 5 and inp.x.shape[0] <= 9
    assert inp.token_ids.shape == (inp.x.shape[0],)
    assert all(0 <= i < 11 for i in inp.token_ids.tolist())


@given(router_inputs(3, dtype=(torch.float16, torch.bfloat16, torch.float64)))
def test_router_inputs_draws_dtypes(inp):
    assert inp.x.dtype in (torch.float16, torch.bfloat16, torch.float64)


def test_validation_toggle_skips_the_finite_check():
    gate = TopKGate(4, 3)
    x = torch.full((2, 4), float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        gate(x)
    with routelab.validation(False):
        assert not routelab.validation_enabled()
        gate(x)  # no check, no error: the caller asked for the fast path
    assert routelab.validation_enabled()


def test_check_routing_checks_sizes():
    r = Routing.from_topk(torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1), 2)
    with pytest.raises(ValueError, match="num_tokens"):
        check_routing(r, num_tokens=4)
    with pytest.raises(ValueError, match="num_experts"):
        check_routing(r, num_experts=3)
    with pytest.raises(TypeError, match="Routing"):
        check_routing("r")


# ---------------------------------------------------------------- the gradient check cannot be
# switched off by the router under test (issue 10.10)
def test_a_router_cannot_switch_its_own_gradient_check_off():
    class Detached(_Broken):
        differentiable = False  # a broken router claiming it is not meant to learn

        def __init__(self, d_model, num_experts):
            super().__init__(d_model, num_experts, "detached")

        def route(self, x, token_ids):
            logits = self.proj(x)
            idx = logits.topk(2, dim=1).indices
            w = torch.softmax(logits.gather(1, idx), dim=1).detach()
            return Routing.from_topk(idx, w, self.num_experts)

    class Contract(RouterContract):
        expect = {"k": 2}

        def make_router(self, d_model, num_experts):
            return Detached(d_model, num_experts)

    # the finite-difference probe sees the weights move with the parameters
    _fails_with(AssertionError, "differentiable flag", Contract().test_gradient_reaches_parameters)

    class Stated(Contract):
        differentiable = True

    _fails_with(AssertionError, "flag", Stated().test_gradient_reaches_parameters)


def test_the_probe_tells_constant_weights_from_learned_ones():
    torch.manual_seed(0)
    x = torch.randn(10, 5)
    assert probe_differentiable(TopKGate(5, 4, k=2), x)
    assert not probe_differentiable(TopKGate(5, 4, k=1), x)  # weight is constantly 1
    assert probe_differentiable(routelab.routers.SwitchGate(5, 4), x)


def test_a_stated_non_differentiable_router_must_not_pass_gradients():
    class Contract(RouterContract):
        differentiable = False
        expect = {"k": 2}

        def make_router(self, d_model, num_experts):
            gate = TopKGate(d_model, num_experts, k=2)
            gate.differentiable = False  # agrees with the statement, but gradients flow
            return gate

    _fails_with(AssertionError, "passes a gradient", Contract().test_gradient_reaches_parameters)


# ---------------------------------------------------------------- PolicyContract catches faults
class _StatefulInForward(routelab.policies.Policy):
    """A policy that changes its state inside forward (what balancing must never do)."""

    def __init__(self, num_experts):
        super().__init__()
        self.register_buffer("counts", torch.zeros(num_experts))

    def forward(self, routing):
        self.counts += routing.load().to(self.counts)
        return routing


class _MutatesInput(routelab.policies.Policy):
    def forward(self, routing):
        routing.weight.mul_(0.5)
        return routing


class _NotARouting(routelab.policies.Policy):
    def forward(self, routing):
        return routing.to_dense()


@pytest.mark.parametrize(
    ("policy", "test", "message"),
    [
        (_StatefulInForward, "test_forward_changes_no_state", "forward changed"),
        (_MutatesInput, "test_output_is_a_valid_routing", "changed its input"),
        (_NotARouting, "test_output_is_a_valid_routing", "returned Tensor"),
        (_StatefulInForward, "test_non_routing_is_a_clear_error", "no attribute"),
    ],
)
def test_policy_contract_catches_broken_policies(policy, test, message):
    class Contract(PolicyContract):
        def make_policy(self, num_experts):
            return policy(num_experts) if policy is _StatefulInForward else policy()

    exc = Exception
    _fails_with(exc, message, getattr(Contract(), test))
