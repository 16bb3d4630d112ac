"""The rows of ``routelab compare``: one named router configuration per row.

A row (``CompareRow``) holds classes, not names: the router class, its keyword options
and the policies (each a ``PolicySpec``: a policy class and its options) that follow it
in the MoE layer. ``row.build_layer(d_model, num_experts, data)`` is the one way an
experiment turns a row into a layer: ``MoE(router, FFNExperts(E, d, d_hidden), policies)``
(or the row's own ``layer`` builder, for layers that are not router + policies + FFN
experts). ``row.with_options(capacity_factor=2.0)`` is the same row with options changed:
what ``routelab sweep`` varies; ``row.sweepable()`` lists the options it can vary.

Adding a row is one ``register(CompareRow(...))`` call (see the rows below)::

    register(
        CompareRow(
            "top2-lossfree",                      # the row's name (--routers takes it)
            TopKGate,                             # the router class
            {"k": 2},                             # its keyword options
            policies=(PolicySpec(LossFreeBalancingPolicy, {"k": 2, "rate": 1e-3}),),
            description="top-2 with loss-free bias balancing (Wang et al. 2024)",
        )
    )

Names are unique (registering a name twice raises unless ``replace=True``), every
class is checked when the row is created, and an unknown name raises a ValueError that
lists the known ones: nothing is skipped silently.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor

from analysis.data import DATASETS
from routelab.experts import FFNExperts
from routelab.moe import MoE, SharedExperts
from routelab.null_experts import NullExperts
from routelab.policies import CapacityPolicy, LossFreeBalancingPolicy, PausingPolicy, Policy
from routelab.router import Router
from routelab.routers import (
    BASERouter,
    DSelectKGate,
    ExpertChoiceRouter,
    HashRouter,
    NoisyTopKGate,
    SinkhornRouter,
    SoftmaxGate,
    SwitchGate,
    TopKGate,
    TopKRouter,
)
from routelab.routers.cosine import CosineTopKGate
from routelab.routers.moe_plus_plus import MoEPlusPlusGate
from routelab.routers.remoe import ReMoEGate
from routelab.routers.top_p import TopPGate
from routelab.soft_moe import SoftMoE

__all__ = [
    "DATASETS",
    "REGISTRY",
    "CompareRow",
    "PolicySpec",
    "RoutingData",
    "SweepOption",
    "default_rows",
    "fit_hash",
    "register",
    "resolve_routers",
]

_NAME = re.compile(r"^[a-z0-9][a-z0-9.+_-]*$")


class RoutingData(Protocol):
    """What a row's builder may use from a data set (``analysis.data.Dataset`` has it).

    ``name`` (``"tokens"`` / ``"digits"``), ``vocab_size`` (the number of token ids),
    ``fit_token_ids`` (int64, the ids of the tokens the models train on) and
    ``embeddings`` (float ``[vocab_size, D]`` per-id features).
    """

    name: str
    vocab_size: int
    fit_token_ids: Tensor
    embeddings: Tensor


RouterBuilder = Callable[["CompareRow", int, int, RoutingData], Router]
LayerBuilder = Callable[["CompareRow", int, int, RoutingData, int], MoE | SoftMoE]


def _keyword_defaults(function: Callable[..., Any], skip: Sequence[str]) -> dict[str, Any]:
    """The keyword parameters of ``function`` with a number or bool default."""
    out = {}
    for name, param in inspect.signature(function).parameters.items():
        if name in skip or param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            continue
        if isinstance(param.default, (bool, int, float)) or param.default is None:
            out[name] = param.default
    return out


@dataclass(frozen=True)
class PolicySpec:
    """A policy class and its keyword options.

    Built as ``policy(num_experts, **options)`` when the class's first parameter is
    ``num_experts`` (pausing, loss-free bias), else ``policy(**options)`` (capacity).
    """

    policy: type[Policy]
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (isinstance(self.policy, type) and issubclass(self.policy, Policy)):
            raise TypeError(f"policy must be a Policy subclass, got {self.policy!r}")
        object.__setattr__(self, "options", dict(self.options))

    @property
    def takes_num_experts(self) -> bool:
        params = list(inspect.signature(self.policy.__init__).parameters)
        return len(params) > 1 and params[1] == "num_experts"

    def build(self, num_experts: int) -> Policy:
        if self.takes_num_experts:
            return self.policy(num_experts, **self.options)
        return self.policy(**self.options)

    def describe(self) -> str:
        return _call_text(self.policy.__name__, self.options)

    def option_defaults(self) -> dict[str, Any]:
        return {**_keyword_defaults(self.policy.__init__, ("self", "num_experts")), **self.options}


def _call_text(name: str, options: Mapping[str, Any]) -> str:
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in options.items())})"


@dataclass(frozen=True)
class SweepOption:
    """One option ``routelab sweep`` can vary: where it goes and its current value."""

    name: str
    target: str  # "router" or the policy class's name
    value: Any


@dataclass(frozen=True)
class CompareRow:
    """One row of ``routelab compare``: a router class, its options and its policies.

    Fields:
        name: the row's name (``--routers`` takes it): lower case, digits, ``.+_-``.
        router: the router class (a ``routelab.Router`` subclass); for a row whose
            ``build_layer_with`` builds a layer without a router (Soft MoE), the layer
            class, whose keyword options ``options`` are.
        options: keyword options of the router's constructor (after ``d_model,
            num_experts``), or of ``build_router`` where one is given.
        policies: ``PolicySpec`` s applied in order after the router.
        datasets: the data sets the row runs on (default both).
        description: one line for the report: what the row is.
        build_router: ``(row, d_model, num_experts, data) -> Router`` for routers that
            need the data (hash tables); default ``router(d_model, num_experts,
            **options)``.
        build_layer_with: ``(row, d_model, num_experts, data, d_hidden) -> layer`` for
            layers that are not ``MoE(router, FFNExperts, policies)``; the layer must be
            a ``routelab.MoE`` (or subclass) or a ``routelab.soft_moe.SoftMoE``, so the
            recorder sees its routing.
        in_default: whether ``routelab compare`` without ``--routers`` runs it.
    """

    name: str
    router: type[Router] | type[SoftMoE]
    options: Mapping[str, Any] = field(default_factory=dict)
    policies: tuple[PolicySpec, ...] = ()
    datasets: tuple[str, ...] = DATASETS
    description: str = ""
    build_router: RouterBuilder | None = None
    build_layer_with: LayerBuilder | None = None
    in_default: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(
                f"row name must be lower case letters, digits and '.+_-', got {self.name!r}"
            )
        layer_class = self.build_layer_with is not None and self.router is SoftMoE
        if not (isinstance(self.router, type) and (issubclass(self.router, Router) or layer_class)):
            raise TypeError(
                f"row {self.name!r}: router must be a Router subclass, got {self.router!r}"
            )
        object.__setattr__(self, "options", dict(self.options))
        object.__setattr__(self, "policies", tuple(self.policies))
        for spec in self.policies:
            if not isinstance(spec, PolicySpec):
                raise TypeError(f"row {self.name!r}: policies must be PolicySpecs, got {spec!r}")
        datasets = tuple(self.datasets)
        if not datasets or any(d not in DATASETS for d in datasets):
            raise ValueError(
                f"row {self.name!r}: datasets must be among {DATASETS}, got {datasets}"
            )
        object.__setattr__(self, "datasets", datasets)

    # ------------------------------------------------------------------ building
    def make_router(self, d_model: int, num_experts: int, data: RoutingData) -> Router:
        if self.build_router is not None:
            return self.build_router(self, d_model, num_experts, data)
        if not issubclass(self.router, Router):
            raise TypeError(f"row {self.name!r}: {self.router.__name__} is a layer, not a router")
        return self.router(d_model, num_experts, **self.options)

    def make_policies(self, num_experts: int) -> list[Policy]:
        return [spec.build(num_experts) for spec in self.policies]

    def build_layer(
        self, d_model: int, num_experts: int, data: RoutingData, *, d_hidden: int | None = None
    ) -> MoE | SoftMoE:
        """The MoE layer of this row: router, ``FFNExperts(E, d, d_hidden)`` (relu,
        default ``d_hidden = 2 d``), policies; or what ``build_layer_with`` builds."""
        d_hidden = 2 * d_model if d_hidden is None else d_hidden
        if self.build_layer_with is not None:
            return self.build_layer_with(self, d_model, num_experts, data, d_hidden)
        router = self.make_router(d_model, num_experts, data)
        experts = FFNExperts(router.num_experts, d_model, d_hidden, activation="relu")
        return MoE(router, experts, self.make_policies(num_experts))

    # ------------------------------------------------------------------ options
    def sweepable(self) -> dict[str, SweepOption]:
        """Every option ``with_options`` accepts, by name: the router's keyword options
        (numbers and flags) and each policy's. A name that two of them share is listed
        qualified, as ``router.k`` / ``PolicyName.k``; ``with_options`` also accepts
        every option qualified."""
        if self.build_router is None:
            defaults = _keyword_defaults(self.router.__init__, ("self", "d_model", "num_experts"))
        else:
            defaults = dict(getattr(self.build_router, "option_defaults", lambda row: {})(self))
        found = [
            SweepOption(name, "router", value)
            for name, value in {**defaults, **self.options}.items()
            if isinstance(value, (bool, int, float)) or value is None
        ]
        for spec in self.policies:
            found += [
                SweepOption(name, spec.policy.__name__, value)
                for name, value in spec.option_defaults().items()
            ]
        names = [option.name for option in found]
        return {
            (
                option.name if names.count(option.name) == 1 else f"{option.target}.{option.name}"
            ): option
            for option in found
        }

    def with_options(self, **changes: Any) -> CompareRow:
        """This row with options changed (names as in :meth:`sweepable`, or qualified as
        ``router.NAME`` / ``PolicyName.NAME``); an unknown name raises a ValueError."""
        sweepable = self.sweepable()
        qualified = {f"{o.target}.{o.name}": o for o in sweepable.values()}
        options = dict(self.options)
        policy_options = [dict(spec.options) for spec in self.policies]
        for name, value in changes.items():
            option = sweepable.get(name) or qualified.get(name)
            if option is None:
                raise ValueError(
                    f"router {self.name!r} has no option {name!r}; its options: "
                    + ", ".join(sweepable)
                )
            value = _like(option, value)
            if option.target == "router":
                options[option.name] = value
            else:
                for spec, opts in zip(self.policies, policy_options):
                    if spec.policy.__name__ == option.target:
                        opts[option.name] = value
        policies = tuple(
            PolicySpec(spec.policy, opts) for spec, opts in zip(self.policies, policy_options)
        )
        return dataclasses.replace(self, options=options, policies=policies)

    def configuration(self) -> str:
        """One line: the router call and the policies, e.g. ``SwitchGate(balance_weight=0.01)
        -> CapacityPolicy(capacity_factor=1.0)``."""
        router = self.router.__name__
        if self.build_router is not None and self.build_router is fit_hash:
            router = "HashRouter.fit"
        parts = [_call_text(router, self.options)]
        parts += [spec.describe() for spec in self.policies]
        return " -> ".join(parts)


def _like(option: SweepOption, value: Any) -> Any:
    """``value`` as the option's kind: an int option takes whole numbers only."""
    current = option.value
    if isinstance(current, bool):
        if value in (0, 1, 0.0, 1.0, True, False):
            return bool(value)
        raise ValueError(f"option {option.name!r} is a flag (0 or 1), got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"option {option.name!r} must be finite, got {value!r}")
    if isinstance(current, int) and isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"option {option.name!r} takes whole numbers, got {value!r}")
        return int(value)
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def fit_hash(row: CompareRow, d_model: int, num_experts: int, data: RoutingData) -> Router:
    """``HashRouter.fit(strategy, ...)`` on the training token ids (and their embeddings
    for the clustered / dispersed tables); ``row.options`` holds ``strategy`` and any
    ``HashRouter.fit`` option (``num_hashes``, ``seed``, ``num_clusters``)."""
    options = dict(row.options)
    strategy = options.pop("strategy")
    fit: dict[str, Any] = {"d_model": d_model, "vocab_size": data.vocab_size}
    per_hash = num_experts
    if strategy in ("balanced", "clustered", "dispersed"):
        fit["token_ids"] = data.fit_token_ids
    if strategy in ("clustered", "dispersed"):
        fit["embeddings"] = data.embeddings
    if strategy == "multi-hash":
        num_hashes = options.get("num_hashes", 2)
        if num_experts % num_hashes:
            raise ValueError(
                f"multi-hash needs num_experts divisible by num_hashes = {num_hashes}, "
                f"got {num_experts}"
            )
        per_hash = num_experts // num_hashes
        options["num_hashes"] = num_hashes
    return HashRouter.fit(strategy, per_hash, **fit, **options)


