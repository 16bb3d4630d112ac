"""Every router computes its logits with fp32 operands (issue 10.1): half-precision input
selects exactly what the fp32 computation on the same values selects, and finite fp16
input never gives NaN or inf weights."""

from __future__ import annotations

import pytest
import torch

import routelab.routers as routers
from routelab.routers.hash import HashRouter

D, E, VOCAB = 16, 8, 40

FACTORIES = {
    "SoftmaxGate": lambda: routers.SoftmaxGate(D, E),
    "TopKGate": lambda: routers.TopKGate(D, E, k=2),
    "NoisyTopKGate": lambda: routers.NoisyTopKGate(D, E, k=2),
    "SwitchGate": lambda: routers.SwitchGate(D, E, z_weight=1e-3),
    "DSelectKGate": lambda: routers.DSelectKGate(D, E, k=2, entropy_weight=0.1),
    "DSelectKGate-static": lambda: routers.DSelectKGate(D, E, k=2, per_example=False),
    "ExpertChoiceRouter": lambda: routers.ExpertChoiceRouter(D, E, capacity_factor=1.5),
    "BASERouter": lambda: routers.BASERouter(D, E, method="exact"),
    "SinkhornRouter": lambda: routers.SinkhornRouter(D, E),
    "HashRouter": lambda: HashRouter.fit("random", E, d_model=D, vocab_size=VOCAB),
    "TopKRouter": lambda: routers.TopKRouter(D, E, k=2),
    "TopKRouter-sigmoid-groups": lambda: routers.TopKRouter(
        D, E, k=2, score="sigmoid", num_groups=4, top_groups=2, selection_bias=True
    ),
    "CosineTopKGate": lambda: routers.CosineTopKGate(D, E, k=2),
    "MoEPlusPlusGate": lambda: routers.MoEPlusPlusGate(D, E),
    "ReMoEGate": lambda: routers.ReMoEGate(D, E),
    "TopPGate": lambda: routers.TopPGate(D, E),
}


def test_every_exported_router_is_covered():
    exported = {
        name
        for name in routers.__all__
        if isinstance(getattr(routers, name), type)
        and issubclass(getattr(routers, name), routelab_router())
    }
    covered = {key.split("-")[0] for key in FACTORIES}
    abstract = {"BalancedAssignmentRouter", "TokenChoiceRouter"}  # base classes
    assert exported - abstract <= covered, sorted(exported - abstract - covered)


def routelab_router():
    from routelab import Router

    return Router


def _route(router, x, ids, training, seed=0):
    router.train(training)
    torch.manual_seed(seed)
    return router(x, ids)


def _ids(router, T):
    return torch.arange(T) % VOCAB if router.requires_token_ids else None


@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_half_input_selects_what_fp32_selects_on_the_same_values(name, half):
    torch.manual_seed(0)
    router = FACTORIES[name]()
    T = 64
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(1)).to(half)
    ids = _ids(router, T)
    for training in (True, False):
        low = _route(router, x, ids, training)
        ref = _route(router, x.float(), ids, training)  # the same values, in fp32
        assert torch.equal(low.token, ref.token) and torch.equal(low.expert, ref.expert), name
        torch.testing.assert_close(low.weight.float(), ref.weight.float(), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_finite_fp16_input_never_gives_nan_weights(name):
    torch.manual_seed(0)
    router = FACTORIES[name]()
    with torch.no_grad():
        for p in router.parameters():
            p.mul_(50.0)  # logits far beyond fp16's range (65504) for inputs near 1e3
    T = 32
    x = (1e3 * torch.randn(T, D, generator=torch.Generator().manual_seed(2))).half()
    assert bool(torch.isfinite(x).all())
    ids = _ids(router, T)
    for training in (True, False):
        routing = _route(router, x, ids, training)
        assert bool(torch.isfinite(routing.weight).all()), name
        assert routing.probs is None or bool(torch.isfinite(routing.probs).all()), name
        ref = _route(router, x.float(), ids, training)
        assert torch.equal(routing.expert, ref.expert), name


def test_router_logits_keeps_fp64_and_upcasts_half():
    from routelab.router import router_logits

    w = torch.randn(4, 3)
    assert router_logits(torch.randn(2, 4).half(), w).dtype == torch.float32
    assert router_logits(torch.randn(2, 4).bfloat16(), w.bfloat16()).dtype == torch.float32
    assert router_logits(torch.randn(2, 4, dtype=torch.float64), w).dtype == torch.float64
    x = torch.full((1, 4), 6e4).half()
    assert bool(torch.isfinite(router_logits(x, torch.ones(4, 3).half())).all())
