from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from routelab import Routing
from routelab.policies import CapacityPolicy
from routelab.routers.topk import topk_softmax_routing
from routelab.testing import PolicyContract, check_routing, routings


def _entries_of_token(routing):
    """token -> its entry indices in routing order (a plain dict of lists)."""
    per = {t: [] for t in range(routing.num_tokens)}
    for i, t in enumerate(routing.token.tolist()):
        per[t].append(i)
    return per


def _brute_force_order(routing, drop_order):
    """Entry indices in the order of the drop order's definition, by plain Python loops."""
    n, T = routing.num_entries, routing.num_tokens
    per = _entries_of_token(routing)
    if drop_order == "token":  # Megatron-Core: token by token, a token's entries in order
        return [i for t in range(T) for i in per[t]]
    if drop_order == "score":  # per entry by descending weight, ties to the earlier entry
        return sorted(range(n), key=lambda i: (-float(routing.weight[i]), i))
    if drop_order == "choice":  # GShard: all first choices, then all second choices, ...
        tokens = list(range(T))
    else:  # batch priority: tokens by their top gate value, descending, ties earlier token
        if routing.probs is not None:
            top = [max(routing.probs[t].tolist()) for t in range(T)]
        else:
            top = [max((float(routing.weight[i]) for i in per[t]), default=0.0) for t in range(T)]
        tokens = sorted(range(T), key=lambda t: (-top[t], t))
    depth = max((len(v) for v in per.values()), default=0)
    return [per[t][j] for j in range(depth) for t in tokens if j < len(per[t])]


def _reference_keep(routing, capacity, drop_order):
    """Brute force: walk the entries in priority order, admit while the expert has room."""
    used = [0] * routing.num_experts
    keep = [False] * routing.num_entries
    for i in _brute_force_order(routing, drop_order):
        e = int(routing.expert[i])
        if used[e] < capacity:
            used[e] += 1
            keep[i] = True
    return torch.tensor(keep, dtype=torch.bool)


def _shuffled(routing, gen, with_probs):
    """The same entries in a random order (so routing order is not token order), with
    random probs where asked."""
    perm = torch.randperm(routing.num_entries, generator=gen)
    probs = None
    if with_probs:
        probs = torch.rand(routing.num_tokens, routing.num_experts, generator=gen)
        probs = torch.round(probs * 4) / 4  # ties between tokens' top values on purpose
    return Routing(
        routing.token[perm],
        routing.expert[perm],
        routing.weight[perm],
        routing.num_tokens,
        routing.num_experts,
        probs=probs,
    )


