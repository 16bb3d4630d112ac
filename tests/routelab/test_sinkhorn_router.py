import torch
from hypothesis import given
from hypothesis import strategies as st

from routelab.routers import SinkhornRouter
from routelab.routing import even_quota
from routelab.testing import RouterContract


class TestSinkhornRouter(RouterContract):
    num_experts = 5

    def make_router(self, d_model, num_experts):
        return SinkhornRouter(d_model, num_experts)

    def expectations(self, router, x):
        return {"balanced": torch.tensor(even_quota(x.shape[0], router.num_experts))}

    def eval_expectations(self, router, x):
        return {}


@given(T=st.integers(0, 60), E=st.integers(1, 8), seed=st.integers(0, 10_000))
def test_training_is_balanced_and_weights_are_the_raw_softmax(T, E, seed):
    torch.manual_seed(seed)
    router = SinkhornRouter(6, E).train()
    x = torch.randn(T, 6)
    routing = router(x)
    assert routing.load().tolist() == even_quota(T, E)
    probs = torch.softmax(x @ router.expert_embeddings.t(), dim=-1)
    torch.testing.assert_close(routing.probs, probs)
    torch.testing.assert_close(routing.weight, probs[torch.arange(T), routing.expert])


def test_eval_is_greedy_and_router_learns():
    torch.manual_seed(0)
    router = SinkhornRouter(8, 4)
    x = torch.randn(40, 8)
    router.eval()
    assert torch.equal(router(x).expert, (x @ router.expert_embeddings.t()).argmax(1))
    router.train()
    router(x).weight.sum().backward()
    assert router.expert_embeddings.grad is not None
    assert bool(router.expert_embeddings.grad.abs().sum() > 0)


def test_sinkhorn_prefers_high_scores():
    # Two obvious clusters: the balanced assignment should follow them exactly.
    router = SinkhornRouter(2, 2).double().train()
    with torch.no_grad():
        router.expert_embeddings.copy_(torch.eye(2, dtype=torch.float64))
    x = torch.tensor([[5.0, 0.0]] * 10 + [[0.0, 5.0]] * 10, dtype=torch.float64)
    assert router(x).expert.tolist() == [0] * 10 + [1] * 10
