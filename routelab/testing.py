"""A test kit for routers: hypothesis strategies, ``check_routing`` and ``RouterContract``.

Prototype a router, then get the whole invariant suite with one class::

    class TestMyRouter(RouterContract):
        expect = {"k": 2}                      # expectations for check_routing

        def make_router(self, d_model, num_experts):
            return MyRouter(d_model, num_experts, k=2)

``RouterContract`` checks, over hypothesis-drawn inputs (odd sizes, ties, constant
rows, extreme scales, empty batches): ids in range, no duplicate pair, finite
non-negative weights and the subclass's expectations; seeded runs repeat exactly;
evaluation is repeatable; gradients reach the parameters of a differentiable router;
a ``state_dict`` round trip reproduces the routing; wrong input gets a clear error.
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

from routelab.router import Router
from routelab.routing import Routing, require_routing

__all__ = [
    "RouterContract",
    "RouterInput",
    "check_routing",
    "router_inputs",
    "routings",
]

INPUT_PATTERNS = ("gaussian", "ties", "constant", "large", "tiny")


class RouterInput(NamedTuple):
    """One drawn router input: ``x [T, d]``, ``token_ids int64 [T]`` or None, its seed."""

    x: Tensor
    token_ids: Tensor | None
    seed: int


@st.composite
def router_inputs(
    draw: st.DrawFn,
    d_model: int,
    *,
    min_tokens: int = 0,
    max_tokens: int = 40,
    vocab_size: int | None = None,
    dtype: torch.dtype | tuple[torch.dtype, ...] = torch.float32,
    patterns: tuple[str, ...] = INPUT_PATTERNS,
) -> RouterInput:
    """Strategy for router inputs ``x [T, d]`` with T in ``[min_tokens, max_tokens]``.

    Patterns: ``gaussian``; ``ties`` (rows repeated, so scores tie); ``constant`` (every
    row the same); ``large`` (scale 1e3); ``tiny`` (scale 1e-6). With ``vocab_size`` also
    draws ``token_ids`` in ``[0, vocab_size)``. ``dtype``: one dtype, or a tuple to draw from.
    """
    if isinstance(dtype, tuple):
        dtype = draw(st.sampled_from(dtype))
    num_tokens = draw(st.integers(min_tokens, max_tokens))
    seed = draw(st.integers(0, 2**31 - 1))
    pattern = draw(st.sampled_from(patterns))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, d_model, generator=gen, dtype=torch.float64)
    if num_tokens and pattern == "ties":
        distinct = max(1, num_tokens // 3)
        x = x[torch.randint(distinct, (num_tokens,), generator=gen)]
    elif num_tokens and pattern == "constant":
        x = x[:1].expand(num_tokens, d_model).clone()
    elif pattern == "large":
        x = x * 1e3
    elif pattern == "tiny":
        x = x * 1e-6
    token_ids = None
    if vocab_size is not None:
        token_ids = torch.randint(vocab_size, (num_tokens,), generator=gen)
    return RouterInput(x.to(dtype), token_ids, seed)


@st.composite
def routings(
    draw: st.DrawFn,
    *,
    num_tokens: int | None = None,
    num_experts: int | None = None,
    max_tokens: int = 24,
    max_experts: int = 8,
    k: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> Routing:
    """Strategy for valid Routings: each token gets k entries (or a random number of
    distinct experts, zero included), weights uniform in [0, 1) with exact zeros mixed in.
    """
    T = num_tokens if num_tokens is not None else draw(st.integers(0, max_tokens))
    E = num_experts if num_experts is not None else draw(st.integers(1, max_experts))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    if k is None:
        per_token = torch.randint(0, E + 1, (T,), generator=gen)
    else:
        per_token = torch.full((T,), k, dtype=torch.int64)
    rank = torch.argsort(torch.rand(T, E, generator=gen), dim=1).argsort(dim=1)
    token, expert = torch.nonzero(rank < per_token[:, None], as_tuple=True)
    weight = torch.rand(token.shape[0], generator=gen, dtype=torch.float64)
    weight[torch.rand(token.shape[0], generator=gen) < 0.1] = 0.0
    return Routing(token, expert, weight.to(dtype), T, E)


def check_routing(
    routing: Routing,
    *,
    num_tokens: int | None = None,
    num_experts: int | None = None,
    k: int | None = None,
    capacity: int | Tensor | None = None,
    balanced: bool | Tensor | None = None,
    atol: float = 1e-5,
) -> Routing:
    """Check a router's output: every Routing invariant plus the given expectations.

    ``num_tokens`` / ``num_experts``: the T and E it must be built for. ``k``: exactly k
    entries per token whose weights sum to 1. ``capacity``: no expert above it.
    ``balanced``: ``True`` for an even split, or an exact per-expert quota ``[E]``.
    Raises ValueError naming the failed invariant; returns the routing.
    """
    routing = require_routing(routing)
    if num_tokens is not None and routing.num_tokens != num_tokens:
        raise ValueError(f"routing has num_tokens = {routing.num_tokens}, expected {num_tokens}")
    if num_experts is not None and routing.num_experts != num_experts:
        raise ValueError(f"routing has num_experts = {routing.num_experts}, expected {num_experts}")
    return routing.validate(k=k, capacity=capacity, balanced=balanced, atol=atol)


def assert_same_routing(a: Routing, b: Routing) -> None:
    """Exact equality of two routings' entries (for determinism checks)."""
    assert a.num_tokens == b.num_tokens and a.num_experts == b.num_experts
    assert torch.equal(a.token, b.token), "token differs between the two runs"
    assert torch.equal(a.expert, b.expert), "expert differs between the two runs"
    assert torch.equal(a.weight.detach(), b.weight.detach()), "weight differs between the two runs"


