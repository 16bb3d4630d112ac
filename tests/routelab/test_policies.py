import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from routelab import Routing
from routelab.policies import CapacityPolicy
from routelab.testing import check_routing, routings


def _reference_keep(routing, capacity, drop_order):
    """Brute force: walk the entries in priority order, admit while the expert has room."""
    n = routing.num_entries
    if drop_order == "position":
        order = sorted(range(n), key=lambda i: (int(routing.token[i]), i))
    else:
        order = sorted(range(n), key=lambda i: (-float(routing.weight[i]), i))
    used = [0] * routing.num_experts
    keep = [False] * n
    for i in order:
        e = int(routing.expert[i])
        if used[e] < capacity:
            used[e] += 1
            keep[i] = True
    return torch.tensor(keep, dtype=torch.bool)


@given(routing=routings(max_tokens=30), data=st.data())
def test_capacity_is_never_exceeded_and_drop_order_is_the_documented_one(routing, data):
    drop_order = data.draw(st.sampled_from(CapacityPolicy.DROP_ORDERS))
    if data.draw(st.booleans()):
        factor = data.draw(st.floats(0.1, 3.0))
        policy = CapacityPolicy(factor, drop_order=drop_order)
        capacity = math.ceil(factor * routing.num_entries / routing.num_experts)
    else:
        capacity = data.draw(st.integers(0, 6))
        policy = CapacityPolicy(capacity=capacity, drop_order=drop_order)
    out = policy(routing)
    assert out.capacity == capacity
    check_routing(out, capacity=capacity)
    keep = _reference_keep(routing, capacity, drop_order)
    assert torch.equal(out.token, routing.token[keep])
    assert torch.equal(out.expert, routing.expert[keep])
    assert torch.equal(out.weight, routing.weight[keep])
    assert out.dropped.num_entries == int((~keep).sum())
    assert torch.equal(out.dropped.expert, routing.expert[~keep])
    # nothing lost: kept + dropped = original, per expert
    assert torch.equal(out.load() + out.dropped.load(), routing.load())


def test_position_order_keeps_earlier_tokens():
    r = Routing(
        torch.tensor([3, 0, 2, 1]),
        torch.zeros(4, dtype=torch.long),
        torch.tensor([0.9, 0.1, 0.5, 0.2]),
        4,
        1,
    )
    out = CapacityPolicy(capacity=2)(r)
    assert sorted(out.token.tolist()) == [0, 1]
    out = CapacityPolicy(capacity=2, drop_order="score")(r)
    assert sorted(out.token.tolist()) == [2, 3]


def test_stacked_policies_accumulate_dropped_entries():
    r = Routing(torch.arange(6), torch.zeros(6, dtype=torch.long), torch.ones(6), 6, 2)
    out = CapacityPolicy(capacity=2)(CapacityPolicy(capacity=4)(r))
    assert out.num_entries == 2 and out.dropped.num_entries == 4
    assert out.capacity == 2


def test_gradient_flows_through_kept_weights():
    w = torch.tensor([0.5, 0.4, 0.3], requires_grad=True)
    r = Routing(torch.arange(3), torch.zeros(3, dtype=torch.long), w, 3, 1)
    CapacityPolicy(capacity=2)(r).weight.sum().backward()
    assert w.grad.tolist() == [1.0, 1.0, 0.0]


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((), {}, "exactly one"),
        ((1.0,), {"capacity": 3}, "exactly one"),
        ((0.0,), {}, "capacity_factor"),
        ((-1.0,), {}, "capacity_factor"),
        ((), {"capacity": -1}, "capacity must"),
        ((1.0,), {"drop_order": "random"}, "drop_order"),
        ((1.0,), {"min_capacity": -1}, "min_capacity"),
    ],
)
def test_bad_capacity_arguments(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        CapacityPolicy(*args, **kwargs)


def test_policy_rejects_non_routing():
    with pytest.raises(TypeError, match="routing must be"):
        CapacityPolicy(1.0)(torch.zeros(3))
