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
Whether gradients must reach the parameters is decided by :func:`probe_differentiable`
(finite differences) or stated by the test class, never by the router's own flag.

``PolicyContract`` is the same kit for policies (``Routing -> Routing`` modules)::

    class TestMyPolicy(PolicyContract):
        def make_policy(self, num_experts):
            return MyPolicy(num_experts)
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
    "PolicyContract",
    "RouterContract",
    "RouterInput",
    "check_routing",
    "probe_differentiable",
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


def probe_differentiable(
    router: Router,
    x: Tensor,
    token_ids: Tensor | None = None,
    *,
    route: Any = None,
    seed: int = 0,
) -> bool:
    """Whether ``router``'s routing weights or aux losses on ``x`` change when its
    parameters move slightly (finite differences on an fp64 copy, same selection, same
    random draws): the independent answer to "must a gradient reach the parameters?".

    Selection changes are avoided by shrinking the step (1e-4, 1e-6, 1e-8 relative); a
    router whose weights and aux are constant under all of them is not differentiable.
    """
    import copy

    probe = copy.deepcopy(router).double().train(router.training)
    params = [p for p in probe.parameters() if p.requires_grad]
    if not params:
        return False
    call = route if route is not None else (lambda r, a, b: r(a, b))
    x = x.double()

    def run() -> Routing:
        torch.manual_seed(seed)
        with torch.no_grad():
            return call(probe, x, token_ids)

    base = run()
    originals = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(seed + 1)
    for step in (1e-4, 1e-6, 1e-8):
        with torch.no_grad():
            for p, p0 in zip(params, originals):
                noise = torch.randn(p0.shape, generator=gen, dtype=p0.dtype)
                p.copy_(p0 + step * (p0.abs() + 1.0) * noise.to(p0.device))
        moved = run()
        same_entries = (
            moved.num_entries == base.num_entries
            and torch.equal(moved.token, base.token)
            and torch.equal(moved.expert, base.expert)
        )
        if not same_entries:
            continue
        weights_moved = (
            bool((moved.weight.double() - base.weight.double()).abs().max() > 0)
            if (base.num_entries)
            else False
        )
        aux_moved = any(
            key not in moved.aux or bool(moved.aux[key].double() != value.double())
            for key, value in base.aux.items()
        )
        return weights_moved or aux_moved
    return True  # every step changed the selection: the routing depends on the parameters


_CONTRACT_SETTINGS = settings(
    deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors]
)


class RouterContract:
    """Pytest base class: subclass it with a router factory to get the invariant suite.

    Override :meth:`make_router`; set ``expect`` (keyword expectations for
    :func:`check_routing`, e.g. ``{"k": 2}``) or override :meth:`expectations` when they
    depend on the input (a capacity that depends on T). Class attributes set the sizes.

    The gradient check does not trust ``router.differentiable``: whether gradients must
    reach the parameters is stated by the subclass (``differentiable = True / False``)
    or found by :func:`probe_differentiable`, and the router's flag must agree.
    """

    d_model: ClassVar[int] = 12
    num_experts: ClassVar[int] = 6
    max_tokens: ClassVar[int] = 40
    vocab_size: ClassVar[int] = 64
    expect: ClassVar[dict[str, Any]] = {}
    dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float64, torch.bfloat16)
    #: Whether gradients must reach the router's parameters. None: decided by
    #: probe_differentiable (finite differences), never by the router's own flag; the
    #: flag must agree with it either way.
    differentiable: ClassVar[bool | None] = None

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

    def expects_gradient(self, router: Router) -> bool:
        """Whether the router must pass gradients to its parameters: the subclass's
        ``differentiable`` when it states one, else :func:`probe_differentiable` (a
        finite-difference probe that does not trust the router's own flag)."""
        if self.differentiable is not None:
            return bool(self.differentiable)
        x, ids, _ = self.sample(router, 24)
        return probe_differentiable(router, x, ids, route=self.route)

    def test_gradient_reaches_parameters(self) -> None:
        router = self.build().train()
        expected = self.expects_gradient(router)
        assert router.differentiable == expected, (
            f"the router's differentiable flag is {router.differentiable}, but its routing "
            f"weights and aux losses {'do' if expected else 'do not'} depend on its parameters"
        )
        params = [p for p in router.parameters() if p.requires_grad]
        x, ids, _ = self.sample(router, 24)
        torch.manual_seed(0)
        routing = self.route(router, x, ids)
        loss = self.gradient_loss(routing, torch.Generator().manual_seed(5))
        if not expected:
            if loss.requires_grad:
                loss.backward()
            assert all(p.grad is None or not bool(p.grad.abs().sum() > 0) for p in params), (
                "a router stated non-differentiable passes a gradient to its parameters"
            )
            return
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


