"""Load-balance metrics of a routing, from a :class:`~routelab.Routing` or from counts.

Definitions (E experts; ``load [E]`` entries per expert; ``importance [E]``):

- importance (Shazeer et al. 2017): ``Importance_e = sum over tokens t of G(x_t)_e``,
  the router's gate values summed over the batch. ``G`` is ``routing.probs [T, E]``
  where the router has one; where ``probs`` is None the routing weights scattered
  to ``[T, E]`` are used instead (so importance is then the sum of the combine
  weights each expert received, after any capacity policy).
- load: the number of (token, expert) entries each expert received, ``routing.load()``
  (after capacity and pausing policies: what the experts actually process).
- ``CV(v) = std(v) / mean(v)`` with the population std over experts (Shazeer et al.
  2017 use ``CV^2`` in their importance and load losses; we report CV itself).
- ``max_over_mean`` and ``min_over_mean``: ``max(load) / mean(load)`` and
  ``min(load) / mean(load)``.
- Gini of the load vector: ``sum_i sum_j |l_i - l_j| / (2 E sum(l))``; 0 for an even
  load, ``(E - 1) / E`` when one expert takes everything.
- normalised entropy: ``H(p) / log E`` with ``p = load / sum(load)`` and
  ``0 log 0 = 0``; 1 for an even load, 0 when one expert takes everything.
- ``unused_fraction``: the fraction of experts with zero load.
- ``dropped_fraction``: dropped entries / (kept + dropped entries), where a capacity
  or pausing policy recorded ``routing.dropped``; 0 otherwise.
- ``capacity_utilisation``: kept entries / (capacity * E), where a capacity policy ran
  (``routing.capacity`` is set); None otherwise.
- ``unrouted_fraction``: the fraction of tokens left with no kept entry (dropped by a
  capacity policy, or picked by no expert under expert choice).
- variable compute (top-p, ReLU routing, null experts): ``experts_per_token_hist``
  (float64 ``[E + 1]``, entry n the number of tokens with n kept entries),
  ``experts_per_token_mean`` (kept entries / tokens), ``ffn_entries_per_token`` (the
  same, not counting entries on ``null_experts``, the ids whose experts spend no FFN
  compute: MoE++'s zero / copy / constant experts; or the rows the FFN experts ran where
  the caller gives them, a Soft MoE's slots) and ``flops_vs_topk``
  (``ffn_entries_per_token / reference_k``: the expert FLOPs per token relative to a
  top-k router with ``k = reference_k`` and the same experts; None without a reference).

Conventions for the degenerate cases, so every field is a finite number:

- one expert (E = 1): CV 0, Gini 0, max/mean = min/mean = 1 and entropy **1.0**
  (``log 1 = 0``; a single expert is trivially perfectly balanced).
- an all-zero vector (an empty routing, T = 0 or N = 0) is treated as perfectly even:
  CV 0, Gini 0, max/mean = min/mean = 1, entropy 1.0; ``unused_fraction`` is 1 (no
  expert received anything); ``dropped_fraction`` 0; capacity utilisation 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from analysis.validation import (
    as_float_array,
    require_float,
    require_int,
    require_optional_int,
)
from routelab.routing import Routing, require_routing

__all__ = [
    "LoadCounter",
    "LoadStats",
    "coefficient_of_variation",
    "concat_routings",
    "gini",
    "importance",
    "load_stats",
    "normalised_entropy",
]


def _as_vector(name: str, values: object) -> Tensor:
    """A load-like vector ``[E]``, E >= 1, of finite numbers >= 0, as float64 on the CPU."""
    return as_float_array(name, values, 1, nonnegative=True, min_size=1)


def coefficient_of_variation(values: Tensor) -> float:
    """``std(v) / mean(v)`` over experts (population std); 0 for an all-zero vector."""
    v = _as_vector("values", values)
    mean = float(v.mean())
    if mean == 0.0:
        return 0.0
    return float(v.std(unbiased=False)) / mean


def gini(values: Tensor) -> float:
    """Gini coefficient ``sum_ij |v_i - v_j| / (2 E sum(v))``; 0 for an all-zero vector."""
    v = _as_vector("values", values)
    total = float(v.sum())
    if total == 0.0:
        return 0.0
    diffs = (v[:, None] - v[None, :]).abs().sum()
    return float(diffs) / (2.0 * v.shape[0] * total)


def normalised_entropy(values: Tensor) -> float:
    """``H(v / sum v) / log E`` in [0, 1]; 1.0 for E = 1 and for an all-zero vector."""
    v = _as_vector("values", values)
    total = float(v.sum())
    if v.shape[0] == 1 or total == 0.0:
        return 1.0
    p = v / total
    nz = p[p > 0]
    return float(-(nz * nz.log()).sum()) / math.log(v.shape[0])


def _ratio(values: Tensor, which: str) -> float:
    mean = float(values.mean())
    if mean == 0.0:
        return 1.0
    return float(values.max() if which == "max" else values.min()) / mean


def importance(routing: Routing) -> Tensor:
    """float64 ``[E]``: ``sum_t G(x_t)``, from ``probs`` where present, else the weights."""
    require_routing(routing)
    if routing.probs is not None:
        return routing.probs.detach().to("cpu", torch.float64).sum(0)
    out = torch.zeros(routing.num_experts, dtype=torch.float64)
    return out.index_add(
        0, routing.expert.detach().cpu(), routing.weight.detach().to("cpu", torch.float64)
    )


@dataclass(frozen=True)
class LoadStats:
    """How balanced a routing is (see the module docstring for every definition).

    Fields:
        importance: float64 ``[E]``, summed gate values per expert.
        load: float64 ``[E]``, entries per expert (whole numbers).
        cv_importance, cv_load: coefficients of variation (std / mean over experts).
        max_over_mean, min_over_mean: max and min load relative to the mean load.
        gini: Gini coefficient of the load.
        entropy: normalised entropy of the load, in [0, 1].
        unused_fraction: fraction of experts with zero load.
        dropped_fraction: dropped / (kept + dropped) entries.
        capacity_utilisation: kept entries / total capacity slots, or None when no
            capacity policy ran.
        unrouted_fraction: the fraction of tokens with no kept entry (dropped by a
            capacity policy, or not chosen by any expert under expert choice).
        num_tokens: tokens seen; num_entries: kept entries; num_dropped: dropped entries;
        capacity_slots: summed ``capacity * E`` over the batches a capacity policy ran on.
        experts_per_token_hist: float64 ``[E + 1]``, tokens per number of kept entries
            (None where only counts were given).
        experts_per_token_mean: mean kept entries per token.
        ffn_entries_per_token: mean kept entries per token on experts with FFN compute.
        null_experts: the expert ids counted as free (no FFN compute).
        reference_k: the k of the top-k reference for ``flops_vs_topk`` (or None).
        flops_vs_topk: ``ffn_entries_per_token / reference_k`` (None without reference_k).
    """

    importance: Tensor
    load: Tensor
    cv_importance: float
    cv_load: float
    max_over_mean: float
    min_over_mean: float
    gini: float
    entropy: float
    unused_fraction: float
    dropped_fraction: float
    capacity_utilisation: float | None
    unrouted_fraction: float
    num_tokens: int
    num_entries: int
    num_dropped: int
    capacity_slots: int | None
    experts_per_token_hist: Tensor | None = None
    experts_per_token_mean: float = 0.0
    ffn_entries_per_token: float = 0.0
    null_experts: tuple[int, ...] = ()
    reference_k: int | None = None
    flops_vs_topk: float | None = None

    @classmethod
    def from_counts(
        cls,
        load: Tensor,
        importance: Tensor | None = None,
        *,
        num_tokens: int = 0,
        num_dropped: int = 0,
        capacity_slots: int | None = None,
        num_unrouted: int = 0,
        experts_per_token_hist: Tensor | None = None,
        null_experts: Sequence[int] = (),
        reference_k: int | None = None,
        ffn_entries: float | None = None,
    ) -> LoadStats:
        """The statistics of accumulated counts.

        ``load [E]`` kept entries per expert; ``importance [E]`` (default: ``load``);
        ``num_dropped`` entries removed by policies; ``capacity_slots`` the summed
        ``capacity * E`` over the batches a capacity policy ran on (None: none ran);
        ``num_unrouted`` the tokens that kept no entry; ``experts_per_token_hist [E + 1]``
        tokens per number of kept entries; ``null_experts`` expert ids without FFN compute;
        ``reference_k`` the top-k reference of ``flops_vs_topk``; ``ffn_entries`` the
        rows the FFN experts ran (default: the kept entries not on ``null_experts``).
        """
        load_v = _as_vector("load", load)
        imp_v = load_v if importance is None else _as_vector("importance", importance)
        if imp_v.shape != load_v.shape:
            raise ValueError(
                f"importance has shape {tuple(imp_v.shape)}, load has {tuple(load_v.shape)}"
            )
        if num_dropped < 0:
            raise ValueError(f"num_dropped must be >= 0, got {num_dropped}")
        if not 0 <= num_unrouted <= max(num_tokens, 0):
            raise ValueError(
                f"num_unrouted must lie in [0, num_tokens = {num_tokens}], got {num_unrouted}"
            )
        kept = round(float(load_v.sum()))
        routed = kept + num_dropped
        utilisation = None
        if capacity_slots is not None:
            if capacity_slots < 0:
                raise ValueError(f"capacity_slots must be >= 0, got {capacity_slots}")
            utilisation = kept / capacity_slots if capacity_slots else 0.0
        null = tuple(sorted({int(e) for e in null_experts}))
        if any(not 0 <= e < load_v.shape[0] for e in null):
            raise ValueError(
                f"null_experts must be expert ids in [0, {load_v.shape[0]}), got {null}"
            )
        reference_k = require_optional_int("reference_k", reference_k, 1)
        hist = None
        if experts_per_token_hist is not None:
            hist = _as_vector("experts_per_token_hist", experts_per_token_hist)
            if hist.shape[0] != load_v.shape[0] + 1:
                raise ValueError(
                    f"experts_per_token_hist must be [E + 1] = [{load_v.shape[0] + 1}], "
                    f"got {tuple(hist.shape)}"
                )
        ffn_kept = float(load_v.sum() - load_v[list(null)].sum())
        if ffn_entries is not None:
            ffn_kept = require_float("ffn_entries", ffn_entries, minimum=0.0)
        ffn_per_token = ffn_kept / num_tokens if num_tokens else 0.0
        return cls(
            importance=imp_v,
            load=load_v,
            cv_importance=coefficient_of_variation(imp_v),
            cv_load=coefficient_of_variation(load_v),
            max_over_mean=_ratio(load_v, "max"),
            min_over_mean=_ratio(load_v, "min"),
            gini=gini(load_v),
            entropy=normalised_entropy(load_v),
            unused_fraction=float((load_v == 0).double().mean()),
            dropped_fraction=num_dropped / routed if routed else 0.0,
            capacity_utilisation=utilisation,
            unrouted_fraction=num_unrouted / num_tokens if num_tokens else 0.0,
            num_tokens=int(num_tokens),
            num_entries=kept,
            num_dropped=int(num_dropped),
            capacity_slots=capacity_slots,
            experts_per_token_hist=hist,
            experts_per_token_mean=kept / num_tokens if num_tokens else 0.0,
            ffn_entries_per_token=ffn_per_token,
            null_experts=null,
            reference_k=reference_k,
            flops_vs_topk=None if reference_k is None else ffn_per_token / reference_k,
        )

    @classmethod
    def merge(cls, parts: list[LoadStats]) -> LoadStats:
        """The statistics of several batches' stats together (sums of their counts)."""
        if not parts:
            raise ValueError("parts must be a non-empty list of LoadStats")
        slots = [p.capacity_slots for p in parts if p.capacity_slots is not None]
        hists = [p.experts_per_token_hist for p in parts]
        first = parts[0]
        if any(
            (p.null_experts, p.reference_k) != (first.null_experts, first.reference_k)
            for p in parts
        ):
            raise ValueError("parts must share their null_experts and reference_k")
        return cls.from_counts(
            torch.stack([p.load for p in parts]).sum(0),
            torch.stack([p.importance for p in parts]).sum(0),
            num_tokens=sum(p.num_tokens for p in parts),
            num_dropped=sum(p.num_dropped for p in parts),
            capacity_slots=sum(slots) if slots else None,
            num_unrouted=sum(round(p.unrouted_fraction * p.num_tokens) for p in parts),
            experts_per_token_hist=(
                None if any(h is None for h in hists) else torch.stack(hists).sum(0)  # type: ignore[arg-type]
            ),
            null_experts=first.null_experts,
            reference_k=first.reference_k,
            ffn_entries=sum(p.ffn_entries_per_token * p.num_tokens for p in parts),
        )

    @property
    def num_experts(self) -> int:
        return int(self.load.shape[0])

    def to_dict(self) -> dict[str, object]:
        """Plain Python values (lists and floats), ready for ``json.dump``."""
        out = asdict(self)
        out["importance"] = self.importance.tolist()
        out["load"] = [round(v) for v in self.load.tolist()]
        hist = self.experts_per_token_hist
        out["experts_per_token_hist"] = None if hist is None else [round(v) for v in hist.tolist()]
        out["null_experts"] = list(self.null_experts)
        return out


