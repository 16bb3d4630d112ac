"""Auxiliary routing losses shared by the gates (each with its formula and paper).

All functions are plain differentiable tensor functions (float64-safe for
``torch.autograd.gradcheck``) returning a scalar; the gates multiply them by their
``<loss>_weight`` coefficient and store them in ``Routing.aux``. An empty batch (T = 0)
gives a zero loss, never NaN.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["check_loss_weight", "cv_squared", "expert_sum", "router_z_loss", "switch_balance_loss"]


def check_loss_weight(name: str, value: object) -> float:
    """Validate a loss coefficient (or another non-negative option): a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} ({value!r})")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def cv_squared(values: Tensor) -> Tensor:
    """The squared coefficient of variation ``CV(v)^2 = (std(v) / mean(v))^2``.

    Shazeer et al. 2017 (Outrageously Large Neural Networks), the importance and load
    losses: ``values [E]`` is a per-expert quantity; ``std`` is the population standard
    deviation over the E experts. Only the all-zero case is guarded (the loss is 0 there,
    with finite zero gradients); ``E = 1`` gives 0.
    """
    values = values.reshape(-1)
    mean = values.mean()
    var = (values - mean).square().mean()
    nonzero = mean != 0
    safe_mean = torch.where(nonzero, mean, torch.ones_like(mean))
    return torch.where(nonzero, var / safe_mean.square(), torch.zeros_like(var))


def expert_sum(expert: Tensor, weight: Tensor, num_experts: int) -> Tensor:
    """``[E]``: the sum of ``weight [N]`` per expert id ``expert [N]`` (differentiable).

    With the combine weights this is Shazeer's ``Importance(X) = sum_x G(x)``.
    """
    return weight.new_zeros(num_experts).index_add(0, expert, weight)


def switch_balance_loss(probs: Tensor, expert_index: Tensor) -> Tensor:
    """Switch Transformer load-balancing loss ``E * sum_i f_i * P_i`` (unscaled by alpha).

    Fedus et al. 2021 (Switch Transformers, eq. 4-6):

        f_i = (1 / T) * sum_x 1[argmax p(x) = i]    fraction of tokens sent to expert i
        P_i = (1 / T) * sum_x p_i(x)                mean router probability of expert i

    ``probs [T, E]`` the router probabilities, ``expert_index int64 [T]`` each token's
    chosen expert (before any capacity limit). Gradients flow through ``P`` only (``f`` is
    a count). Equals 1 for perfectly uniform routing (f_i = P_i = 1/E) and E when every
    token goes to one expert with probability 1. 0 for an empty batch.
    """
    num_tokens, num_experts = probs.shape
    if num_tokens == 0:
        return probs.sum() * 0.0
    counts = torch.bincount(expert_index, minlength=num_experts).to(probs.dtype)
    fraction = counts / num_tokens  # f [E]
    mean_prob = probs.mean(dim=0)  # P [E]
    return num_experts * (fraction * mean_prob).sum()


def router_z_loss(logits: Tensor) -> Tensor:
    """Router z-loss ``(1 / T) * sum_x logsumexp(logits(x))^2`` (unscaled).

    Zoph et al. 2022 (ST-MoE, eq. 5): penalises large router logits for numerical
    stability. ``logits [T, E]``; 0 for an empty batch.
    """
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return torch.logsumexp(logits, dim=-1).square().mean()
