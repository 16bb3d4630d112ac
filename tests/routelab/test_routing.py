import copy
import dataclasses
import pickle
from fractions import Fraction

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from routelab import Routing
from routelab.router import validation
from routelab.routing import capacity_from_factor
from routelab.testing import check_routing, routings


def _routing(token, expert, weight, T, E, **kw):
    return Routing(
        torch.tensor(token, dtype=torch.int64),
        torch.tensor(expert, dtype=torch.int64),
        torch.tensor(weight, dtype=torch.float32),
        T,
        E,
        **kw,
    )


@given(routings())
def test_dense_round_trip(routing):
    dense = routing.to_dense()
    assert dense.shape == (routing.num_tokens, routing.num_experts)
    back = Routing.from_dense(dense)
    # from_dense keeps the non-zero entries only: compare as dense matrices
    assert torch.equal(back.to_dense(), dense)
    assert back.num_entries == int((dense != 0).sum())


@given(st.integers(0, 20), st.integers(1, 9), st.data())
def test_from_topk_layout_and_load(T, E, data):
    k = data.draw(st.integers(1, E))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    idx = torch.argsort(torch.rand(T, E, generator=gen), dim=1)[:, :k]
    w = torch.softmax(torch.randn(T, k, generator=gen), dim=1)
    r = Routing.from_topk(idx, w, E)
    check_routing(r, k=k, num_tokens=T, num_experts=E)
    assert torch.equal(r.token, torch.arange(T).repeat_interleave(k))
    assert torch.equal(r.load(), torch.bincount(idx.reshape(-1), minlength=E))
    assert torch.equal(r.entries_per_token(), torch.full((T,), k))


def test_from_dense_keep_zeros_holds_every_pair():
    combine = torch.tensor([[0.5, 0.0, 0.5], [0.0, 0.0, 1.0]])
    r = Routing.from_dense(combine, keep_zeros=True)
    assert r.num_entries == 6
    assert torch.equal(r.to_dense(), combine)


def test_to_dense_is_differentiable():
    w = torch.tensor([0.3, 0.7], requires_grad=True)
    r = Routing(torch.tensor([0, 1]), torch.tensor([1, 0]), w, 2, 2)
    (r.to_dense() * torch.tensor([[1.0, 2.0], [3.0, 4.0]])).sum().backward()
    assert torch.equal(w.grad, torch.tensor([2.0, 3.0]))


def test_aux_loss_sums_and_defaults_to_zero():
    r = _routing([0], [0], [1.0], 1, 1)
    assert r.aux_loss.item() == 0.0
    r = dataclasses.replace(r, aux={"a": torch.tensor(0.25), "b": torch.tensor(1.5)})
    assert r.aux_loss.item() == pytest.approx(1.75)


@pytest.mark.parametrize(
    ("token", "expert", "weight", "message"),
    [
        ([0, 3], [0, 1], [1.0, 1.0], "token ids out of range"),
        ([0, 1], [0, 5], [1.0, 1.0], "expert ids out of range"),
        ([0, 0], [1, 1], [0.5, 0.5], "duplicate"),
        ([0, 1], [0, 1], [float("nan"), 1.0], "finite"),
        ([0, 1], [0, 1], [float("inf"), 1.0], "finite"),
        ([0, 1], [0, 1], [-0.1, 1.0], ">= 0"),
    ],
)
def test_validate_names_the_failed_invariant(token, expert, weight, message):
    with pytest.raises(ValueError, match=message):
        _routing(token, expert, weight, 3, 2).validate()


