"""Hostile and edge inputs to the public API of routelab's core (issue 10, item 8): every
case must end in a TypeError / ValueError naming the argument, never a silent wrong
answer or a deep torch error. Each row: (label, call, error type, text in the message)."""

from __future__ import annotations

import dataclasses
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from routelab import FFNExperts, MoE, Routing
from routelab._validate import (
    all_finite,
    exact_fraction,
    require_bool,
    require_choice,
    require_finite_tensor,
    require_float,
    require_int,
)
from routelab.balancing import SelectionBias, update_balancing
from routelab.policies import CapacityPolicy, LossFreeBalancingPolicy, PausingPolicy
from routelab.router import check_k, router_logits
from routelab.routers import (
    BASERouter,
    DSelectKGate,
    ExpertChoiceRouter,
    NoisyTopKGate,
    SinkhornRouter,
    SoftmaxGate,
    SwitchGate,
)
from routelab.routing import capacity_from_factor

L = torch.long


def _r(token=(0, 1), expert=(0, 1), weight=(1.0, 1.0), T=2, E=2, **kw):
    return Routing(
        torch.tensor(token, dtype=L),
        torch.tensor(expert, dtype=L),
        torch.tensor(weight),
        T,
        E,
        **kw,
    )


def _topk_routing():
    return Routing.from_topk(torch.zeros(3, 1, dtype=L), torch.ones(3, 1), 2)


NAN, INF = float("nan"), float("inf")


def _loss_free_state(bias_value):
    return {
        "bias": torch.tensor([bias_value, 0.0]),
        "pending_observations": torch.zeros((), dtype=torch.float64),
        "pending_load": torch.zeros(2, dtype=torch.float64),
    }