def _hash_options(row: CompareRow) -> dict[str, Any]:
    """The ``HashRouter.fit`` options a hash row's strategy uses (what sweep may vary)."""
    strategy = str(row.options.get("strategy"))
    extra: dict[str, dict[str, Any]] = {
        "multi-hash": {"num_hashes": 2},
        "clustered": {"num_clusters": None},
        "dispersed": {"num_clusters": None},
    }
    return {"seed": 0, **extra.get(strategy, {})}


fit_hash.option_defaults = _hash_options  # type: ignore[attr-defined]


REGISTRY: dict[str, CompareRow] = {}


def register(row: CompareRow, *, replace: bool = False) -> CompareRow:
    """Add ``row`` under its name; a name already registered raises unless ``replace``."""
    if not isinstance(row, CompareRow):
        raise TypeError(f"row must be a CompareRow, got {type(row).__name__}")
    if row.name in REGISTRY and not replace:
        raise ValueError(f"a row named {row.name!r} is already registered")
    REGISTRY[row.name] = row
    return row


def default_rows() -> list[CompareRow]:
    """The rows ``routelab compare`` runs by default, in registration order."""
    return [row for row in REGISTRY.values() if row.in_default]


def resolve_routers(names: Sequence[str] | None) -> list[CompareRow]:
    """The rows named, in the order given (the default rows for None or empty).

    Unknown or repeated names raise a ValueError naming them and the known rows.
    """
    if names is None:
        return default_rows()
    if isinstance(names, str):
        raise TypeError("names must be a list of row names, not one string")
    rows = []
    for name in names:
        if name not in REGISTRY:
            hint = ""
            if name != name.strip():
                hint = " (names are separated by commas, without spaces)"
            raise ValueError(f"unknown router {name!r}{hint}; known: {', '.join(REGISTRY)}")
        if REGISTRY[name] in rows:
            raise ValueError(f"router {name!r} is named twice")
        rows.append(REGISTRY[name])
    if not rows:
        raise ValueError("no routers named")
    return rows


