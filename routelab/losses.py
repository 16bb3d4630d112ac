"""Auxiliary routing losses shared by the gates (each with its formula and paper).

All functions are plain differentiable tensor functions (float64-safe for
``torch.autograd.gradcheck``) returning a scalar; the gates multiply them by their
``<loss>_weight`` coefficient and store them in ``Routing.aux``. An empty batch (T = 0)
gives a zero loss, never NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor

from routelab._validate import require_float

__all__ = [
    "check_loss_weight",
    "cv_squared",
    "expert_load",
    "expert_sum",
    "load_balance_loss",
    "router_z_loss",
    "sequence_balance_loss",
    "switch_balance_loss",
]


def check_loss_weight(name: str, value: object) -> float:
    """Validate a loss coefficient (or another non-negative option): a finite number >= 0."""
    return require_float(name, value, minimum=0.0)


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


def expert_load(expert: Tensor, num_experts: int) -> Tensor:
    """int64 ``[E]``: how many of the ids ``expert`` (int, any shape) are each expert i.

    ``torch.bincount(expert, minlength=E)`` for ids in ``[0, E)``, but always of size E
    (a scatter-add into E zeros): bincount's size depends on the largest id, which
    ``torch.compile`` cannot trace without a graph break, and it costs the same on CPU.
    An id out of range raises a RuntimeError, where bincount would return a longer count.
    """
    flat = expert.reshape(-1).long()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat))


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
    counts = expert_load(expert_index, num_experts).to(probs.dtype)
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


def load_balance_loss(
    probs: Tensor, load: Tensor, *, num_tokens: float | Tensor | None = None
) -> Tensor:
    """The balance loss ``E * sum_i f_i * P_i`` of a top-k router from its load (unscaled).

    Switch / GShard (Fedus et al. 2021, eq. 4-6) for k experts per token, as Megatron-Core
    computes it, and with a global load the global-batch loss of Qiu et al. 2025 (Demons
    in the Detail: On Implementing Load Balancing Loss for Training Specialized MoE)::

        f_i = load_i / sum_j load_j          fraction of the selections on expert i
        P_i = (1 / num_tokens) * sum_t p_i(t)

    ``probs [T, E]`` the router's per-token normalised scores, ``load [E]`` selections
    per expert (a count; no gradient flows through it), ``num_tokens`` the normaliser of
    P (default T). With ``load`` the batch's own top-k counts this is the micro-batch loss
    (1 for uniform routing, E when every token sends everything to one expert). For the
    global-batch loss ``load`` is counted over the global batch (every micro-batch and
    data-parallel rank) and ``num_tokens = T_global / W``, so that the mean of the W
    ranks' losses is ``E * sum_i f_i * P_i`` with P over the global batch and each rank's
    gradient flows through its own tokens' p. 0 when T = 0 or the load is all zero.
    """
    num_experts = probs.shape[-1]
    if tuple(load.shape) != (num_experts,):
        raise ValueError(f"load must be [E] = [{num_experts}], got shape {tuple(load.shape)}")
    load = load.detach().to(probs.dtype)
    if probs.shape[0] == 0:
        return probs.sum() * 0.0
    total = load.sum()
    fraction = load / torch.where(total > 0, total, torch.ones_like(total))  # f [E], no sync
    denominator = probs.shape[0] if num_tokens is None else num_tokens
    mean_prob = probs.sum(dim=0) / torch.as_tensor(denominator).to(probs)  # P [E]
    return num_experts * (fraction * mean_prob).sum()


def sequence_balance_loss(
    probs: Tensor, chosen: Tensor, sequence_length: int | None = None
) -> Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss (unscaled by alpha).

    DeepSeek-AI 2024 (DeepSeek-V3 Technical Report, eq. 17-20), for each sequence of S
    tokens::

        f_i = E / (k S) * sum_t 1[i in TopK(t)]
        P_i = (1 / S) * sum_t s'_{i,t}           s' the scores normalised per token
        L_seq = sum_i f_i * P_i

    averaged over the ``B = T / S`` sequences. ``probs [T, E]`` is ``s'`` with tokens in
    sequence-major order (token ``b * S + j`` is position j of sequence b, the layout of
    a flattened ``x [B, S, d]``), ``chosen`` int64 ``[T, k]`` the experts selected per
    token, ``sequence_length`` S (None: the batch is one sequence; T must be a multiple
    of S). 1 for uniform routing; 0 for an empty batch. Gradients flow through P only.
    """
    num_tokens, num_experts = probs.shape
    if chosen.dim() != 2 or chosen.shape[0] != num_tokens:
        raise ValueError(f"chosen must be [T, k] with T = {num_tokens}, got {tuple(chosen.shape)}")
    if num_tokens == 0:
        return probs.sum() * 0.0
    length = num_tokens if sequence_length is None else int(sequence_length)
    if length < 1 or num_tokens % length:
        raise ValueError(
            f"sequence_length must divide the number of tokens T = {num_tokens}, got {length}"
        )
    k = chosen.shape[1]
    sequences = num_tokens // length
    sequence_of = torch.arange(num_tokens, device=probs.device).div(length, rounding_mode="floor")
    slot = sequence_of[:, None] * num_experts + chosen  # [T, k] flat (sequence, expert) ids
    counts = expert_load(slot, sequences * num_experts)
    f = counts.view(sequences, num_experts).to(probs.dtype) * (num_experts / (k * length))
    mean_prob = probs.view(sequences, length, num_experts).mean(dim=1)  # P [B, E]
    return (f * mean_prob).sum(dim=1).mean()