class PolicyContract:
    """Pytest base class for policies (``Routing -> Routing`` modules), as RouterContract
    is for routers. Subclass it with a policy factory::

        class TestMyPolicy(PolicyContract):
            def make_policy(self, num_experts):
                return MyPolicy(num_experts)

    Override :meth:`make_router` to feed the policy another router's routings (default:
    a top-2 gate) and :meth:`expectations` for :func:`check_routing` keywords on the
    output. Checks, over hypothesis-drawn inputs: the output is a valid Routing over the
    same T and E with the expectations; the input Routing is left untouched; ``forward``
    changes no state but the pending statistics of a
    :class:`routelab.balancing.BalancingState` (state moves only in the update step); an
    activation-checkpoint recompute is not observed twice; eval is not observed; the same
    input gives the same output; a ``state_dict`` round trip after some updates gives the
    same output; an empty batch works; a non-Routing argument and a non-finite state in
    ``load_state_dict`` are clear errors; gradients still reach the router.
    """

    d_model: ClassVar[int] = 8
    num_experts: ClassVar[int] = 6
    max_tokens: ClassVar[int] = 30

    # ------------------------------------------------------------------ hooks
    def make_policy(self, num_experts: int) -> torch.nn.Module:
        """Build the policy under test."""
        raise NotImplementedError("subclass PolicyContract and implement make_policy")

    def make_router(self, d_model: int, num_experts: int) -> Router:
        """The router whose routings the policy receives (default: top-2 gate)."""
        from routelab.routers.topk import TopKGate

        return TopKGate(d_model, num_experts, k=min(2, num_experts))

    def expectations(self, policy: torch.nn.Module, routing: Routing) -> dict[str, Any]:
        """Keyword expectations for :func:`check_routing` on the policy's output."""
        return {}

    # ------------------------------------------------------------------ helpers
    def build(self, seed: int = 0) -> tuple[Router, torch.nn.Module]:
        torch.manual_seed(seed)
        router = self.make_router(self.d_model, self.num_experts)
        policy = self.make_policy(self.num_experts)
        if not isinstance(policy, torch.nn.Module):
            raise TypeError(f"make_policy must return an nn.Module, got {type(policy).__name__}")
        return router, policy

    def sample(self, num_tokens: int, seed: int = 0) -> Tensor:
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(num_tokens, self.d_model, generator=gen)

    @staticmethod
    def state(policy: torch.nn.Module) -> dict[str, Tensor]:
        """The policy's state without pending (not yet applied) statistics."""
        return {
            k: v.detach().clone()
            for k, v in policy.state_dict().items()
            if not k.rsplit(".", 1)[-1].startswith("pending_")
        }

    @staticmethod
    def pending(policy: torch.nn.Module) -> dict[str, Tensor]:
        return {
            k: v.detach().clone()
            for k, v in policy.state_dict().items()
            if k.rsplit(".", 1)[-1].startswith("pending_")
        }

    @staticmethod
    def update(policy: torch.nn.Module) -> None:
        from routelab.balancing import update_balancing

        update_balancing(policy)

    def warm_up(self, router: Router, policy: torch.nn.Module, steps: int = 3) -> None:
        """A few training forwards and update steps, so the state is not the initial one."""
        policy.train()
        for step in range(steps):
            with torch.no_grad():
                policy(router(self.sample(32, seed=100 + step)))
            self.update(policy)

    # ------------------------------------------------------------------ the suite
    @_CONTRACT_SETTINGS
    @given(data=st.data())
    def test_output_is_a_valid_routing(self, data: st.DataObject) -> None:
        router, policy = self.build()
        x, _, seed = data.draw(router_inputs(self.d_model, max_tokens=self.max_tokens))
        self.warm_up(router, policy, steps=data.draw(st.integers(0, 2)))
        for training in (True, False):
            policy.train(training)
            torch.manual_seed(seed)
            routing = router.train(training)(x)
            before = (routing.token.clone(), routing.expert.clone(), routing.weight.clone())
            out = policy(routing)
            assert isinstance(out, Routing), f"the policy returned {type(out).__name__}"
            check_routing(
                out,
                num_tokens=x.shape[0],
                num_experts=self.num_experts,
                **self.expectations(policy, routing),
            )
            after = (routing.token, routing.expert, routing.weight)
            assert all(torch.equal(a, b) for a, b in zip(before, after)), (
                "the policy changed its input Routing"
            )

    def test_forward_changes_no_state(self) -> None:
        router, policy = self.build()
        self.warm_up(router, policy)
        state = self.state(policy)
        policy.train()
        for seed in range(3):
            policy(router(self.sample(20, seed=seed)))
        for key, value in self.state(policy).items():
            assert torch.equal(value, state[key]), f"forward changed {key!r}"

    def test_update_without_observations_changes_nothing(self) -> None:
        router, policy = self.build()
        self.warm_up(router, policy)
        state = self.state(policy)
        self.update(policy)
        for key, value in self.state(policy).items():
            assert torch.equal(value, state[key]), f"an empty update step changed {key!r}"

    def test_checkpoint_recompute_is_not_observed_twice(self) -> None:
        from torch.utils.checkpoint import checkpoint

        for reentrant in (True, False):
            router, policy = self.build()
            policy.train()
            x = self.sample(16).requires_grad_(True)
            with torch.no_grad():
                policy(router(x.detach()))
            once = self.pending(policy)
            _, fresh = self.build()
            fresh.train()

            def layer(
                t: Tensor, policy: torch.nn.Module = fresh, router: Router = router
            ) -> Tensor:
                out = policy(router(t))
                return out.weight.sum() + out.aux_loss + t.sum() * 0

            checkpoint(layer, x, use_reentrant=reentrant).backward()
            twice = self.pending(fresh)
            for key, value in once.items():
                assert torch.equal(twice[key], value), (
                    f"checkpoint recompute (use_reentrant={reentrant}) changed {key!r} twice"
                )

    def test_eval_is_not_observed(self) -> None:
        router, policy = self.build()
        self.warm_up(router, policy)
        pending, state = self.pending(policy), self.state(policy)
        policy.eval()
        policy(router.eval()(self.sample(20)))
        self.update(policy)
        for key, value in self.pending(policy).items():
            assert torch.equal(value, pending[key]), f"an eval forward was observed: {key!r}"
        for key, value in self.state(policy).items():
            assert torch.equal(value, state[key]), f"an eval forward moved {key!r}"

    def test_same_input_same_output(self) -> None:
        router, policy = self.build()
        self.warm_up(router, policy)
        routing = router.eval()(self.sample(23))
        for training in (False, True):
            policy.train(training)
            assert_same_routing(policy(routing), policy(routing))

    def test_state_dict_round_trip(self) -> None:
        router, policy = self.build()
        self.warm_up(router, policy, steps=4)
        _, clone = self.build(seed=1)
        clone.load_state_dict(policy.state_dict())
        routing = router.eval()(self.sample(19))
        for training in (False, True):
            policy.train(training)
            clone.train(training)
            assert_same_routing(policy(routing), clone(routing))

    def test_empty_batch(self) -> None:
        router, policy = self.build()
        for training in (True, False):
            policy.train(training)
            out = policy(router.train(training)(self.sample(0)))
            check_routing(out, num_tokens=0, num_experts=self.num_experts)
            assert out.num_entries == 0

    def test_non_routing_is_a_clear_error(self) -> None:
        import pytest

        _, policy = self.build()
        with pytest.raises(TypeError, match="routing"):
            policy(torch.zeros(3, self.num_experts))

    def test_non_finite_state_is_refused_on_load(self) -> None:
        import pytest

        _, policy = self.build()
        for key, value in policy.state_dict().items():
            if not value.is_floating_point() or not value.numel():
                continue
            state = policy.state_dict()
            state[key] = torch.full_like(value, float("nan"))
            with pytest.raises(ValueError, match="NaN"):
                policy.load_state_dict(state)

    def test_gradient_still_reaches_the_router(self) -> None:
        router, policy = self.build()
        self.warm_up(router, policy)
        policy.train()
        out = policy(router.train()(self.sample(24)))
        if out.num_entries == 0 or not router.differentiable:
            return
        loss = (out.weight * torch.linspace(0.5, 1.5, out.num_entries)).sum() + out.aux_loss
        assert loss.requires_grad, "the policy detached the routing weights from the router"
        loss.backward()
        assert any(
            p.grad is not None and bool(p.grad.abs().sum() > 0) for p in router.parameters()
        ), "no router parameter received a gradient through the policy"
