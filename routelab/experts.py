"""Expert execution: run any :class:`~routelab.Routing` through E experts.

The fast path (after torchtitan's grouped experts and ScatterMoE):

1. sort the N entries by expert (stable), so each expert's rows are contiguous
   (:class:`ExpertDispatch`);
2. gather the rows ``x[token]`` into ``xs [N, d]``;
3. run each projection as one grouped matmul over the expert segments
   (:func:`grouped_linear`; :meth:`Experts.run_sorted` is this step alone, for rows that
   are already in expert order, e.g. the receiving side of expert parallelism);
4. multiply by the combine weights and scatter-add back into ``y [T, d]``.

Two kernels compute the grouped matmul ``ys[rows of e] = xs[rows of e] @ W[e] + b[e]``:

- ``"grouped"``: ``torch._grouped_mm`` (CPU and CUDA; fp32, bf16, fp16; its rows must be
  a multiple of 16 bytes long: d and h multiples of 4 in fp32, of 8 in half precision).
  No host sync (the segment ends are computed on the device), so it also runs under
  ``torch.compile(fullgraph=True)``.
- ``"segment"``: one ``addmm`` per non-empty segment inside one autograd function whose
  backward writes each expert's weight gradient straight into one ``[E, d, h]`` buffer
  (no per-expert parameter views, no re-stacking of gradients). Any dtype (fp64
  included) and any size; it needs the segment sizes on the host (one sync).

Which path runs (``FFNExperts(grouped_gemm="auto")``, the default), as measured by
``benchmarks/experts.py`` (CPU, torch 2.13, fp32, 1 thread, the five configurations of
issue 17; tables in ``benchmarks/README.md``):

- CPU, with ``n`` = entries per expert on average at least 96 and at least h / 16
  (training batch sizes; small or fine-grained experts need fewer rows): the per-expert
  loop (:class:`_ExpertLoopFFN`, one autograd function). Each expert's whole FFN and its
  backward run on its rows while they are in cache, with no ``[N, d]`` / ``[N, h]``
  intermediates at all; its backward writes the weight gradients straight into the
  ``[E, d, h]`` stacks (no re-stacking). Loop / grouped time, measured side by side
  (``T, d, h, E, k``): 0.54 (16384, 256, 64, 512, 8; n = 256), 0.66 (4096, 256, 64, 256,
  8; n = 128), 0.78-0.88 (n = 128-256 with h = 64-256), 0.89 (3072, 256, 64, 256, 8;
  n = 96), 0.94 (3072, 512, 256, 64, 2; n = 96), 0.9 at large (n = 1024, h = 2048),
  0.77-0.85 at fine / fine-small.
- otherwise (few rows per expert, big experts on small batches, accelerators,
  ``torch.compile``): ``"grouped"`` wherever ``torch._grouped_mm`` accepts the dtype and
  the sizes, ``"segment"`` otherwise. The loop loses there: 1.04-1.13 at n = 64
  ((1024, 256, 128, 64, 4), (512, 1024, 512, 64, 8), (4096, 128, 64, 512, 8)), 1.07 at
  n = 32, 1.05 at T = 64 with d = 1024, h = 4096, E = 8, and 1.06 at n = 128 with
  h = 4096 (n < h / 16), where the per-expert dispatch costs more than the cache saves.

Where the hidden width is below the model width (full precision), the combine weights
scale the hidden rows before the output projection instead of the output rows.
``grouped_gemm=False`` forces the segment kernel, ``True`` the grouped one.

Kept beside them as tested references: :meth:`FFNExperts.loop_forward` (the plain
per-expert Python loop through autograd, :meth:`ExpertDispatch.run_segments`) and
:meth:`FFNExperts.dense_forward` (every expert on every token, masked by the dense
combine matrix).
"""

from __future__ import annotations

import copy
import ctypes
import math
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from routelab._validate import require_int
from routelab.routing import Routing, require_routing

__all__ = [
    "ExpertDispatch",
    "ExpertSegments",
    "Experts",
    "FFNExperts",
    "ModuleExperts",
    "grouped_kernel_accepts",
    "grouped_linear",
]

ACTIVATIONS = ("relu", "gelu", "silu", "swiglu")
KERNELS = ("grouped", "segment")
GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision outputs are accumulated in fp32 and cast back once."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# ---------------------------------------------------------------------- the layout
class ExpertSegments:
    """The layout of N rows sorted by expert: expert e owns rows ``[end_{e-1}, end_e)``.

    Built from ``counts``, the rows of each expert: an int64 tensor ``[E]`` on the rows'
    device (no host sync) or a sequence of E ints (already on the host); ``sizes``: the
    same counts as ints where the caller has them already. :meth:`sizes` gives them as a
    Python list (one host sync for a tensor, at most once; the per-expert loops need it).
    """

    def __init__(
        self,
        counts: Tensor | Sequence[int],
        *,
        device: torch.device | None = None,
        sizes: Sequence[int] | None = None,
    ):
        if isinstance(counts, Tensor):
            if counts.dim() != 1 or counts.is_floating_point():
                raise ValueError(f"counts must be an int tensor [E], got {counts!r}")
            self.counts = counts.long()
            # the same counts already on the host (a caller that synced anyway)
            self._sizes: list[int] | None = None if sizes is None else [int(n) for n in sizes]
        else:
            sizes = [require_int(f"counts[{e}]", n, 0) for e, n in enumerate(counts)]
            self.counts = torch.tensor(sizes, dtype=torch.int64, device=device)
            self._sizes = sizes
        if self.counts.numel() < 1:
            raise ValueError("counts must hold at least one expert")

    @property
    def num_experts(self) -> int:
        return int(self.counts.shape[0])

    def sizes(self) -> list[int]:
        if self._sizes is None:
            self._sizes = [int(n) for n in self.counts.tolist()]
        return self._sizes