def test_validate_expectations():
    r = _routing([0, 0, 1, 1], [0, 1, 0, 1], [0.5, 0.5, 0.9, 0.2], 2, 2)
    with pytest.raises(ValueError, match="sum to 1"):
        r.validate(k=2)
    with pytest.raises(ValueError, match="exactly k=1"):
        r.validate(k=1)
    with pytest.raises(ValueError, match="capacity"):
        r.validate(capacity=1)
    r.validate(capacity=2)
    with pytest.raises(ValueError, match="exactly one entry"):
        r.validate(balanced=True)
    with pytest.raises(ValueError, match="quota"):
        r.validate(balanced=torch.tensor([1, 3]))
    r.validate(balanced=torch.tensor([2, 2]))
    uneven = _routing([0, 1, 2], [0, 0, 0], [1.0, 1.0, 1.0], 3, 2)
    with pytest.raises(ValueError, match="differ by at most one"):
        uneven.validate(balanced=True)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"token": [[0]]}, ValueError, "token must be 1-D"),
        ({"expert": torch.tensor([0], dtype=torch.int32)}, TypeError, "expert must be int64"),
        ({"weight": torch.tensor([1])}, TypeError, "weight must be a floating"),
        ({"weight": torch.tensor([1.0, 2.0])}, ValueError, "same length"),
        ({"num_tokens": -1}, ValueError, "num_tokens"),
        ({"num_experts": 0}, ValueError, "num_experts"),
        ({"num_experts": 2.0}, TypeError, "num_experts"),
        ({"probs": torch.ones(3, 3)}, ValueError, "probs must have shape"),
        ({"aux": {"x": torch.ones(2)}}, ValueError, "aux"),
    ],
)
def test_construction_errors_name_the_argument(kwargs, error, message):
    fields = {
        "token": torch.tensor([0]),
        "expert": torch.tensor([0]),
        "weight": torch.tensor([1.0]),
        "num_tokens": 1,
        "num_experts": 2,
    }
    for key, value in kwargs.items():
        fields[key] = torch.tensor(value) if isinstance(value, list) else value
    with pytest.raises(error, match=message):
        Routing(**fields)


def test_empty_routing_is_valid():
    r = _routing([], [], [], 0, 3)
    check_routing(r, k=2, capacity=0, balanced=True)
    assert torch.equal(r.load(), torch.zeros(3, dtype=torch.int64))
    assert r.to_dense().shape == (0, 3)