# ---------------------------------------------------------------------- the rows
_SWITCH = {"balance_weight": 1e-2}

for _row in (
    CompareRow("softmax", SoftmaxGate, description="dense softmax gate: every expert, every token"),
    CompareRow("top2", TopKGate, {"k": 2}, description="top-2 softmax gate, no balancing"),
    CompareRow(
        "noisy-top2",
        NoisyTopKGate,
        {"k": 2, "importance_weight": 0.1, "load_weight": 0.1},
        description="noisy top-2 with importance and load losses (Shazeer et al. 2017)",
    ),
    CompareRow(
        "noisy-top2-noloss",
        NoisyTopKGate,
        {"k": 2, "importance_weight": 0.0, "load_weight": 0.0},
        description="noisy top-2 without its balancing losses",
    ),
    *(
        CompareRow(
            f"switch-cf{cf}",
            SwitchGate,
            _SWITCH,
            policies=(PolicySpec(CapacityPolicy, {"capacity_factor": cf}),),
            description=f"Switch top-1 with balance loss, capacity factor {cf} (Fedus et al. 2021)",
        )
        for cf in (0.5, 1.0, 1.25, 2.0)
    ),
    CompareRow(
        "dselect-2", DSelectKGate, {"k": 2}, description="DSelect-k, k = 2 (Hazimeh et al. 2021)"
    ),
    CompareRow(
        "expert-choice",
        ExpertChoiceRouter,
        {"capacity_factor": 2.0},
        description="expert choice: each expert takes its top tokens (Zhou et al. 2022)",
    ),
    CompareRow(
        "base", BASERouter, description="BASE layer: balanced assignment (Lewis et al. 2021)"
    ),
    CompareRow(
        "sinkhorn", SinkhornRouter, description="Sinkhorn-balanced top-1 (Clark et al. 2022)"
    ),
    CompareRow(
        "top2-pausing",
        TopKGate,
        {"k": 2},
        # margin in gate mass: 64 = one step's mean share of an expert (256 items x 2 / 8)
        policies=(PolicySpec(PausingPolicy, {"margin": 64.0}),),
        description="top-2 with Eigen et al. 2013 pausing: an expert more than 64 of gate "
        "mass above the mean total is paused",
    ),
    CompareRow(
        "top2-lossfree",
        TopKGate,
        {"k": 2},
        policies=(PolicySpec(LossFreeBalancingPolicy, {"k": 2, "rate": 1e-3}),),
        description="top-2 with loss-free bias balancing (Wang et al. 2024)",
    ),
    # Hash rows run on tokens only: on digits the only id is the image's index, and
    # held-out images have ids no table has seen (every table is then a random one).
    *(
        CompareRow(
            f"hash-{strategy}",
            HashRouter,
            {"strategy": strategy},
            datasets=("tokens",),
            build_router=fit_hash,
            description=f"hash routing by token id, {strategy} table (Roller et al. 2021)",
        )
        for strategy in ("random", "balanced", "clustered", "dispersed", "multi-hash")
    ),
):
    register(_row)


