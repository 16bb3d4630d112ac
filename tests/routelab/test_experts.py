import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import routelab
from routelab import FFNExperts, ModuleExperts, MoE, Routing
from routelab.experts import ExpertDispatch, grouped_kernel_accepts, grouped_linear
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


def _run(experts, path, x, routing, coef):
    """Output and every gradient (x, routing weights, each parameter) of ``sum(y * coef)``."""
    x_ = x.clone().requires_grad_(True)
    w_ = routing.weight.clone().requires_grad_(True)
    r = routing.with_weight(w_)
    experts.zero_grad()
    y = getattr(experts, path)(x_, r)
    (y * coef.to(y.dtype)).sum().backward()
    return [y.detach(), x_.grad, w_.grad, *_grads(list(experts.parameters()))]


@given(
    T=st.integers(0, 17),
    d=st.integers(1, 9),
    h=st.integers(1, 11),
    E=st.integers(1, 64),
    activation=st.sampled_from(ACTIVATIONS),
    bias=st.booleans(),
    path=st.sampled_from(["grouped", "segment", "loop_forward"]),
    data=st.data(),
)
def test_every_path_equals_dense_reference(T, d, h, E, activation, bias, path, data):
    """Each execution path against the dense reference on the output and every gradient:
    odd sizes (fp64, segment kernel and loop), aligned sizes for the grouped kernel (fp32
    against an fp64 dense reference), empty experts, T = 0, variable entries per token."""
    k = data.draw(st.integers(1, E), label="k")
    seed = data.draw(st.integers(0, 10_000), label="seed")
    mode = data.draw(st.sampled_from([k, None]), label="k or variable")
    routing = data.draw(
        routings(num_tokens=T, num_experts=E, k=mode, dtype=torch.float64), label="routing"
    )
    grouped = path == "grouped"
    if grouped:
        d, h = 4 * d, 4 * h  # the grouped kernel's fp32 alignment
    torch.manual_seed(seed)
    reference = FFNExperts(E, d, h, activation=activation, bias=bias, dtype=torch.float64)
    experts = copy.deepcopy(reference)
    experts.grouped_gemm = grouped
    if grouped:
        experts = experts.float()
        routing = routing.with_weight(routing.weight.float())
    x = torch.randn(T, d, dtype=torch.float64)
    coef = torch.randn(T, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    got = _run(
        experts,
        "forward" if path != "loop_forward" else path,
        x.to(experts.w_in.dtype),
        routing,
        coef,
    )
    want = _run(reference, "dense_forward", x, routing.with_weight(routing.weight.double()), coef)
    tol = 1e-4 if grouped else 1e-10
    for a, b in zip(got, want):
        if a is None or b is None:  # a parameter no entry reaches may have no gradient
            assert a is None or not a.abs().any()
            assert b is None or not b.abs().any()
        else:
            torch.testing.assert_close(a.double(), b, atol=tol, rtol=tol)


def test_kernel_choice_follows_the_documented_rule():
    experts = FFNExperts(3, 8, 12)
    assert experts.kernel(torch.randn(2, 8)) == "grouped"  # fp32, 32 and 48 bytes
    assert FFNExperts(3, 8, 6).kernel(torch.randn(2, 8)) == "segment"  # h * 4 = 24 bytes
    assert experts.double().kernel(torch.randn(2, 8, dtype=torch.float64)) == "segment"
    assert FFNExperts(3, 8, 12, grouped_gemm=False).kernel(torch.randn(2, 8)) == "segment"
    assert not grouped_kernel_accepts(torch.randn(2, 6, dtype=torch.bfloat16), torch.randn(1, 6, 8))
    assert grouped_kernel_accepts(torch.randn(2, 8, dtype=torch.bfloat16), torch.randn(1, 8, 8))


def test_segment_kernel_writes_weight_gradients_without_restacking():
    """The weight gradient of the stacked parameters is produced by the kernel itself
    (one [E, d, h] tensor), never by stacking or concatenating per-expert gradients."""
    torch.manual_seed(0)
    experts = FFNExperts(6, 5, 7, grouped_gemm=False, bias=True)
    routing = Routing.from_topk(torch.randint(0, 6, (9, 1)), torch.rand(9, 1), 6)
    x = torch.randn(9, 5, requires_grad=True)
    y = experts(x, routing)
    with torch.profiler.profile() as prof:  # the backward pass alone
        y.sum().backward()
    names = {event.key for event in prof.key_averages()}
    assert not names & {"aten::stack", "aten::cat", "aten::unbind"}, names
    assert experts.w_in.grad.shape == (6, 5, 7)


@pytest.mark.parametrize("per_segment_bias", [True, False])  # CPU's way, accelerators' way
@pytest.mark.parametrize("kernel", ["grouped", "segment"])
def test_grouped_linear_kernels_match_per_expert_matmuls(kernel, per_segment_bias, monkeypatch):
    monkeypatch.setattr(routelab.experts, "_host_segment_loops", lambda xs: per_segment_bias)
    torch.manual_seed(1)
    counts = torch.tensor([3, 0, 5, 1])
    xs = torch.randn(9, 4, requires_grad=True)
    w = torch.randn(4, 4, 8, requires_grad=True)
    b = torch.randn(4, 8, requires_grad=True)
    y = grouped_linear(xs, w, b, counts, kernel)
    expert = torch.repeat_interleave(torch.arange(4), counts)
    ref = torch.einsum("na,nab->nb", xs, w[expert]) + b[expert]
    torch.testing.assert_close(y, ref)
    grad = torch.randn(9, 8)
    got = torch.autograd.grad(y, (xs, w, b), grad)
    want = torch.autograd.grad(ref, (xs, w, b), grad)
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c)
    # only the weight's gradient asked for (two outputs of the gradient op unused)
    (g_w,) = torch.autograd.grad(grouped_linear(xs.detach(), w, None, counts, kernel).sum(), w)
    ref_w = torch.einsum("na,nab->nb", xs.detach(), w[expert])
    torch.testing.assert_close(g_w, torch.autograd.grad(ref_w.sum(), w)[0])
    with pytest.raises(ValueError, match="kernel"):
        grouped_linear(xs, w, b, counts, "fast")


