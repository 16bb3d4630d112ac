"""What experts specialise in: expert x label tables, mutual information, co-activation.

- :func:`contingency`: the expert x label table ``C [E, L]``; ``C[e, l]`` counts the
  routing entries (token, e) whose token has label l. A label is any integer per token:
  a class, a token id, a token-frequency bucket (:func:`frequency_buckets`). With
  top-k routing a token contributes k entries, one per chosen expert.
- :func:`specialisation`: from a table (or a routing and labels) the mutual
  information ``I(expert; label)`` in nats of the joint distribution ``C / sum(C)``,
  its normalised form ``NMI = I / ((H(expert) + H(label)) / 2)`` (the arithmetic
  normalisation, as scikit-learn's ``normalized_mutual_info_score``; 0 when both
  entropies are 0), per-expert purity ``max_l C[e, l] / sum_l C[e, l]`` and top labels.
- :func:`coactivation`: ``A [E1, E2]``, how many tokens went to expert i in one MoE
  layer and expert j in the next (Eigen et al. 2013, factored representations).
- :func:`routing_stability`: the fraction of tokens whose set of experts differs
  between two routings of the same tokens (two checkpoints or steps).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from analysis.validation import as_float_array, as_labels, require_int
from routelab.routing import Routing, require_routing

__all__ = [
    "Specialisation",
    "coactivation",
    "contingency",
    "frequency_buckets",
    "mutual_information",
    "routing_stability",
    "shuffled_baseline",
    "shuffled_levels",
    "specialisation",
]


def contingency(routing: Routing, labels: Tensor, num_labels: int | None = None) -> Tensor:
    """int64 ``[E, L]``: entries of ``routing`` per (expert, label of their token).

    ``labels`` int ``[T]``, values in ``[0, num_labels)`` (default: ``max + 1``).
    """
    routing = require_routing(routing, "routing")
    labels, num_labels = as_labels(
        "labels", labels, routing.num_tokens, num_labels, rows=routing.num_experts
    )
    flat = routing.expert.cpu() * num_labels + labels[routing.token.cpu()]
    counts = torch.bincount(flat, minlength=routing.num_experts * num_labels)
    return counts.view(routing.num_experts, num_labels)


def _entropy(p: Tensor) -> float:
    nz = p[p > 0]
    return float(-(nz * nz.log()).sum())


def _check_table(table: object) -> Tensor:
    return as_float_array("table", table, 2, nonnegative=True, min_size=1)


def mutual_information(table: Tensor) -> float:
    """``I(row; column)`` in nats of the joint distribution ``table / sum(table)``.

    ``sum_{e,l} p(e, l) log(p(e, l) / (p(e) p(l)))``; 0 for an empty table.
    """
    t = _check_table(table)
    total = float(t.sum())
    if total == 0.0:
        return 0.0
    p = t / total
    pe, pl = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
    mask = p > 0
    mi = float((p[mask] * (p[mask].log() - (pe * pl).expand_as(p)[mask].log())).sum())
    return max(mi, 0.0)


@dataclass(frozen=True)
class Specialisation:
    """Expert specialisation with respect to a labelling of the tokens.

    Fields:
        table: int64 ``[E, L]`` expert x label counts.
        mutual_information: ``I(expert; label)`` in nats.
        normalised_mi: ``I / ((H(expert) + H(label)) / 2)`` in [0, 1].
        expert_entropy, label_entropy: ``H(expert)``, ``H(label)`` in nats.
        purity: float64 ``[E]``, the share of each expert's entries with its commonest
            label (0 for an expert with no entries).
        mean_purity: ``sum_e max_l C[e, l] / sum(C)`` (entry-weighted purity).
        top_labels: per expert, up to ``top`` ``(label, share)`` pairs, commonest first.
    """

    table: Tensor
    mutual_information: float
    normalised_mi: float
    expert_entropy: float
    label_entropy: float
    purity: Tensor
    mean_purity: float
    top_labels: list[list[tuple[int, float]]]

    def to_dict(self) -> dict[str, object]:
        return {
            "mutual_information": self.mutual_information,
            "normalised_mi": self.normalised_mi,
            "expert_entropy": self.expert_entropy,
            "label_entropy": self.label_entropy,
            "mean_purity": self.mean_purity,
            "purity": self.purity.tolist(),
            "top_labels": [[list(pair) for pair in row] for row in self.top_labels],
        }


def specialisation(
    routing_or_table: Routing | Tensor,
    labels: Tensor | None = None,
    *,
    num_labels: int | None = None,
    top: int = 3,
) -> Specialisation:
    """Specialisation of experts: from a :class:`Routing` and ``labels [T]``, or a table.

    Args:
        routing_or_table: a Routing (then ``labels`` is required) or a count table ``[E, L]``
            (e.g. accumulated by :class:`~analysis.RoutingRecorder`).
        labels: int ``[T]``, one label per token.
        num_labels: L (default: the largest label + 1).
        top: how many top labels to list per expert.
    """
    if isinstance(routing_or_table, Routing):
        if labels is None:
            raise ValueError("labels [T] are required when specialisation is given a Routing")
        table = contingency(routing_or_table, labels, num_labels)
    else:
        if labels is not None:
            raise ValueError("give labels only with a Routing, not with a table")
        table = routing_or_table
    top = require_int("top", top, minimum=1)
    t = _check_table(table)
    total = float(t.sum())
    mi = mutual_information(t)
    if total:
        h_e, h_l = _entropy(t.sum(1) / total), _entropy(t.sum(0) / total)
    else:
        h_e = h_l = 0.0
    denom = (h_e + h_l) / 2
    nmi = min(mi / denom, 1.0) if denom > 0 else 0.0
    row = t.sum(1)
    best = t.max(1).values
    purity = torch.where(row > 0, best / row.clamp_min(1e-300), torch.zeros_like(row))
    mean_purity = float(best.sum()) / total if total else 0.0
    top_labels: list[list[tuple[int, float]]] = []
    k = min(top, t.shape[1])
    order = torch.argsort(-t, dim=1, stable=True)[:, :k]
    for e in range(t.shape[0]):
        pairs = []
        for label in order[e].tolist():
            if t[e, label] > 0:
                pairs.append((int(label), float(t[e, label] / row[e])))
        top_labels.append(pairs)
    return Specialisation(
        table=t.round().long() if bool((t == t.round()).all()) else t,
        mutual_information=mi,
        normalised_mi=nmi,
        expert_entropy=h_e,
        label_entropy=h_l,
        purity=purity,
        mean_purity=mean_purity,
        top_labels=top_labels,
    )


def expert_indicator(routing: Routing) -> Tensor:
    """float64 ``[T, E]``: 1 where token t has an entry for expert e."""
    out = torch.zeros(routing.num_tokens, routing.num_experts, dtype=torch.float64)
    out[routing.token.cpu(), routing.expert.cpu()] = 1.0
    return out


def coactivation(first: Routing, second: Routing) -> Tensor:
    """int64 ``[E1, E2]``: tokens routed to expert i by ``first`` and expert j by ``second``.

    Both routings cover the same T tokens (two stacked MoE layers on one batch). A token
    with k1 and k2 entries adds k1 * k2 pairs.
    """
    first = require_routing(first, "first")
    second = require_routing(second, "second")
    if first.num_tokens != second.num_tokens:
        raise ValueError(
            f"first and second must route the same tokens, got T = {first.num_tokens} "
            f"and T = {second.num_tokens}"
        )
    return (expert_indicator(first).T @ expert_indicator(second)).round().long()


def routing_stability(before: Routing, after: Routing) -> float:
    """The fraction of tokens whose set of experts changed from ``before`` to ``after``.

    0 means every token kept exactly its experts; 1 that every token's set changed.
    Weights are ignored; an empty batch gives 0.
    """
    before = require_routing(before, "before")
    after = require_routing(after, "after")
    if before.num_tokens != after.num_tokens or before.num_experts != after.num_experts:
        raise ValueError(
            "before and after must route the same tokens to the same experts, got "
            f"T, E = {before.num_tokens}, {before.num_experts} and "
            f"{after.num_tokens}, {after.num_experts}"
        )
    if before.num_tokens == 0:
        return 0.0
    changed = (expert_indicator(before) != expert_indicator(after)).any(1)
    return float(changed.double().mean())


def frequency_buckets(counts: Tensor, num_buckets: int = 4) -> Tensor:
    """int64 ``[V]``: the frequency bucket of every token id, by equal stream mass.

    Token ids are ranked by count (descending, ties by id); bucket b holds the ids whose
    cumulative share of the stream *before* them lies in ``[b/B, (b+1)/B)``. Bucket 0 is
    the handful of most frequent tokens covering the first 1/B of the stream; the last
    bucket the long tail. Apply as ``buckets[token_ids]``.
    """
    c = as_float_array("counts", counts, 1, nonnegative=True)
    num_buckets = require_int("num_buckets", num_buckets, minimum=1)
    order = torch.argsort(-c, stable=True)
    total = float(c.sum())
    before = torch.cumsum(c[order], 0) - c[order]
    share = before / total if total > 0 else torch.zeros_like(before)
    bucket_sorted = (share * num_buckets).floor().long().clamp(0, num_buckets - 1)
    out = torch.empty_like(bucket_sorted)
    out[order] = bucket_sorted
    return out


def shuffled_levels(
    routing: Routing,
    labels: Tensor,
    num_labels: int | None = None,
    *,
    shuffles: int = 10,
    seed: int = 0,
) -> Tensor:
    """float64 ``[shuffles]``: ``I(expert; label)`` with the labels randomly permuted over
    the tokens, once per shuffle (the chance level and its spread).

    Shuffling keeps both marginals, so each value is what a router that ignores the label
    would score on a sample of this size; a router's ``I(expert; label)`` within about two
    standard deviations of their mean is indistinguishable from chance. Permutation i
    comes from ``torch.Generator().manual_seed(seed + i)``.
    """
    routing = require_routing(routing, "routing")
    labels, num_labels = as_labels(
        "labels", labels, routing.num_tokens, num_labels, rows=routing.num_experts
    )
    shuffles = require_int("shuffles", shuffles, minimum=1)
    seed = require_int("seed", seed, minimum=0)
    values = []
    for i in range(shuffles):
        gen = torch.Generator().manual_seed(seed + i)
        perm = torch.randperm(labels.shape[0], generator=gen)
        values.append(mutual_information(contingency(routing, labels[perm], num_labels)))
    return torch.tensor(values, dtype=torch.float64)


def shuffled_baseline(
    routing: Routing,
    labels: Tensor,
    num_labels: int | None = None,
    *,
    seed: int = 0,
    shuffles: int = 1,
) -> float:
    """The mean of :func:`shuffled_levels` (``shuffles`` permutations; default one)."""
    return float(shuffled_levels(routing, labels, num_labels, shuffles=shuffles, seed=seed).mean())