# ---------------------------------------------------------------------- beyond fixed top-k
def _moe_plus_plus_layer(
    row: CompareRow, d_model: int, num_experts: int, data: RoutingData, d_hidden: int
) -> MoE:
    """MoE++ (Jin et al. 2024): ``num_null`` of the E experts are null experts (one zero,
    one copy, the rest constant), the others FFN experts; ``DeepMoE`` links the gates of
    consecutive layers (gating residuals)."""
    options = dict(row.options)
    num_null = options.pop("num_null")
    counts = {
        "num_zero": min(1, num_null),
        "num_copy": min(1, max(0, num_null - 1)),
        "num_constant": max(0, num_null - 2),
    }
    gate = MoEPlusPlusGate(d_model, num_experts, num_null=num_null, **options)
    ffn = FFNExperts(num_experts - num_null, d_model, d_hidden, activation="relu")
    return MoE(gate, NullExperts(ffn, **counts), row.make_policies(num_experts))


def _soft_moe_layer(
    row: CompareRow, d_model: int, num_experts: int, data: RoutingData, d_hidden: int
) -> SoftMoE:
    """Soft MoE (Puigcerver et al. 2024) over E FFN experts, ``row.options`` its options."""
    experts = FFNExperts(num_experts, d_model, d_hidden, activation="relu")
    return SoftMoE(d_model, num_experts, experts, **row.options)