def test_run_sorted_is_the_executor_on_rows_in_expert_order():
    """The entry point for rows already sorted by expert (the expert-parallel receiving
    side): counts as a tensor or as ints, each row through its expert, no weights."""
    torch.manual_seed(2)
    experts = FFNExperts(4, 8, 12)
    counts = [2, 0, 3, 1]
    xs = torch.randn(6, 8)
    ids = [0, 0, 2, 2, 2, 3]
    want = torch.stack([experts.expert_forward(e, xs[n : n + 1])[0] for n, e in enumerate(ids)])
    torch.testing.assert_close(experts.run_sorted(xs, counts), want)
    torch.testing.assert_close(experts.run_sorted(xs, torch.tensor(counts)), want)
    modules = ModuleExperts([nn.Linear(8, 3) for _ in range(4)], d_out=3)
    torch.testing.assert_close(
        modules.run_sorted(xs, counts),
        torch.stack([modules.experts[e](xs[n]) for n, e in enumerate(ids)]),
    )
    with pytest.raises(ValueError, match="sum to 5"):
        experts.run_sorted(xs, [2, 0, 2, 1])
    with pytest.raises(ValueError, match="3 experts"):
        experts.run_sorted(xs, [2, 0, 4])


class _ScaledFFNExperts(FFNExperts):
    """An FFNExperts with one more per-expert parameter (a learned output scale)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.out_scale = nn.Parameter(torch.rand(self.num_experts, self.d_model))


def test_experts_shard_every_per_expert_tensor_themselves():
    """A parameter added to FFNExperts shards and gathers with no change anywhere else."""
    torch.manual_seed(3)
    full = _ScaledFFNExperts(6, 4, 8, activation="swiglu")
    full.register_buffer("usage", torch.arange(6.0))
    shard = full.select_experts(range(2, 4))
    assert isinstance(shard, _ScaledFFNExperts) and shard.num_experts == 2
    assert set(shard.expert_tensors()) == set(full.expert_tensors())
    for name, tensor in full.expert_tensors().items():
        torch.testing.assert_close(shard.expert_tensors()[name], tensor[2:4])
    assert isinstance(shard.out_scale, nn.Parameter) and "usage" in dict(shard.named_buffers())
    shard.out_scale.data.add_(1.0)  # a copy: the full experts are untouched
    assert not torch.equal(shard.out_scale, full.out_scale[2:4])
    back = shard.with_expert_tensors(
        {
            n: torch.cat([t[:2], shard.expert_tensors()[n], t[4:]])
            for n, t in full.expert_tensors().items()
        }
    )
    assert back.num_experts == 6
    torch.testing.assert_close(back.out_scale[2:4], shard.out_scale)
    x = torch.randn(3, 4)
    torch.testing.assert_close(shard.expert_forward(1, x), full.expert_forward(3, x))
    with pytest.raises(ValueError, match="ids"):
        full.select_experts([6])
    with pytest.raises(ValueError, match="exactly"):
        shard.with_expert_tensors({"w_in": full.w_in})
    with pytest.raises(TypeError, match="submodules"):
        ModuleExperts([nn.Linear(2, 2)]).select_experts([0])


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


@pytest.mark.parametrize("grouped_gemm", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_dtypes_track_fp64(dtype, grouped_gemm):
    torch.manual_seed(0)
    E, d, h, T = 5, 16, 24, 40
    experts64 = FFNExperts(E, d, h, activation="gelu", dtype=torch.float64)
    experts = FFNExperts(E, d, h, activation="gelu", dtype=dtype, grouped_gemm=grouped_gemm)
    experts.load_state_dict({k: v.to(dtype) for k, v in experts64.state_dict().items()})
    idx = torch.argsort(torch.rand(T, E), dim=1)[:, :2]
    w = torch.softmax(torch.randn(T, 2), dim=1)
    x = torch.randn(T, d)
    coef = torch.randn(T, d)
    got = _run(experts, "forward", x.to(dtype), Routing.from_topk(idx, w.to(dtype), E), coef)
    want = _run(experts64, "forward", x.double(), Routing.from_topk(idx, w.double(), E), coef)
    assert got[0].dtype == dtype
    tol = {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 1e-2}[dtype]
    for a, b in zip(got, want):  # output, d x, d weight, every parameter's gradient
        scale = b.abs().max().clamp_min(1.0)
        torch.testing.assert_close(a.double() / scale, b / scale, atol=tol, rtol=tol)


@pytest.mark.parametrize("grouped_gemm", [True, False])
def test_empty_experts_zero_tokens_and_zero_entries(grouped_gemm):
    experts = FFNExperts(4, 4, 8, grouped_gemm=grouped_gemm)
    # T = 0
    x0 = torch.randn(0, 4, requires_grad=True)
    y = experts(x0, Routing.from_topk(torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2), 4))
    assert y.shape == (0, 4)
    y.sum().backward()
    assert experts.w_in.grad is not None and not experts.w_in.grad.any()
    # N = 0 with T > 0: output is zero
    empty = Routing(
        torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0), 6, 4
    )
    x = torch.randn(6, 4, requires_grad=True)
    y = experts(x, empty)
    assert torch.equal(y, torch.zeros(6, 4))
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros(6, 4))
    # every entry on one expert: the other three are empty
    one = Routing(torch.arange(6), torch.full((6,), 2), torch.ones(6), 6, 4)
    torch.testing.assert_close(experts(x, one), experts.dense_forward(x, one))


def test_dispatch_plan_sorts_by_expert_and_keeps_pairs():
    r = Routing(
        torch.tensor([0, 0, 1, 2, 2]), torch.tensor([2, 0, 2, 1, 0]), torch.arange(5.0), 3, 3
    )
    plan = ExpertDispatch.plan(r)
    assert plan.counts.tolist() == [2, 1, 2] and plan.segments.sizes() == [2, 1, 2]
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


@pytest.mark.slow
@pytest.mark.parametrize("d_hidden", [4, 12])  # weights on the hidden rows, or on the output
def test_compiled_moe_fullgraph_equals_eager(d_hidden):
    """torch.compile(MoE, fullgraph=True) with validation off: no graph break (no host
    sync for the expert counts), the same output and gradients as eager."""
    torch.manual_seed(4)
    moe = MoE(TopKGate(8, 4, k=2), FFNExperts(4, 8, d_hidden))
    x = torch.randn(10, 8)
    grad = torch.randn(10, 8)

    def step(layer):
        moe.zero_grad()
        x_ = x.clone().requires_grad_(True)
        y = layer(x_).output
        y.backward(grad)
        return [y.detach(), x_.grad] + [p.grad.clone() for p in moe.parameters()]

    with routelab.validation(False):
        eager = step(moe)
        compiled = step(torch.compile(moe, fullgraph=True, backend="aot_eager"))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("d", "h"), [(3, 5), (6, 2)])  # both forms of the weights' gradient
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_cpu_cache_local_loop_equals_dense_reference(activation, bias, d, h):
    """The measured CPU rule's per-expert loop (at least max(96, h / 16) entries per
    expert) against the dense reference: output and every gradient (x, routing weights,
    parameters), top-2 over 3 experts one of which gets no entry."""
    torch.manual_seed(5)
    T, E = 800, 3
    experts = FFNExperts(E, d, h, activation=activation, bias=bias, dtype=torch.float64)
    idx = torch.argsort(torch.rand(T, 2), dim=1)  # experts 0 and 1 only: expert 2 empty
    routing = Routing.from_topk(idx, torch.rand(T, 2, dtype=torch.float64), E)
    assert experts._cache_local_loop(torch.zeros(1, d, dtype=torch.float64), 2 * T)
    x = torch.randn(T, d, dtype=torch.float64)
    coef = torch.randn(T, d, dtype=torch.float64)
    got = _run(experts, "forward", x, routing, coef)
    want = _run(experts, "dense_forward", x, routing, coef)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    plan = ExpertDispatch.plan(routing)  # and the entry point for sorted rows
    rows = plan.gather(x).requires_grad_(True)
    ys = experts.run_sorted(rows, plan.counts)
    ids = plan.expert.tolist()
    ref_rows = rows.detach().clone().requires_grad_(True)
    ref = torch.cat([experts.expert_forward(e, ref_rows[n : n + 1]) for n, e in enumerate(ids)])
    torch.testing.assert_close(ys, ref)
    upstream = torch.randn(len(ids), d, dtype=torch.float64)
    ys.backward(upstream)
    ref.backward(upstream)
    torch.testing.assert_close(rows.grad, ref_rows.grad)


def test_cpu_cache_local_loop_writes_weight_gradients_in_place():
    """Issue 17: no re-stacking of the weight gradients. The loop's backward runs no
    concatenation or stacking op (the autograd loop over views of the stacks ran one per
    stacked parameter)."""
    torch.manual_seed(0)
    T, E, d, h = 600, 2, 4, 8
    experts = FFNExperts(E, d, h)
    routing = Routing.from_topk(torch.randint(0, E, (T, 1)), torch.rand(T, 1), E)
    assert experts._cache_local_loop(torch.zeros(1, d), T)
    y = experts(torch.randn(T, d, requires_grad=True), routing)
    with torch.profiler.profile() as prof:
        y.sum().backward()
    ops = {event.key for event in prof.key_averages()}
    assert not ops & {"aten::cat", "aten::stack", "aten::_cat"}, sorted(ops)
    assert all(p.grad is not None and p.grad.shape == p.shape for p in experts.parameters())


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_cpu_cache_local_loop_in_bfloat16_follows_the_fp64_reference(activation):
    """The loop in bf16 (fp32 accumulation of the scattered rows) against the fp64 dense
    reference on the same values: within bf16 rounding."""
    torch.manual_seed(2)
    T, E, d, h = 1200, 4, 16, 8
    experts = FFNExperts(E, d, h, activation=activation, dtype=torch.bfloat16)
    reference = FFNExperts(E, d, h, activation=activation, dtype=torch.float64)
    reference.load_state_dict({n: t.double() for n, t in experts.state_dict().items()})
    idx = torch.argsort(torch.rand(T, E), dim=1)[:, :2]
    routing = Routing.from_topk(idx, torch.rand(T, 2), E)
    x = torch.randn(T, d).to(torch.bfloat16)
    assert experts._cache_local_loop(x, routing.num_entries)
    coef = torch.randn(T, d, dtype=torch.float64)
    got = _run(experts, "forward", x, routing, coef)
    want = _run(
        reference, "dense_forward", x.double(), routing.with_weight(routing.weight.double()), coef
    )
    for a, b in zip(got, want):
        scale = float(b.abs().max())
        torch.testing.assert_close(a.double(), b, atol=3e-2 * scale, rtol=0)


def test_huge_page_hint_covers_whole_huge_pages_inside_the_buffer(monkeypatch):
    """The weight-gradient buffer's hint: madvise(MADV_HUGEPAGE) on exactly the whole
    2 MiB pages inside the buffer, only for buffers above 32 MiB, and a buffer of the
    right shape either way."""
    from routelab import experts as module

    calls = []
    monkeypatch.setattr(module, "_madvise", lambda *args: calls.append(args) or 0)
    big = module._empty_written_once(torch.empty(9, 1 << 20))  # 36 MiB of fp32
    assert big.shape == (9, 1 << 20) and big.is_contiguous() and len(calls) == 1
    begin, length, advice = calls[0]
    start, stop = big.data_ptr(), big.data_ptr() + big.numel() * 4
    huge = 2 << 20
    assert advice == 14 and begin % huge == 0 and length % huge == 0
    assert start <= begin < start + huge and stop - huge < begin + length <= stop
    module._empty_written_once(torch.empty(1 << 20))  # 4 MiB: from the heap, no hint
    assert len(calls) == 1