class ExpertDispatch:
    """A routing's entries sorted by expert: the plan every expert executor shares.

    Fields (N entries, E experts):
        token: int64 ``[N]``, the token of each entry in expert order.
        expert: int64 ``[N]``, the expert of each entry, non-decreasing.
        weight: float ``[N]``, the combine weight of each entry in expert order.
        segments: the :class:`ExpertSegments` of the sorted entries (``counts`` int64 ``[E]``
            on the device; the sizes on the host only when a caller asks).
    """

    def __init__(self, token: Tensor, expert: Tensor, weight: Tensor, segments: ExpertSegments):
        self.token, self.expert, self.weight, self.segments = token, expert, weight, segments

    @classmethod
    def plan(cls, routing: Routing) -> ExpertDispatch:
        """Sort ``routing``'s entries by expert (stable: entry order within an expert)."""
        order = torch.argsort(routing.expert, stable=True)
        expert = routing.expert[order]
        # segment ends by binary search on the sorted ids: a fixed-size [E] result
        # (bincount's size depends on the data, which torch.compile cannot trace)
        bounds = torch.arange(routing.num_experts + 1, device=expert.device)
        starts = torch.searchsorted(expert, bounds)
        segments = ExpertSegments(starts[1:] - starts[:-1])
        return cls(routing.token[order], expert, routing.weight[order], segments)

    @property
    def counts(self) -> Tensor:
        """int64 ``[E]``: the entries of each expert."""
        return self.segments.counts

    def gather(self, x: Tensor) -> Tensor:
        """``x [T, d] -> xs [N, d]``, the input rows in expert order."""
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
        sizes = self.segments.sizes()
        acc_dtype = _accumulation_dtype(x.dtype)
        out = x.new_zeros((x.shape[0], d_out), dtype=acc_dtype)
        inputs = torch.split(self.gather(x), sizes)
        tokens = torch.split(self.token, sizes)
        weights = torch.split(self.weight, sizes)
        active = [e for e, n in enumerate(sizes) if n] or [0]
        for e in active:
            rows = expert_fn(e, inputs[e])
            if rows.dim() != 2 or rows.shape[1] != d_out:
                raise ValueError(
                    f"expert {e} produced shape {tuple(rows.shape)}, expected [n, {d_out}]"
                )
            out.index_add_(0, tokens[e], rows.to(acc_dtype) * weights[e].to(acc_dtype)[:, None])
        return out.to(x.dtype)


def as_segments(counts: ExpertSegments | Tensor | Sequence[int], rows: Tensor) -> ExpertSegments:
    """``counts`` (segments, an int tensor ``[E]`` or E ints) as :class:`ExpertSegments`
    for ``rows [N, ...]``; raises unless the counts sum to N (checked on the host only
    when the sizes are there already, so a device tensor costs no sync)."""
    segments = (
        counts if isinstance(counts, ExpertSegments) else ExpertSegments(counts, device=rows.device)
    )
    if segments._sizes is not None and sum(segments._sizes) != rows.shape[0]:
        raise ValueError(f"counts sum to {sum(segments._sizes)} but there are {rows.shape[0]} rows")
    return segments


# ---------------------------------------------------------------------- the kernels
def grouped_kernel_accepts(rows: Tensor, *weights: Tensor) -> bool:
    """Whether ``torch._grouped_mm`` takes ``rows [N, a]`` times each ``weights [E, a, b]``:
    the kernel exists, the dtype is fp32 / bf16 / fp16, and every matrix dimension is a
    multiple of 16 bytes (the kernel's stride rule)."""
    if not hasattr(torch, "_grouped_mm") or rows.dtype not in GROUPED_DTYPES:
        return False
    size = rows.element_size()
    return all((w.shape[1] * size) % 16 == 0 and (w.shape[2] * size) % 16 == 0 for w in weights)


def _segment_sizes(counts: Tensor) -> list[int]:
    return [int(n) for n in counts.tolist()]


def _grouped_linear_impl(
    xs: Tensor, weight: Tensor, bias: Tensor | None, counts: Tensor, kernel: str
) -> Tensor:
    if kernel == "grouped":
        out = torch._grouped_mm(xs, weight, offs=torch.cumsum(counts, 0).to(torch.int32))
        if bias is None:
            return out
        if _host_segment_loops(xs):  # a broadcast add per segment, no [N, b] bias rows
            start = 0
            for e, n in enumerate(_segment_sizes(counts)):
                if n:
                    out[start : start + n] += bias[e]
                start += n
            return out
        row_expert = torch.repeat_interleave(
            torch.arange(counts.shape[0], device=counts.device), counts, output_size=len(xs)
        )
        return out.add_(bias.index_select(0, row_expert))
    out = xs.new_empty((xs.shape[0], weight.shape[2]))
    start = 0
    for e, n in enumerate(_segment_sizes(counts)):
        if n:
            rows, target = xs[start : start + n], out[start : start + n]
            if bias is None:
                torch.mm(rows, weight[e], out=target)
            else:
                torch.addmm(bias[e], rows, weight[e], out=target)
        start += n
    return out