# ---------------------------------------------------------------- immutability (issue 10.6)
@pytest.mark.parametrize(
    "field",
    [
        "token",
        "expert",
        "weight",
        "num_tokens",
        "num_experts",
        "probs",
        "aux",
        "dropped",
        "capacity",
    ],
)
def test_fields_cannot_be_assigned(field):
    r = _routing([0, 1], [1, 0], [1.0, 1.0], 2, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(r, field, getattr(r, field))


def test_aux_is_a_read_only_copy_never_shared():
    given_aux = {"a": torch.tensor(0.5)}
    r = _routing([0], [0], [1.0], 1, 1, aux=given_aux)
    given_aux["b"] = torch.tensor(9.0)  # the caller's dict is not the routing's
    assert sorted(r.aux) == ["a"]
    with pytest.raises(TypeError, match="read-only"):
        r.aux["c"] = torch.tensor(1.0)
    for mutate in (
        lambda a: a.update(x=1),
        lambda a: a.pop("a"),
        lambda a: a.clear(),
        lambda a: a.setdefault("x", 1),
        lambda a: a.popitem(),
    ):
        with pytest.raises(TypeError, match="read-only"):
            mutate(r.aux)
    r2 = dataclasses.replace(r, aux={**r.aux, "z": torch.tensor(0.25)})
    assert sorted(r.aux) == ["a"] and sorted(r2.aux) == ["a", "z"]
    r3 = r.select(torch.tensor([True]))
    assert r3.aux is not r.aux and dict(r3.aux) == dict(r.aux)
    assert r.with_weight(torch.tensor([0.5])).aux is not r.aux
    assert r.detach().aux is not r.aux


def test_replace_reruns_the_checks():
    r = _routing([0, 1], [1, 0], [1.0, 1.0], 2, 2)
    with pytest.raises(ValueError, match="same length"):
        dataclasses.replace(r, weight=torch.ones(3))
    with pytest.raises(TypeError, match="int64"):
        dataclasses.replace(r, expert=torch.tensor([1, 0], dtype=torch.int32))
    with pytest.raises(TypeError, match="dropped"):
        dataclasses.replace(r, dropped="x")
    with pytest.raises(ValueError, match="capacity"):
        dataclasses.replace(r, capacity=-1)


def test_a_routing_pickles_and_copies():
    r = _routing([0, 1], [1, 0], [0.25, 0.75], 2, 2, aux={"a": torch.tensor(0.5)})
    for clone in (pickle.loads(pickle.dumps(r)), copy.deepcopy(r), copy.copy(r)):
        assert torch.equal(clone.weight, r.weight) and float(clone.aux["a"]) == 0.5
        with pytest.raises(TypeError):
            clone.aux["b"] = torch.tensor(0.0)


# ---------------------------------------------------------------- ids checked before use
@pytest.mark.parametrize(
    ("token", "expert"), [([0, 1], [0, 2]), ([0, 1], [-1, 0]), ([0, 2], [0, 1]), ([-1, 0], [0, 1])]
)
def test_to_dense_refuses_out_of_range_ids(token, expert):
    r = _routing(token, expert, [1.0, 1.0], 2, 2)
    with pytest.raises(ValueError, match="ids out of range"):
        r.to_dense()
    with pytest.raises(ValueError, match="ids out of range"):
        r.check_ids()


def test_check_ids_is_off_without_validation_and_fine_on_empty():
    r = _routing([0], [5], [1.0], 1, 2)
    with validation(False):
        assert r.check_ids() is r
    assert _routing([], [], [], 0, 3).check_ids().to_dense().shape == (0, 3)


# ---------------------------------------------------------------- exact capacity (issue 10.2)
_FACTORS = [
    "0.1",
    "0.3",
    "0.7",
    "1.0",
    "1.1",
    "1.15",
    "1.2",
    "1.25",
    "1.3",
    "1.7",
    "2.0",
    "2.2",
    "2.675",
    "3.3",
    "0.0001",
    "1e-3",
    "12.5",
]


@pytest.mark.parametrize("text", _FACTORS)
def test_capacity_from_factor_is_exact_on_the_written_decimal(text):
    factor = float(text)
    exact = Fraction(text)  # the decimal as written, parsed independently of the code
    for num_entries in (0, 1, 7, 10, 64, 100, 1000, 1024, 4096, 8192, 12345):
        for num_experts in (1, 3, 8, 10, 64, 100):
            q = exact * num_entries
            expected = -((-q.numerator * 1) // (q.denominator * num_experts))
            assert capacity_from_factor(factor, num_entries, num_experts) == expected, (
                text,
                num_entries,
                num_experts,
            )


def test_capacity_from_factor_known_values_and_bad_input():
    assert capacity_from_factor(1.1, 100, 10) == 11  # the float product gives 12
    assert capacity_from_factor(Fraction(1, 3), 3, 1) == 1
    assert capacity_from_factor(10**30, 2, 1) == 2 * 10**30
    for bad, error in [
        (float("inf"), ValueError),
        (float("nan"), ValueError),
        (0, ValueError),
        (-1.0, ValueError),
        ("1.1", TypeError),
        (True, TypeError),
    ]:
        with pytest.raises(error, match="capacity_factor"):
            capacity_from_factor(bad, 10, 2)
    with pytest.raises(ValueError, match="num_experts"):
        capacity_from_factor(1.0, 10, 0)
    with pytest.raises(TypeError, match="num_entries"):
        capacity_from_factor(1.0, 10.0, 2)


@pytest.mark.parametrize("zeros", [False, True])
def test_from_dense_equals_nonzero_gather(zeros):
    """``from_dense`` (which skips the gather when no weight is zero) against the plain
    construction: the non-zero entries in row-major order, weights gathered; the same
    weights and the same gradients."""
    gen = torch.Generator().manual_seed(0)
    gates = torch.rand(6, 4, generator=gen, dtype=torch.float64) + 0.1
    if zeros:
        gates[1, 2] = gates[4, 0] = 0.0
    gates.requires_grad_()
    got = Routing.from_dense(gates, probs=gates)
    token, expert = (gates.detach() != 0).nonzero(as_tuple=True)
    assert torch.equal(got.token, token) and torch.equal(got.expert, expert)
    want = gates[token, expert]
    assert torch.equal(got.weight, want)
    coef = torch.randn(got.num_entries, generator=gen, dtype=torch.float64)
    (g_got,) = torch.autograd.grad((got.weight * coef).sum(), gates)
    (g_want,) = torch.autograd.grad((want * coef).sum(), gates)
    assert torch.equal(g_got, g_want)
