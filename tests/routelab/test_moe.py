import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from routelab import FFNExperts, MoE
from routelab.policies import CapacityPolicy
from routelab.routers import TopKGate


@given(
    shape=st.lists(st.integers(0, 4), min_size=0, max_size=3),
    k=st.integers(1, 4),
    seed=st.integers(0, 100),
)
def test_moe_accepts_any_leading_shape_and_matches_the_dense_reference(shape, k, seed):
    torch.manual_seed(seed)
    d, E = 6, 4
    moe = MoE(TopKGate(d, E, k=k), FFNExperts(E, d, 10)).double()
    x = torch.randn(*shape, d, dtype=torch.float64)
    out = moe(x)
    assert out.output.shape == x.shape
    assert out.routing.num_tokens == x.reshape(-1, d).shape[0]
    flat = x.reshape(-1, d)
    ref = moe.experts.dense_forward(flat, out.routing)
    torch.testing.assert_close(out.output.reshape(-1, d), ref)


def test_moe_with_capacity_drops_and_reports():
    torch.manual_seed(0)
    moe = MoE(TopKGate(8, 4, k=1), FFNExperts(4, 8, 16), [CapacityPolicy(0.5)])
    out = moe(torch.randn(64, 8))
    assert out.routing.capacity == 8
    assert out.routing.dropped.num_entries == 64 - out.routing.num_entries
    assert int(out.routing.load().max()) <= 8
    dropped_tokens = out.routing.dropped.token
    assert torch.all(out.output[dropped_tokens] == 0)  # dropped tokens get no expert output


def test_moe_gradients_reach_router_and_experts():
    torch.manual_seed(0)
    moe = MoE(TopKGate(8, 4, k=2), FFNExperts(4, 8, 16))
    x = torch.randn(3, 7, 8, requires_grad=True)
    out = moe(x)
    (out.output.square().sum() + out.aux_loss).backward()
    assert moe.router.proj.weight.grad.abs().sum() > 0
    assert moe.experts.w_in.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0


def test_moe_errors():
    with pytest.raises(ValueError, match="num_experts"):
        MoE(TopKGate(8, 4), FFNExperts(5, 8, 16))
    with pytest.raises(TypeError, match="router"):
        MoE("router", FFNExperts(5, 8, 16))
    moe = MoE(TopKGate(8, 4), FFNExperts(4, 8, 16))
    with pytest.raises(ValueError, match="d_model"):
        moe(torch.randn(2, 3, 9))
    with pytest.raises(ValueError, match="token_ids"):
        moe(torch.randn(2, 3, 8), token_ids=torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="x must be"):
        moe([1.0, 2.0])
