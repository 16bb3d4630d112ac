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
    return _SmoothStep.apply(t, gamma)


class _SmoothStep(torch.autograd.Function):
    """``smooth_step`` with its closed-form derivative, ``S'(t) = 3 / (2 gamma) -
    6 t^2 / gamma^3`` for ``|t| < gamma/2`` and 0 elsewhere (fewer passes each way than
    autograd through the polynomial and both selections; the same values)."""

    @staticmethod
    def forward(ctx, t: Tensor, gamma: float) -> Tensor:  # type: ignore[override]
        ctx.gamma = gamma
        ctx.save_for_backward(t)
        half = gamma / 2
        # -2 t^3 / gamma^3 + 1.5 t / gamma + 0.5, the operations in this order
        inner = t.pow(3).mul_(-2.0).div_(gamma**3).add_(t.mul(1.5).div_(gamma)).add_(0.5)
        return inner.masked_fill_(t >= half, 1.0).masked_fill_(t <= -half, 0.0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (t,) = ctx.saved_tensors
        gamma = ctx.gamma
        slope = t.square().mul_(-6.0 / gamma**3).add_(1.5 / gamma)
        return slope.masked_fill_(t.abs() >= gamma / 2, 0.0).mul_(grad), None


def _code_products(steps: Tensor, dim: int = -1) -> Tensor:
    """``[..., m] -> [..., 2^m]``: ``r_l = prod_j (S_j if bit j of l is 1 else 1 - S_j)``
    (the bits along ``dim``, -1 by default; ``dim=0`` maps ``[m, N] -> [2^m, N]``).

    Built one bit at a time: after bits ``0..j`` the codes with bit j set are the upper
    half, so each step is ``r <- [r * (1 - S_j), r * S_j]``. O(2^m) work and memory per
    selector (no ``[..., 2^m, m]`` factor tensor), and the product of every code is
    taken in the same order ``j = 0..m-1`` as the per-code formula.
    """
    shape = list(steps.shape)
    shape[dim] = 1
    products = steps.new_ones(shape)  # m = 0 bits: the one empty code
    for j in range(steps.shape[dim]):
        step = steps.narrow(dim, j, 1)
        products = torch.cat([products * (1.0 - step), products * step], dim=dim)
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


# Selectors per block of the fused entropy: about 2^18 selector weights (1 MiB in fp32) per
# temporary, so the passes over a block stay in cache.
_BLOCK_WEIGHTS = 2**18


def _entropy_and_gradients(low: Tensor, high: Tensor, grads: bool) -> tuple[Tensor, ...]:
    """``H = -sum r log(r + eps)`` over every selector ``r = high (x) low`` (outer product
    ``[2^hi, 2^lo]`` per selector; ``low [2^lo, N]`` and ``high [2^hi, N]`` hold the N
    selectors along the last, contiguous axis), and with ``grads`` ``-dH/dlow`` and
    ``-dH/dhigh`` (the same shapes)::

        w = -dH/dr = log(r + eps) + r / (r + eps)
        -dH/dlow_a = sum_h high_h w_ha,   -dH/dhigh_h = sum_a w_ha low_a

    Every pass runs over long rows of selectors (with the 2^lo codes last, each would
    loop over 8 elements at a time), in blocks of about ``_BLOCK_WEIGHTS`` weights kept in
    three reused buffers that stay in cache; ``r`` is never formed whole.
    """
    (num_low, num_selectors), num_high = low.shape, high.shape[0]
    block = max(1, min(num_selectors, _BLOCK_WEIGHTS // (num_low * num_high)))
    entropy = low.new_zeros(())
    by_low, by_high = torch.empty_like(low), torch.empty_like(high)
    buffers = low.new_empty(3, num_high * num_low * block)
    for start in range(0, num_selectors, block):
        stop = min(start + block, num_selectors)
        lo, hi = low[:, start:stop], high[:, start:stop]
        r, log_r, ratio = buffers[:, : num_high * num_low * (stop - start)].view(
            3, num_high, num_low, stop - start
        )
        torch.mul(hi.unsqueeze(1), lo.unsqueeze(0), out=r)  # [2^hi, 2^lo, n]
        torch.add(r, _ENTROPY_EPS, out=log_r)
        if grads:
            torch.div(r, log_r, out=ratio)
        log_r.log_()
        entropy -= torch.dot(r.view(-1), log_r.view(-1))
        if grads:
            w = log_r.add_(ratio)
            weighted = torch.mul(w, hi.unsqueeze(1), out=ratio)  # ratio is free again
            torch.sum(weighted, dim=0, out=by_low[:, start:stop])
            torch.sum(w.mul_(lo.unsqueeze(0)), dim=1, out=by_high[:, start:stop])
    return (entropy, by_low, by_high) if grads else (entropy,)


class _CodeMixture(torch.autograd.Function):
    """The gate and the selectors' entropy when E = 2^m, fused.

    Each selector is an outer product: with the m bits split into the low ``m_lo`` and
    the high ``m - m_lo`` ones, code ``l = h * 2^m_lo + a`` has ``r_l = high_h * low_a``,
    with ``low [2^lo, N]`` and ``high [2^hi, N]`` the code products of each half
    (``_code_products`` with ``dim=0``) for the ``N = T*k`` selectors, selector
    ``t*k + i`` being token t's i-th. Then, ``mix [T, k]``::

        G[t, h, a] = sum_i mix_ti high_h,ti low_a,ti   one batched matmul, r never formed
        H = -sum_{t, i, l} r_l log(r_l + eps)         blocks of r, in cache

    H is a scalar, so its gradients with respect to low and high (small) are computed
    with it, in the same pass over each block (``_entropy_and_gradients``), and
    nothing of size ``[T, k, E]`` is kept for the backward. Backward
    (``g = dL/dG [T, 2^hi, 2^lo]``, ``c = dL/dH``)::

        dL/dlow_a,ti  = mix_ti sum_h high_h,ti g_tha + c dH/dlow_a,ti
        dL/dhigh_h,ti = mix_ti sum_a low_a,ti g_tha  + c dH/dhigh_h,ti
        dL/dmix_ti    = sum_h high_h,ti sum_a low_a,ti g_tha

    Returns ``(G [T, E], H)`` (H = 0 with ``with_entropy=False``). The same values as
    ``selector_weights`` + ``matmul`` + ``_SelectorEntropy`` up to float rounding (the
    factors are multiplied in another order); tested against them and by gradcheck.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, low: Tensor, high: Tensor, mix: Tensor, with_entropy: bool
    ) -> tuple[Tensor, Tensor]:
        (num_tokens, k), num_low, num_high = mix.shape, low.shape[0], high.shape[0]
        low_rows = low.t().reshape(num_tokens, k, num_low)  # [T, k, 2^lo]
        high_rows = high.t().reshape(num_tokens, k, num_high)  # [T, k, 2^hi]
        # sum_i (mix_i high_i)^T low_i: [T, 2^hi, k] @ [T, k, 2^lo]
        gates = torch.bmm((mix.unsqueeze(-1) * high_rows).transpose(1, 2), low_rows)
        gates = gates.view(num_tokens, num_high * num_low)
        ctx.with_entropy = with_entropy
        entropy, *entropy_grads = (
            _entropy_and_gradients(low, high, ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
            if with_entropy
            else (low.new_zeros(()),)
        )
        ctx.save_for_backward(low_rows, high_rows, mix, *entropy_grads)
        return gates, entropy

    @staticmethod
    def backward(  # type: ignore[override]
        ctx, grad_gates: Tensor, grad_entropy: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, None]:
        low_rows, high_rows, mix = ctx.saved_tensors[:3]
        num_tokens, _, num_low = low_rows.shape
        num_high = high_rows.shape[-1]
        g = grad_gates.reshape(num_tokens, num_high, num_low)
        low_sums = torch.bmm(high_rows, g)  # sum_h high_h g_ha: [T, k, 2^lo]
        high_sums = torch.bmm(low_rows, g.transpose(1, 2))  # sum_a low_a g_ha: [T, k, 2^hi]
        grad_mix = (high_sums * high_rows).sum(dim=-1)
        # back to the selector-major layout [2^lo, N], [2^hi, N]
        grad_low = low_sums.mul_(mix.unsqueeze(-1)).view(-1, num_low).t()
        grad_high = high_sums.mul_(mix.unsqueeze(-1)).view(-1, num_high).t()
        if ctx.with_entropy and len(ctx.saved_tensors) > 3:  # dH/dlow = -by_low, ...
            by_low, by_high = ctx.saved_tensors[3:]
            grad_low = torch.addcmul(grad_low, by_low, grad_entropy, value=-1.0)
            grad_high = torch.addcmul(grad_high, by_high, grad_entropy, value=-1.0)
        return grad_low, grad_high, grad_mix, None


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

    def selector_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(z, alpha)``: the selectors' bit logits ``[T, k, m]`` and mixing logits
        ``[T, k]`` (``[1, k, m]`` and ``[1, k]`` in the static variant), at least fp32."""
        if not self.per_example:
            return upcast_half(self.z)[None], upcast_half(self.alpha)[None]
        # one matmul for both projections: [T, k*m + k]
        weight = torch.cat([self.z_proj.weight, self.alpha_proj.weight]).t()
        bias = torch.cat([self.z_proj.bias, self.alpha_proj.bias])
        z, alpha = router_logits(x, weight, bias).split([self.k * self.num_bits, self.k], 1)
        return z.reshape(-1, self.k, self.num_bits), alpha

    def gate_weights(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(G, r)``: the expert weights ``[T, E]`` and the selectors ``[T, k, E]``
        (``[1, k, E]`` in the static variant), composed directly from the formula
        (``route`` gets the same ``G`` from a fused computation when E = 2^m)."""
        z, alpha = self.selector_logits(x)
        r = selector_weights(smooth_step(z, self.gamma), self.num_experts)  # [., k, E]
        mix = torch.softmax(alpha, dim=-1).unsqueeze(-2)  # [., 1, k]
        gates = torch.matmul(mix, r).squeeze(-2)  # sum_i mix_i r_i: [., E]
        return gates, r

    def _gates_and_entropy(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(G [., E], sum of the selectors' entropies or None)``: fused when E = 2^m
        (``_CodeMixture``), else through ``gate_weights``."""
        with_entropy = self.entropy_weight > 0
        if self.num_experts != 2**self.num_bits:
            gates, r = self.gate_weights(x)
            return gates, _SelectorEntropy.apply(r) if with_entropy else None
        z, alpha = self.selector_logits(x)
        # selector-major [m, N] (N = T*k, selector t*k + i): elementwise passes over long rows
        steps = smooth_step(z.permute(2, 0, 1).reshape(self.num_bits, -1), self.gamma)
        low_bits = self.num_bits // 2
        if 2 * low_bits == self.num_bits:  # both halves in one pass: [2, 2^(m/2), N]
            low, high = _code_products(steps.view(2, low_bits, -1), dim=1).unbind(0)
        else:
            low = _code_products(steps[:low_bits], dim=0)  # [2^lo, N]
            high = _code_products(steps[low_bits:], dim=0)  # [2^hi, N]
        # softmax over k along dim 0 of the transpose (over a short last dim: ~10x slower)
        mix = torch.softmax(alpha.t(), dim=0).t().contiguous()  # [., k]
        gates, entropy = _CodeMixture.apply(low, high, mix, with_entropy)
        return gates, entropy if with_entropy else None

    def route(self, x: Tensor, token_ids: Tensor | None) -> Routing:
        num_tokens = x.shape[0]
        gates, entropy = self._gates_and_entropy(x)
        aux: dict[str, Tensor] = {}
        if entropy is not None:  # mean over tokens (one row if static) of sum_i entropy(r_i)
            aux["entropy"] = self.entropy_weight * (entropy / max(gates.shape[0], 1))
        if not self.per_example:
            gates = gates.to(upcast_half(x).dtype).expand(num_tokens, self.num_experts)
        return Routing.from_dense(gates, probs=gates, aux=aux)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, k={self.k}, gamma={self.gamma}, "
            f"entropy_weight={self.entropy_weight}, per_example={self.per_example}"
        )