_CONTRACT_SETTINGS = settings(
    deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors]
)


class RouterContract:
    """Pytest base class: subclass it with a router factory to get the invariant suite.

    Override :meth:`make_router`; set ``expect`` (keyword expectations for
    :func:`check_routing`, e.g. ``{"k": 2}``) or override :meth:`expectations` when they
    depend on the input (a capacity that depends on T). Class attributes set the sizes.
    """

    d_model: ClassVar[int] = 12
    num_experts: ClassVar[int] = 6
    max_tokens: ClassVar[int] = 40
    vocab_size: ClassVar[int] = 64
    expect: ClassVar[dict[str, Any]] = {}
    dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float64, torch.bfloat16)

    # ------------------------------------------------------------------ hooks
    def make_router(self, d_model: int, num_experts: int) -> Router:
        """Build the router under test (parameters drawn from torch's global RNG)."""
        raise NotImplementedError("subclass RouterContract and implement make_router")

    def expectations(self, router: Router, x: Tensor) -> dict[str, Any]:
        """Keyword expectations for :func:`check_routing` on input ``x`` (train mode)."""
        return dict(self.expect)

    def eval_expectations(self, router: Router, x: Tensor) -> dict[str, Any]:
        """Expectations in eval mode (default: the same as in training)."""
        return self.expectations(router, x)

    def gradient_loss(self, routing: Routing, gen: torch.Generator) -> Tensor:
        """A scalar that depends on every routing weight and on the aux losses."""
        coef = torch.randn(routing.num_entries, generator=gen, dtype=torch.float64)
        return (routing.weight.double() * coef.to(routing.device)).sum() + routing.aux_loss

    # ------------------------------------------------------------------ helpers
    def build(self, seed: int = 0) -> Router:
        torch.manual_seed(seed)
        router = self.make_router(self.d_model, self.num_experts)
        if not isinstance(router, Router):
            raise TypeError(
                f"make_router must return a routelab.Router, got {type(router).__name__}"
            )
        return router

    def inputs(self, router: Router) -> st.SearchStrategy[RouterInput]:
        vocab = self.vocab_size if router.requires_token_ids else None
        return router_inputs(self.d_model, max_tokens=self.max_tokens, vocab_size=vocab)

    def route(self, router: Router, x: Tensor, token_ids: Tensor | None) -> Routing:
        return router(x, token_ids)

    def sample(self, router: Router, num_tokens: int, seed: int = 0) -> RouterInput:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(num_tokens, self.d_model, generator=gen)
        ids = None
        if router.requires_token_ids:
            ids = torch.randint(self.vocab_size, (num_tokens,), generator=gen)
        return RouterInput(x, ids, seed)

    # ------------------------------------------------------------------ the suite
    @_CONTRACT_SETTINGS
    @given(data=st.data())
    def test_routing_invariants(self, data: st.DataObject) -> None:
        router = self.build()
        x, ids, seed = data.draw(self.inputs(router), label="input")
        for training in (True, False):
            router.train(training)
            torch.manual_seed(seed)
            routing = self.route(router, x, ids)
            expect = self.expectations(router, x) if training else self.eval_expectations(router, x)
            check_routing(routing, num_tokens=x.shape[0], num_experts=self.num_experts, **expect)
            assert routing.token.dtype == torch.int64 and routing.expert.dtype == torch.int64
            assert routing.weight.is_floating_point()

    @_CONTRACT_SETTINGS
    @given(data=st.data())
    def test_seeded_runs_repeat(self, data: st.DataObject) -> None:
        x, ids, seed = data.draw(self.inputs(self.build()), label="input")
        results = []
        for _ in range(2):
            router = self.build(seed=3).train()
            torch.manual_seed(seed)
            results.append(self.route(router, x, ids))
        assert_same_routing(*results)

    def test_eval_is_repeatable(self) -> None:
        router = self.build().eval()
        x, ids, _ = self.sample(router, 17)
        torch.manual_seed(1)
        first = self.route(router, x, ids)
        torch.manual_seed(2)
        second = self.route(router, x, ids)
        assert_same_routing(first, second)

    def test_gradient_reaches_parameters(self) -> None:
        router = self.build().train()
        params = [p for p in router.parameters() if p.requires_grad]
        if not router.differentiable or not params:
            assert not router.differentiable or not params
            return
        x, ids, _ = self.sample(router, 24)
        torch.manual_seed(0)
        routing = self.route(router, x, ids)
        loss = self.gradient_loss(routing, torch.Generator().manual_seed(5))
        assert loss.requires_grad, (
            "no gradient: the routing weights and aux losses are detached from the router"
        )
        loss.backward()
        grads = [p.grad for p in params]
        assert any(g is not None for g in grads), "no router parameter received a gradient"
        for g in grads:
            assert g is None or bool(torch.isfinite(g).all()), "non-finite router gradient"
        assert any(g is not None and bool(g.abs().sum() > 0) for g in grads), (
            "every router gradient is zero"
        )

    def test_state_dict_round_trip(self) -> None:
        router = self.build(seed=0).eval()
        clone = self.build(seed=1).eval()
        clone.load_state_dict(router.state_dict())
        x, ids, _ = self.sample(router, 19)
        assert_same_routing(self.route(router, x, ids), self.route(clone, x, ids))

    def test_empty_batch(self) -> None:
        router = self.build()
        x, ids, _ = self.sample(router, 0)
        for training in (True, False):
            routing = self.route(router.train(training), x, ids)
            check_routing(routing, num_tokens=0, num_experts=self.num_experts)
            assert routing.num_entries == 0

    def test_input_dtypes(self) -> None:
        for dtype in self.dtypes:
            router = self.build().to(dtype)
            x, ids, _ = self.sample(router, 13)
            for training in (True, False):
                router.train(training)
                routing = self.route(router, x.to(dtype), ids)
                expect = (
                    self.expectations(router, x) if training else self.eval_expectations(router, x)
                )
                check_routing(
                    routing, num_experts=self.num_experts, num_tokens=13, atol=2e-2, **expect
                )

    def test_wrong_width_is_a_clear_error(self) -> None:
        import pytest

        router = self.build()
        x, ids, _ = self.sample(router, 5)
        wide = torch.cat([x, x[:, :1]], dim=1)
        with pytest.raises(ValueError, match="d_model"):
            self.route(router, wide, ids)
        with pytest.raises(ValueError, match="x must be"):
            self.route(router, x[0], ids)
        with pytest.raises(TypeError, match="floating"):
            self.route(router, x.long(), ids)

    def test_non_finite_input_is_a_clear_error(self) -> None:
        import pytest

        router = self.build()
        x, ids, _ = self.sample(router, 5)
        x[2, 1] = float("nan")
        with pytest.raises(ValueError, match="NaN"):
            self.route(router, x, ids)

    def test_token_ids_are_checked(self) -> None:
        import pytest

        router = self.build()
        x, _, _ = self.sample(router, 6)
        with pytest.raises(ValueError, match="token_ids"):
            self.route(router, x, torch.zeros(5, dtype=torch.int64))
        if router.requires_token_ids:
            with pytest.raises(ValueError, match="token_ids"):
                self.route(router, x, None)
