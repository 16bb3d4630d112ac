"""The compare registry: rows hold classes, build one way, fail loudly, sweep any option."""

import math

import pytest
import torch

from analysis.data import DATASETS
from analysis.registry import (
    REGISTRY,
    CompareRow,
    PolicySpec,
    default_rows,
    register,
    resolve_routers,
)
from routelab import MoE
from routelab.policies import CapacityPolicy, PausingPolicy, Policy
from routelab.router import Router
from routelab.routers import SwitchGate, TopKGate
from routelab.soft_moe import SoftMoE

# The rows the foundation and the first round registered, written out by hand (rows
# other engineers add come on top; none of these may disappear or be renamed).
FOUNDATION_ROWS = [
    "softmax",
    "top2",
    "noisy-top2",
    "noisy-top2-noloss",
    "switch-cf0.5",
    "switch-cf1.0",
    "switch-cf1.25",
    "switch-cf2.0",
    "dselect-2",
    "expert-choice",
    "base",
    "sinkhorn",
    "top2-pausing",
    "top2-lossfree",
    "hash-random",
    "hash-balanced",
    "hash-clustered",
    "hash-dispersed",
    "hash-multi-hash",
]


class _Data:
    name = "stand-in"
    vocab_size = 40
    fit_token_ids = torch.arange(200) % 40
    embeddings = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))


def test_the_foundation_rows_are_registered_in_order():
    names = [row.name for row in default_rows()]
    assert [n for n in names if n in FOUNDATION_ROWS] == FOUNDATION_ROWS


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_row_holds_classes_and_builds_a_layer_that_routes(name):
    row = REGISTRY[name]
    # a router class, or a layer class its own layer builder uses (Soft MoE)
    assert isinstance(row.router, type)
    assert issubclass(row.router, Router) or row.build_layer_with is not None
    assert all(issubclass(spec.policy, Policy) for spec in row.policies)
    assert set(row.datasets) <= set(DATASETS)
    torch.manual_seed(0)
    layer = row.build_layer(8, 4, _Data())
    assert isinstance(layer, (MoE, SoftMoE)) and layer.num_experts >= 4
    x, ids = torch.randn(32, 8), torch.arange(32) % 40
    out = layer(x, ids)
    assert out.output.shape == (32, 8)
    assert out.routing.num_tokens == 32 and int(out.routing.expert.max()) < layer.num_experts


def test_hash_rows_run_on_tokens_only():
    hashed = [row for row in REGISTRY.values() if row.router.__name__ == "HashRouter"]
    assert len(hashed) == 5
    assert all(row.datasets == ("tokens",) for row in hashed)


def test_unknown_and_repeated_names_raise():
    with pytest.raises(ValueError, match="unknown router 'nope'"):
        resolve_routers(["top2", "nope"])
    with pytest.raises(ValueError, match="without spaces"):
        resolve_routers(["top2", " base"])
    with pytest.raises(ValueError, match="twice"):
        resolve_routers(["top2", "top2"])
    with pytest.raises(ValueError, match="no routers"):
        resolve_routers([])
    assert [r.name for r in resolve_routers(["base", "top2"])] == ["base", "top2"]


def test_rows_refuse_strings_duplicates_and_bad_names():
    with pytest.raises(TypeError, match="Router subclass"):
        CompareRow("strings", "TopKGate")  # the old registry held names
    with pytest.raises(TypeError, match="Policy subclass"):
        PolicySpec("CapacityPolicy")
    with pytest.raises(ValueError, match="row name"):
        CompareRow("Has Space", TopKGate)
    with pytest.raises(ValueError, match="datasets"):
        CompareRow("x", TopKGate, datasets=("imagenet",))
    with pytest.raises(ValueError, match="already registered"):
        register(CompareRow("top2", TopKGate, {"k": 1}))
    assert REGISTRY["top2"].options == {"k": 2}


def test_with_options_reaches_router_and_policy():
    row = REGISTRY["switch-cf1.0"].with_options(capacity_factor=2.0, balance_weight=0.5)
    layer = row.build_layer(8, 4, _Data())
    assert isinstance(layer.router, SwitchGate)
    (policy,) = layer.policies
    assert isinstance(policy, CapacityPolicy) and policy.capacity_factor == 2.0
    # the capacity it enforces: ceil(2.0 * 100 entries / 4 experts) = 50
    routing = layer.router(torch.randn(100, 8))
    assert policy.capacity_for(routing) == math.ceil(2.0 * 100 / 4) == 50
    assert row.options["balance_weight"] == 0.5
    assert REGISTRY["switch-cf1.0"].policies[0].options == {"capacity_factor": 1.0}  # unchanged


def test_sweepable_options_and_their_checks():
    pausing = REGISTRY["top2-pausing"].sweepable()
    assert {"k", "margin"} <= set(pausing) and pausing["margin"].target == "PausingPolicy"
    layer = REGISTRY["top2-pausing"].with_options(margin=0.5).build_layer(8, 4, _Data())
    assert isinstance(layer.policies[0], PausingPolicy) and layer.policies[0].margin == 0.5
    assert REGISTRY["top2"].with_options(k=3.0).options["k"] == 3  # whole floats become ints
    with pytest.raises(ValueError, match="whole numbers"):
        REGISTRY["top2"].with_options(k=1.5)
    with pytest.raises(ValueError, match=r"no option 'nope'.*its options: k, bias"):
        REGISTRY["top2"].with_options(nope=1)
    with pytest.raises(ValueError, match="finite"):
        REGISTRY["noisy-top2"].with_options(load_weight=float("nan"))
    # a name two targets share is qualified
    lossfree = REGISTRY["top2-lossfree"].sweepable()
    assert "router.k" in lossfree and "k" not in lossfree
    assert "seed" in REGISTRY["hash-random"].sweepable()
    assert "num_hashes" in REGISTRY["hash-multi-hash"].sweepable()


def test_configuration_line_names_classes_and_options():
    assert (
        REGISTRY["switch-cf1.25"].configuration()
        == "SwitchGate(balance_weight=0.01) -> CapacityPolicy(capacity_factor=1.25)"
    )
    assert REGISTRY["hash-balanced"].configuration() == "HashRouter.fit(strategy='balanced')"
