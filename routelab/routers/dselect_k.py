"""DSelect-k: differentiable selection of k experts by binary encoding (Hazimeh et al. 2021)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from routelab._validate import require_bool, require_float
from routelab.losses import check_loss_weight
from routelab.router import MIN_TEMPERATURE, Router, check_k, router_logits, upcast_half
from routelab.routing import Routing

__all__ = ["DSelectKGate", "selector_weights", "smooth_step"]

# Entropy of a selector: -sum r log(r + eps), finite gradient at r = 0 (reference code).
_ENTROPY_EPS = 1e-6


def smooth_step(t: Tensor, gamma: float) -> Tensor:
    """The cubic smooth step of DSelect-k (Hazimeh et al. 2021, eq. 3)::

        S(t) = 0                                         t <= -gamma/2
        S(t) = -2 t^3 / gamma^3 + 3 t / (2 gamma) + 1/2   -gamma/2 < t < gamma/2
        S(t) = 1                                         t >= gamma/2

    Continuously differentiable (S' = 0 at both ends), elementwise on any shape.
    """
    inner = -2.0 * t.pow(3) / gamma**3 + 1.5 * t / gamma + 0.5
    half = gamma / 2
    return torch.where(t <= -half, torch.zeros_like(t), torch.where(t >= half, 1.0, inner))


def _code_products(steps: Tensor) -> Tensor:
    """``[..., m] -> [..., 2^m]``: ``r_l = prod_j (S_j if bit j of l is 1 else 1 - S_j)``.

    Built one bit at a time: after bits ``0..j`` the codes with bit j set are the upper
    half, so each step is ``r <- [r * (1 - S_j), r * S_j]``. O(2^m) work and memory per
    selector (no ``[..., 2^m, m]`` factor tensor), and the product of every code is
    taken in the same order ``j = 0..m-1`` as the per-code formula.
    """
    products = torch.ones_like(steps[..., :1])
    for j in range(steps.shape[-1]):
        step = steps[..., j : j + 1]
        products = torch.cat([products * (1.0 - step), products * step], dim=-1)
    return products


def selector_weights(steps: Tensor, num_experts: int) -> Tensor:
    """Each selector's distribution over the E experts, ``[..., E]`` from ``S(z)`` ``[..., m]``.

    The unrestricted selector puts ``r_l = prod_j (S(z_j) if bit j of l is 1 else
    1 - S(z_j))`` on every code ``l < 2^m`` (these sum to 1). When E is not a power of two,
    codes ``l >= E`` have no expert: we mask them and renormalise over the valid codes
    (conditioning the bits on ``l < E``), so no weight reaches a missing expert and the
    weights still sum to 1. If a selector has reached a binary state on a missing code
    (the valid mass is exactly 0), its top bit is cleared instead: code ``l`` folds onto
    ``l - 2^(m-1) < E``, which keeps it one-hot (its gradient is 0 there anyway).
    """
    m = steps.shape[-1]
    full = _code_products(steps)  # [..., 2^m]
    if num_experts == 2**m:
        return full
    valid = full[..., :num_experts]
    mass = valid.sum(dim=-1, keepdim=True)
    has_mass = mass > 0
    renormalised = valid / torch.where(has_mass, mass, torch.ones_like(mass))
    missing = torch.arange(num_experts, 2**m, device=steps.device) - 2 ** (m - 1)
    folded = valid.index_add(-1, missing, full[..., num_experts:])  # l -> l - 2^(m-1)
    return torch.where(has_mass, renormalised, folded)


class _SelectorEntropy(torch.autograd.Function):
    """``-sum r log(r + eps)`` over every element of ``r``, a scalar; backward
    ``-(log(r + eps) + r / (r + eps))``. The same value as the elementwise expression,
    with one pass fewer each way and no ``[., k, E]`` temporaries kept for autograd."""

    @staticmethod
    def forward(ctx, r: Tensor) -> Tensor:  # type: ignore[override]
        log_r = torch.log(r + _ENTROPY_EPS)
        ctx.save_for_backward(r, log_r)
        return -torch.dot(r.reshape(-1), log_r.reshape(-1))

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        r, log_r = ctx.saved_tensors
        return (log_r + r / (r + _ENTROPY_EPS)).mul_(-grad)


class DSelectKGate(Router):
    """DSelect-k gate (Hazimeh, Zhao, Chowdhery, Sathiamoorthy, Chen, Mazumder, Hong & Chi
    2021, DSelect-k: Differentiable Selection in the Mixture of Experts with Applications
    to Multi-Task Learning).

    Formula (E experts, ``m = ceil(log2 E)`` bits, k selectors, smooth step S)::

        r(S(z))_l = prod_j (S(z_j) if bit j of l is 1 else 1 - S(z_j))   selector over codes
        G = sum_{i=1..k} softmax(alpha)_i * r(S(z^(i)))                   [E], sums to 1

    - static variant (``per_example=False``): ``z [k, m]`` and ``alpha [k]`` are
      parameters, one selection for all inputs (multi-task learning: one gate per task);
    - per-example variant (``per_example=True``): ``z^(i) = W_i x``, ``alpha = A x``
      (``W [k*m, d]``, ``A [k, d]``), so ``G(x)`` is ``[T, E]``.

    A selector whose bits all reach ``|z_j| >= gamma/2`` is one-hot, so once training has
    converged at most k experts carry weight; the Routing holds only the non-zero entries
    (``probs`` is the dense ``G`` ``[T, E]``). E not a power of two: see
    :func:`selector_weights` (mask codes >= E, renormalise each selector).

    Loss: ``aux["entropy"] = entropy_weight * sum_i entropy(r(S(z^(i))))`` (averaged over
    tokens in the per-example variant; ``entropy(r) = -sum_l r_l log(r_l + 1e-6)``); it
    pushes the selectors to binary states. 0 switches it off (no ``entropy`` key).

    Conventions, and where they differ from the authors' reference code
    (google-research/dselect_k_moe, Keras):

    - Bit order: here ``z_j`` is bit j of the code counting from the least significant
      (expert l = sum_j b_j 2^j); the reference builds its codes with
      ``np.binary_repr``, so its j-th logit is the most significant bit. Reversing each
      selector's m logits converts one into the other;
      :meth:`load_reference_parameters` does it (and transposes Keras kernels), so
      reference weights load and give the same gate.
    - E not a power of two: the reference keeps the first E codes without renormalising
      (a selector's weights may sum to less than 1) and adds the loss
      ``sum 1 / sum_l r_l`` (not added here); routelab renormalises each selector over
      the valid codes instead (:func:`selector_weights`), so G sums to 1 exactly.
    - Entropy: the reference sums the entropy over every example of the batch; here it
      is averaged over tokens (the reference's value / T), so ``entropy_weight`` does not
      depend on the batch size.

    Init (as in the paper's code): z and its projection ``W`` uniform in ``±gamma/100``, so
    every selector starts near the uniform distribution; the static alpha starts at zero,
    ``A`` uniform in ``±0.05`` with a zero bias.

    Args:
        d_model: d.
        num_experts: E.
        k: number of selectors, ``1 <= k <= E``.
        gamma: the smooth step's width, >= 1e-6 (``routelab.router.MIN_TEMPERATURE``;
            ``gamma^3`` must not underflow).
        entropy_weight: lambda >= 0.
        per_example: the per-example (True) or static (False) variant.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        k: int = 2,
        gamma: float = 1.0,
        entropy_weight: float = 0.0,
        per_example: bool = True,
    ) -> None:
        super().__init__(d_model, num_experts)
        self.k = check_k(k, num_experts)
        self.gamma = require_float("gamma", gamma, minimum=MIN_TEMPERATURE)
        self.entropy_weight = check_loss_weight("entropy_weight", entropy_weight)
        self.per_example = require_bool("per_example", per_example)
        self.num_bits = max(1, math.ceil(math.log2(num_experts)))
        self.differentiable = num_experts > 1
        bound = gamma / 100
        if per_example:
            self.z_proj = nn.Linear(d_model, self.k * self.num_bits)
            self.alpha_proj = nn.Linear(d_model, self.k)
            nn.init.uniform_(self.z_proj.weight, -bound, bound)
            nn.init.uniform_(self.z_proj.bias, -bound, bound)
            nn.init.uniform_(self.alpha_proj.weight, -0.05, 0.05)
            nn.init.zeros_(self.alpha_proj.bias)
        else:
            self.z = nn.Parameter(torch.empty(self.k, self.num_bits).uniform_(-bound, bound))
            self.alpha = nn.Parameter(torch.zeros(self.k))

    @torch.no_grad()
    def load_reference_parameters(
        self,
        z: object,
        alpha: object,
        z_bias: object = None,
        alpha_bias: object = None,
    ) -> None:
        """Copy parameters in the layout of the authors' Keras code (google-research
        dselect_k_moe) into this gate, converting the bit order (their logits are most
        significant bit first, ours least significant first).

        Static variant: ``z`` is their ``z_logits`` ``[k, 1, m]`` (or ``[k, m]``), ``alpha``
        their ``w_logits`` ``[k, 1]`` (or ``[k]``). Per-example variant: ``z`` and ``alpha``
        are the Dense kernels ``[d, k*m]`` and ``[d, k]``, ``z_bias`` ``[k*m]`` and
        ``alpha_bias`` ``[k]`` their biases. Arrays may be numpy or torch.
        """
        k, m = self.k, self.num_bits

        def tensor(name: str, value: object, shape: tuple[int, ...]) -> Tensor:
            t = torch.as_tensor(value, dtype=torch.float64)
            if t.numel() != math.prod(shape):
                raise ValueError(
                    f"{name} must have {math.prod(shape)} values {shape}, got {tuple(t.shape)}"
                )
            return t.reshape(shape)

        def msb_to_lsb(t: Tensor) -> Tensor:  # [..., k*m] -> bits reversed per selector
            return t.reshape(*t.shape[:-1], k, m).flip(-1).reshape(*t.shape[:-1], k * m)

        if not self.per_example:
            self.z.copy_(tensor("z", z, (k, m)).flip(-1))
            self.alpha.copy_(tensor("alpha", alpha, (k,)))
            return
        if z_bias is None or alpha_bias is None:
            raise ValueError("the per-example variant needs z_bias and alpha_bias")
        d = self.d_model
        self.z_proj.weight.copy_(msb_to_lsb(tensor("z", z, (d, k * m))).t())
        self.z_proj.bias.copy_(msb_to_lsb(tensor("z_bias", z_bias, (k * m,))))
        self.alpha_proj.weight.copy_(tensor("alpha", alpha, (d, k)).t())
        self.alpha_proj.bias.copy_(tensor("alpha_bias", alpha_bias, (k,)))

    def gate_weights(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(G, r)``: the expert weights ``[T, E]`` and the selectors ``[T, k, E]``
        (``[1, k, E]`` in the static variant)."""
        if self.per_example:
            # one matmul for both projections: [T, k*m + k]
            weight = torch.cat([self.z_proj.weight, self.alpha_proj.weight]).t()
            bias = torch.cat([self.z_proj.bias, self.alpha_proj.bias])
            z, alpha = router_logits(x, weight, bias).split([self.k * self.num_bits, self.k], 1)
            z = z.reshape(-1, self.k, self.num_bits)  # [T, k, m]; alpha [T, k]
        else:
            z = upcast_half(self.z)[None]  # [1, k, m]
            alpha = upcast_half(self.alpha)[None]  # [1, k]
        r = selector_weights(smooth_step(z, self.gamma), self.num_experts)  # [., k, E]
        mix = torch.softmax(alpha, dim=-1).unsqueeze(-2)  # [., 1, k]
        gates = torch.matmul(mix, r).squeeze(-2)  # sum_i mix_i r_i: [., E]
        return gates, r

    def route(self, x: Tensor, token_ids: Tensor | None) -> Routing:
        num_tokens = x.shape[0]
        gates, r = self.gate_weights(x)
        if not self.per_example:
            gates = gates.to(upcast_half(x).dtype).expand(num_tokens, self.num_experts)
        aux: dict[str, Tensor] = {}
        if self.entropy_weight > 0:
            # mean over tokens of sum_i entropy(r_i): one dot product over [., k, E]
            mean = _SelectorEntropy.apply(r) / max(r.shape[0], 1)
            aux["entropy"] = self.entropy_weight * mean
        return Routing.from_dense(gates, probs=gates, aux=aux)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, k={self.k}, gamma={self.gamma}, "
            f"entropy_weight={self.entropy_weight}, per_example={self.per_example}"
        )
