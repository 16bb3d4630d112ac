"""Balancing state: controllers that observe routing statistics in ``forward`` and change
their state only in an explicit update step.

Loss-free selection biases (Wang et al. 2024; DeepSeek-V3), pausing totals (Eigen et al.
2013), ReMoE's adaptive L1 coefficient (Wang, Chen & Zhu 2025) and any future controller
share one life cycle:

1. ``forward`` calls :meth:`BalancingState.observe` with the statistics of the batch
   (for example the load per expert ``[E]``). Observations are summed into pending
   buffers; the controller's state (bias, totals, coefficient) does not change.
   Observations made while autograd is running a backward pass are skipped: that is
   activation checkpointing recomputing the forward (``torch.utils.checkpoint``, both
   the reentrant and the non-reentrant variant), so a recomputed forward never counts
   twice. Observations are also skipped in eval mode unless the controller says
   otherwise.
2. The training loop calls :func:`update_balancing` (or ``controller.update()``) once
   per optimiser step, after ``optimizer.step()``. With a process group the pending
   statistics are all-reduced (summed) first, so every rank applies the same update
   and holds the same state; then :meth:`BalancingState.apply_update` changes the
   state and the pending buffers are cleared. Gradient-accumulation micro-batches
   between two updates are therefore summed.

Pending statistics are buffers (saved in the ``state_dict``), so a checkpoint taken
between micro-batches resumes exactly.

Example::

    for x in batches:
        out = model(x)
        (task_loss(out) + out.aux_loss).backward()
        optimizer.step(); optimizer.zero_grad()
        update_balancing(model, group=None)   # every controller in the model
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from routelab._validate import require_float, require_int, validation_enabled
from routelab.losses import expert_load

__all__ = [
    "BalancingState",
    "GlobalLoadCounts",
    "SelectionBias",
    "in_backward_recompute",
    "update_balancing",
]


def in_backward_recompute() -> bool:
    """True while autograd runs a backward pass (a checkpointed forward being recomputed).

    False inside ``torch.compile``: autograd's graph-task id is host state the compiler
    cannot trace, and none is needed there, since a compiled graph applies its buffer
    updates once per forward, also when it checkpoints (``torch.utils.checkpoint`` inside
    the compiled region recomputes activations, never the updates). An eager checkpoint
    around a compiled module does re-run the compiled forward, updates included: put the
    checkpoint inside the compiled region instead.
    """
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


class BalancingState(nn.Module):
    """Base class of a controller with explicitly updated state.

    Subclasses call :meth:`register_statistic` in ``__init__`` for each statistic they
    observe (a name and a shape), call :meth:`observe` in ``forward`` and implement
    :meth:`apply_update`, which receives the statistics summed over every observation
    since the last update (and over the ranks of ``group``) plus ``"observations"``, the
    number of ``observe`` calls summed likewise (a float64 scalar).

    Class attribute ``observe_in_eval``: whether eval-mode forwards are observed too
    (False: eval batches never move the state).

    The controller's buffers keep their dtype when the model is cast
    (``model.to(torch.bfloat16)``, ``.half()``, ``.double()``): only their device follows,
    so counts and biases never lose precision in a half-precision model. Under
    ``DistributedDataParallel`` pass ``broadcast_buffers=False``: the default broadcast
    copies rank 0's buffers, pending sums included, to every rank at each forward, and the
    update step would then sum W copies of rank 0's statistics.
    """

    observe_in_eval: bool = False
    pending_observations: Tensor

    def __init__(self) -> None:
        super().__init__()
        self._statistics: list[str] = []
        self.register_buffer("pending_observations", torch.zeros((), dtype=torch.float64))

    def register_statistic(self, name: str, shape: Sequence[int] | int) -> None:
        """Declare a pending statistic ``name`` of ``shape`` (float64, summed)."""
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"statistic name must be an identifier, got {name!r}")
        if name in self._statistics:
            raise ValueError(f"statistic {name!r} is already registered")
        size = (shape,) if isinstance(shape, int) else tuple(shape)
        self.register_buffer(f"pending_{name}", torch.zeros(size, dtype=torch.float64))
        self._statistics.append(name)

    def pending(self, name: str) -> Tensor:
        """The pending (not yet applied) sum of statistic ``name``."""
        if name not in self._statistics:
            raise KeyError(f"unknown statistic {name!r}; registered: {self._statistics}")
        return getattr(self, f"pending_{name}")

    def observe(self, **statistics: Tensor) -> bool:
        """Add one batch's statistics to the pending sums; returns whether it counted.

        Every registered statistic must be given, with its registered shape. Skipped
        (returns False) during a backward-pass recompute and, unless
        ``observe_in_eval``, in eval mode.
        """
        if set(statistics) != set(self._statistics):
            raise ValueError(
                f"observe() needs exactly the statistics {sorted(self._statistics)}, "
                f"got {sorted(statistics)}"
            )
        if (not self.training and not self.observe_in_eval) or in_backward_recompute():
            return False
        with torch.no_grad():
            for name, value in statistics.items():
                buffer = self.pending(name)
                value = torch.as_tensor(value).detach()
                if tuple(value.shape) != tuple(buffer.shape):
                    raise ValueError(
                        f"statistic {name!r} must have shape {tuple(buffer.shape)}, "
                        f"got {tuple(value.shape)}"
                    )
                # through a 1-d view: torch.compile (2.13, AOTAutograd) drops in-place
                # updates of a 0-dim float64 buffer made directly
                value = value.to(device=buffer.device, dtype=buffer.dtype)
                buffer.view(-1).add_(value.reshape(-1))
            self.pending_observations.view(1).add_(1.0)
        return True

    @torch.no_grad()
    def update(self, group: dist.ProcessGroup | None = None) -> bool:
        """Apply the pending statistics to the state, then clear them.

        With ``group`` (or whenever ``torch.distributed`` is initialised and ``group`` is
        the default group, passed explicitly) the pending sums are all-reduced first, so
        every rank of the group makes the same update. Every rank of the group must call
        it. Returns whether an update was applied (False when nothing was observed on
        any rank).
        """
        names = ["observations", *self._statistics]
        values = [self.pending_observations, *(self.pending(n) for n in self._statistics)]
        if group is not None:
            flat = torch.cat([v.reshape(-1) for v in values])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            offset = 0
            for v in values:
                v.copy_(flat[offset : offset + v.numel()].view_as(v))
                offset += v.numel()
        applied = bool(self.pending_observations > 0)
        if applied:
            self.apply_update(dict(zip(names, (v.clone() for v in values))))
        for v in values:
            v.zero_()
        return applied

    def apply_update(self, statistics: Mapping[str, Tensor]) -> None:
        """Change the state from the summed statistics (float64 tensors)."""
        raise NotImplementedError

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # A cast of the model must not round the controller's state: keep every own
        # buffer's dtype (and values), move it to the device the cast chose.
        kept = {name: buf for name, buf in self._buffers.items() if buf is not None}
        result = super()._apply(fn, recurse)
        for name, original in kept.items():
            moved = self._buffers[name]
            if moved is not None and moved.dtype != original.dtype:
                self._buffers[name] = original.to(device=moved.device)
        return result

    def _load_from_state_dict(  # type: ignore[no-untyped-def]
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
    ) -> None:
        # A controller's state must be finite: a NaN bias or total would silently poison
        # every later selection. Refuse it up front, naming the key.
        for name in self._buffers:
            value = state_dict.get(prefix + name)
            if isinstance(value, Tensor) and value.is_floating_point() and value.numel():
                if not bool(torch.isfinite(value).all()):
                    raise ValueError(
                        f"{type(self).__name__}.load_state_dict: {prefix + name!r} contains "
                        "NaN or inf; balancing state must be finite"
                    )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
        )


class SelectionBias(BalancingState):
    """The auxiliary-loss-free selection bias ``b [E]`` (Wang, Gao, Zhao, Dai & Lin 2024,
    Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts; DeepSeek-V3).

    The bias changes which experts are selected, never the combine weights::

        chosen(x) = TopK(s(x) + b, k)          s(x) [E] the router's scores
        weight(x, i) from s(x) alone            (the router's own weight rule)

    The selection itself is the one token-choice top-k,
    ``routelab.routers.topk.TopKSelection`` (``select(..., selection_bias=bias)`` uses
    :meth:`biased` and observes the choice); a router doing its own selection calls
    :meth:`observe_selection` with the chosen expert ids (or :meth:`observe_load` with a
    load ``[E]``). The loads are summed until the
    explicit update step (:func:`update_balancing` / :meth:`update`, after
    ``optimizer.step()``), which all-reduces them over the process group and applies the
    paper's rule (their Algorithm 1, with ``u = rate``)::

        load_i = entries of expert i since the last update (all micro-batches, all ranks)
        b_i  +=  rate * sign(mean_j(load_j) - load_i)

    Overloaded experts become less attractive, underloaded ones more; an expert exactly at
    the mean keeps its bias. ``bias`` is a float32 buffer (saved in the ``state_dict``,
    not a parameter; loading a non-finite bias raises). Eval-mode forwards and backward
    recomputes (activation checkpointing) are not observed.

    Args:
        num_experts: E.
        rate: the update speed u >= 0 (DeepSeek-V3 uses 1e-3; 0 freezes the bias).
    """

    bias: Tensor

    def __init__(self, num_experts: int, *, rate: float = 1e-3) -> None:
        super().__init__()
        self.num_experts = require_int("num_experts", num_experts, 1)
        self.rate = require_float("rate", rate, minimum=0.0)
        self.register_statistic("load", self.num_experts)
        self.register_buffer("bias", torch.zeros(self.num_experts, dtype=torch.float32))

    def biased(self, scores: Tensor) -> Tensor:
        """``scores + b`` for selection (``scores [..., E]``, detached; in scores' dtype,
        at least fp32)."""
        if scores.shape[-1] != self.num_experts:
            raise ValueError(
                f"scores must have last dimension E = {self.num_experts}, "
                f"got shape {tuple(scores.shape)}"
            )
        dtype = torch.promote_types(scores.dtype, torch.float32)
        return scores.detach().to(dtype) + self.bias.to(device=scores.device, dtype=dtype)

    def observe_selection(self, expert: Tensor) -> bool:
        """Count the chosen expert ids (int tensor of any shape, e.g. ``[T, k]`` or a
        Routing's ``expert [N]``) into the pending load; returns whether it counted."""
        if not isinstance(expert, Tensor) or expert.is_floating_point():
            raise TypeError("expert must be an integer tensor of expert ids")
        flat = expert.detach().reshape(-1).long()
        if (
            validation_enabled()  # a host sync; out-of-range ids still raise in expert_load
            and flat.numel()
            and (int(flat.min()) < 0 or int(flat.max()) >= self.num_experts)
        ):
            raise ValueError(
                f"expert ids out of range [0, {self.num_experts}): "
                f"min {int(flat.min())}, max {int(flat.max())}"
            )
        return self.observe_load(expert_load(flat, self.num_experts))

    def observe_load(self, load: Tensor) -> bool:
        """Add a load ``[E]`` (entries per expert) to the pending load."""
        return self.observe(load=torch.as_tensor(load))

    def apply_update(self, statistics: Mapping[str, Tensor]) -> None:
        load = statistics["load"]
        step = torch.sign(load.mean() - load)
        self.bias.add_((self.rate * step).to(self.bias))

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, rate={self.rate}"


class GlobalLoadCounts(BalancingState):
    """The load per expert over the global batch so far: the counts of the global-batch
    balance loss (Qiu et al. 2025, Demons in the Detail: On Implementing Load Balancing
    Loss for Training Specialized Mixture-of-Expert Models; Qwen3-MoE).

    A training forward calls ``accumulate`` with its micro-batch's load ``[E]`` and
    scores ``[T, E]``. They are observed into the pending sums (this micro-batch
    included), and the pending load, with this micro-batch's token count, is all-reduced
    over ``group`` (one ``[E + 1]`` float64 all-reduce per forward: Qiu et al.'s extra
    communication step). So micro-batch m of an optimiser step sees the load of
    micro-batches 1..m on every rank: the last micro-batch sees the whole global batch
    (Megatron-Core's ``global_aux_loss`` uses the same running counts). The explicit
    update step (``update_balancing``, after ``optimizer.step()``; pass the same
    group) stores the step's global statistics and clears the pending sums, so the next
    step starts from zero:

        step_load [E]   the global batch's load (every micro-batch, every rank)
        step_tokens     its number of tokens
        step_loss       E * sum_i f_i P_i over the global batch (the exact global-batch
                        loss value, unscaled, for logging)

    Exact equality with the loss and gradient on the concatenated global batch holds for
    one micro-batch per step at any world size. With gradient accumulation an earlier
    micro-batch's backward cannot know the later micro-batches' counts (its graph is
    freed before they exist), so its loss uses the counts so far, the same for any split
    of the step's micro-batches over the ranks; ``step_loss`` is still the exact value.

    Eval-mode forwards use the micro-batch's own local load (no collective, nothing
    observed). A backward recompute (activation checkpointing) is not observed again and
    reuses the pending sums, which already hold its micro-batch. Under
    ``DistributedDataParallel`` pass ``broadcast_buffers=False``: its default copies rank
    0's buffers, the pending sums included, to every rank at each forward.

    Args:
        num_experts: E.
        group: the data-parallel process group (None: this process only).
    """

    step_load: Tensor
    step_tokens: Tensor
    step_loss: Tensor

    def __init__(self, num_experts: int, *, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.num_experts = require_int("num_experts", num_experts, 1)
        self.group = group
        self.register_statistic("load", self.num_experts)
        self.register_statistic("probs", self.num_experts)
        self.register_statistic("tokens", ())
        self.register_buffer("step_load", torch.zeros(self.num_experts, dtype=torch.float64))
        self.register_buffer("step_tokens", torch.zeros((), dtype=torch.float64))
        self.register_buffer("step_loss", torch.zeros((), dtype=torch.float64))

    def accumulate(self, load: Tensor, probs: Tensor) -> tuple[Tensor, Tensor]:
        """Observe one micro-batch; return ``(global_load [E], tokens [])``, float64.

        ``load`` int or float ``[E]`` the micro-batch's selections per expert, ``probs
        [T, E]`` its per-token normalised scores. ``global_load`` is the load of this
        step's micro-batches so far on every rank, ``tokens = T_global / W`` with
        ``T_global`` this micro-batch's tokens summed over the W ranks (the normaliser
        that makes the mean of the ranks' losses the global one; see
        ``routelab.losses.load_balance_loss``).
        """
        load = torch.as_tensor(load).detach()
        if tuple(load.shape) != (self.num_experts,) or probs.shape[-1:] != load.shape:
            raise ValueError(
                f"load must be [E] and probs [T, E] with E = {self.num_experts}, got "
                f"{tuple(load.shape)} and {tuple(probs.shape)}"
            )
        tokens = torch.tensor(float(probs.shape[0]), dtype=torch.float64, device=load.device)
        if not self.training:
            return load.to(torch.float64), tokens
        # skipped during a backward recompute, whose micro-batch is already pending
        self.observe(load=load, probs=probs.detach().sum(dim=0), tokens=tokens)
        world = 1
        summed = torch.cat([self.pending("load").to(load.device), tokens.reshape(1)])
        if self.group is not None:
            world = dist.get_world_size(self.group)
            dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=self.group)
        return summed[: self.num_experts], summed[-1] / world

    def apply_update(self, statistics: Mapping[str, Tensor]) -> None:
        load, tokens = statistics["load"], statistics["tokens"]
        self.step_load.copy_(load)
        self.step_tokens.copy_(tokens)
        total = load.sum()
        if bool(total > 0) and bool(tokens > 0):
            mean_prob = statistics["probs"] / tokens
            self.step_loss.copy_(self.num_experts * ((load / total) * mean_prob).sum())
        else:
            self.step_loss.zero_()

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, group={'set' if self.group else None}"


def update_balancing(module: nn.Module, group: dist.ProcessGroup | None = None) -> int:
    """Call :meth:`BalancingState.update` on every controller inside ``module`` (in
    ``named_modules`` order, so every rank runs the collectives in the same order).
    Returns the number of controllers that applied an update."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    return sum(
        int(m.update(group)) for _, m in module.named_modules() if isinstance(m, BalancingState)
    )
