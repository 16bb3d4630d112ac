"""Expert execution: run any :class:`~routelab.Routing` through E experts.

The fast path (after torchtitan's grouped experts and ScatterMoE):

1. sort the N entries by expert (stable), so each expert's rows are contiguous;
2. gather the rows ``x[token]`` into ``xs [N, d]``;
3. run one matmul per contiguous expert segment (a grouped GEMM on CUDA where torch
   provides one);
4. multiply by the combine weights and scatter-add back into ``y [T, d]``.

:meth:`FFNExperts.dense_forward` is the plain reference kept beside it for tests:
every expert on every token, masked by the dense combine matrix.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from routelab.routing import Routing, _require_int, require_routing

__all__ = ["ExpertDispatch", "Experts", "FFNExperts", "ModuleExperts"]

ACTIVATIONS = ("relu", "gelu", "silu", "swiglu")


@dataclass
class ExpertDispatch:
    """A routing's entries sorted by expert: the plan every expert executor shares.

    Fields (N entries, E experts):
        token: int64 ``[N]``, the token of each entry in expert order.
        expert: int64 ``[N]``, the expert of each entry, non-decreasing.
        weight: float ``[N]``, the combine weight of each entry in expert order.
        counts: the number of entries of each expert, a Python list of length E
            (one host sync; the segment loop needs the sizes).
    """

    token: Tensor
    expert: Tensor
    weight: Tensor
    counts: list[int]

    @classmethod
    def plan(cls, routing: Routing) -> ExpertDispatch:
        order = torch.argsort(routing.expert, stable=True)
        counts = torch.bincount(routing.expert, minlength=routing.num_experts)
        return cls(
            token=routing.token[order],
            expert=routing.expert[order],
            weight=routing.weight[order],
            counts=counts.tolist(),
        )

    def gather(self, x: Tensor) -> Tensor:
        """``x [T, d] -> xs [N, d]``, the input rows in expert order (whole-buffer users:
        grouped GEMM, all-to-all exchange)."""
        return x.index_select(0, self.token)

    def combine(self, ys: Tensor, num_tokens: int, dtype: torch.dtype) -> Tensor:
        """``ys [N, d_out] -> y [T, d_out]``: weight each row and scatter-add it to its token.

        Half-precision outputs are accumulated in fp32 and cast back once.
        """
        acc_dtype = _accumulation_dtype(dtype)
        weighted = ys.to(acc_dtype) * self.weight.to(acc_dtype).unsqueeze(1)
        out = ys.new_zeros((num_tokens, ys.shape[1]), dtype=acc_dtype)
        return out.index_add(0, self.token, weighted).to(dtype)

    def run_segments(
        self,
        x: Tensor,
        expert_fn: Callable[[int, Tensor], Tensor],
        d_out: int,
    ) -> Tensor:
        """The segment loop: ``y [T, d_out] = sum_n weight_n * expert_fn(expert_n, x[token_n])``.

        The rows are gathered once (one ``[T, d]`` gradient scatter in backward, not one
        per expert) and split into per-expert views; each expert's output is weighted and
        scatter-added in place into ``y``. With no entry at all, expert 0 runs on zero rows
        so that ``y`` stays in the autograd graph.
        """
        acc_dtype = _accumulation_dtype(x.dtype)
        out = x.new_zeros((x.shape[0], d_out), dtype=acc_dtype)
        inputs = torch.split(self.gather(x), self.counts)
        tokens = torch.split(self.token, self.counts)
        weights = torch.split(self.weight, self.counts)
        active = [e for e, n in enumerate(self.counts) if n] or [0]
        for e in active:
            rows = expert_fn(e, inputs[e])
            if rows.dim() != 2 or rows.shape[1] != d_out:
                raise ValueError(
                    f"expert {e} produced shape {tuple(rows.shape)}, expected [n, {d_out}]"
                )
            out.index_add_(0, tokens[e], rows.to(acc_dtype) * weights[e].to(acc_dtype)[:, None])
        return out.to(x.dtype)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision outputs are accumulated in fp32 and cast back once."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class Experts(nn.Module):
    """Base class of expert executors: ``forward(x [T, d], routing) -> y [T, d_out]``."""

    num_experts: int
    d_model: int | None

    def check_call(self, x: object, routing: object) -> None:
        """Validate ``x`` against ``routing`` and against this executor; clear errors."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"x must be [T, d_model], got shape {tuple(x.shape)}")
        if self.d_model is not None and x.shape[1] != self.d_model:
            raise ValueError(
                f"x has last dimension {x.shape[1]}, expected d_model = {self.d_model}"
            )
        routing = require_routing(routing)
        if routing.num_tokens != x.shape[0]:
            raise ValueError(
                f"routing was built for num_tokens = {routing.num_tokens}, but x has "
                f"T = {x.shape[0]} rows"
            )
        if routing.num_experts != self.num_experts:
            raise ValueError(
                f"routing was built for num_experts = {routing.num_experts}, but these "
                f"experts number {self.num_experts}"
            )
        if routing.device != x.device:
            raise ValueError(f"routing is on {routing.device} but x is on {x.device}")


