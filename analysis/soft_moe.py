"""Load and specialisation of a Soft MoE layer from its dispatch and combine weights.

A ``routelab.soft_moe.SoftMoE`` forward returns D (dispatch, softmax over the
tokens of each slot) and C (combine, softmax over the slots of each token), both
``[G, S, E, p]``. ``soft_moe_stats`` summarises them:

- ``slot_mass [E]``: ``sum over tokens and e's slots of D``; p per group for every
  expert: Soft MoE is balanced by construction (every expert processes p slots).
- ``combine_mass [E]``: ``sum over tokens of sum over e's slots of C[t, s]``, how much of
  the layer's output each expert writes (sums to T); ``cv_combine_mass`` its CV.
- ``dispatch_entropy``: the mean over slots of ``H(D[:, s]) / log S`` (1: the slot
  averages every token of its group evenly, 0: it copies one token).
- ``combine_entropy``: the mean over tokens of ``H(C[t, :]) / log n``.
- ``expert_rows_per_token``: expert FFN rows per token, ``G * n / T = E * p / S`` (a
  top-k layer runs k). Padded positions of an incomplete last group (``group_size``)
  are not tokens: they carry no combine weight.
- with labels: ``table [E, L]``, the dispatch mass each expert's slots draw from tokens
  of each label (specialisation over tokens), and ``mutual_information`` of that table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from analysis.metrics import coefficient_of_variation
from analysis.specialisation import mutual_information

__all__ = ["SoftMoEStats", "soft_moe_stats"]


@dataclass(frozen=True)
class SoftMoEStats:
    """Summary of Soft MoE dispatch/combine weights (see the module docstring)."""

    slot_mass: Tensor
    combine_mass: Tensor
    cv_combine_mass: float
    dispatch_entropy: float
    combine_entropy: float
    expert_rows_per_token: float
    table: Tensor | None
    mutual_information: float | None

    def to_dict(self) -> dict[str, object]:
        return {
            "slot_mass": self.slot_mass.tolist(),
            "combine_mass": self.combine_mass.tolist(),
            "cv_combine_mass": self.cv_combine_mass,
            "dispatch_entropy": self.dispatch_entropy,
            "combine_entropy": self.combine_entropy,
            "expert_rows_per_token": self.expert_rows_per_token,
            "table": None if self.table is None else self.table.tolist(),
            "mutual_information": self.mutual_information,
        }


def _mean_normalised_entropy(p: Tensor, dim: int) -> float:
    """Mean over the other dimension of ``H(p along dim) / log(size)``; 1.0 for size 1."""
    size = p.shape[dim]
    if p.numel() == 0:
        return 0.0
    if size == 1:
        return 1.0
    safe = torch.where(p > 0, p, torch.ones_like(p))
    entropy = -(p * safe.log()).sum(dim)
    return float(entropy.mean()) / math.log(size)


def soft_moe_stats(
    output: Any, labels: Tensor | None = None, num_labels: int | None = None
) -> SoftMoEStats:
    """The ``SoftMoEStats`` of a ``routelab.soft_moe.SoftMoEOutput``.

    ``labels`` int ``[T]`` (T = G * S tokens in the flattened order of the input) give the
    expert x label table; ``num_labels`` its width (default ``max + 1``).
    """
    dispatch, combine = getattr(output, "dispatch", None), getattr(output, "combine", None)
    if not isinstance(dispatch, Tensor) or not isinstance(combine, Tensor):
        raise TypeError(f"output must be a SoftMoEOutput, got {type(output).__name__}")
    if dispatch.dim() != 4 or dispatch.shape != combine.shape:
        raise ValueError(
            "dispatch and combine must both be [G, S, E, p], got "
            f"{tuple(dispatch.shape)} and {tuple(combine.shape)}"
        )
    groups, tokens, experts, slots = dispatch.shape
    d = dispatch.detach().to("cpu", torch.float64)
    c = combine.detach().to("cpu", torch.float64)
    flat_d = d.reshape(groups, tokens, experts * slots)
    flat_c = c.reshape(groups * tokens, experts * slots)
    real = flat_c.sum(dim=1) > 0.5  # padded positions (group_size) have no combine weight
    total_tokens = int(real.sum())
    combine_mass = c.sum(dim=(0, 1, 3))
    table = mi = None
    if labels is not None:
        labels = torch.as_tensor(labels).reshape(-1).long().cpu()
        if labels.shape[0] != total_tokens:
            raise ValueError(f"labels must have one entry per token (T = {total_tokens})")
        if labels.numel() and int(labels.min()) < 0:
            raise ValueError("labels must be >= 0")
        width = int(labels.max()) + 1 if labels.numel() else 1
        width = width if num_labels is None else num_labels
        if labels.numel() and int(labels.max()) >= width:
            raise ValueError(f"labels must be < num_labels = {width}")
        per_token = d.sum(dim=3).reshape(groups * tokens, experts)[real]  # [T, E] dispatch mass
        table = torch.zeros(experts, width, dtype=torch.float64)
        table.index_add_(1, labels, per_token.T)
        mi = mutual_information(table)
    return SoftMoEStats(
        slot_mass=d.sum(dim=(0, 1, 3)),
        combine_mass=combine_mass,
        cv_combine_mass=coefficient_of_variation(combine_mass),
        dispatch_entropy=_mean_normalised_entropy(flat_d, 1),
        combine_entropy=_mean_normalised_entropy(flat_c[real], 1),
        expert_rows_per_token=groups * experts * slots / total_tokens if total_tokens else 0.0,
        table=table,
        mutual_information=mi,
    )