class LoadCounter:
    """Streaming accumulator of load statistics: memory ``O(E)`` however many tokens.

    ``update(routing)`` adds a batch; ``stats()`` returns the :class:`LoadStats` of
    everything seen, equal to :func:`load_stats` of all the batches concatenated.
    ``null_experts`` (expert ids without FFN compute) and ``reference_k`` (the top-k
    reference) only shape the variable-compute fields (see the module docstring).
    """

    def __init__(
        self, num_experts: int, *, null_experts: Sequence[int] = (), reference_k: int | None = None
    ) -> None:
        self.num_experts = require_int("num_experts", num_experts, 1)
        self.null_experts = tuple(null_experts)
        self.reference_k = reference_k
        self.reset()

    def reset(self) -> None:
        self.load = torch.zeros(self.num_experts, dtype=torch.float64)
        self.importance = torch.zeros(self.num_experts, dtype=torch.float64)
        self.num_tokens = 0
        self.num_dropped = 0
        self.num_unrouted = 0
        self.capacity_slots: int | None = None
        self.experts_per_token_hist = torch.zeros(self.num_experts + 1, dtype=torch.float64)
        self.ffn_entries = 0

    def update(self, routing: Routing, *, ffn_entries: int | None = None) -> LoadCounter:
        """Add one batch. ``ffn_entries``: the rows the FFN experts ran for it, where that
        is not the routing's entries (a Soft MoE runs its slots); default: the entries
        not on ``null_experts``."""
        require_routing(routing)
        if routing.num_experts != self.num_experts:
            raise ValueError(
                f"routing has num_experts = {routing.num_experts}, counter has {self.num_experts}"
            )
        self.load += routing.load().cpu().double()
        self.importance += importance(routing)
        self.num_tokens += routing.num_tokens
        per_token = routing.entries_per_token().cpu()
        self.num_unrouted += int((per_token == 0).sum())
        self.experts_per_token_hist += torch.bincount(
            per_token.clamp(max=self.num_experts), minlength=self.num_experts + 1
        ).double()
        if ffn_entries is None:
            null = torch.tensor(self.null_experts, dtype=torch.int64)
            ffn_entries = routing.num_entries - int(torch.isin(routing.expert.cpu(), null).sum())
        self.ffn_entries += ffn_entries
        if routing.dropped is not None:
            self.num_dropped += routing.dropped.num_entries
        if routing.capacity is not None:
            self.capacity_slots = (self.capacity_slots or 0) + routing.capacity * self.num_experts
        return self

    def stats(self) -> LoadStats:
        return LoadStats.from_counts(
            self.load,
            self.importance,
            num_tokens=self.num_tokens,
            num_dropped=self.num_dropped,
            capacity_slots=self.capacity_slots,
            num_unrouted=self.num_unrouted,
            experts_per_token_hist=self.experts_per_token_hist,
            null_experts=self.null_experts,
            reference_k=self.reference_k,
            ffn_entries=self.ffn_entries,
        )


