"""Noisy top-k gating with importance and load losses (Shazeer et al. 2017)."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from routelab.losses import check_loss_weight, cv_squared, expert_sum
from routelab.router import Router, check_k, router_logits
from routelab.routers.topk import TopKSelection, topk_softmax_routing
from routelab.routing import Routing

__all__ = ["NoisyTopKGate", "kth_excluding", "smooth_load"]


class NoisyTopKGate(Router):
    """Noisy top-k gate with importance and load losses (Shazeer et al. 2017,
    Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts Layer).

    Formula (``x [T, d]``, ``W_g, W_noise [d, E]``, both initialised to zero)::

        sigma(x) = softplus(x W_noise) + noise_epsilon              [T, E]
        H(x)_i = (x W_g)_i + eps_i * sigma(x)_i,  eps ~ N(0, 1)      (training only)
        G(x) = softmax(KeepTopK(H(x), k))                           [T, E], k non-zeros

    In eval mode ``H(x) = x W_g``. Each token gets exactly k entries whose weights sum to 1
    (selection and weights both from ``H``, as in the paper); ``probs`` is ``softmax(H(x))``.

    Losses (``CV = std / mean`` over the E experts, population std, see
    :func:`routelab.losses.cv_squared`):

    - ``aux["importance"] = importance_weight * CV(Importance(X))^2`` with
      ``Importance(X) = sum_x G(x)`` ``[E]``;
    - ``aux["load"] = load_weight * CV(Load(X))^2`` with the smooth estimator
      ``Load(X)_i = sum_x P(x, i)`` of :func:`smooth_load` in training; gradients reach
      ``W_noise`` through it. In eval mode (no noise) ``Load`` is the hard entry count per
      expert, as in the authors' reference code.

    A weight of 0 switches its loss off (its key is then absent from ``aux``).

    ``noise_epsilon`` (default 1e-2, the value of the authors' reference implementation)
    keeps ``sigma`` away from 0 so the estimator and its gradient stay finite; 0 gives
    the paper's formula exactly. With k = 1 the combine weight is constantly 1, so the
    gate learns only through the load loss (``differentiable`` is False when that is off).

    Args:
        d_model: d.
        num_experts: E.
        k: experts per token, ``1 <= k <= E``.
        importance_weight: w_importance >= 0.
        load_weight: w_load >= 0.
        noise_epsilon: >= 0, added to the noise standard deviation.
    """

    stochastic_in_training = True

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        k: int = 2,
        importance_weight: float = 0.1,
        load_weight: float = 0.1,
        noise_epsilon: float = 1e-2,
    ) -> None:
        super().__init__(d_model, num_experts)
        self.k = check_k(k, num_experts)
        self.importance_weight = check_loss_weight("importance_weight", importance_weight)
        self.load_weight = check_loss_weight("load_weight", load_weight)
        self.noise_epsilon = check_loss_weight("noise_epsilon", noise_epsilon)
        self.differentiable = self.k > 1 or (self.load_weight > 0 and self.k < num_experts)
        self.w_gate = nn.Parameter(torch.zeros(d_model, num_experts))
        self.w_noise = nn.Parameter(torch.zeros(d_model, num_experts))

    def clean_logits(self, x: Tensor) -> Tensor:
        """``x W_g`` ``[T, E]`` in at least fp32."""
        return router_logits(x, self.w_gate)

    def clean_logits_and_noise_std(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(x W_g, sigma(x))``, both ``[T, E]``, from one matmul with ``[W_g, W_noise]``;
        ``sigma(x) = softplus(x W_noise) + noise_epsilon``."""
        both = router_logits(x, torch.cat([self.w_gate, self.w_noise], dim=1))  # [T, 2E]
        clean, raw_std = both.split(self.num_experts, dim=1)
        return clean, F.softplus(raw_std) + self.noise_epsilon

    def route(self, x: Tensor, token_ids: Tensor | None) -> Routing:
        noisy = self.training and x.shape[0] > 0
        if noisy:
            clean, std = self.clean_logits_and_noise_std(x)  # [T, E] each
            logits = clean + torch.randn_like(clean) * std  # H(x)
        else:
            clean = logits = self.clean_logits(x)
        E = self.num_experts
        smooth = noisy and self.load_weight > 0 and self.k < E
        if smooth:  # one topk for the selection and the load's thresholds
            top = torch.topk(logits, self.k + 1, dim=-1)  # [T, k+1], sorted
            selection = TopKSelection(self.k, softmax_after_topk=True)
            routing = selection.select(logits, indices=top.indices[:, : self.k]).routing(E)
        else:
            routing = topk_softmax_routing(logits, self.k)
        aux: dict[str, Tensor] = dict(routing.aux)
        if self.importance_weight > 0:
            importance = expert_sum(routing.expert, routing.weight, E)
            aux["importance"] = self.importance_weight * cv_squared(importance)
        if self.load_weight > 0:
            if smooth:
                load = smooth_load(clean, logits, std, self.k, noisy_top=top.values).sum(dim=0)
            elif noisy:  # k = E: every expert always in the top k
                load = smooth_load(clean, logits, std, self.k).sum(dim=0)
            else:
                load = routing.load().to(clean.dtype)
            aux["load"] = self.load_weight * cv_squared(load)
        return dataclasses.replace(routing, aux=aux)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, k={self.k}, importance_weight={self.importance_weight}, "
            f"load_weight={self.load_weight}, noise_epsilon={self.noise_epsilon}"
        )


