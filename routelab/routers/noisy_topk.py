"""Noisy top-k gating with importance and load losses (Shazeer et al. 2017)."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from routelab.losses import check_loss_weight, cv_squared, expert_sum
from routelab.router import Router, check_k, router_logits
from routelab.routers.topk import Selection, topk_softmax_routing
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
        return clean, F.softplus(raw_std).add_(self.noise_epsilon)  # (backward needs raw_std)

    def route(self, x: Tensor, token_ids: Tensor | None) -> Routing:
        noisy = self.training and x.shape[0] > 0
        if noisy:
            clean, std = self.clean_logits_and_noise_std(x)  # [T, E] each
            logits = (torch.randn_like(clean) * std).add_(clean)  # H(x) = clean + eps * std
        else:
            clean = logits = self.clean_logits(x)
        E = self.num_experts
        smooth = noisy and self.load_weight > 0 and self.k < E
        if smooth:  # one topk for the selection and the load's thresholds
            top = torch.topk(logits, self.k + 1, dim=-1)  # [T, k+1], sorted
            # softmax(KeepTopK(H, k)): TopKSelection(k, softmax_after_topk=True) on the
            # chosen experts, whose logits are the first k of the top k+1 values
            # (along dim 0 of the transpose: a softmax over a short last dim runs ~10x slower)
            weights = torch.softmax(top.values[:, : self.k].t(), dim=0).t()
            probs = torch.softmax(logits, dim=-1)
            routing = Selection(top.indices[:, : self.k], weights, probs).routing(E)
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


def _top_values(values: Tensor, k: int) -> Tensor:
    """The k+1 greatest of each row of ``values [T, E]``, sorted ``[T, k+1]`` (one ``-inf``
    column appended first, for k = E)."""
    padded = F.pad(values, (0, 1), value=float("-inf"))
    return torch.topk(padded, k + 1, dim=-1).values


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
        top = _top_values(values, k)
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
    if noisy_top is None:
        noisy_top = _top_values(noisy, k)  # [T, k+1], as kth_excluding finds them
    return _SmoothLoad.apply(clean, noisy.detach(), noise_std, noisy_top, k)


_INV_SQRT_2PI = 0.3989422804014327  # 1 / sqrt(2 pi)
_SQRT_HALF = 0.7071067811865476  # 1 / sqrt 2, as torch.special.ndtr


class _SmoothLoad(torch.autograd.Function):
    """``P = Phi(u)``, ``u = (clean - kth_excluding(noisy, k, top)) / std`` ``[T, E]``, for
    ``k < E``, with the closed-form backward (``phi`` the standard normal density)::

        dP/dclean = phi(u) / std,   dP/dstd = -phi(u) u / std,
        dP/dtop[:, k] = -phi(u) / std where noisy > top[:, k] (the threshold is then
        the (k+1)-th value), dP/dtop[:, k-1] = the same elsewhere

    ``noisy`` only chooses between the two thresholds (no gradient); ``top`` is the top
    k+1 of ``noisy`` (its gradient reaches ``noisy`` through ``torch.topk``). The same
    values as the elementwise composition, in fewer passes over ``[T, E]`` each way."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, clean: Tensor, noisy: Tensor, std: Tensor, top: Tensor, k: int
    ) -> Tensor:
        # contiguous [T, 1] columns: broadcast over [T, E] at full speed
        if_in, if_out = top[:, k : k + 1].contiguous(), top[:, k - 1 : k].contiguous()
        # 1.0 where noisy > the (k+1)-th value (among the top k: the threshold is then the
        # (k+1)-th value, else the k-th), as floats: much faster than a bool mask here
        inside = torch.gt(noisy, if_in, out=torch.empty_like(clean))
        # = torch.where(inside, if_in, if_out) exactly (lerp with weight 0 or 1 returns
        # an end point exactly for finite values), several times faster
        threshold = torch.lerp(if_out, if_in, inside)
        margin = threshold.neg_().add_(clean).div_(std)  # u = (clean - threshold) / std
        ctx.k, ctx.top_dtype = k, top.dtype
        ctx.save_for_backward(std, inside, margin)
        # torch.special.ndtr(u) = (1 + erf(u / sqrt 2)) / 2, the same operations
        return margin.mul(_SQRT_HALF).erf_().add_(1.0).mul_(0.5)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx, grad: Tensor
    ) -> tuple[Tensor, None, Tensor, Tensor, None]:
        std, inside, margin = ctx.saved_tensors
        k = ctx.k
        # dL/dclean = grad * phi(u) / std; dL/dstd = -dL/dclean * u; dL/dthreshold = -dL/dclean
        grad_clean = margin.square().mul_(-0.5).exp_().mul_(grad).div_(std).mul_(_INV_SQRT_2PI)
        grad_std = torch.mul(grad_clean, margin).neg_()
        grad_top = std.new_zeros(std.shape[0], k + 1, dtype=ctx.top_dtype)
        masked = grad_clean * inside  # dL/dclean where the threshold is top[:, k], else 0
        grad_top[:, k] = masked.sum(dim=-1).neg_()
        grad_top[:, k - 1] = masked.sub_(grad_clean).sum(dim=-1)  # -(dL/dclean elsewhere)
        return grad_clean, None, grad_std, grad_top, None
