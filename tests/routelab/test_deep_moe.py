import pytest
import torch

from routelab.balancing import update_balancing
from routelab.deep_moe import DeepMoE, build_deep_moe
from routelab.policies import PausingPolicy
from routelab.routers import TopKGate
from routelab.routers.hash import HashRouter


def test_shapes_routings_and_gradients():
    torch.manual_seed(0)
    model = DeepMoE(10, 3, d_model=8, num_experts=4, num_layers=3)
    x = torch.randn(2, 5, 10)
    out = model(x)
    assert out.logits.shape == (2, 5, 3)
    assert len(out.routings) == 3
    for routing in out.routings:
        assert routing.num_tokens == 10 and routing.num_experts == 4
        routing.validate(k=2)
    (out.logits.square().mean() + out.aux_loss).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    # eigen stacking: the second layer routes the first layer's output
    assert out.routings[0] is not out.routings[1]


def test_factories_policies_and_token_ids():
    torch.manual_seed(0)
    policies = []

    def make_policies(i):
        policies.append(PausingPolicy(4, margin=0.0))
        return [policies[-1]]

    model = build_deep_moe(
        6,
        2,
        d_model=8,
        num_experts=4,
        make_router=lambda d, e: TopKGate(d, e, k=1),
        make_policies=make_policies,
    )
    for _ in range(3):
        model(torch.randn(16, 6))
        update_balancing(model)  # pausing totals move only in the explicit update step
    assert len(policies) == 2
    assert all(float(p.totals.sum()) > 0 for p in policies)
    table = torch.arange(10) % 4
    hashed = DeepMoE(
        6,
        2,
        d_model=8,
        num_experts=4,
        make_router=lambda d, e: HashRouter(d, e, table=table),
    )
    ids = torch.tensor([0, 1, 2, 7])
    out = hashed(torch.randn(4, 6), ids)
    assert out.routings[0].expert.tolist() == (ids % 4).tolist()
    with pytest.raises(ValueError, match="token_ids"):
        hashed(torch.randn(4, 6))


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_layers"):
        DeepMoE(4, 2, num_layers=0)
    with pytest.raises(TypeError, match="in_features"):
        DeepMoE(4.0, 2)


def test_make_layer_builds_each_layer_and_excludes_the_factories():
    from routelab import FFNExperts, MoE

    built = []

    def make_layer(i):
        layer = MoE(TopKGate(8, 4, k=1), FFNExperts(4, 8, 3))
        built.append((i, layer))
        return layer

    model = DeepMoE(6, 2, d_model=8, num_experts=4, num_layers=3, make_layer=make_layer)
    assert [i for i, _ in built] == [0, 1, 2]
    assert all(model.layers[i] is layer for i, layer in built)
    assert model(torch.randn(5, 6)).logits.shape == (5, 2)
    with pytest.raises(ValueError, match="not both"):
        DeepMoE(6, 2, make_layer=make_layer, make_router=lambda d, e: TopKGate(d, e))
    with pytest.raises(ValueError, match="num_experts = 4"):
        DeepMoE(
            6,
            2,
            d_model=8,
            num_experts=4,
            make_layer=lambda i: MoE(TopKGate(8, 3), FFNExperts(3, 8, 4)),
        )
