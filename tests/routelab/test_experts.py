import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from routelab import FFNExperts, ModuleExperts, MoE, Routing
from routelab.experts import ExpertDispatch
from routelab.routers import TopKGate
from routelab.testing import routings

ACTIVATIONS = ["relu", "gelu", "silu", "swiglu"]


def _grads(tensors):
    return [None if t.grad is None else t.grad.clone() for t in tensors]


def _sparse_and_dense(experts, x, routing, seed):
    """Run both paths on the same inputs; return outputs and gradients of a random loss."""
    out = {}
    for path in ("sparse", "dense"):
        x_ = x.clone().requires_grad_(True)
        w_ = routing.weight.clone().requires_grad_(True)
        r = routing.with_weight(w_)
        experts.zero_grad()
        y = experts(x_, r) if path == "sparse" else experts.dense_forward(x_, r)
        coef = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
        (y * coef).sum().backward()
        out[path] = (y.detach(), x_.grad, w_.grad, _grads(list(experts.parameters())))
    return out["sparse"], out["dense"]


def _assert_close_grads(a, b, tol=1e-9):
    for ga, gb in zip(a, b):
        if ga is None or gb is None:
            assert ga is None or not ga.abs().any()
            assert gb is None or not gb.abs().any()
        else:
            torch.testing.assert_close(ga, gb, atol=tol, rtol=tol)


@given(
    T=st.integers(0, 17),
    d=st.integers(1, 9),
    h=st.integers(1, 11),
    E=st.integers(1, 64),
    activation=st.sampled_from(ACTIVATIONS),
    bias=st.booleans(),
    data=st.data(),
)
def test_sparse_path_equals_dense_reference(T, d, h, E, activation, bias, data):
    k = data.draw(st.integers(1, E), label="k")
    seed = data.draw(st.integers(0, 10_000), label="seed")
    routing = data.draw(
        routings(
            num_tokens=T,
            num_experts=E,
            k=data.draw(st.sampled_from([k, None]), label="mode"),
            dtype=torch.float64,
        ),
        label="routing",
    )
    torch.manual_seed(seed)
    experts = FFNExperts(E, d, h, activation=activation, bias=bias, dtype=torch.float64)
    x = torch.randn(T, d, dtype=torch.float64)
    sparse, dense = _sparse_and_dense(experts, x, routing, seed)
    torch.testing.assert_close(sparse[0], dense[0], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(sparse[1], dense[1], atol=1e-10, rtol=1e-10)  # d x
    torch.testing.assert_close(sparse[2], dense[2], atol=1e-10, rtol=1e-10)  # d weight
    _assert_close_grads(sparse[3], dense[3])  # every expert parameter


@given(routing=routings(max_experts=6), data=st.data())
def test_module_experts_match_dense_reference(routing, data):
    torch.manual_seed(data.draw(st.integers(0, 100)))
    experts = ModuleExperts(
        [
            nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
            for _ in range(routing.num_experts)
        ],
        d_out=3,
    ).double()
    x = torch.randn(routing.num_tokens, 5, dtype=torch.float64)
    w = routing.weight.double()
    y = experts(x, routing.with_weight(w))
    torch.testing.assert_close(y, experts.dense_forward(x, routing.with_weight(w)))
    assert y.shape == (routing.num_tokens, 3)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_one_expert_moe_is_the_plain_ffn(activation):
    torch.manual_seed(0)
    d, h = 7, 13
    moe = MoE(TopKGate(d, 1, k=1), FFNExperts(1, d, h, activation=activation)).double()
    ex = moe.experts
    x = torch.randn(2, 5, d, dtype=torch.float64, requires_grad=True)
    y = moe(x).output

    x_ref = x.detach().clone().requires_grad_(True)
    w_in = ex.w_in[0].detach().clone().requires_grad_(True)
    w_out = ex.w_out[0].detach().clone().requires_grad_(True)
    pre = x_ref @ w_in + ex.b_in[0].detach()
    if activation == "swiglu":
        pre = torch.nn.functional.silu(x_ref @ ex.w_gate[0].detach()) * pre
    else:
        pre = getattr(torch.nn.functional, activation)(pre)
    y_ref = pre @ w_out + ex.b_out[0].detach()
    torch.testing.assert_close(y, y_ref)

    coef = torch.randn_like(y)
    (y * coef).sum().backward()
    (y_ref * coef).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(ex.w_in.grad[0], w_in.grad)
    torch.testing.assert_close(ex.w_out.grad[0], w_out.grad)
    # one expert, k = 1: the weight is exactly 1, so the gate gets no gradient signal
    assert torch.all(moe.router.proj.weight.grad == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_dtypes_track_fp64(dtype):
    torch.manual_seed(0)
    E, d, h, T = 5, 16, 24, 40
    experts64 = FFNExperts(E, d, h, activation="gelu", dtype=torch.float64)
    experts = FFNExperts(E, d, h, activation="gelu", dtype=dtype)
    experts.load_state_dict({k: v.to(dtype) for k, v in experts64.state_dict().items()})
    idx = torch.argsort(torch.rand(T, E), dim=1)[:, :2]
    w = torch.softmax(torch.randn(T, 2), dim=1)
    x = torch.randn(T, d)
    y = experts(x.to(dtype), Routing.from_topk(idx, w, E))
    assert y.dtype == dtype
    ref = experts64(x.double(), Routing.from_topk(idx, w.double(), E))
    tol = {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 1e-2}[dtype]
    torch.testing.assert_close(y.double(), ref, atol=tol, rtol=tol)
    y.float().sum().backward()
    assert torch.isfinite(experts.w_in.grad.float()).all()


def test_empty_experts_zero_tokens_and_zero_entries():
    experts = FFNExperts(4, 3, 5)
    # T = 0
    y = experts(
        torch.randn(0, 3),
        Routing.from_topk(torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2), 4),
    )
    assert y.shape == (0, 3)
    # N = 0 with T > 0: output is zero
    empty = Routing(
        torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0), 6, 4
    )
    x = torch.randn(6, 3, requires_grad=True)
    y = experts(x, empty)
    assert torch.equal(y, torch.zeros(6, 3))
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros(6, 3))
    # every entry on one expert: the other three are empty
    one = Routing(torch.arange(6), torch.full((6,), 2), torch.ones(6), 6, 4)
    torch.testing.assert_close(experts(x, one), experts.dense_forward(x, one))


