import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from routelab.routers import BASERouter
from routelab.routing import even_quota
from routelab.testing import RouterContract
from solvers import balanced_assignment


def quota(T, E):
    return torch.tensor(even_quota(T, E))


class TestBASERouter(RouterContract):
    num_experts = 5  # does not divide most T: uneven quotas

    def make_router(self, d_model, num_experts):
        return BASERouter(d_model, num_experts)

    def expectations(self, router, x):
        return {"balanced": quota(x.shape[0], router.num_experts)}

    def eval_expectations(self, router, x):
        return {}


class TestBASERouterAuction(TestBASERouter):
    num_experts = 4

    def make_router(self, d_model, num_experts):
        return BASERouter(d_model, num_experts, method="auction")


def test_default_solver_is_exact():
    """The default is the optimum, and on CPU it is faster than the torch auction
    (issue 17: BASE's default at most the exact solver's time)."""
    assert BASERouter(4, 3).method == "exact"


@given(T=st.integers(0, 50), E=st.integers(1, 7), seed=st.integers(0, 10_000))
def test_training_gives_every_expert_its_quota_and_the_optimum(T, E, seed):
    torch.manual_seed(seed)
    router = BASERouter(6, E, method="exact").double().train()
    x = torch.randn(T, 6, dtype=torch.float64)
    routing = router(x)
    assert routing.load().tolist() == even_quota(T, E)
    assert torch.equal(routing.token, torch.arange(T))
    scores = (x @ router.expert_embeddings.t()).detach().numpy()
    opt = balanced_assignment(scores, method="hungarian").objective
    got = float(scores[np.arange(T), routing.expert.numpy()].sum())
    assert got == pytest.approx(opt, rel=1e-9, abs=1e-9)
    chosen = scores[np.arange(T), routing.expert.numpy()]
    torch.testing.assert_close(routing.weight, torch.sigmoid(torch.from_numpy(chosen)))


def test_auction_assignment_is_near_optimal():
    torch.manual_seed(0)
    router = BASERouter(16, 8, method="auction").double().train()
    x = torch.randn(200, 16, dtype=torch.float64)
    scores = router.expert_scores(x).detach()
    a = router.assign(scores)
    res = balanced_assignment(scores.numpy(), method="exact")
    got = float(scores[torch.arange(200), a].sum())
    assert res.objective - got <= 1e-6 * float(scores.abs().max(1).values.sum())


def test_eval_is_greedy_argmax():
    torch.manual_seed(1)
    router = BASERouter(8, 4).eval()
    x = torch.randn(30, 8)
    routing = router(x)
    scores = x @ router.expert_embeddings.t()
    assert torch.equal(routing.expert, scores.argmax(1))
    torch.testing.assert_close(routing.weight, torch.sigmoid(scores.max(1).values))


def test_embeddings_receive_gradient_through_the_weight():
    torch.manual_seed(2)
    router = BASERouter(8, 4).train()
    x = torch.randn(21, 8, requires_grad=True)
    routing = router(x)
    routing.weight.sum().backward()
    g = router.expert_embeddings.grad
    assert g is not None and bool(torch.isfinite(g).all())
    assert bool((g.abs().sum(1) > 0).all()), "every expert's embedding gets a gradient"
    assert x.grad is not None and bool(x.grad.abs().sum() > 0)


def test_pieces_compose_to_route():
    torch.manual_seed(3)
    router = BASERouter(8, 3).train()
    x = torch.randn(11, 8)
    scores = router.expert_scores(x)
    assert scores.shape == (11, 3)
    a = router.assign(scores)
    assert a.dtype == torch.int64 and a.shape == (11,)
    manual = router.routing_from_assignment(scores, a)
    routed = router(x)
    assert torch.equal(manual.expert, routed.expert)
    torch.testing.assert_close(manual.weight, routed.weight)


def test_bad_method_or_option_is_a_clear_error():
    with pytest.raises(ValueError, match="method"):
        BASERouter(8, 4, method="magic")
    with pytest.raises(TypeError, match="unknown option"):
        BASERouter(8, 4, method="greedy", tol=1e-3)


def test_route_with_assignment_is_the_protocol_expert_parallelism_uses():
    """BalancedAssignmentRouter: a replacement assign (e.g. solved over every rank's
    tokens) keeps the router's input checks and combine weights."""
    from routelab.routers import BalancedAssignmentRouter, SinkhornRouter

    assert issubclass(BASERouter, BalancedAssignmentRouter)
    assert issubclass(SinkhornRouter, BalancedAssignmentRouter)
    torch.manual_seed(0)
    router = BASERouter(4, 3)
    x = torch.randn(6, 4)
    forced = torch.tensor([2, 2, 0, 1, 0, 1])
    routing = router.route_with_assignment(x, assign=lambda scores: forced)
    assert routing.expert.tolist() == forced.tolist()
    scores = x @ router.expert_embeddings.t()
    torch.testing.assert_close(routing.weight, torch.sigmoid(scores[torch.arange(6), forced]))
    with pytest.raises(ValueError, match="d_model"):
        router.route_with_assignment(torch.randn(6, 5), assign=lambda scores: forced)
    with pytest.raises(ValueError, match="assign must return"):
        router.route_with_assignment(x, assign=lambda scores: forced[:3])