def _host_segment_loops(xs: Tensor) -> bool:
    """Whether the grouped kernel adds biases and computes weight gradients per segment
    (a loop over the host sizes: no ``[N, b]`` bias gather, and torch._grouped_mm's
    weight-gradient form is up to 3.5x slower on CPU than one mm per segment, never
    faster: measured) or in one op each (no host sync: for accelerators)."""
    return xs.device.type == "cpu"


# Fresh CPU buffers above glibc's largest mmap threshold (32 MiB on 64-bit) are new
# mappings every time: each 4 KiB page faults on first write. A stacked [E, a, b] weight
# gradient is such a buffer each step (per-expert weights of a few MiB come from the
# reused heap instead); at T = 64, d = 1024, h = 4096, E = 8 the faults were a third of
# the step (kernel time; the arithmetic equal to the per-expert loop's). A transparent
# huge page hint on the buffer (the madvise PyTorch makes itself under
# THP_MEM_ALLOC_ENABLE=1) turns 512 faults into one: kernel time 0.116 -> 0.045 s per
# step there. It is used where few rows per expert make the weight gradient the bulk of
# the step's memory (the grouped and segment kernels); in the CPU loop (>= 96 rows per
# expert) it measured 1-3% slower (T = 8192, h = 2048, E = 16), and so did hinting only
# buffers whose first huge page was not yet resident (mincore) at T = 64.
_HUGE_PAGE = 2 << 20
_MMAP_THRESHOLD_MAX = 32 << 20
_MADV_HUGEPAGE = 14


def _load_madvise() -> Callable[[int, int, int], int] | None:
    """The C library's ``madvise`` (Linux; None elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return cast("Callable[[int, int, int], int]", madvise)


_madvise = _load_madvise()


def _huge_pages_inside(address: int, size: int) -> tuple[int, int]:
    """``(begin, end)``: the whole 2 MiB huge pages inside ``[address, address + size)``
    (``end <= begin``: none)."""
    begin = -(-address // _HUGE_PAGE) * _HUGE_PAGE
    return begin, (address + size) // _HUGE_PAGE * _HUGE_PAGE


def _empty_written_once(like: Tensor) -> Tensor:
    """``torch.empty_like(like)`` for a buffer the caller overwrites in full; a large CPU
    buffer carries the huge page hint on the huge pages inside it (a no-op where the
    kernel has no transparent huge pages)."""
    out = torch.empty_like(like, memory_format=torch.contiguous_format)
    size = out.numel() * out.element_size()
    if _madvise is not None and out.device.type == "cpu" and size > _MMAP_THRESHOLD_MAX:
        begin, end = _huge_pages_inside(out.data_ptr(), size)
        if end > begin:
            _madvise(begin, end - begin, _MADV_HUGEPAGE)
    return out


def _segment_weight_grad(xs: Tensor, grad: Tensor, sizes: list[int], like: Tensor) -> Tensor:
    """``[E, a, b]``: each segment's ``xs_e^T grad_e``, written in place (0 when empty)."""
    grad_w = _empty_written_once(like)
    start = 0
    for e, n in enumerate(sizes):
        if n:
            torch.mm(xs[start : start + n].t(), grad[start : start + n], out=grad_w[e])
        else:
            grad_w[e].zero_()
        start += n
    return grad_w


def _segment_bias_grad(grad: Tensor, sizes: list[int], num_experts: int) -> Tensor:
    """``[E, b]``: the sum of each segment's gradient rows (0 for an empty one)."""
    grad_b = grad.new_empty((num_experts, grad.shape[1]))
    start = 0
    for e, n in enumerate(sizes):
        if n:
            torch.sum(grad[start : start + n], 0, out=grad_b[e])
        else:
            grad_b[e].zero_()
        start += n
    return grad_b


