"""MoE's shared experts (DeepSeekMoE, Qwen2-MoE's gate) and the sequence layout a router
receives from MoE."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from routelab import FFNExperts, MoE, Router, Routing
from routelab.moe import SharedExperts
from routelab.router import check_sequence_length
from routelab.routers import SoftmaxGate
from routelab.routers.topk import TopKGate, TopKRouter


def separate_ffns(shared: SharedExperts, x):
    """The n shared experts as n separate SwiGLU FFNs over slices of the hidden units."""
    h = shared.d_hidden
    w_in, w_gate, w_out = shared.ffn.w_in[0], shared.ffn.w_gate[0], shared.ffn.w_out[0]
    total = 0
    for j in range(shared.num_experts):
        cols = slice(j * h, (j + 1) * h)
        total = total + (F.silu(x @ w_gate[:, cols]) * (x @ w_in[:, cols])) @ w_out[cols]
    return total


@pytest.mark.parametrize("gated", [False, True])
def test_shared_experts_are_the_sum_of_n_ffns_times_the_gate(gated):
    torch.manual_seed(0)
    shared = SharedExperts(6, 4, num_experts=3, activation="swiglu", gated=gated).double()
    x = torch.randn(7, 6, dtype=torch.float64)
    expected = separate_ffns(shared, x)
    if gated:
        expected = torch.sigmoid(x @ shared.gate.weight.t()) * expected
    torch.testing.assert_close(shared(x), expected)


def test_moe_adds_the_shared_output_and_trains_it():
    torch.manual_seed(1)
    router = TopKGate(6, 4, k=2)
    experts = FFNExperts(4, 6, 5)
    shared = SharedExperts(6, 5, gated=True)
    x = torch.randn(2, 3, 6)
    with_shared = MoE(router, experts, shared_experts=shared)(x).output
    without = MoE(router, experts)(x).output
    torch.testing.assert_close(with_shared - without, shared(x.reshape(6, 6)).reshape(2, 3, 6))
    with_shared.sum().backward()
    assert all(p.grad is not None for p in shared.parameters())


def test_shared_experts_errors():
    with pytest.raises(TypeError, match="shared_experts"):
        MoE(TopKGate(6, 4), FFNExperts(4, 6, 5), shared_experts="ffn")
    with pytest.raises(ValueError, match="d_model"):
        MoE(TopKGate(6, 4), FFNExperts(4, 6, 5), shared_experts=SharedExperts(5, 5))
    with pytest.raises(ValueError, match="num_experts"):
        SharedExperts(6, 5, num_experts=0)
    with pytest.raises(TypeError, match="gated"):
        SharedExperts(6, 5, gated=1)


class LayoutSpy(Router):
    """Records the sequence_length it receives."""

    uses_sequence_layout = True

    def __init__(self, d_model, num_experts):
        super().__init__(d_model, num_experts)
        self.seen = []

    def route(self, x, token_ids, *, sequence_length=None):
        self.seen.append(sequence_length)
        T = x.shape[0]
        return Routing(torch.arange(T), torch.zeros(T, dtype=torch.long), x.new_ones(T), T, 1)


def test_moe_passes_the_sequence_length_to_routers_that_ask_for_it():
    spy = LayoutSpy(4, 1)
    moe = MoE(spy, FFNExperts(1, 4, 3))
    moe(torch.randn(2, 3, 4))
    moe(torch.randn(5, 2, 3, 4))  # leading dims flatten into sequences of the last-but-one
    moe(torch.randn(6, 4))  # 2-D: the batch is one sequence
    moe(torch.randn(2, 0, 4))  # empty
    assert spy.seen == [3, 3, None, None]


def test_other_routers_are_called_without_the_layout():
    gate = SoftmaxGate(4, 3)
    assert not gate.uses_sequence_layout
    calls = []
    original = gate.route

    def spying_route(x, token_ids):  # the plain two-argument signature
        calls.append(x.shape[0])
        return original(x, token_ids)

    gate.route = spying_route
    MoE(gate, FFNExperts(3, 4, 3))(torch.randn(2, 3, 4))
    gate(torch.randn(6, 4), sequence_length=3)  # accepted, validated, ignored
    assert calls == [6, 6]


def test_sequence_layout_reaches_the_sequence_balance_loss():
    torch.manual_seed(2)
    router = TopKRouter(4, 4, k=1, sequence_balance_weight=1.0).double()
    moe = MoE(router, FFNExperts(4, 4, 3)).double()
    x = torch.randn(3, 4, 4, dtype=torch.float64)
    per_sequence = moe(x).routing.aux["sequence_balance"]
    as_one = router(x.reshape(12, 4)).aux["sequence_balance"]
    by_hand = router(x.reshape(12, 4), sequence_length=4).aux["sequence_balance"]
    torch.testing.assert_close(per_sequence, by_hand)
    assert not torch.allclose(per_sequence, as_one)


def test_bad_sequence_length_is_a_clear_error():
    with pytest.raises(ValueError, match="divide"):
        check_sequence_length(4, 10)
    with pytest.raises(ValueError, match="sequence_length"):
        TopKGate(4, 3)(torch.randn(6, 4), sequence_length=0)
    with pytest.raises(TypeError, match="sequence_length"):
        TopKGate(4, 3)(torch.randn(6, 4), sequence_length=2.0)
    assert check_sequence_length(5, 0) == 5