def kth_excluding(values: Tensor, k: int, *, top: Tensor | None = None) -> Tensor:
    """``[T, E]``: entry ``(t, i)`` is the k-th greatest of ``values[t]`` with component i
    left out (``-inf`` when fewer than k components remain, i.e. k = E).

    From the top k+1 values ``v_1 >= ... >= v_{k+1}`` of the row: if ``values[t, i] > v_{k+1}``
    then i is among the top k and leaving it out makes ``v_{k+1}`` the k-th greatest;
    otherwise the k-th greatest is ``v_k`` (ties give the same value either way).
    ``values [T, E]``, ``1 <= k <= E``; ``top [T, k+1]``: the k+1 greatest of each row,
    sorted descending (``torch.topk(values, k + 1).values``) when already computed (k < E).
    """
    if top is None:
        padded = F.pad(values, (0, 1), value=float("-inf"))  # one -inf column for k = E
        top = torch.topk(padded, k + 1, dim=-1).values  # [T, k+1]
    if_in, if_out = top[:, k : k + 1], top[:, k - 1 : k]
    return torch.where(values > if_in, if_in, if_out)


def smooth_load(
    clean: Tensor, noisy: Tensor, noise_std: Tensor, k: int, *, noisy_top: Tensor | None = None
) -> Tensor:
    """``P(x, i)`` ``[T, E]``: the probability that expert i is in the top k of ``H(x)``
    when only i's noise is resampled (Shazeer et al. 2017, Appendix A):

        P(x, i) = Phi( ((x W_g)_i - kth_excluding(H(x), k, i)) / sigma(x)_i )

    with Phi the standard normal CDF. ``clean = x W_g [T, E]``, ``noisy = H(x) [T, E]``
    (the drawn noisy logits), ``noise_std = sigma(x) [T, E]`` (> 0). ``Load(X)_i`` is the
    column sum. Differentiable in all three inputs (the threshold is the other experts'
    drawn noisy logit, as in the reference code). k = E gives all ones. ``noisy_top``:
    ``torch.topk(noisy, k + 1).values [T, k+1]`` when the caller has it (the gate's
    selection takes its first k), so the top k+1 are not searched twice.
    """
    if k >= clean.shape[-1]:
        return torch.ones_like(clean)
    threshold = kth_excluding(noisy, k, top=noisy_top)
    return torch.special.ndtr((clean - threshold) / noise_std)