def load_stats(
    routing: Routing, *, null_experts: Sequence[int] = (), reference_k: int | None = None
) -> LoadStats:
    """The :class:`LoadStats` of one routing (see the module docstring).

    ``null_experts``: expert ids that spend no FFN compute (``NullExperts.null_expert_ids``);
    ``reference_k``: the k of the top-k router ``flops_vs_topk`` compares with.
    """
    require_routing(routing)
    counter = LoadCounter(routing.num_experts, null_experts=null_experts, reference_k=reference_k)
    return counter.update(routing).stats()


def concat_routings(routings: list[Routing]) -> Routing:
    """Routings over consecutive batches as one Routing over all their tokens.

    Token ids are offset by the preceding batches' sizes; ``probs`` are stacked when
    every routing has them (else None); ``dropped`` entries are concatenated. The
    capacity is not carried over (it is per batch).
    """
    if not routings:
        raise ValueError("routings must be a non-empty list")
    num_experts = routings[0].num_experts
    for r in routings:
        if r.num_experts != num_experts:
            raise ValueError(f"every routing must have num_experts = {num_experts}")
    offsets, total = [], 0
    for r in routings:
        offsets.append(total)
        total += r.num_tokens

    def cat(parts: list[Routing], offs: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        return (
            torch.cat([p.token.cpu() + o for p, o in zip(parts, offs)]),
            torch.cat([p.expert.cpu() for p in parts]),
            torch.cat([p.weight.detach().cpu().double() for p in parts]),
        )

    token, expert, weight = cat(routings, offsets)
    probs = None
    if all(r.probs is not None for r in routings):
        probs = torch.cat([r.probs.detach().cpu().double() for r in routings])  # type: ignore[union-attr]
    dropped = None
    with_drop = [(r.dropped, o) for r, o in zip(routings, offsets) if r.dropped is not None]
    if with_drop:
        dt, de, dw = cat([d for d, _ in with_drop], [o for _, o in with_drop])  # type: ignore[misc]
        dropped = Routing(dt, de, dw, total, num_experts)
    return Routing(token, expert, weight, total, num_experts, probs=probs, dropped=dropped)