def expert_ffn(
    x: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    b_in: Tensor | None,
    b_out: Tensor | None,
    w_gate: Tensor | None,
    activation: str,
) -> Tensor:
    """One expert's FFN on rows ``x [n, d]``: ``act(x W_in + b_in) W_out + b_out``.

    SwiGLU (Shazeer 2020): ``(silu(x W_gate) * (x W_in)) W_out``.
    Shapes: ``w_in, w_gate [d, h]``, ``w_out [h, d_out]``, ``b_in [h]``, ``b_out [d_out]``.
    """
    h = x @ w_in if b_in is None else torch.addmm(b_in, x, w_in)
    if activation == "relu":
        h = F.relu(h)
    elif activation == "gelu":
        h = F.gelu(h)
    elif activation == "silu":
        h = F.silu(h)
    else:  # swiglu
        assert w_gate is not None
        h = F.silu(x @ w_gate) * h
    return h @ w_out if b_out is None else torch.addmm(b_out, h, w_out)


class FFNExperts(Experts):
    """E feed-forward experts with stacked weights, executed sparsely for any Routing.

    Parameters: ``w_in [E, d, h]``, ``w_out [E, h, d]``, optional ``b_in [E, h]``,
    ``b_out [E, d]``, and for SwiGLU ``w_gate [E, d, h]``.

    ``forward(x [T, d], routing) -> y [T, d]`` with
    ``y_t = sum over entries n of token t: weight_n * FFN_{expert_n}(x_t)``.
    Gradients flow to x, to the expert weights and to ``routing.weight``.

    Args:
        num_experts: E.
        d_model: d.
        d_hidden: h.
        activation: ``"relu"``, ``"gelu"``, ``"silu"`` or ``"swiglu"``.
        bias: whether the two projections carry biases.
        grouped_gemm: ``"auto"`` uses ``torch._grouped_mm`` on CUDA with bf16 where torch
            provides it; ``True`` uses it on any device where torch has it (CPU included);
            ``False`` never. The segment loop is the reference path and the CPU default.
    """

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_hidden: int,
        *,
        activation: str = "relu",
        bias: bool = True,
        grouped_gemm: bool | str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_experts = _require_int("num_experts", num_experts, 1)
        self.d_model = _require_int("d_model", d_model, 1)
        self.d_hidden = _require_int("d_hidden", d_hidden, 1)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if grouped_gemm not in (True, False, "auto"):
            raise ValueError(f"grouped_gemm must be True, False or 'auto', got {grouped_gemm!r}")
        self.activation = activation
        self.grouped_gemm = grouped_gemm
        factory = {"device": device, "dtype": dtype}
        E, d, h = num_experts, d_model, d_hidden
        self.w_in = nn.Parameter(torch.empty(E, d, h, **factory))
        self.w_out = nn.Parameter(torch.empty(E, h, d, **factory))
        self.w_gate = (
            nn.Parameter(torch.empty(E, d, h, **factory)) if activation == "swiglu" else None
        )
        self.b_in = nn.Parameter(torch.empty(E, h, **factory)) if bias else None
        self.b_out = nn.Parameter(torch.empty(E, d, **factory)) if bias else None
        self.reset_parameters()

    def with_num_experts(self, num_experts: int) -> FFNExperts:
        """A new FFNExperts of the same configuration, device and dtype with
        ``num_experts`` experts (freshly initialised): shards and their inverse."""
        return FFNExperts(
            num_experts,
            self.d_model,
            self.d_hidden,
            activation=self.activation,
            bias=self.b_in is not None,
            grouped_gemm=self.grouped_gemm,
            device=self.w_in.device,
            dtype=self.w_in.dtype,
        )

    def reset_parameters(self) -> None:
        """Each expert initialised as ``nn.Linear`` would be: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        bound_in, bound_out = 1 / math.sqrt(self.d_model), 1 / math.sqrt(self.d_hidden)
        with torch.no_grad():
            for p, bound in (
                (self.w_in, bound_in),
                (self.w_gate, bound_in),
                (self.b_in, bound_in),
                (self.w_out, bound_out),
                (self.b_out, bound_out),
            ):
                if p is not None:
                    p.uniform_(-bound, bound)

    def per_expert_params(self) -> list[tuple[Tensor | None, ...]]:
        """Each expert's ``(w_in [d, h], w_out [h, d], b_in, b_out, w_gate)``.

        The stacks are unbound once per call: indexing ``w_in[e]`` in a loop would make
        backward allocate a full ``[E, d, h]`` gradient per expert.
        """

        def split(p: Tensor | None) -> Sequence[Tensor | None]:
            return [None] * self.num_experts if p is None else p.unbind(0)

        return list(
            zip(
                self.w_in.unbind(0),
                self.w_out.unbind(0),
                split(self.b_in),
                split(self.b_out),
                split(self.w_gate),
            )
        )

    def expert_forward(self, e: int, x: Tensor) -> Tensor:
        """Expert e alone on rows ``x [n, d] -> [n, d]``."""
        return self.run_expert(self.per_expert_params()[e], x)

    def run_expert(self, params: tuple[Tensor | None, ...], x: Tensor) -> Tensor:
        """One expert, given its ``per_expert_params`` entry, on rows ``x [n, d]``."""
        w_in, w_out, b_in, b_out, w_gate = params
        return expert_ffn(x, w_in, w_out, b_in, b_out, w_gate, self.activation)

    def _check_dtype(self, x: Tensor) -> None:
        if x.dtype != self.w_in.dtype:
            raise TypeError(
                f"x has dtype {x.dtype} but the expert weights are {self.w_in.dtype}; "
                "cast one of them (e.g. experts.to(x.dtype))"
            )
        if x.device != self.w_in.device:
            raise ValueError(f"x is on {x.device} but the expert weights are on {self.w_in.device}")

    def forward(self, x: Tensor, routing: Routing) -> Tensor:
        """``x [T, d]``, any Routing over T tokens and E experts -> ``y [T, d]``."""
        self.check_call(x, routing)
        self._check_dtype(x)
        plan = ExpertDispatch.plan(routing)
        if self._use_grouped_gemm(x, plan):
            ys = self._grouped_forward(plan.gather(x), plan)
            if ys is not None:
                return plan.combine(ys, x.shape[0], x.dtype)
        params = self.per_expert_params()
        return plan.run_segments(x, lambda e, rows: self.run_expert(params[e], rows), self.d_model)

    def _use_grouped_gemm(self, x: Tensor, plan: ExpertDispatch) -> bool:
        """``"auto"``: CUDA, bf16, dims multiple of 16. ``True``: wherever torch has the
        kernel (CPU included, which lets the tests check this path against the loop)."""
        if self.grouped_gemm is False or not hasattr(torch, "_grouped_mm"):
            return False
        if not plan.token.numel():
            return False
        if self.grouped_gemm is True:
            return True
        return (
            x.is_cuda
            and x.dtype == torch.bfloat16
            and self.d_model % 16 == 0
            and self.d_hidden % 16 == 0
        )

    def _grouped_forward(self, xs: Tensor, plan: ExpertDispatch) -> Tensor | None:
        """``xs [N, d] -> ys [N, d]`` with ``torch._grouped_mm`` over the expert segments.

        Returns None (after one warning, and ``"auto"`` turns itself off) if the kernel
        refuses the shapes; the caller then runs the segment loop.
        """
        offsets = torch.cumsum(torch.tensor(plan.counts, device=xs.device), 0).to(torch.int32)
        try:
            h = torch._grouped_mm(xs, self.w_in, offs=offsets)
            if self.b_in is not None:
                h = h + self.b_in[plan.expert]
            if self.activation == "swiglu":
                assert self.w_gate is not None
                h = F.silu(torch._grouped_mm(xs, self.w_gate, offs=offsets)) * h
            else:
                h = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}[self.activation](h)
            ys = torch._grouped_mm(h, self.w_out, offs=offsets)
            return ys if self.b_out is None else ys + self.b_out[plan.expert]
        except RuntimeError as err:
            if self.grouped_gemm is True:
                raise
            warnings.warn(f"grouped GEMM unavailable ({err}); using the segment loop", stacklevel=3)
            self.grouped_gemm = False
            return None

    def dense_forward(self, x: Tensor, routing: Routing) -> Tensor:
        """Reference: every expert on every token, masked by the dense combine matrix.

        ``y = sum_e combine[:, e] * FFN_e(x)`` with ``combine = routing.to_dense() [T, E]``.
        O(T * E) work; for tests and tiny cases.
        """
        self.check_call(x, routing)
        self._check_dtype(x)
        combine = routing.to_dense().to(x.dtype)
        out = x.new_zeros(x.shape)
        for e, params in enumerate(self.per_expert_params()):
            out = out + combine[:, e : e + 1] * self.run_expert(params, x)
        return out

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, d_hidden={self.d_hidden}, "
            f"activation={self.activation!r}, bias={self.b_in is not None}"
        )


class ModuleExperts(Experts):
    """Any list of ``nn.Module`` experts, executed sparsely for any Routing.

    Each module maps rows ``[n, d] -> [n, d_out]``. ``forward(x [T, d], routing) ->
    y [T, d_out]``; ``d_out`` defaults to d (pass it when the experts change the width).
    """

    def __init__(self, experts: Sequence[nn.Module], *, d_out: int | None = None) -> None:
        super().__init__()
        experts = list(experts)
        if not experts:
            raise ValueError("experts must be a non-empty sequence of nn.Module")
        for i, module in enumerate(experts):
            if not isinstance(module, nn.Module):
                raise TypeError(f"experts[{i}] must be an nn.Module, got {type(module).__name__}")
        self.experts = nn.ModuleList(experts)
        self.num_experts = len(experts)
        self.d_model = None
        self.d_out = None if d_out is None else _require_int("d_out", d_out, 1)

    def forward(self, x: Tensor, routing: Routing) -> Tensor:
        self.check_call(x, routing)
        d_out = self.d_out if self.d_out is not None else x.shape[1]
        plan = ExpertDispatch.plan(routing)
        try:
            return plan.run_segments(x, lambda e, rows: self.experts[e](rows), d_out)
        except ValueError as err:
            raise ValueError(f"{err}; pass d_out= to ModuleExperts") from None

    def dense_forward(self, x: Tensor, routing: Routing) -> Tensor:
        """Reference: every expert on every token, masked by the dense combine matrix."""
        self.check_call(x, routing)
        combine = routing.to_dense().to(x.dtype)
        return sum(combine[:, e : e + 1] * m(x) for e, m in enumerate(self.experts))