CASES = [
    # ------------------------------------------------------------ validation helpers
    ("require_int bool", lambda: require_int("k", True), TypeError, "k must be an int"),
    ("require_int float", lambda: require_int("k", 2.0), TypeError, "k must be an int"),
    ("require_int str", lambda: require_int("k", "2"), TypeError, "k must be an int"),
    ("require_int None", lambda: require_int("k", None), TypeError, "k must be an int"),
    ("require_int float tensor", lambda: require_int("k", torch.tensor(2.0)), TypeError, "k"),
    ("require_int below", lambda: require_int("k", 0, 1), ValueError, "k must be >= 1"),
    ("require_int above", lambda: require_int("k", 9, 1, 8), ValueError, "k must be <= 8"),
    ("require_float nan", lambda: require_float("t", NAN), ValueError, "t must be a number"),
    ("require_float inf", lambda: require_float("t", INF), ValueError, "t must be finite"),
    ("require_float bool", lambda: require_float("t", False), TypeError, "real number"),
    ("require_float str", lambda: require_float("t", "1"), TypeError, "real number"),
    ("require_float complex", lambda: require_float("t", 1j), TypeError, "real number"),
    ("require_float list", lambda: require_float("t", [1.0]), TypeError, "real number"),
    ("require_float vector", lambda: require_float("t", torch.ones(2)), TypeError, "tensor"),
    ("require_float huge int", lambda: require_float("t", 10**400), ValueError, "too large"),
    ("require_float open bound", lambda: require_float("t", 0.0, above=0), ValueError, "> 0"),
    ("require_float closed bound", lambda: require_float("t", -1, minimum=0), ValueError, ">="),
    ("require_bool int", lambda: require_bool("flag", 1), TypeError, "flag must be a bool"),
    ("require_bool str", lambda: require_bool("flag", "yes"), TypeError, "flag must be a bool"),
    ("require_choice", lambda: require_choice("m", "x", ("a", "b")), ValueError, "one of"),
    ("require_choice type", lambda: require_choice("m", 1, (True,)), ValueError, "one of"),
    (
        "finite tensor nan",
        lambda: require_finite_tensor("s", torch.tensor([NAN])),
        ValueError,
        "1 of 1",
    ),
    (
        "finite tensor int",
        lambda: require_finite_tensor("s", torch.ones(1, dtype=L)),
        TypeError,
        "floating",
    ),
    ("exact_fraction inf", lambda: exact_fraction("cf", INF), ValueError, "finite"),
    (
        "exact_fraction Decimal nan",
        lambda: exact_fraction("cf", Decimal("NaN")),
        ValueError,
        "finite",
    ),
    ("exact_fraction 0", lambda: exact_fraction("cf", Fraction(0)), ValueError, "> 0"),
    ("exact_fraction tensor", lambda: exact_fraction("cf", torch.tensor(1.0)), TypeError, "cf"),
    # ------------------------------------------------------------ Routing construction
    ("T negative", lambda: _r(T=-1), ValueError, "num_tokens"),
    ("T float", lambda: _r(T=2.0), TypeError, "num_tokens"),
    ("E zero", lambda: _r(E=0), ValueError, "num_experts"),
    ("T 10**30", lambda: _r(T=10**30), ValueError, "num_tokens"),
    ("T * E beyond int64", lambda: _r(T=2**40, E=2**40), ValueError, "does not fit"),
    ("E bool", lambda: _r(E=True), TypeError, "num_experts"),
    (
        "token list",
        lambda: Routing([0], torch.zeros(1, dtype=L), torch.ones(1), 1, 1),
        TypeError,
        "token must be a torch.Tensor",
    ),
    (
        "token 2-D",
        lambda: Routing(torch.zeros(1, 1, dtype=L), torch.zeros(1, dtype=L), torch.ones(1), 1, 1),
        ValueError,
        "1-D",
    ),
    (
        "expert int32",
        lambda: Routing(
            torch.zeros(1, dtype=L), torch.zeros(1, dtype=torch.int32), torch.ones(1), 1, 1
        ),
        TypeError,
        "int64",
    ),
    (
        "weight int",
        lambda: Routing(
            torch.zeros(1, dtype=L), torch.zeros(1, dtype=L), torch.ones(1, dtype=L), 1, 1
        ),
        TypeError,
        "floating",
    ),
    ("lengths differ", lambda: _r(weight=(1.0,)), ValueError, "same length"),
    ("probs shape", lambda: _r(probs=torch.ones(3, 2)), ValueError, "probs must have shape"),
    ("probs list", lambda: _r(probs=[[1.0]]), TypeError, "probs"),
    ("aux list", lambda: _r(aux=[1]), TypeError, "aux"),
    ("aux vector", lambda: _r(aux={"a": torch.ones(2)}), ValueError, "scalar"),
    ("aux float", lambda: _r(aux={"a": 1.0}), ValueError, "scalar"),
    ("aux key", lambda: _r(aux={1: torch.ones(())}), TypeError, "aux keys"),
    ("dropped str", lambda: _r(dropped="x"), TypeError, "dropped"),
    ("dropped other T", lambda: _r(dropped=_r(T=3)), ValueError, "dropped"),
    ("capacity negative", lambda: _r(capacity=-1), ValueError, "capacity"),
    ("capacity float", lambda: _r(capacity=2.5), TypeError, "capacity"),
    (
        "assign a field",
        lambda: setattr(_r(), "weight", torch.ones(2)),
        dataclasses.FrozenInstanceError,
        "weight",
    ),
    ("mutate aux", lambda: _r(aux={"a": torch.ones(())}).aux.update(b=1), TypeError, "read-only"),
    (
        "from_topk float indices",
        lambda: Routing.from_topk(torch.zeros(3, 1), torch.ones(3, 1), 2),
        TypeError,
        "indices must be an integer",
    ),
    (
        "from_topk 1-D",
        lambda: Routing.from_topk(torch.zeros(3, dtype=L), torch.ones(3), 2),
        ValueError,
        "[T, k]",
    ),
    (
        "from_topk shapes",
        lambda: Routing.from_topk(torch.zeros(3, 2, dtype=L), torch.ones(3, 1), 2),
        ValueError,
        "[T, k]",
    ),
    (
        "from_topk list",
        lambda: Routing.from_topk([[0]], torch.ones(1, 1), 2),
        TypeError,
        "indices must be a torch.Tensor",
    ),
    ("from_dense list", lambda: Routing.from_dense([[1.0]]), TypeError, "combine"),
    ("from_dense 1-D", lambda: Routing.from_dense(torch.ones(3)), ValueError, "[T, E]"),
    (
        "from_dense int",
        lambda: Routing.from_dense(torch.ones(2, 2, dtype=L)),
        TypeError,
        "floating",
    ),
    # ------------------------------------------------------------ Routing methods
    ("to_dense expert id >= E", lambda: _r(expert=(0, 2)).to_dense(), ValueError, "expert ids"),
    ("to_dense token id >= T", lambda: _r(token=(0, 2)).to_dense(), ValueError, "token ids"),
    ("to_dense negative id", lambda: _r(expert=(-1, 0)).to_dense(), ValueError, "expert ids"),
    (
        "validate duplicates",
        lambda: _r(expert=(0, 0), token=(0, 0)).validate(),
        ValueError,
        "duplicate",
    ),
    ("validate nan weight", lambda: _r(weight=(NAN, 1.0)).validate(), ValueError, "finite"),
    ("validate negative weight", lambda: _r(weight=(-1.0, 1.0)).validate(), ValueError, ">= 0"),
    (
        "validate nan probs",
        lambda: _r(probs=torch.full((2, 2), NAN)).validate(),
        ValueError,
        "probs",
    ),
    ("validate nan aux", lambda: _r(aux={"a": torch.tensor(NAN)}).validate(), ValueError, "aux"),
    ("validate k float", lambda: _topk_routing().validate(k=1.5), TypeError, "k must be an int"),
    ("validate k negative", lambda: _topk_routing().validate(k=-1), ValueError, "k must be >="),
    (
        "validate capacity negative",
        lambda: _topk_routing().validate(capacity=-1),
        ValueError,
        "capacity",
    ),
    ("validate atol nan", lambda: _topk_routing().validate(k=1, atol=NAN), ValueError, "atol"),
    (
        "validate quota shape",
        lambda: _topk_routing().validate(balanced=torch.tensor([3])),
        ValueError,
        "quota",
    ),
    ("select float mask", lambda: _topk_routing().select(torch.ones(3)), TypeError, "keep"),
    (
        "select short mask",
        lambda: _topk_routing().select(torch.ones(2, dtype=torch.bool)),
        ValueError,
        "keep",
    ),
    ("select list", lambda: _topk_routing().select([True] * 3), TypeError, "keep"),
    (
        "with_weight length",
        lambda: _topk_routing().with_weight(torch.ones(2)),
        ValueError,
        "same length",
    ),
    (
        "with_weight int",
        lambda: _topk_routing().with_weight(torch.ones(3, dtype=L)),
        TypeError,
        "floating",
    ),
    # ------------------------------------------------------------ capacity arithmetic
    ("capacity_from_factor inf", lambda: capacity_from_factor(INF, 10, 2), ValueError, "finite"),
    ("capacity_from_factor nan", lambda: capacity_from_factor(NAN, 10, 2), ValueError, "number"),
    ("capacity_from_factor 0", lambda: capacity_from_factor(0, 10, 2), ValueError, "> 0"),
    (
        "capacity_from_factor str",
        lambda: capacity_from_factor("1.1", 10, 2),
        TypeError,
        "capacity_factor",
    ),
    (
        "capacity_from_factor N<0",
        lambda: capacity_from_factor(1.0, -1, 2),
        ValueError,
        "num_entries",
    ),
    (
        "capacity_from_factor E=0",
        lambda: capacity_from_factor(1.0, 10, 0),
        ValueError,
        "num_experts",
    ),
    # ------------------------------------------------------------ router helpers
    (
        "router_logits int x",
        lambda: router_logits(torch.ones(2, 3, dtype=L), torch.ones(3, 2)),
        TypeError,
        "floating",
    ),
    (
        "router_logits shapes",
        lambda: router_logits(torch.ones(2, 3), torch.ones(4, 2)),
        ValueError,
        "weight [d, E]",
    ),
    (
        "router_logits linear layout",
        lambda: router_logits(torch.ones(2, 3), torch.ones(2, 3)),
        ValueError,
        "linear.weight.t()",
    ),
    (
        "router_logits bias",
        lambda: router_logits(torch.ones(2, 3), torch.ones(3, 2), torch.ones(3)),
        ValueError,
        "bias",
    ),
    ("check_k 0", lambda: check_k(0, 3), ValueError, "k must be >= 1"),
    ("check_k > E", lambda: check_k(4, 3), ValueError, "k must be <= num_experts"),
    ("check_k float", lambda: check_k(2.0, 3), TypeError, "k must be an int"),
    # ------------------------------------------------------------ router options
    (
        "softmax temperature 1e-40",
        lambda: SoftmaxGate(4, 3, temperature=1e-40),
        ValueError,
        "temperature",
    ),
    (
        "softmax temperature inf",
        lambda: SoftmaxGate(4, 3, temperature=INF),
        ValueError,
        "temperature",
    ),
    ("softmax bias int", lambda: SoftmaxGate(4, 3, bias=1), TypeError, "bias"),
    ("softmax d_model 0", lambda: SoftmaxGate(0, 3), ValueError, "d_model"),
    ("softmax d_model float", lambda: SoftmaxGate(4.0, 3), TypeError, "d_model"),
    ("softmax E bool", lambda: SoftmaxGate(4, True), TypeError, "num_experts"),
    ("switch jitter 1", lambda: SwitchGate(4, 3, jitter=1.0), ValueError, "jitter"),
    ("switch jitter nan", lambda: SwitchGate(4, 3, jitter=NAN), ValueError, "jitter"),
    (
        "switch balance_weight -1",
        lambda: SwitchGate(4, 3, balance_weight=-1),
        ValueError,
        "balance_weight",
    ),
    ("switch z_weight inf", lambda: SwitchGate(4, 3, z_weight=INF), ValueError, "z_weight"),
    ("switch bias str", lambda: SwitchGate(4, 3, bias="no"), TypeError, "bias"),
    ("noisy k 0", lambda: NoisyTopKGate(4, 3, k=0), ValueError, "k"),
    ("noisy k > E", lambda: NoisyTopKGate(4, 3, k=4), ValueError, "k"),
    (
        "noisy noise_epsilon nan",
        lambda: NoisyTopKGate(4, 3, noise_epsilon=NAN),
        ValueError,
        "noise_epsilon",
    ),
    (
        "noisy load_weight str",
        lambda: NoisyTopKGate(4, 3, load_weight="0.1"),
        TypeError,
        "load_weight",
    ),
    ("dselect gamma 1e-110", lambda: DSelectKGate(4, 3, gamma=1e-110), ValueError, "gamma"),
    ("dselect gamma 0", lambda: DSelectKGate(4, 3, gamma=0), ValueError, "gamma"),
    ("dselect gamma inf", lambda: DSelectKGate(4, 3, gamma=INF), ValueError, "gamma"),
    (
        "dselect per_example int",
        lambda: DSelectKGate(4, 3, per_example=1),
        TypeError,
        "per_example",
    ),
    (
        "dselect entropy_weight nan",
        lambda: DSelectKGate(4, 3, entropy_weight=NAN),
        ValueError,
        "entropy_weight",
    ),
    (
        "expert choice factor inf",
        lambda: ExpertChoiceRouter(4, 3, capacity_factor=INF),
        ValueError,
        "capacity_factor",
    ),
    (
        "expert choice factor 0",
        lambda: ExpertChoiceRouter(4, 3, capacity_factor=0),
        ValueError,
        "capacity_factor",
    ),
    (
        "expert choice capacity_for -1",
        lambda: ExpertChoiceRouter(4, 3).capacity_for(-1),
        ValueError,
        "num_tokens",
    ),
    (
        "expert choice capacity_for float",
        lambda: ExpertChoiceRouter(4, 3).capacity_for(2.0),
        TypeError,
        "num_tokens",
    ),
    ("BASE method", lambda: BASERouter(4, 3, method="simplex"), ValueError, "method"),
    (
        "BASE unknown option",
        lambda: BASERouter(4, 3, tolerance=1e-3),
        (TypeError, ValueError),
        "tolerance",
    ),
    (
        "sinkhorn temperature inf",
        lambda: SinkhornRouter(4, 3, temperature=INF),
        ValueError,
        "temperature",
    ),
    (
        "sinkhorn temperature 1e-40",
        lambda: SinkhornRouter(4, 3, temperature=1e-40),
        ValueError,
        "temperature",
    ),
    ("sinkhorn max_iter 0", lambda: SinkhornRouter(4, 3, max_iter=0), ValueError, "max_iter"),
    # ------------------------------------------------------------ router forward
    ("router x list", lambda: SoftmaxGate(4, 3)([[0.0] * 4]), TypeError, "x must be"),
    ("router x 3-D", lambda: SoftmaxGate(4, 3)(torch.zeros(2, 2, 4)), ValueError, "[T, d_model]"),
    ("router x width", lambda: SoftmaxGate(4, 3)(torch.zeros(2, 5)), ValueError, "d_model"),
    ("router x int", lambda: SoftmaxGate(4, 3)(torch.zeros(2, 4, dtype=L)), TypeError, "floating"),
    ("router x inf", lambda: SoftmaxGate(4, 3)(torch.full((2, 4), INF)), ValueError, "NaN or inf"),
    (
        "router token_ids float",
        lambda: SoftmaxGate(4, 3)(torch.zeros(2, 4), torch.zeros(2)),
        TypeError,
        "token_ids",
    ),
    (
        "router token_ids shape",
        lambda: SoftmaxGate(4, 3)(torch.zeros(2, 4), torch.zeros(3, dtype=L)),
        ValueError,
        "token_ids",
    ),
    # ------------------------------------------------------------ policies
    ("capacity factor inf", lambda: CapacityPolicy(INF), ValueError, "capacity_factor"),
    ("capacity 10**30", lambda: CapacityPolicy(capacity=10**30), ValueError, "capacity"),
    ("capacity both", lambda: CapacityPolicy(1.0, capacity=2), ValueError, "exactly one"),
    ("capacity neither", lambda: CapacityPolicy(), ValueError, "exactly one"),
    (
        "capacity drop_order",
        lambda: CapacityPolicy(1.0, drop_order="gshard"),
        ValueError,
        "drop_order",
    ),
    (
        "capacity drop_order None",
        lambda: CapacityPolicy(1.0, drop_order=None),
        ValueError,
        "drop_order",
    ),
    (
        "capacity min_capacity float",
        lambda: CapacityPolicy(1.0, min_capacity=1.5),
        TypeError,
        "min_capacity",
    ),
    ("capacity on a tensor", lambda: CapacityPolicy(1.0)(torch.zeros(3)), TypeError, "routing"),
    ("pausing margin nan", lambda: PausingPolicy(3, margin=NAN), ValueError, "margin"),
    ("pausing margin -1", lambda: PausingPolicy(3, margin=-1), ValueError, "margin"),
    ("pausing reroute int", lambda: PausingPolicy(3, reroute=0), TypeError, "reroute"),
    (
        "pausing active_in_eval str",
        lambda: PausingPolicy(3, active_in_eval="no"),
        TypeError,
        "active_in_eval",
    ),
    ("pausing E mismatch", lambda: PausingPolicy(3)(_topk_routing()), ValueError, "num_experts"),
    (
        "pausing nan totals on load",
        lambda: PausingPolicy(2).load_state_dict(
            {
                "totals": torch.tensor([NAN, 0.0], dtype=torch.float64),
                "pending_observations": torch.zeros((), dtype=torch.float64),
                "pending_mass": torch.zeros(2, dtype=torch.float64),
            }
        ),
        ValueError,
        "totals",
    ),
    (
        "loss-free k mismatch",
        lambda: LossFreeBalancingPolicy(2, k=2)(
            Routing.from_topk(
                torch.zeros(3, 1, dtype=L), torch.ones(3, 1), 2, probs=torch.full((3, 2), 0.5)
            )
        ),
        ValueError,
        "k = 2",
    ),
    (
        "loss-free no probs",
        lambda: LossFreeBalancingPolicy(2)(_topk_routing()),
        ValueError,
        "probs",
    ),
    ("loss-free rate inf", lambda: LossFreeBalancingPolicy(2, rate=INF), ValueError, "rate"),
    *(
        (
            f"loss-free {bad} bias on load",
            lambda bad=bad: LossFreeBalancingPolicy(2).load_state_dict(_loss_free_state(bad)),
            ValueError,
            "bias",
        )
        for bad in (NAN, INF, -INF)
    ),
    # ------------------------------------------------------------ balancing
    (
        "selection bias scores of another E",
        lambda: SelectionBias(3).biased(torch.zeros(2, 4)),
        ValueError,
        "last dimension",
    ),
    (
        "selection bias ids >= E",
        lambda: SelectionBias(3).observe_selection(torch.tensor([3])),
        ValueError,
        "out of range",
    ),
    (
        "selection bias float ids",
        lambda: SelectionBias(3).observe_selection(torch.tensor([1.0])),
        TypeError,
        "integer",
    ),
    (
        "selection bias load shape",
        lambda: SelectionBias(3).observe_load(torch.ones(2)),
        ValueError,
        "shape",
    ),
    ("update_balancing non-module", lambda: update_balancing(None), TypeError, "module"),
    # ------------------------------------------------------------ MoE and executors
    (
        "MoE d_model mismatch",
        lambda: MoE(SoftmaxGate(4, 3), FFNExperts(3, 5, 8)),
        ValueError,
        "d_model",
    ),
    (
        "MoE num_experts mismatch",
        lambda: MoE(SoftmaxGate(4, 3), FFNExperts(2, 4, 8)),
        ValueError,
        "num_experts",
    ),
    ("MoE router not a module", lambda: MoE("router", FFNExperts(2, 4, 8)), TypeError, "router"),
    (
        "executor expert id >= E",
        lambda: FFNExperts(2, 4, 8)(torch.zeros(2, 4), _r(expert=(0, 2))),
        ValueError,
        "expert ids",
    ),
    (
        "executor token id >= T",
        lambda: FFNExperts(2, 4, 8)(torch.zeros(2, 4), _r(token=(0, 2))),
        ValueError,
        "token ids",
    ),
    (
        "dense_forward expert id >= E",
        lambda: FFNExperts(2, 4, 8).dense_forward(torch.zeros(2, 4), _r(expert=(0, 2))),
        ValueError,
        "expert ids",
    ),
    (
        "executor negative id",
        lambda: FFNExperts(2, 4, 8)(torch.zeros(2, 4), _r(expert=(-1, 1))),
        ValueError,
        "expert ids",
    ),
]


