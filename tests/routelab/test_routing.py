import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from routelab import Routing
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
    r.aux = {"a": torch.tensor(0.25), "b": torch.tensor(1.5)}
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
