"""Counterfactual balance on a model's recorded router scores.

Given the routings one MoE layer made (``routelab.hf.LayerRouting``: the router's own
choice ``chosen`` with its scores ``probs [T, E]``, per router call), what would

- **a capacity limit** have dropped: :func:`capacity_drops` applies
  ``routelab.policies.CapacityPolicy(capacity_factor, drop_order=...)`` to every call's
  choice (capacity ``ceil(factor * T * k / E)`` per call, as a layer enforces it per
  batch) for every drop order in ``CapacityPolicy.DROP_ORDERS``: dropped entries / all
  entries, and tokens left with no expert / all tokens;
- **an exact balanced assignment** have changed: :func:`balanced_counterfactual` solves
  ``routelab.hf.swap.balanced_topk`` (``solvers.balanced_assignment``, BASE for k = 1) on each
  call's selection scores (``probs`` plus the router's selection bias) and reports the
  fraction of tokens whose expert set changed, the fraction of entries moved, and the
  score lost relative to the model's greedy choice::

      score(R) = sum over entries (t, e) of R of probs[t, e]      the model's unbiased scores
      score_lost = 1 - score(balanced) / score(greedy)

- **a loss-free bias** have to be to reach that balance: :func:`fit_balancing_bias`
  runs the auxiliary-loss-free update (Wang et al. 2024; DeepSeek-V3; routelab's
  ``SelectionBias``) on the recorded scores,
  ``b_e += rate_t * sign(mean load - load_e)`` with the model's own selection
  ``TopK(select(probs, b), k)`` and a decaying rate, and keeps the bias with the most
  even load.

:func:`layer_counterfactuals` gathers the three for one layer, :func:`model_table`
sums the layers into whole-model rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from analysis.metrics import LoadStats, concat_routings
from analysis.specialisation import routing_stability
from routelab.balancing import SelectionBias
from routelab.hf.capture import LayerRouting
from routelab.hf.swap import balanced_routing
from routelab.policies import CapacityPolicy
from routelab.routing import Routing

__all__ = [
    "BalancedCounterfactual",
    "BiasFit",
    "CapacityDrop",
    "balanced_counterfactual",
    "capacity_drops",
    "fit_balancing_bias",
    "layer_counterfactuals",
    "model_table",
    "sum_drops",
]

CAPACITY_FACTORS = (1.0, 1.25, 2.0)


@dataclass(frozen=True)
class CapacityDrop:
    """What ``CapacityPolicy(capacity_factor, drop_order)`` drops of a layer's choice.

    The number of dropped entries, ``sum_e max(0, load_e - C)`` per call, is the same for
    every drop order; which entries go differs: ``dropped_weight`` (their combine
    weights) and ``unrouted`` (tokens left with no expert) tell the orders apart.
    """

    capacity_factor: float
    drop_order: str
    entries: int
    dropped: int
    tokens: int
    unrouted: int
    weight: float = 0.0
    dropped_weight: float = 0.0

    @property
    def dropped_fraction(self) -> float:
        return self.dropped / self.entries if self.entries else 0.0

    @property
    def unrouted_fraction(self) -> float:
        return self.unrouted / self.tokens if self.tokens else 0.0

    @property
    def dropped_weight_fraction(self) -> float:
        return self.dropped_weight / self.weight if self.weight else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "dropped_fraction": self.dropped_fraction,
            "unrouted_fraction": self.unrouted_fraction,
            "dropped_weight_fraction": self.dropped_weight_fraction,
        }

    def __add__(self, other: CapacityDrop) -> CapacityDrop:
        if (self.capacity_factor, self.drop_order) != (other.capacity_factor, other.drop_order):
            raise ValueError("only rows of the same capacity factor and drop order add up")
        return CapacityDrop(
            self.capacity_factor,
            self.drop_order,
            self.entries + other.entries,
            self.dropped + other.dropped,
            self.tokens + other.tokens,
            self.unrouted + other.unrouted,
            self.weight + other.weight,
            self.dropped_weight + other.dropped_weight,
        )


def _choices(records: Sequence[LayerRouting]) -> list[Routing]:
    if not records:
        raise ValueError("records must hold at least one LayerRouting of the layer")
    return [r.chosen for r in records]


def capacity_drops(
    records: Sequence[LayerRouting],
    factors: Sequence[float] = CAPACITY_FACTORS,
    drop_orders: Sequence[str] | None = None,
) -> list[CapacityDrop]:
    """One :class:`CapacityDrop` per (factor, drop order) over every call of one layer."""
    orders = tuple(CapacityPolicy.DROP_ORDERS if drop_orders is None else drop_orders)
    choices = _choices(records)
    rows = []
    for factor in factors:
        for order in orders:
            policy = CapacityPolicy(float(factor), drop_order=order)
            total = CapacityDrop(float(factor), order, 0, 0, 0, 0)
            for routing in choices:
                kept = policy(routing)
                weight = float(routing.weight.double().sum())
                total = total + CapacityDrop(
                    float(factor),
                    order,
                    routing.num_entries,
                    routing.num_entries - kept.num_entries,
                    routing.num_tokens,
                    int((kept.entries_per_token() == 0).sum()),
                    weight,
                    weight - float(kept.weight.double().sum()),
                )
            rows.append(total)
    return rows


@dataclass(frozen=True)
class BiasFit:
    """A selection bias ``[E]`` and the load it gives on the recorded scores."""

    bias: Tensor
    load: Tensor
    max_over_mean: float
    cv_load: float
    steps: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "bias": self.bias.tolist(),
            "load": self.load.tolist(),
            "max_over_mean": self.max_over_mean,
            "cv_load": self.cv_load,
            "steps": self.steps,
        }


def _balance(load: Tensor) -> tuple[float, float]:
    load = load.double()
    mean = float(load.mean())
    if mean <= 0:
        return 1.0, 0.0
    return float(load.max()) / mean, float(load.std(unbiased=False)) / mean


def fit_balancing_bias(
    records: Sequence[LayerRouting],
    *,
    steps: int = 300,
    rate: float | None = None,
    decay: float = 0.985,
    target_max_over_mean: float = 1.0,
) -> BiasFit:
    """The loss-free balancing bias on a layer's recorded scores (module docstring).

    The bias is routelab's ``SelectionBias`` (the paper's update rule, applied in its
    explicit update step after each pass over the scores); selection is the model's own
    (``spec.select`` with the bias added: group limits and the router's own correction
    bias included). ``rate`` defaults to 5 % of the score range; it shrinks by ``decay``
    each step. Stops early once ``max/mean`` load reaches ``target_max_over_mean``;
    returns the best bias seen (the zero bias counts).
    """
    first = records[0]
    probs = torch.cat([r.chosen.probs for r in records])  # type: ignore[misc]
    E, k = probs.shape[1], first.k
    if rate is None:
        rate = 0.05 * float(probs.max() - probs.min()) if probs.numel() else 0.0
    state = SelectionBias(E, rate=rate).train()
    best: BiasFit | None = None
    for step in range(steps + 1):
        chosen = first.spec.select(probs, first.module, k=k, extra_bias=state.bias)
        load = torch.bincount(chosen.reshape(-1), minlength=E)
        mom, cv = _balance(load)
        if best is None or mom < best.max_over_mean - 1e-12:
            best = BiasFit(state.bias.clone(), load, mom, cv, step)
        if mom <= target_max_over_mean + 1e-12 or step == steps:
            break
        state.observe_load(load)
        state.update()
        state.rate *= decay
    assert best is not None
    return best


@dataclass(frozen=True)
class BalancedCounterfactual:
    """What an exact balanced assignment changes in one layer (module docstring)."""

    tokens: int
    entries: int
    moved_token_fraction: float
    moved_entry_fraction: float
    score_greedy: float
    score_balanced: float
    greedy: LoadStats
    balanced: LoadStats
    bias: BiasFit

    @property
    def score_lost(self) -> float:
        return 1.0 - self.score_balanced / self.score_greedy if self.score_greedy else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "entries": self.entries,
            "moved_token_fraction": self.moved_token_fraction,
            "moved_entry_fraction": self.moved_entry_fraction,
            "score_greedy": self.score_greedy,
            "score_balanced": self.score_balanced,
            "score_lost": self.score_lost,
            "greedy_max_over_mean": self.greedy.max_over_mean,
            "greedy_cv_load": self.greedy.cv_load,
            "balanced_max_over_mean": self.balanced.max_over_mean,
            "balanced_cv_load": self.balanced.cv_load,
            "bias": self.bias.to_dict(),
        }


def _score(routing: Routing) -> float:
    assert routing.probs is not None
    return float(routing.probs.double()[routing.token, routing.expert].sum())


def balanced_counterfactual(
    records: Sequence[LayerRouting], *, method: str = "exact", bias_steps: int = 300
) -> BalancedCounterfactual:
    """:class:`BalancedCounterfactual` over every call of one layer."""
    from analysis.metrics import load_stats

    choices = _choices(records)
    balanced = [
        balanced_routing(r.spec, r.module, r.chosen.probs, r.k, method=method)  # type: ignore[arg-type]
        for r in records
    ]
    tokens = sum(r.num_tokens for r in choices)
    entries = sum(r.num_entries for r in choices)
    moved_tokens = sum(routing_stability(a, b) * a.num_tokens for a, b in zip(choices, balanced))
    kept_pairs = 0
    for a, b in zip(choices, balanced):
        E = a.num_experts
        kept_pairs += int(torch.isin(b.token * E + b.expert, a.token * E + a.expert).sum())
    greedy_all, balanced_all = concat_routings(choices), concat_routings(balanced)
    bal_stats = load_stats(balanced_all)
    target = max(bal_stats.max_over_mean, 1.0)
    return BalancedCounterfactual(
        tokens=tokens,
        entries=entries,
        moved_token_fraction=moved_tokens / tokens if tokens else 0.0,
        moved_entry_fraction=1.0 - kept_pairs / entries if entries else 0.0,
        score_greedy=sum(_score(r) for r in choices),
        score_balanced=sum(_score(r) for r in balanced),
        greedy=load_stats(greedy_all),
        balanced=bal_stats,
        bias=fit_balancing_bias(records, steps=bias_steps, target_max_over_mean=target),
    )


def layer_counterfactuals(
    records: Sequence[LayerRouting],
    *,
    factors: Sequence[float] = CAPACITY_FACTORS,
    method: str = "exact",
    bias_steps: int = 300,
) -> dict[str, Any]:
    """``{"capacity": [CapacityDrop], "balanced": BalancedCounterfactual}`` of one layer."""
    return {
        "capacity": capacity_drops(records, factors),
        "balanced": balanced_counterfactual(records, method=method, bias_steps=bias_steps),
    }


def sum_drops(per_layer: Sequence[Sequence[CapacityDrop]]) -> list[CapacityDrop]:
    """The layers' rows summed per (capacity factor, drop order), in first-seen order."""
    sums: dict[tuple[float, str], CapacityDrop] = {}
    for rows in per_layer:
        for row in rows:
            key = (row.capacity_factor, row.drop_order)
            sums[key] = sums[key] + row if key in sums else row
    return list(sums.values())


def model_table(per_layer: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Whole-model rows: capacity drops summed over layers per (factor, order), and the
    balanced counterfactual's moved fractions and score weighted by each layer's size."""
    capacity = [row.to_dict() for row in sum_drops([layer["capacity"] for layer in per_layer])]
    balanced = [layer["balanced"] for layer in per_layer]
    tokens = sum(b.tokens for b in balanced)
    entries = sum(b.entries for b in balanced)
    greedy = sum(b.score_greedy for b in balanced)
    return {
        "capacity": capacity,
        "balanced": {
            "tokens": tokens,
            "entries": entries,
            "moved_token_fraction": sum(b.moved_token_fraction * b.tokens for b in balanced)
            / max(tokens, 1),
            "moved_entry_fraction": sum(b.moved_entry_fraction * b.entries for b in balanced)
            / max(entries, 1),
            "score_lost": 1.0 - sum(b.score_balanced for b in balanced) / greedy if greedy else 0.0,
        },
    }