@pytest.mark.parametrize(("label", "call", "error", "message"), CASES, ids=[c[0] for c in CASES])
def test_hostile_input_is_a_clear_error(label, call, error, message):
    with pytest.raises(error) as info:
        call()
    assert message in str(info.value), (label, str(info.value))


EDGE_CASES_THAT_WORK = [
    ("require_int numpy", lambda: require_int("k", np.int64(3)) == 3),
    ("require_int 0-d int tensor", lambda: require_int("k", torch.tensor(3)) == 3),
    (
        "exact_fraction numpy float32",
        lambda: exact_fraction("cf", np.float32(1.1)) == Fraction(11, 10),
    ),
    ("exact_fraction Decimal", lambda: exact_fraction("cf", Decimal("1.1")) == Fraction(11, 10)),
    ("capacity 1.1 * 100 / 10 = 11", lambda: capacity_from_factor(1.1, 100, 10) == 11),
    ("capacity factor 1e-300 gives 1", lambda: capacity_from_factor(1e-300, 10, 2) == 1),
    (
        "expert choice 1e-300 factor",
        lambda: ExpertChoiceRouter(4, 3, capacity_factor=1e-300).capacity_for(5) == 1,
    ),
    ("empty routing to_dense", lambda: _r((), (), (), 0, 2).to_dense().shape == (0, 2)),
    (
        "empty batch through MoE",
        lambda: (
            MoE(SoftmaxGate(4, 3), FFNExperts(3, 4, 8))(torch.zeros(0, 4)).output.shape == (0, 4)
        ),
    ),
]


@pytest.mark.parametrize(
    ("label", "call"), EDGE_CASES_THAT_WORK, ids=[c[0] for c in EDGE_CASES_THAT_WORK]
)
def test_edge_input_that_is_valid_works(label, call):
    assert call(), label


def test_case_count():
    # for the closing note: the number of hostile inputs this file tries
    assert len(CASES) >= 140 and len(EDGE_CASES_THAT_WORK) >= 9


_SPECIAL = st.sampled_from([float("nan"), float("inf"), -float("inf"), 3e38, -3e38, 1e308])


@given(
    values=st.lists(st.floats(-1e6, 1e6) | _SPECIAL, max_size=12),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
)
def test_all_finite_equals_the_elementwise_check(values, dtype):
    """The sum shortcut (a finite sum proves every element finite) agrees with
    ``isfinite(x).all()`` everywhere, overflowing sums of finite values included."""
    x = torch.tensor(values, dtype=torch.float64).to(dtype)
    assert all_finite(x) == bool(torch.isfinite(x).all())
