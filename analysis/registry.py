"""The router configurations ``routelab compare`` knows, by name.

A :class:`RouterConfig` builds ``(router, policies)`` for ``(d_model, num_experts,
dataset)``; ``options`` are keyword overrides (what ``routelab sweep`` varies).
Configurations whose router class has not been added to :mod:`routelab.routers` are
skipped by :func:`available_routers`, so the comparison covers every router that exists.
Register more with :func:`register`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import routelab.routers as routers_module
from routelab import policies as policies_module
from routelab.policies import CapacityPolicy, Policy
from routelab.router import Router

__all__ = ["REGISTRY", "RouterConfig", "available_routers", "register", "resolve_routers"]

Built = tuple[Router, list[Policy]]


@dataclass(frozen=True)
class RouterConfig:
    """A named router configuration.

    Fields:
        name: the row name in reports (``--routers`` takes these).
        router_class: the name of the class in :mod:`routelab.routers` it needs.
        kwargs: keyword arguments of the router's constructor.
        capacity_factor: wrap with ``CapacityPolicy(capacity_factor)`` when set.
        policy: the name of an extra policy class in :mod:`routelab.policies` built as
            ``Policy(num_experts, **policy_kwargs)`` (e.g. ``"PausingPolicy"``), applied
            before the capacity policy.
        hash_strategy: build with ``HashRouter.fit(hash_strategy, ...)`` instead.
        description: one line for the report.
    """

    name: str
    router_class: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    capacity_factor: float | None = None
    policy: str | None = None
    policy_kwargs: dict[str, Any] = field(default_factory=dict)
    hash_strategy: str | None = None
    description: str = ""

    @property
    def available(self) -> bool:
        if getattr(routers_module, self.router_class, None) is None:
            return False
        return self.policy is None or getattr(policies_module, self.policy, None) is not None

    def build(self, d_model: int, num_experts: int, dataset: Any, **options: Any) -> Built:
        """``(router, policies)`` for E experts of width d; ``options`` override kwargs."""
        cls = getattr(routers_module, self.router_class, None)
        if cls is None:
            raise ValueError(f"router {self.name!r} needs routelab.routers.{self.router_class}")
        kwargs = {**self.kwargs, **options}
        if self.hash_strategy is not None:
            router = _fit_hash(cls, self.hash_strategy, num_experts, d_model, dataset, kwargs)
        else:
            router = cls(d_model, num_experts, **kwargs)
        policies: list[Policy] = []
        if self.policy is not None:
            policies.append(
                getattr(policies_module, self.policy)(num_experts, **self.policy_kwargs)
            )
        if self.capacity_factor is not None:
            policies.append(CapacityPolicy(self.capacity_factor))
        return router, policies


def _fit_hash(
    cls: Any, strategy: str, num_experts: int, d_model: int, dataset: Any, kwargs: dict
) -> Router:
    fit: dict[str, Any] = {
        "d_model": d_model,
        "vocab_size": dataset.vocab_size,
        "seed": kwargs.pop("seed", 0),
    }
    per_hash = num_experts
    if strategy in ("balanced", "clustered", "dispersed"):
        fit["token_ids"] = dataset.fit_token_ids
    if strategy in ("clustered", "dispersed"):
        fit["embeddings"] = dataset.embeddings
    if strategy == "multi-hash":
        num_hashes = kwargs.pop("num_hashes", 2)
        if num_experts % num_hashes:
            raise ValueError(
                f"multi-hash needs num_experts divisible by num_hashes = {num_hashes}, "
                f"got {num_experts}"
            )
        fit["num_hashes"] = num_hashes
        per_hash = num_experts // num_hashes
    fit.update(kwargs)
    return cls.fit(strategy, per_hash, **fit)


REGISTRY: dict[str, RouterConfig] = {}


def register(config: RouterConfig) -> RouterConfig:
    """Add (or replace) a configuration under its name."""
    if not isinstance(config, RouterConfig):
        raise TypeError(f"config must be a RouterConfig, got {type(config).__name__}")
    REGISTRY[config.name] = config
    return config


for _config in (
    RouterConfig("softmax", "SoftmaxGate", description="dense softmax gate, every expert"),
    RouterConfig("top2", "TopKGate", {"k": 2}, description="top-2 softmax gate, no loss"),
    RouterConfig(
        "noisy-top2",
        "NoisyTopKGate",
        {"k": 2, "importance_weight": 0.1, "load_weight": 0.1},
        description="noisy top-2, w_importance = w_load = 0.1",
    ),
    RouterConfig(
        "noisy-top2-noloss",
        "NoisyTopKGate",
        {"k": 2, "importance_weight": 0.0, "load_weight": 0.0},
        description="noisy top-2 without balancing losses",
    ),
    RouterConfig(
        "switch-cf0.5",
        "SwitchGate",
        {"balance_weight": 1e-2},
        capacity_factor=0.5,
        description="Switch top-1, capacity factor 0.5",
    ),
    RouterConfig(
        "switch-cf1.0",
        "SwitchGate",
        {"balance_weight": 1e-2},
        capacity_factor=1.0,
        description="Switch top-1, capacity factor 1.0",
    ),
    RouterConfig(
        "switch-cf1.25",
        "SwitchGate",
        {"balance_weight": 1e-2},
        capacity_factor=1.25,
        description="Switch top-1, capacity factor 1.25",
    ),
    RouterConfig(
        "switch-cf2.0",
        "SwitchGate",
        {"balance_weight": 1e-2},
        capacity_factor=2.0,
        description="Switch top-1, capacity factor 2.0",
    ),
    RouterConfig("dselect-2", "DSelectKGate", {"k": 2}, description="DSelect-k, k = 2"),
    RouterConfig(
        "expert-choice",
        "ExpertChoiceRouter",
        {"capacity_factor": 2.0},
        description="expert choice, capacity factor 2",
    ),
    RouterConfig("base", "BASERouter", description="BASE layer, balanced assignment"),
    RouterConfig("sinkhorn", "SinkhornRouter", description="Sinkhorn-balanced top-1"),
    RouterConfig(
        "top2-pausing",
        "TopKGate",
        {"k": 2},
        policy="PausingPolicy",
        description="top-2 with Eigen et al. pausing (margin 0.1)",
    ),
    RouterConfig(
        "top2-lossfree",
        "TopKGate",
        {"k": 2},
        policy="LossFreeBalancingPolicy",
        policy_kwargs={"k": 2, "rate": 1e-3},
        description="top-2 with loss-free bias balancing (Wang et al. 2024)",
    ),
    *(
        RouterConfig(
            f"hash-{strategy}",
            "HashRouter",
            hash_strategy=strategy,
            description=f"hash routing, {strategy} table",
        )
        for strategy in ("random", "balanced", "clustered", "dispersed", "multi-hash")
    ),
):
    register(_config)


def available_routers() -> list[RouterConfig]:
    """Every registered configuration whose router class exists, in registration order."""
    return [c for c in REGISTRY.values() if c.available]


def resolve_routers(names: list[str] | None) -> list[RouterConfig]:
    """The configurations named (all available ones for None); unknown names raise."""
    if not names:
        return available_routers()
    out = []
    for name in names:
        if name not in REGISTRY:
            raise ValueError(f"unknown router {name!r}; known: {', '.join(REGISTRY)}")
        config = REGISTRY[name]
        if not config.available:
            raise ValueError(f"router {name!r} needs routelab.routers.{config.router_class}")
        out.append(config)
    return out
