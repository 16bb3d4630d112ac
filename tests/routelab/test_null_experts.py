import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from routelab import FFNExperts, ModuleExperts, Routing
from routelab.experts import Experts
from routelab.null_experts import NullExperts
from routelab.testing import routings


def reference_output(layer: NullExperts, x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """MoE++ expert by expert, one entry at a time (Jin et al. 2024)."""
    zero, copy, constant = (layer.kind_range(k) for k in ("zero", "copy", "constant"))
    rows = []
    for t in range(x.shape[0]):
        y = x[t] * 0.0  # in the graph even for a token without entries
        for n in torch.nonzero(routing.token == t).flatten().tolist():
            e, w = int(routing.expert[n]), routing.weight[n]
            if e < layer.num_ffn:
                out = layer.experts.expert_forward(e, x[t : t + 1])[0]
            elif e in zero:
                out = torch.zeros_like(x[t])  # E(x) = 0
            elif e in copy:
                out = x[t]  # E(x) = x
            else:
                c = e - constant.start  # E(x) = a1 x + a2 v, [a1, a2] = softmax(x W_c)
                a = torch.softmax(x[t] @ layer.constant_gate[c], dim=0)
                out = a[0] * x[t] + a[1] * layer.constant[c]
            y = y + w * out
        rows.append(y)
    return torch.stack(rows) if rows else x * 0.0


@given(
    counts=st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(0, 2)),
    data=st.data(),
)
def test_outputs_and_gradients_match_the_per_entry_reference(counts, data):
    zero, copy, constant = counts
    torch.manual_seed(data.draw(st.integers(0, 100)))
    layer = NullExperts(
        FFNExperts(3, 5, 7), num_zero=zero, num_copy=copy, num_constant=constant
    ).double()
    routing = data.draw(routings(num_experts=layer.num_experts, max_tokens=9, dtype=torch.float64))
    x = torch.randn(routing.num_tokens, 5, dtype=torch.float64, requires_grad=True)
    weight = routing.weight.clone().requires_grad_()
    routing = routing.with_weight(weight)
    params = [x, weight, *layer.parameters()]
    got = layer(x, routing)
    expected = reference_output(layer, x, routing)
    torch.testing.assert_close(got, expected)
    # the executor protocol: rows in expert order through run_sorted, then combined
    torch.testing.assert_close(Experts.forward(layer, x, routing), expected)
    g = torch.randn_like(got)
    grads = torch.autograd.grad((got * g).sum(), params, allow_unused=True)
    ref_grads = torch.autograd.grad((expected * g).sum(), params, allow_unused=True)
    for a, b in zip(grads, ref_grads):
        if a is None or b is None:
            assert (a is None or not a.any()) and (b is None or not b.any())
        else:
            torch.testing.assert_close(a, b)


class CountingExperts(FFNExperts):
    """FFNExperts that record how many entries (rows) each forward received."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rows_seen: list[int] = []

    def forward(self, x, routing):
        self.rows_seen.append(routing.num_entries)
        return super().forward(x, routing)


def test_null_entries_never_reach_the_ffn_experts():
    torch.manual_seed(0)
    inner = CountingExperts(4, 6, 8)
    layer = NullExperts(inner, num_zero=2, num_copy=1, num_constant=1)
    token = torch.arange(10).repeat_interleave(2)
    expert = torch.tensor([0, 4, 5, 6, 7, 4, 1, 2, 4, 5, 6, 7, 3, 4, 5, 6, 7, 4, 5, 0])
    routing = Routing(token, expert, torch.rand(20), 10, layer.num_experts)
    layer(torch.randn(10, 6), routing)
    assert inner.rows_seen == [int((expert < 4).sum())] == [5]
    only_null = Routing(token, expert.clamp(min=4), torch.rand(20), 10, layer.num_experts)
    y = layer(torch.randn(10, 6), only_null)
    assert inner.rows_seen[-1] == 0 and y.shape == (10, 6)


def test_zero_experts_discard_and_copy_experts_pass_through():
    layer = NullExperts(FFNExperts(2, 3, 4), num_zero=1, num_copy=1, num_constant=0)
    x = torch.randn(2, 3)
    routing = Routing(torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([1.0, 0.5]), 2, 4)
    y = layer(x, routing)
    assert torch.equal(y[0], torch.zeros(3))
    torch.testing.assert_close(y[1], 0.5 * x[1])
    assert list(layer.null_expert_ids) == [2, 3]


def test_module_experts_with_constant_experts_need_the_width():
    experts = ModuleExperts([torch.nn.Linear(4, 4) for _ in range(2)])
    with pytest.raises(ValueError, match="d_model"):
        NullExperts(experts, num_constant=1)
    layer = NullExperts(experts, num_constant=1, d_model=4)
    routing = Routing(torch.tensor([0, 0]), torch.tensor([1, 4]), torch.ones(2), 1, 5)
    assert layer(torch.randn(1, 4), routing).shape == (1, 4)


def test_bad_arguments_are_clear_errors():
    layer = NullExperts(FFNExperts(2, 3, 4))
    with pytest.raises(ValueError, match="num_experts"):
        layer(torch.randn(2, 3), Routing(torch.tensor([0]), torch.tensor([0]), torch.ones(1), 2, 2))
    with pytest.raises(ValueError, match="num_zero"):
        NullExperts(FFNExperts(2, 3, 4), num_zero=-1)
    with pytest.raises(TypeError, match="experts"):
        NullExperts(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="kind"):
        layer.kind_range("one")
