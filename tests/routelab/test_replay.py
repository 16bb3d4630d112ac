"""Router replay: record every MoE layer's routing, replay the experts with recomputed
weights, into the same or another model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from routelab import FFNExperts, MoE, Routing
from routelab.policies import CapacityPolicy
from routelab.replay import RouterReplay, replay_layers
from routelab.routers import CosineTopKGate, HashRouter, SwitchGate
from routelab.routers.topk import TopKGate, TopKRouter


class TwoLayers(nn.Module):
    def __init__(self, make_router, d=8, E=6):
        super().__init__()
        self.first = MoE(make_router(d, E), FFNExperts(E, d, 12), [CapacityPolicy(1.5)])
        self.second = MoE(make_router(d, E), FFNExperts(E, d, 12))

    def forward(self, x):
        a = self.first(x)
        b = self.second(torch.relu(a.output))
        return b.output, [a.routing, b.routing]


def deepseek(d, E):
    return TopKRouter(
        d, E, k=2, score="sigmoid", num_groups=3, top_groups=2, selection_bias=True,
        scaling_factor=2.5, sequence_balance_weight=1e-3,
    )  # fmt: skip


def pairs(routing):
    order = torch.argsort(routing.token * routing.num_experts + routing.expert)
    return routing.token[order], routing.expert[order]


def perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))


@pytest.mark.parametrize("make_router", [deepseek, lambda d, E: TopKGate(d, E, k=2)])
def test_replay_keeps_the_recorded_experts_and_recomputes_weights(make_router):
    torch.manual_seed(0)
    model = TwoLayers(make_router)
    x = torch.randn(2, 5, 8)
    replay = RouterReplay()
    with replay.record(model):
        _, recorded = model(x)
    assert set(replay.records) == {"first", "second"}
    perturb(model)
    _, fresh = model(x)
    assert any(not torch.equal(pairs(f)[1], pairs(r)[1]) for f, r in zip(fresh, recorded))
    with replay.replay(model):
        out, replayed = model(x)
    for got, want in zip(replayed, recorded):
        # the same pairs after the policies: the first layer's capacity policy drops
        # again from the same selection by the same rule
        assert [torch.equal(a, b) for a, b in zip(pairs(got), pairs(want))] == [True] * 2
    stored = replay.records["second"][0]  # no policy: the router output itself
    assert [torch.equal(a, b) for a, b in zip(pairs(replayed[1]), pairs(stored))] == [True] * 2
    # the weights are the current router's, for the recorded experts: the first layer's
    # router output is recomputed by the selection with forced indices
    first_router = model.first.router
    logits = first_router.logits(x.reshape(-1, 8))
    indices = replay.records["first"][0].expert.view(10, 2)
    expected = first_router.selection.select(logits, indices=indices)
    dense = torch.zeros(10, 6).scatter(1, expected.indices, expected.weights)
    kept = replayed[0]
    torch.testing.assert_close(kept.weight, dense[kept.token, kept.expert])
    out.sum().backward()
    assert any(
        p.grad is not None and bool(p.grad.abs().sum() > 0) for p in first_router.parameters()
    )


def test_replay_into_a_model_with_another_router():
    torch.manual_seed(1)
    source = TwoLayers(lambda d, E: TopKGate(d, E, k=2))
    target = TwoLayers(deepseek)
    x = torch.randn(7, 8)
    replay = RouterReplay()
    with replay.record(source):
        source(x)
    with replay.replay(target):
        _, replayed = target(x)
    stored = {name: routings[0] for name, routings in replay.records.items()}
    assert [torch.equal(a, b) for a, b in zip(pairs(replayed[1]), pairs(stored["second"]))] == [
        True,
        True,
    ]
    # the first layer's capacity policy keeps a subset of the recorded pairs
    recorded_ids = set((stored["first"].token * 6 + stored["first"].expert).tolist())
    assert set((replayed[0].token * 6 + replayed[0].expert).tolist()) <= recorded_ids


def test_a_deterministic_router_replays_and_a_changed_one_without_replay_route_fails():
    torch.manual_seed(2)
    hashed = MoE(
        HashRouter.fit("random", 4, d_model=8, vocab_size=20), FFNExperts(4, 8, 6)
    )  # fmt: skip
    ids = torch.randint(0, 20, (9,))
    x = torch.randn(9, 8)
    replay = RouterReplay()
    with replay.record(hashed):
        first = hashed(x, ids)
    with replay.replay(hashed):
        again = hashed(x, ids)
    torch.testing.assert_close(again.output, first.output)

    switch = MoE(SwitchGate(8, 4), FFNExperts(4, 8, 6))
    with replay.record(switch):
        switch(x)
    with torch.no_grad():
        switch.router.proj.weight.mul_(-1)
    with pytest.raises(ValueError, match="cannot replay"), replay.replay(switch):
        switch(x)


def test_replay_errors():
    torch.manual_seed(3)
    model = TwoLayers(lambda d, E: TopKGate(d, E, k=2))
    replay = RouterReplay()
    with pytest.raises(ValueError, match="no routing was recorded"), replay.replay(model):
        pass
    with replay.record(model):
        model(torch.randn(4, 8))
    with replay.replay(model), pytest.raises(ValueError, match="same batch"):
        model(torch.randn(5, 8))
    with replay.replay(model):
        model(torch.randn(4, 8))
        with pytest.raises(ValueError, match="more often"):
            model(torch.randn(4, 8))
    with pytest.raises(ValueError, match="no MoE layer"), replay.record(nn.Linear(2, 2)):
        pass
    with replay.record(model), pytest.raises(RuntimeError, match="already"):
        with replay.record(model):
            pass
    assert [name for name, _ in replay_layers(model)] == ["first", "second"]
    assert model.first._router_replay is None  # detached after the blocks


def test_replay_of_routings_loaded_from_elsewhere():
    torch.manual_seed(4)
    moe = MoE(deepseek(8, 6), FFNExperts(6, 8, 5))
    x = torch.randn(5, 8)
    chosen = torch.tensor([[0, 1], [2, 3], [4, 5], [0, 1], [2, 3]])  # any ids: no group limit
    external = Routing.from_topk(chosen, torch.ones(5, 2), 6)  # e.g. an inference engine's ids
    replay = RouterReplay().load({"": [external]})
    with replay.replay(moe):
        routing = moe(x).routing
    assert torch.equal(routing.expert.view(5, 2), chosen)
    with pytest.raises(TypeError, match="Routings"):
        RouterReplay().load({"": [chosen]})


@pytest.mark.parametrize(
    "make_router",
    [
        lambda: TopKGate(8, 6, k=2),
        lambda: deepseek(8, 6),
        lambda: TopKRouter(8, 6, k=3, softmax_after_topk=True, global_balance_weight=0.1),
        lambda: CosineTopKGate(8, 6, k=2),
    ],
)
def test_every_token_choice_router_replays_its_own_routing_exactly(make_router):
    torch.manual_seed(5)
    router = make_router().eval()
    x = torch.randn(9, 8)
    first = router(x)
    again = router.replay_route(x, None, first)
    assert torch.equal(again.token, first.token) and torch.equal(again.expert, first.expert)
    torch.testing.assert_close(again.weight, first.weight)
    torch.testing.assert_close(again.probs, first.probs)
    assert set(again.aux) == set(first.aux)