@given(routing=routings(max_tokens=30), data=st.data())
def test_capacity_is_never_exceeded_and_drop_order_is_the_documented_one(routing, data):
    drop_order = data.draw(st.sampled_from(CapacityPolicy.DROP_ORDERS))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    routing = _shuffled(routing, gen, with_probs=data.draw(st.booleans()))
    if data.draw(st.booleans()):
        text = data.draw(st.sampled_from(["0.1", "0.5", "1.0", "1.1", "1.25", "1.3", "2.2"]))
        policy = CapacityPolicy(float(text), drop_order=drop_order)
        q = Fraction(text) * routing.num_entries  # exact: ceil(q / E)
        capacity = -((-q.numerator) // (q.denominator * routing.num_experts))
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


def _gshard_top2_keep(indices, capacity, num_experts):
    """A direct transcription of GShard's Algorithm 1 / mesh-tensorflow's top-2 dispatch:
    position_in_expert_1 = cumsum(mask_1) - 1, truncated at capacity; second choices are
    queued after every kept first choice: cumsum(mask_2) - 1 + sum(mask_1)."""
    mask_1 = F.one_hot(indices[:, 0], num_experts)
    position_1 = (torch.cumsum(mask_1, dim=0) - 1) * mask_1
    mask_1 = mask_1 * (position_1 < capacity)
    mask_2 = F.one_hot(indices[:, 1], num_experts)
    position_2 = (torch.cumsum(mask_2, dim=0) - 1 + mask_1.sum(dim=0, keepdim=True)) * mask_2
    mask_2 = mask_2 * (position_2 < capacity)
    return torch.stack([mask_1.sum(1), mask_2.sum(1)], dim=1).reshape(-1).bool()


@given(
    T=st.integers(0, 40),
    E=st.integers(2, 6),
    capacity=st.integers(0, 12),
    seed=st.integers(0, 2**16),
)
def test_choice_order_is_gshard_algorithm_1(T, E, capacity, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=gen)
    routing = topk_softmax_routing(logits, 2)
    keep = _gshard_top2_keep(routing.expert.view(T, 2), capacity, E)
    out = CapacityPolicy(capacity=capacity, drop_order="choice")(routing)
    assert torch.equal(out.token, routing.token[keep])
    assert torch.equal(out.expert, routing.expert[keep])


def test_the_orders_differ_where_their_definitions_do():
    # tokens 0 and 1 both send their 2nd choice (token 0) and 1st choice (token 1) to expert 0
    r = Routing(
        torch.tensor([0, 0, 1, 1]),
        torch.tensor([1, 0, 0, 2]),
        torch.tensor([0.6, 0.4, 0.7, 0.3]),
        2,
        3,
        probs=torch.tensor([[0.4, 0.6, 0.0], [0.7, 0.0, 0.3]]),
    )
    kept = {o: CapacityPolicy(capacity=1, drop_order=o)(r) for o in CapacityPolicy.DROP_ORDERS}
    expert0 = {o: out.token[out.expert == 0].tolist() for o, out in kept.items()}
    assert expert0 == {"token": [0], "choice": [1], "batch_priority": [1], "score": [1]}
    # batch priority ranks tokens by top gate value: token 1 (0.7) before token 0 (0.6)
    r2 = Routing(torch.tensor([0, 1]), torch.tensor([0, 0]), torch.tensor([0.6, 0.7]), 2, 1)
    out = CapacityPolicy(capacity=1, drop_order="batch_priority")(r2)
    assert out.token.tolist() == [1]
    assert CapacityPolicy(capacity=1, drop_order="choice")(r2).token.tolist() == [0]


def test_position_is_a_deprecated_alias_of_token():
    with pytest.warns(DeprecationWarning, match="token"):
        policy = CapacityPolicy(1.0, drop_order="position")
    assert policy.drop_order == "token"
    assert "position" not in CapacityPolicy.DROP_ORDERS


def test_exact_capacity_sweep_against_rational_arithmetic():
    for text in ["0.3", "0.7", "1.1", "1.15", "1.2", "1.25", "2.2", "2.675", "3.3"]:
        for n in (0, 1, 10, 100, 128, 1000, 1024, 8192):
            for E in (1, 4, 8, 10, 64):
                q = Fraction(text) * n
                expected = -((-q.numerator) // (q.denominator * E))
                routing = Routing(
                    torch.arange(n) % max(n, 1), torch.arange(n) % E, torch.ones(n), max(n, 1), E
                )
                got = CapacityPolicy(float(text)).capacity_for(routing)
                assert got == expected, (text, n, E)
    assert (
        CapacityPolicy(1.1).capacity_for(
            Routing(torch.arange(100), torch.arange(100) % 10, torch.ones(100), 100, 10)
        )
        == 11
    )


def test_huge_capacities_work_and_absurd_ones_are_refused_up_front():
    r = Routing(torch.arange(6), torch.zeros(6, dtype=torch.long), torch.ones(6), 6, 2)
    out = CapacityPolicy(1e300)(r)  # a huge but finite factor keeps everything
    assert out.num_entries == 6 and out.capacity > 10**299
    check_routing(out, capacity=out.capacity)
    assert CapacityPolicy(capacity=2**63 - 1)(r).num_entries == 6
    with pytest.raises(ValueError, match="capacity must be <="):
        CapacityPolicy(capacity=10**30)
    with pytest.raises(ValueError, match="capacity_factor must be finite"):
        CapacityPolicy(float("inf"))


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
        ((float("nan"),), {}, "capacity_factor"),
        ((), {"capacity": -1}, "capacity must"),
        ((1.0,), {"drop_order": "random"}, "drop_order"),
        ((1.0,), {"drop_order": "Token"}, "drop_order"),
        ((1.0,), {"min_capacity": -1}, "min_capacity"),
        ((1.0,), {"min_capacity": 10**30}, "min_capacity"),
    ],
)
def test_bad_capacity_arguments(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        CapacityPolicy(*args, **kwargs)


def test_policy_rejects_non_routing():
    with pytest.raises(TypeError, match="routing must be"):
        CapacityPolicy(1.0)(torch.zeros(3))


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("1.0",), {}, "capacity_factor"),
        ((True,), {}, "capacity_factor"),
        ((), {"capacity": 2.0}, "capacity"),
        ((), {"capacity": True}, "capacity"),
        ((1.0,), {"min_capacity": 1.5}, "min_capacity"),
    ],
)
def test_wrong_types_are_type_errors(args, kwargs, message):
    with pytest.raises(TypeError, match=message):
        CapacityPolicy(*args, **kwargs)


class TestCapacityPolicyContract(PolicyContract):
    def make_policy(self, num_experts):
        return CapacityPolicy(1.0, drop_order="choice")

    def expectations(self, policy, routing):
        return {"capacity": policy.capacity_for(routing)}


class TestCapacityPolicyBatchPriorityContract(PolicyContract):
    def make_policy(self, num_experts):
        return CapacityPolicy(capacity=2, drop_order="batch_priority")

    def expectations(self, policy, routing):
        return {"capacity": 2}
