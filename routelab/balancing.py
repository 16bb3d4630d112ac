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

__all__ = ["BalancingState", "in_backward_recompute", "update_balancing"]


def in_backward_recompute() -> bool:
    """True while autograd runs a backward pass (a checkpointed forward being recomputed)."""
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
    """

    observe_in_eval: bool = False

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
                buffer.add_(value.to(device=buffer.device, dtype=buffer.dtype))
            self.pending_observations.add_(1.0)
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


def update_balancing(module: nn.Module, group: dist.ProcessGroup | None = None) -> int:
    """Call :meth:`BalancingState.update` on every controller inside ``module`` (in
    ``named_modules`` order, so every rank runs the collectives in the same order).
    Returns the number of controllers that applied an update."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    return sum(
        int(m.update(group)) for _, m in module.named_modules() if isinstance(m, BalancingState)
    )