def test_dispatch_plan_sorts_by_expert_and_keeps_pairs():
    r = Routing(
        torch.tensor([0, 0, 1, 2, 2]), torch.tensor([2, 0, 2, 1, 0]), torch.arange(5.0), 3, 3
    )
    plan = ExpertDispatch.plan(r)
    assert plan.counts == [2, 1, 2]
    assert plan.expert.tolist() == [0, 0, 1, 2, 2]
    pairs = sorted(zip(plan.token.tolist(), plan.expert.tolist(), plan.weight.tolist()))
    assert pairs == sorted(zip(r.token.tolist(), r.expert.tolist(), r.weight.tolist()))


def _topk_routing(T, E, k=1):
    return Routing.from_topk(torch.zeros(T, k, dtype=torch.long), torch.ones(T, k), E)


@pytest.mark.parametrize(
    ("x", "routing", "error", "message"),
    [
        (torch.randn(4, 5), _topk_routing(4, 3), ValueError, "d_model"),
        (torch.randn(4), _topk_routing(4, 3), ValueError, "x must be"),
        ("not a tensor", _topk_routing(4, 3), TypeError, "x must be a torch.Tensor"),
        (torch.randn(4, 6), _topk_routing(5, 3), ValueError, "num_tokens = 5"),
        (torch.randn(4, 6), _topk_routing(4, 7), ValueError, "num_experts = 7"),
        (torch.randn(4, 6), "routing", TypeError, "routing must be"),
        (torch.randn(4, 6, dtype=torch.float64), _topk_routing(4, 3), TypeError, "dtype"),
    ],
)
def test_bad_expert_calls_are_clear_errors(x, routing, error, message):
    experts = FFNExperts(3, 6, 8)
    with pytest.raises(error, match=message):
        experts(x, routing)


def test_mismatched_devices_are_a_clear_error():
    experts = FFNExperts(3, 6, 8).to("meta")
    with pytest.raises(ValueError, match="on cpu"):
        experts(torch.randn(4, 6, device="meta"), _topk_routing(4, 3))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_experts": 0}, "num_experts"),
        ({"d_model": -2}, "d_model"),
        ({"d_hidden": 0}, "d_hidden"),
        ({"activation": "tanh"}, "activation"),
        ({"grouped_gemm": "yes"}, "grouped_gemm"),
    ],
)
def test_bad_construction_is_a_clear_error(kwargs, message):
    args = {"num_experts": 2, "d_model": 3, "d_hidden": 4} | kwargs
    with pytest.raises(ValueError, match=message):
        FFNExperts(args.pop("num_experts"), args.pop("d_model"), args.pop("d_hidden"), **args)


def test_module_experts_validation():
    with pytest.raises(ValueError, match="non-empty"):
        ModuleExperts([])
    with pytest.raises(TypeError, match=r"experts\[1\]"):
        ModuleExperts([nn.Linear(2, 2), "x"])
    experts = ModuleExperts([nn.Linear(2, 3)])
    with pytest.raises(ValueError, match="d_out"):
        experts(torch.randn(3, 2), _topk_routing(3, 1))


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch has no grouped GEMM")
@given(
    T=st.integers(0, 15),
    E=st.integers(1, 7),
    activation=st.sampled_from(ACTIVATIONS),
    bias=st.booleans(),
    data=st.data(),
)
def test_grouped_gemm_path_equals_segment_loop(T, E, activation, bias, data):
    """The CUDA fast path's logic (offsets, biases, SwiGLU), run on CPU in fp32."""
    k = data.draw(st.integers(1, E))
    routing = data.draw(routings(num_tokens=T, num_experts=E, k=k))
    torch.manual_seed(data.draw(st.integers(0, 100)))
    grouped = FFNExperts(E, 16, 32, activation=activation, bias=bias, grouped_gemm=True)
    loop = FFNExperts(E, 16, 32, activation=activation, bias=bias, grouped_gemm=False)
    loop.load_state_dict(grouped.state_dict())
    x = torch.randn(T, 16)
    grad = torch.randn(T, 16)
    outs = []
    for experts in (grouped, loop):
        x_ = x.clone().requires_grad_(True)
        y = experts(x_, routing)
        y.backward(grad)
        outs.append((y.detach(), x_.grad, experts.w_in.grad, experts.w_out.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