for _row in (
    CompareRow(
        "top-p",
        TopPGate,
        {"p": 0.4, "dynamic_weight": 1e-4, "balance_weight": 1e-2},
        description="dynamic top-p (p = 0.4) with its entropy loss (Huang et al. 2024)",
    ),
    CompareRow(
        "remoe",
        ReMoEGate,
        {"k": 2},
        description="ReMoE: ReLU gates, adaptive L1 toward sparsity 1 - 2/E (Wang et al. 2025)",
    ),
    CompareRow(
        "cosine-top2",
        CosineTopKGate,
        {"k": 2, "balance_weight": 1e-2},
        description="X-MoE cosine routing in 16 dimensions, learned temperature (Chi et al. 2022)",
    ),
    CompareRow(
        "moe++",
        MoEPlusPlusGate,
        {"k": 2, "num_null": 3, "tau": 0.75},
        build_layer_with=_moe_plus_plus_layer,
        description="MoE++: E - 3 FFN + zero, copy, constant experts, top-2 (Jin et al. 2024)",
    ),
    CompareRow(
        "soft-moe",
        SoftMoE,
        {"slots_per_expert": 1, "group_size": 16},
        build_layer_with=_soft_moe_layer,
        description="Soft MoE, 1 slot per expert over groups of 16 items (Puigcerver et al. 2024)",
    ),
):
    register(_row)


# ---------------------------------------------------------------------- today's production
# routing (issue 11): routelab.routers.TopKRouter configured as DeepSeek-V3 / Qwen3-MoE
def _with_shared_expert(
    row: CompareRow, d_model: int, num_experts: int, data: RoutingData, d_hidden: int
) -> MoE:
    """``MoE(router, FFNExperts(E, d, d_hidden), policies)`` plus one always-on shared
    expert of the same size (DeepSeekMoE, Dai et al. 2024)."""
    router = row.make_router(d_model, num_experts, data)
    experts = FFNExperts(router.num_experts, d_model, d_hidden, activation="relu")
    shared = SharedExperts(d_model, d_hidden, activation="relu")
    return MoE(router, experts, row.make_policies(num_experts), shared_experts=shared)


for _row in (
    CompareRow(
        "deepseek-v3",
        TopKRouter,
        {
            "k": 2,
            "score": "sigmoid",
            "num_groups": 4,
            "top_groups": 2,
            "scaling_factor": 2.5,
            "selection_bias": True,
            "selection_bias_rate": 1e-3,
            "sequence_balance_weight": 1e-4,
        },
        build_layer_with=_with_shared_expert,
        description="DeepSeek-V3: sigmoid top-2 in the top 2 of 4 expert groups, selection "
        "bias, sequence-wise loss, weights x2.5, one shared expert (DeepSeek-AI 2024)",
    ),
    CompareRow(
        "qwen-global-lbl",
        TopKRouter,
        {"k": 2, "global_balance_weight": 1e-2},
        description="softmax top-2 with the global-batch balance loss (Qiu et al. 2025; "
        "one micro-batch per step here, so global = the batch)",
    ),
    CompareRow(
        "topk-sigmoid-bias",
        TopKRouter,
        {"k": 2, "score": "sigmoid", "selection_bias": True, "selection_bias_rate": 1e-3},
        description="sigmoid top-2 with the loss-free selection bias inside the top-k "
        "(Wang et al. 2024)",
    ),
):
    register(_row)