def _grouped_linear_grads(
    grad: Tensor,
    xs: Tensor,
    weight: Tensor,
    counts: Tensor,
    kernel: str,
    need_x: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad xs [N, a], grad weight [E, a, b], grad bias [E, b])``; an empty tensor
    (a new one each: a custom operator's outputs must not alias) stands for a gradient
    not asked for. The weight gradient of every expert is written
    once into one ``[E, a, b]`` tensor (no per-expert gradients to re-stack)."""
    grad = grad.contiguous()
    if kernel == "grouped":
        offs = torch.cumsum(counts, 0).to(torch.int32)
        grad_x = (
            torch._grouped_mm(grad, weight.transpose(-2, -1), offs=offs)
            if need_x
            else grad.new_empty(0)
        )
        grad_w = grad.new_empty(0)
        if need_w and _host_segment_loops(xs):
            grad_w = _segment_weight_grad(xs, grad, _segment_sizes(counts), weight)
        elif need_w:
            grad_w = torch._grouped_mm(xs.t(), grad, offs=offs)
        grad_b = grad.new_empty(0)
        if need_b and _host_segment_loops(xs):
            grad_b = _segment_bias_grad(grad, _segment_sizes(counts), weight.shape[0])
        elif need_b:
            row_expert = torch.repeat_interleave(
                torch.arange(counts.shape[0], device=counts.device), counts, output_size=len(xs)
            )
            grad_b = grad.new_zeros((weight.shape[0], weight.shape[2]))
            grad_b.index_add_(0, row_expert, grad)
        return grad_x, grad_w, grad_b
    sizes = _segment_sizes(counts)
    grad_x = torch.empty_like(xs) if need_x else grad.new_empty(0)
    start = 0
    for e, n in enumerate(sizes):
        if n and need_x:
            torch.mm(grad[start : start + n], weight[e].t(), out=grad_x[start : start + n])
        start += n
    grad_w = _segment_weight_grad(xs, grad, sizes, weight) if need_w else grad.new_empty(0)
    grad_b = _segment_bias_grad(grad, sizes, weight.shape[0]) if need_b else grad.new_empty(0)
    return grad_x, grad_w, grad_b


# Custom operators: torch.compile sees each grouped matmul as one opaque node with a
# known output shape, so neither the kernel's host-side sizes (segment) nor its meta
# rules (torch._grouped_mm's fake kernel accepts only bf16) break the graph.
@torch.library.custom_op("routelab::grouped_linear", mutates_args=())
def _grouped_linear_op(
    xs: Tensor, weight: Tensor, bias: Tensor | None, counts: Tensor, kernel: str
) -> Tensor:
    return _grouped_linear_impl(xs, weight, bias, counts, kernel)


@_grouped_linear_op.register_fake
def _(xs: Tensor, weight: Tensor, bias: Tensor | None, counts: Tensor, kernel: str) -> Tensor:
    return xs.new_empty((xs.shape[0], weight.shape[2]))


@torch.library.custom_op("routelab::grouped_linear_grads", mutates_args=())
def _grouped_linear_grads_op(
    grad: Tensor,
    xs: Tensor,
    weight: Tensor,
    counts: Tensor,
    kernel: str,
    need_x: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return _grouped_linear_grads(grad, xs, weight, counts, kernel, need_x, need_w, need_b)


@_grouped_linear_grads_op.register_fake
def _(
    grad: Tensor,
    xs: Tensor,
    weight: Tensor,
    counts: Tensor,
    kernel: str,
    need_x: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return (
        torch.empty_like(xs) if need_x else grad.new_empty(0),
        torch.empty_like(weight) if need_w else grad.new_empty(0),
        grad.new_empty((weight.shape[0], weight.shape[2])) if need_b else grad.new_empty(0),
    )


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    xs, weight, bias, counts, kernel = inputs
    ctx.save_for_backward(xs, weight, counts)
    ctx.kernel, ctx.has_bias = kernel, bias is not None


def _backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    xs, weight, counts = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    grads = _grouped_linear_grads_op(
        grad, xs, weight, counts, ctx.kernel, need_x, need_w, need_b and ctx.has_bias
    )
    grad_x, grad_w, grad_b = (
        g if need else None for g, need in zip(grads, (need_x, need_w, need_b))
    )
    return grad_x, grad_w, grad_b if ctx.has_bias else None, None, None


_grouped_linear_op.register_autograd(_backward, setup_context=_setup_context)


def grouped_linear(
    xs: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    counts: ExpertSegments | Tensor,
    kernel: str = "grouped",
) -> Tensor:
    """``xs [N, a]`` in expert order -> ``[N, b]``: ``xs[rows of e] @ weight[e] + bias[e]``.

    ``weight [E, a, b]``, ``bias [E, b]`` or None, ``counts`` int64 ``[E]`` (or
    :class:`ExpertSegments`) the rows of each expert. ``kernel``: ``"grouped"``
    (``torch._grouped_mm``; see :func:`grouped_kernel_accepts`) or ``"segment"`` (one
    matmul per segment, any dtype). Differentiable in ``xs``, ``weight`` and ``bias``;
    traceable by ``torch.compile`` (a custom operator).
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if isinstance(counts, ExpertSegments):
        counts = counts.counts
    return _grouped_linear_op(xs, weight, bias, counts, kernel)


# ------------------------------------------------------- the CPU per-expert FFN loop
class _ExpertLoopFFN(torch.autograd.Function):
    """Each expert's whole FFN, forward and backward, in one go on its rows (the CPU rule
    of the module docstring), as one autograd function.

    Forward, for each expert e with rows ``x_e = x[token_e] [n, d]``:
    ``a_e = x_e W_in[e] + b_in[e]``, ``h_e = act(a_e)`` (SwiGLU: ``silu(x_e W_gate[e]) *
    a_e``), ``y_e = h_e W_out[e] + b_out[e]``, and ``out[token_e] += w_e * y_e``.
    Backward, per expert on the same rows while they are in cache, with
    ``g_e = grad_out[token_e]`` and ``u_e = g_e W_out[e]^T``:
    ``dw_e = rowsum(g_e * y_e)`` from the saved ``y_e [n, d]`` where h > d, else
    ``rowsum(u_e * h_e) + g_e b_out[e]`` (no ``y_e`` kept: the shorter rows either way),
    ``dW_out[e] = h_e^T (w_e g_e)``, ``dh_e = w_e u_e``, then through the activation to
    ``da_e``, ``dW_in[e] = x_e^T da_e`` and ``dx[token_e] += da_e W_in[e]^T``. Every
    expert's weight gradient is written in place into one ``[E, a, b]`` tensor: no
    per-expert views of the stacks, no re-stacking. Saved: ``x``, the entries, and each
    expert's hidden rows ``h_e [n, h]`` (plus ``a_e`` for GELU / SiLU, ``a_e`` and the
    gate for SwiGLU) as separate tensors: one ``[N, h]`` buffer would be a fresh mapping
    each step (the page faults of :func:`_empty_written_once`), per-expert ones come from
    the reused heap.

    ``token=None``: the rows are ``x`` itself, already in expert order (``out [N, d]``,
    :meth:`FFNExperts.run_sorted`); ``weight=None``: no combine weights (1).
    Not twice differentiable.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        token: Tensor | None,
        weight: Tensor | None,
        sizes: list[int],
        activation: str,
        w_in: Tensor,
        w_out: Tensor,
        b_in: Tensor | None,
        b_out: Tensor | None,
        w_gate: Tensor | None,
    ) -> Tensor:
        acc_dtype = _accumulation_dtype(x.dtype)
        out = x.new_zeros((x.shape[0], w_out.shape[2]), dtype=acc_dtype)
        # per active expert: h (ReLU), or (h, a), or (h, a, gate); then y where the combine
        # weights' gradient is cheaper from the outputs ([n, d] rows) than from h ([n, h])
        saved: list[Tensor] = []
        keep_outputs = bool(ctx.needs_input_grad[2]) and w_in.shape[2] > w_out.shape[2]
        # per-expert views made once (each indexing op costs ~2 us; 256 experts x 10 ops)
        params = _expert_views(w_in, w_out, b_in, b_out, w_gate)
        inputs = torch.split(x, sizes) if token is None else ()  # rows in expert order
        tokens = None if token is None else torch.split(token, sizes)
        outputs = torch.split(out, sizes) if token is None else ()
        weights = None if weight is None else torch.split(weight.to(acc_dtype)[:, None], sizes)
        for e, n in enumerate(sizes):
            if not n:
                continue
            W_in, W_out, B_in, B_out, W_gate = params[e]
            rows = inputs[e] if tokens is None else x.index_select(0, tokens[e])
            a = rows @ W_in if B_in is None else torch.addmm(B_in, rows, W_in)
            if activation == "swiglu":
                z = rows @ W_gate
                h = F.silu(z).mul_(a)
                saved += (h, a, z)
            elif activation == "relu":
                h = F.relu(a, inplace=True)  # (per-expert tensors: heap-sized, reused)
                saved.append(h)
            else:
                h = _ACTIVATION_FNS[activation](a)
                saved += (h, a)
            y = (h @ W_out if B_out is None else torch.addmm(B_out, h, W_out)).to(acc_dtype)
            if keep_outputs:
                saved.append(y)
            if weights is not None:
                y = y * weights[e] if keep_outputs else y.mul_(weights[e])
            if tokens is None:
                outputs[e].copy_(y)
            else:
                out.index_add_(0, tokens[e], y)
        ctx.save_for_backward(x, token, weight, w_in, w_out, b_out, w_gate, *saved)
        ctx.sizes, ctx.activation, ctx.has_b_in = sizes, activation, b_in is not None
        ctx.keep_outputs = keep_outputs
        return out.to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, token, weight, w_in, w_out, b_out, w_gate, *saved = ctx.saved_tensors
        per_expert = {"relu": 1, "swiglu": 3}.get(ctx.activation, 2) + ctx.keep_outputs
        need = ctx.needs_input_grad
        need_x, need_weight = need[0], need[2]
        need_w_in, need_w_out, need_b_in, need_b_out, need_w_gate = need[5:10]
        grad_out = grad_out.contiguous()
        acc_dtype = _accumulation_dtype(x.dtype)
        grad_x = x.new_zeros(x.shape, dtype=acc_dtype) if need_x else None
        grad_weight = torch.empty_like(weight) if need_weight else None
        # (no huge page hint here: measured slower, see _empty_written_once)
        grad_w_in = torch.empty_like(w_in) if need_w_in else None
        grad_w_out = torch.empty_like(w_out) if need_w_out else None
        grad_w_gate = torch.empty_like(w_gate) if need_w_gate else None
        grad_b_in = x.new_empty((w_in.shape[0], w_in.shape[2])) if need_b_in else None
        grad_b_out = x.new_empty((w_out.shape[0], w_out.shape[2])) if need_b_out else None
        params = _expert_views(w_in, w_out, None, b_out, w_gate)
        sizes = ctx.sizes
        tokens = None if token is None else torch.split(token, sizes)
        grad_rows = torch.split(grad_out, sizes) if token is None else ()
        inputs = torch.split(x, sizes) if token is None else ()  # rows in expert order
        weights = None if weight is None else torch.split(weight[:, None].to(x.dtype), sizes)
        grad_weights = None if grad_weight is None else torch.split(grad_weight, sizes)
        grad_inputs = torch.split(grad_x, sizes) if token is None and grad_x is not None else ()
        active = 0
        for e, n in enumerate(sizes):
            if not n:
                for grad in (grad_w_in, grad_w_out, grad_w_gate, grad_b_in, grad_b_out):
                    if grad is not None:
                        grad[e].zero_()
                continue
            W_in, W_out, _, B_out, W_gate = params[e]
            g = grad_rows[e] if tokens is None else grad_out.index_select(0, tokens[e])
            h, *pre = saved[active * per_expert : (active + 1) * per_expert]
            y = pre.pop() if ctx.keep_outputs else None
            active += 1
            u = g @ W_out.t()  # [n, h]: d(loss)/d(h) before the combine weight
            if weights is not None:
                w = weights[e]
                if grad_weights is not None:
                    if y is not None:  # dw = <g, y>
                        grad_weights[e].copy_((g * y).sum(1))
                    else:  # dw = <g, h W_out + b_out> = <u, h> + <g, b_out>
                        dot = (u * h).sum(1)
                        grad_weights[e].copy_(dot if B_out is None else dot.addmv_(g, B_out))
                g = g.mul_(w) if tokens is not None else g * w  # (a gathered copy: in place)
                u.mul_(w)
            if grad_w_out is not None:
                torch.mm(h.t(), g, out=grad_w_out[e])
            if grad_b_out is not None:
                torch.sum(g, 0, out=grad_b_out[e])
            if not (need_x or need_w_in or need_b_in or need_w_gate):
                continue
            da, dgate = _activation_backward(ctx.activation, u, h, *pre)
            rows = inputs[e] if tokens is None else x.index_select(0, tokens[e])
            if grad_w_in is not None:
                torch.mm(rows.t(), da, out=grad_w_in[e])
            if grad_b_in is not None:
                torch.sum(da, 0, out=grad_b_in[e])
            if grad_w_gate is not None:
                assert dgate is not None
                torch.mm(rows.t(), dgate, out=grad_w_gate[e])
            if grad_x is not None:
                dx = da @ W_in.t()
                if dgate is not None:
                    dx.addmm_(dgate, W_gate.t())
                if grad_inputs:
                    grad_inputs[e].copy_(dx)
                else:
                    assert tokens is not None
                    grad_x.index_add_(0, tokens[e], dx.to(acc_dtype))
        return (
            None if grad_x is None else grad_x.to(x.dtype),
            None,
            grad_weight,
            None,
            None,
            grad_w_in,
            grad_w_out,
            grad_b_in if ctx.has_b_in else None,
            grad_b_out,
            grad_w_gate,
        )


def _expert_views(*stacks: Tensor | None) -> list[tuple[Any, ...]]:
    """Each expert's slices of ``stacks`` (None stays None), made in one ``unbind`` per
    stack."""
    num_experts = next(t.shape[0] for t in stacks if t is not None)
    views = [(None,) * num_experts if t is None else t.unbind(0) for t in stacks]
    return list(zip(*views))


def _activation_backward(
    activation: str, grad_h: Tensor, h: Tensor, a: Tensor | None = None, z: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """``(d loss / d a, d loss / d gate)`` of one expert's rows from ``grad_h`` (which may
    be overwritten), ``h = act(a)`` (SwiGLU: ``silu(z) * a``)."""
    if activation == "relu":
        return torch.ops.aten.threshold_backward(grad_h, h, 0), None
    assert a is not None
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(grad_h, a), None
    if activation == "silu":
        return torch.ops.aten.silu_backward(grad_h, a), None
    assert z is not None
    return grad_h * F.silu(z), torch.ops.aten.silu_backward(grad_h * a, z)


# ---------------------------------------------------------------------- executors
class Experts(nn.Module):
    """Base class of expert executors: ``forward(x [T, d], routing) -> y [T, d_out]``.

    Subclasses implement :meth:`run_sorted` (rows already in expert order, no weights);
    :meth:`forward` sorts, gathers, runs it and combines. Experts whose parameters are
    all stacked per expert (leading dimension E) shard and gather themselves:
    :meth:`expert_tensors`, :meth:`with_expert_tensors`, :meth:`select_experts`.
    """

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
        if hasattr(routing, "check_ids"):
            routing.check_ids()  # a no-op with routelab.validation(False)

    def forward(self, x: Tensor, routing: Routing) -> Tensor:
        """``x [T, d]``, any Routing over T tokens and E experts -> ``y [T, d_out]``."""
        self.check_call(x, routing)
        plan = ExpertDispatch.plan(routing)
        ys = self.run_sorted(plan.gather(x), plan.segments)
        return plan.combine(ys, x.shape[0], x.dtype)

    def run_sorted(self, xs: Tensor, counts: ExpertSegments | Tensor | Sequence[int]) -> Tensor:
        """Rows already in expert order -> their experts' outputs, unweighted.

        ``xs [N, d]`` holds ``counts[0]`` rows for expert 0, then ``counts[1]`` for expert
        1, ...; ``counts`` is an int64 tensor ``[E]``, E ints or :class:`ExpertSegments`.
        Returns ``[N, d_out]``, row n the FFN of its expert on ``xs[n]``.
        """
        raise NotImplementedError

    # ------------------------------------------------------------------ sharding
    def expert_tensors(self) -> dict[str, Tensor]:
        """Every parameter and buffer, by name: each has the expert dimension E first.

        Raises a TypeError for executors holding submodules or a tensor that is not
        stacked per expert (they cannot be sliced by expert id)."""
        if any(True for _ in self.children()):
            raise TypeError(f"{type(self).__name__} holds submodules; it cannot be sliced")
        tensors = {
            name: t
            for name, t in [*self._parameters.items(), *self._buffers.items()]
            if t is not None
        }
        for name, t in tensors.items():
            if t.dim() == 0 or t.shape[0] != self.num_experts:
                raise TypeError(
                    f"{type(self).__name__}.{name} has shape {tuple(t.shape)}: not stacked "
                    f"per expert (first dimension {self.num_experts})"
                )
        return tensors

    def with_expert_tensors(self, tensors: Mapping[str, Tensor]) -> Experts:
        """A new executor like this one whose per-expert tensors are ``tensors`` (copies;
        every name of :meth:`expert_tensors`, all with the same leading size E', which
        becomes the new ``num_experts``). Parameters stay parameters (same
        ``requires_grad``), buffers buffers."""
        own = self.expert_tensors()
        if set(tensors) != set(own):
            raise ValueError(f"tensors must hold exactly {sorted(own)}, got {sorted(tensors)}")
        sizes = {int(t.shape[0]) for t in tensors.values()}
        if len(sizes) != 1:
            raise ValueError(f"tensors must share their first (expert) dimension, got {sizes}")
        new = copy.copy(self)
        new.__dict__ = dict(self.__dict__)
        new._parameters = dict(self._parameters)
        new._buffers = dict(self._buffers)
        new.num_experts = sizes.pop()
        for name, t in tensors.items():
            old = own[name]
            if tuple(t.shape[1:]) != tuple(old.shape[1:]):
                raise ValueError(
                    f"{name} must be [E', {', '.join(map(str, old.shape[1:]))}], "
                    f"got {tuple(t.shape)}"
                )
            value = t.detach().to(device=old.device, dtype=old.dtype).clone()
            if name in self._parameters:
                new._parameters[name] = nn.Parameter(value, requires_grad=old.requires_grad)
            else:
                new._buffers[name] = value
        return new

    def select_experts(self, ids: Sequence[int] | range) -> Experts:
        """A new executor holding copies of experts ``ids`` (in that order): a shard."""
        index = torch.as_tensor(list(ids), dtype=torch.int64)
        if index.numel() == 0:
            raise ValueError("ids must name at least one expert")
        if int(index.min()) < 0 or int(index.max()) >= self.num_experts:
            raise ValueError(f"ids must be expert ids in [0, {self.num_experts}), got {ids}")
        return self.with_expert_tensors(
            {n: t.index_select(0, index.to(t.device)) for n, t in self.expert_tensors().items()}
        )


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
    if activation == "swiglu":
        assert w_gate is not None
        h = F.silu(x @ w_gate) * h
    else:
        h = _ACTIVATION_FNS[activation](h)
    return h @ w_out if b_out is None else torch.addmm(b_out, h, w_out)


_ACTIVATION_FNS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
}


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
        grouped_gemm: the execution path (module docstring): ``"auto"`` runs the
            measured rule (on CPU the per-expert loop for at least ``max(96, h / 16)``
            entries per expert on average; else ``torch._grouped_mm`` wherever it accepts the dtype and
            sizes, the segment kernel otherwise); ``True`` always the grouped kernel (an
            error where it cannot run); ``False`` always the segment kernel.
    """

    d_model: int

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
        self.num_experts = require_int("num_experts", num_experts, 1)
        self.d_model = require_int("d_model", d_model, 1)
        self.d_hidden = require_int("d_hidden", d_hidden, 1)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if grouped_gemm not in (True, False, "auto"):
            raise ValueError(f"grouped_gemm must be True, False or 'auto', got {grouped_gemm!r}")
        self.activation = activation
        self.grouped_gemm = grouped_gemm
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
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
        ``num_experts`` experts (freshly initialised)."""
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

    def expert_forward(self, e: int, x: Tensor) -> Tensor:
        """Expert e alone on rows ``x [n, d] -> [n, d]``."""
        return expert_ffn(
            x,
            self.w_in[e],
            self.w_out[e],
            None if self.b_in is None else self.b_in[e],
            None if self.b_out is None else self.b_out[e],
            None if self.w_gate is None else self.w_gate[e],
            self.activation,
        )

    def _check_dtype(self, x: Tensor) -> None:
        if x.dtype != self.w_in.dtype:
            raise TypeError(
                f"x has dtype {x.dtype} but the expert weights are {self.w_in.dtype}; "
                "cast one of them (e.g. experts.to(x.dtype))"
            )
        if x.device != self.w_in.device:
            raise ValueError(f"x is on {x.device} but the expert weights are on {self.w_in.device}")

    def check_call(self, x: object, routing: object) -> None:
        super().check_call(x, routing)
        assert isinstance(x, Tensor)
        self._check_dtype(x)

    def kernel(self, xs: Tensor) -> str:
        """``"grouped"`` or ``"segment"``: the kernel that runs for rows ``xs`` (module
        docstring)."""
        if self.grouped_gemm is False:
            return "segment"
        weights = [self.w_in, self.w_out]
        if self.grouped_gemm is True or grouped_kernel_accepts(xs, *weights):
            return "grouped"
        return "segment"

    def run_sorted(self, xs: Tensor, counts: ExpertSegments | Tensor | Sequence[int]) -> Tensor:
        """Rows already in expert order ``xs [N, d]`` (``counts`` rows per expert) ->
        ``[N, d]``, each row through its expert's FFN; see :meth:`Experts.run_sorted`."""
        self._check_dtype(xs)
        if xs.dim() != 2 or xs.shape[1] != self.d_model:
            raise ValueError(f"xs must be [N, d_model = {self.d_model}], got {tuple(xs.shape)}")
        segments = as_segments(counts, xs)
        if segments.num_experts != self.num_experts:
            raise ValueError(
                f"counts holds {segments.num_experts} experts, expected {self.num_experts}"
            )
        if self._cache_local_loop(xs, xs.shape[0]):  # the CPU rule, as in forward
            return self._loop(xs, None, None, segments.sizes())
        kernel = self.kernel(xs)
        try:
            return self._ffn(xs, segments, kernel)
        except RuntimeError as err:
            if kernel != "grouped" or self.grouped_gemm is True:
                raise
            warnings.warn(
                f"grouped GEMM unavailable ({err}); using the segment kernel", stacklevel=2
            )
            self.grouped_gemm = False
            return self._ffn(xs, segments, "segment")

    def forward(self, x: Tensor, routing: Routing) -> Tensor:
        """``x [T, d]``, any Routing over T tokens and E experts -> ``y [T, d]``.

        Where ``h < d`` (full precision) the combine weights scale the hidden rows
        ``[N, h]`` before the output projection instead of the output rows ``[N, d]``
        (``w (h W) = (w h) W``: less memory traffic each way), and the output bias enters
        as ``combine [T, E] @ b_out`` (when the dense combine matrix is at most 64x
        the entries) instead of one bias row per entry.
        """
        self.check_call(x, routing)
        plan = ExpertDispatch.plan(routing)
        if self._cache_local_loop(x, routing.num_entries):
            return self._loop(x, plan.token, plan.weight, plan.segments.sizes())
        xs = plan.gather(x)
        if not self._weights_hidden_rows(x, routing):
            return plan.combine(self.run_sorted(xs, plan.segments), x.shape[0], x.dtype)
        kernel = self.kernel(xs)
        try:
            ys = self._ffn(xs, plan.segments, kernel, row_weight=plan.weight, output_bias=False)
        except RuntimeError:
            if kernel != "grouped" or self.grouped_gemm is True:
                raise
            return plan.combine(self.run_sorted(xs, plan.segments), x.shape[0], x.dtype)
        y = x.new_zeros((x.shape[0], self.d_model)).index_add(0, plan.token, ys)
        if self.b_out is not None:
            y = y + routing.to_dense().to(x.dtype) @ self.b_out
        return y

    def _cache_local_loop(self, x: Tensor, num_entries: int) -> bool:
        """The measured CPU rule (module docstring): ``"auto"`` on CPU with at least
        ``max(96, h / 16)`` entries per expert on average runs each expert's whole FFN,
        forward and backward, in one go on rows still in cache."""
        rows_per_expert = num_entries / self.num_experts
        return (
            self.grouped_gemm == "auto"
            and x.device.type == "cpu"
            and rows_per_expert >= max(96, self.d_hidden / 16)
            and not torch.compiler.is_compiling()
        )

    def _loop(
        self, x: Tensor, token: Tensor | None, weight: Tensor | None, sizes: list[int]
    ) -> Tensor:
        """The CPU per-expert loop (:class:`_ExpertLoopFFN`)."""
        out = _ExpertLoopFFN.apply(
            x,
            token,
            weight,
            sizes,
            self.activation,
            self.w_in,
            self.w_out,
            self.b_in,
            self.b_out,
            self.w_gate,
        )
        return cast(Tensor, out)

    def _weights_hidden_rows(self, x: Tensor, routing: Routing) -> bool:
        if self.d_hidden >= self.d_model or x.dtype in (torch.float16, torch.bfloat16):
            return False
        dense = routing.num_tokens * routing.num_experts
        return self.b_out is None or dense <= 64 * max(routing.num_entries, 1)

    def _ffn(
        self,
        xs: Tensor,
        segments: ExpertSegments,
        kernel: str,
        *,
        row_weight: Tensor | None = None,
        output_bias: bool = True,
    ) -> Tensor:
        """The FFN of sorted rows ``xs [N, d]``; ``row_weight [N]`` scales each hidden row
        before the output projection; ``output_bias=False`` leaves ``b_out`` out."""
        h = grouped_linear(xs, self.w_in, self.b_in, segments, kernel)
        if self.activation == "swiglu":
            assert self.w_gate is not None
            h = F.silu(grouped_linear(xs, self.w_gate, None, segments, kernel)) * h
        elif self.activation == "relu":
            h = F.relu(h, inplace=True)  # h is not saved by its producer
        else:
            h = _ACTIVATION_FNS[self.activation](h)
        if row_weight is not None:
            h = h * row_weight.to(h.dtype).unsqueeze(1)
        bias = self.b_out if output_bias else None
        return grouped_linear(h, self.w_out, bias, segments, kernel)

    def loop_forward(self, x: Tensor, routing: Routing) -> Tensor:
        """Reference: the plain per-expert loop (:meth:`ExpertDispatch.run_segments`,
        autograd through every expert's own ops). Slow; for tests."""
        self.check_call(x, routing)
        plan = ExpertDispatch.plan(routing)
        return plan.run_segments(x, self.expert_forward, self.d_model)

    def dense_forward(self, x: Tensor, routing: Routing) -> Tensor:
        """Reference: every expert on every token, masked by the dense combine matrix.

        ``y = sum_e combine[:, e] * FFN_e(x)`` with ``combine = routing.to_dense() [T, E]``.
        O(T * E) work; for tests and tiny cases.
        """
        self.check_call(x, routing)
        combine = routing.to_dense().to(x.dtype)
        out = x.new_zeros(x.shape)
        for e in range(self.num_experts):
            out = out + combine[:, e : e + 1] * self.expert_forward(e, x)
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
        self.d_out = None if d_out is None else require_int("d_out", d_out, 1)

    def _width(self, x: Tensor) -> int:
        return self.d_out if self.d_out is not None else x.shape[1]

    def forward(self, x: Tensor, routing: Routing) -> Tensor:
        self.check_call(x, routing)
        plan = ExpertDispatch.plan(routing)
        try:
            return plan.run_segments(x, lambda e, rows: self.experts[e](rows), self._width(x))
        except ValueError as err:
            raise ValueError(f"{err}; pass d_out= to ModuleExperts") from None

    def run_sorted(self, xs: Tensor, counts: ExpertSegments | Tensor | Sequence[int]) -> Tensor:
        segments = as_segments(counts, xs)
        parts = torch.split(xs, segments.sizes())
        outs = [self.experts[e](rows) for e, rows in enumerate(parts) if rows.shape[0]]
        return torch.cat(outs) if outs else xs.new_zeros((0, self._width(xs)))

    def dense_forward(self, x: Tensor, routing: Routing) -> Tensor:
        """Reference: every expert on every token, masked by the dense combine matrix."""
        self.check_call(x, routing)
        combine = routing.to_dense().to(x.dtype)
        return sum(combine[:, e : e + 1] * m(x) for e, m in enumerate(self.experts))
