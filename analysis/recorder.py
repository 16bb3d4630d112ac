"""``RoutingRecorder``: streaming routing statistics of every MoE layer of a model.

The recorder registers a forward hook on each :class:`routelab.MoE` (and each
:class:`routelab.soft_moe.SoftMoE`, through the token-level combine-mass view of its
output's ``routing``) inside a model and accumulates, per layer, counts whose size does
not depend on how many tokens were seen:

- load, importance, dropped entries and capacity slots (``O(E)``), for
  :class:`~analysis.metrics.LoadStats` over everything seen and over the current step,
  at two stages: ``"executed"`` (the layer's final routing, after every policy: what the
  experts ran) and ``"router"`` (the router's own choice, before any policy; recorded
  through a hook on the layer's ``router``);
- the expert x label table (``O(E * L)``) when labels are given with
  :meth:`RoutingRecorder.set_labels`;
- the co-activation table of every pair of consecutive MoE layers (``O(E1 * E2)``),
  from the routings of one forward pass of the whole model.

:meth:`RoutingRecorder.step` closes a step and appends that step's load statistics
of every layer to :attr:`RoutingRecorder.history` (and the router-stage statistics to
:attr:`RoutingRecorder.router_history`), one small record per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from analysis.metrics import LoadCounter, LoadStats
from analysis.specialisation import Specialisation, expert_indicator, specialisation
from analysis.validation import as_labels, require_choice, require_int
from routelab.moe import MoE
from routelab.routing import Routing
from routelab.soft_moe import SoftMoE

__all__ = ["RoutingRecorder"]

MODES = ("train", "eval", "all")
STAGES = ("executed", "router")


class _Layer:
    """The accumulators of one MoE layer (executed routing, and the router's own)."""

    def __init__(
        self,
        name: str,
        num_experts: int,
        *,
        null_experts: Sequence[int] = (),
        reference_k: int | None = None,
    ) -> None:
        self.name = name
        self.num_experts = num_experts
        counter: dict[str, Any] = {"null_experts": tuple(null_experts), "reference_k": reference_k}
        self.total = LoadCounter(num_experts, **counter)
        self.current = LoadCounter(num_experts, **counter)
        self.router_total = LoadCounter(num_experts, **counter)
        self.router_current = LoadCounter(num_experts, **counter)
        self.table: Tensor | None = None

    def counters(self) -> tuple[LoadCounter, ...]:
        return (self.total, self.current, self.router_total, self.router_current)


class RoutingRecorder:
    """Record the routing of every MoE layer of ``model`` in streaming form.

    Args:
        model: any ``nn.Module`` containing :class:`routelab.MoE` layers (or one itself).
        num_labels: L, the number of label values for the expert x label tables.
        mode: record routings made in ``"train"`` mode, ``"eval"`` mode, or ``"all"``
            (the MoE layer's ``training`` flag decides). Balanced routers such as BASE
            balance exactly only in training, so balance is usually measured on
            ``"train"`` routings.
        layers: ``[(name, num_experts)]`` to record layers that are not ``routelab.MoE``
            modules (a Hugging Face model's routers, fed by
            ``routelab.hf.RoutingCapture(model, on_routing=...)``): no layer hooks are
            set; call :meth:`record` for each layer's routing during ``model``'s forward
            (the co-activation tables still close with that forward).
        reference_k: the k of the top-k layer the variable-compute statistics compare
            with (``LoadStats.flops_vs_topk``); the expert ids an MoE layer's executor
            runs without FFN compute (``NullExperts.null_expert_ids``) are found by
            themselves, and a SoftMoE's FFN work is its slots, not its dense token view.

    Use::

        recorder = RoutingRecorder(model, num_labels=10, mode="train")
        for x, y in batches:
            recorder.set_labels(y)        # labels [...] matching the tokens of x
            loss = ...model(x)...
            recorder.step()               # closes a step: history gets one record
        recorder.stats(0).cv_load, recorder.specialisation(0).mutual_information
        recorder.remove()                 # or use it as a context manager

    Layers are named by their module path (``recorder.layer_names``) and can be
    addressed by name or by index in model order.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        num_labels: int | None = None,
        mode: str = "all",
        layers: Sequence[tuple[str, int]] | None = None,
        reference_k: int | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        mode = require_choice("mode", mode, MODES)
        if num_labels is not None:
            num_labels = require_int("num_labels", num_labels, minimum=1)
        self.mode = mode
        self.num_labels = num_labels
        self._layers: list[_Layer] = []
        self._handles: list[Any] = []
        self._labels: Tensor | None = None
        self._forward: dict[int, Tensor] = {}
        self._coact: dict[tuple[int, int], Tensor] = {}
        self.history: list[dict[str, LoadStats]] = []
        self.router_history: list[dict[str, LoadStats]] = []
        for name, num_experts in layers or ():  # layers recorded by hand (record())
            num_experts = require_int("num_experts", num_experts, 1)
            self._layers.append(_Layer(name, num_experts, reference_k=reference_k))
        for name, module in model.named_modules() if layers is None else ():
            if isinstance(module, (MoE, SoftMoE)):
                index = len(self._layers)
                null = getattr(getattr(module, "experts", None), "null_expert_ids", ())
                self._layers.append(
                    _Layer(
                        name or "moe",
                        module.num_experts,
                        null_experts=null,
                        reference_k=reference_k,
                    )
                )
                # a SoftMoE has no router and no policies: its choice is what it ran
                as_router = isinstance(module, SoftMoE)
                hook = self._hook_for(index, as_router=as_router)
                self._handles.append(module.register_forward_hook(hook))
                router = getattr(module, "router", None)
                if isinstance(router, nn.Module):
                    hook = self._router_hook_for(index, module)
                    self._handles.append(router.register_forward_hook(hook))
        if not self._layers:
            raise ValueError("model contains no routelab.MoE layer to record")
        self._handles.append(model.register_forward_pre_hook(self._begin_forward))
        self._handles.append(model.register_forward_hook(self._end_forward))

    # ------------------------------------------------------------------ hooks
    def _hook_for(self, index: int, *, as_router: bool = False):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if self.mode == "train" and not module.training:
                return
            if self.mode == "eval" and module.training:
                return
            routing = output.routing if hasattr(output, "routing") else output[1]
            slots = getattr(output, "slot_routing", None)  # a SoftMoE runs its slots
            self.record(index, routing, ffn_entries=None if slots is None else slots.num_entries)
            if as_router:
                self._record_router(index, routing, slots)

        return hook

    def _record_router(self, index: int, routing: Routing, slots: Routing | None = None) -> None:
        entry = self._layers[index]
        routing = routing.detach()
        ffn_entries = None if slots is None else slots.num_entries
        entry.router_total.update(routing, ffn_entries=ffn_entries)
        entry.router_current.update(routing, ffn_entries=ffn_entries)

    def _router_hook_for(self, index: int, layer: nn.Module):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if (self.mode == "train" and not layer.training) or (
                self.mode == "eval" and layer.training
            ):
                return
            if (
                isinstance(output, Routing)
                and output.num_experts == self._layers[index].num_experts
            ):
                self._record_router(index, output)

        return hook

    def _begin_forward(self, module: nn.Module, inputs: Any) -> None:
        self._forward.clear()

    def _end_forward(self, module: nn.Module, inputs: Any, output: Any) -> None:
        for i in range(len(self._layers) - 1):
            a, b = self._forward.get(i), self._forward.get(i + 1)
            if a is None or b is None or a.shape[0] != b.shape[0]:
                continue
            pair = (a.T @ b).round().long()
            key = (i, i + 1)
            self._coact[key] = self._coact[key] + pair if key in self._coact else pair
        self._forward.clear()

    # ------------------------------------------------------------------ recording
    def set_labels(self, labels: Tensor | None) -> None:
        """Labels for the tokens of the next forward passes (any shape; flattened to [T]).

        Integers in ``[0, num_labels)``; None stops recording the label tables.
        """
        if labels is not None:
            if self.num_labels is None:
                raise ValueError("give num_labels to RoutingRecorder to record label tables")
            flat = labels.reshape(-1) if isinstance(labels, Tensor) else torch.as_tensor(labels)
            labels, _ = as_labels("labels", flat.reshape(-1), None, self.num_labels)
        self._labels = labels

    def record(self, layer: int | str, routing: Routing, *, ffn_entries: int | None = None) -> None:
        """Add one routing of ``layer`` (the hooks call this; usable by hand too).

        ``ffn_entries``: the rows its FFN experts ran, where that is not the routing's
        entries (a SoftMoE's slots; see ``LoadCounter.update``)."""
        index = self._index(layer)
        entry = self._layers[index]
        if routing.num_experts != entry.num_experts:
            raise ValueError(
                f"layer {entry.name} has {entry.num_experts} experts, routing has "
                f"{routing.num_experts}"
            )
        if self._labels is not None and self._labels.shape[0] != routing.num_tokens:
            raise ValueError(
                f"the labels cover {self._labels.shape[0]} tokens but layer {entry.name} "
                f"routed {routing.num_tokens}; call set_labels with this batch's labels"
            )
        routing = routing.detach()
        entry.total.update(routing, ffn_entries=ffn_entries)
        entry.current.update(routing, ffn_entries=ffn_entries)
        if self._labels is not None:
            assert self.num_labels is not None
            flat = routing.expert.cpu() * self.num_labels + self._labels[routing.token.cpu()]
            counts = torch.bincount(flat, minlength=entry.num_experts * self.num_labels)
            counts = counts.view(entry.num_experts, self.num_labels)
            entry.table = counts if entry.table is None else entry.table + counts
        self._forward[index] = expert_indicator(routing)

    def step(self) -> dict[str, LoadStats]:
        """Close the current step: append its per-layer LoadStats to :attr:`history`
        (executed routing) and :attr:`router_history` (the router's own choice)."""
        record = {layer.name: layer.current.stats() for layer in self._layers}
        self.router_history.append(
            {layer.name: layer.router_current.stats() for layer in self._layers}
        )
        for layer in self._layers:
            layer.current.reset()
            layer.router_current.reset()
        self.history.append(record)
        return record

    def reset(self) -> None:
        """Forget everything recorded (the hooks stay attached)."""
        for layer in self._layers:
            for counter in layer.counters():
                counter.reset()
            layer.table = None
        self._coact.clear()
        self._forward.clear()
        self.history.clear()
        self.router_history.clear()

    def remove(self) -> None:
        """Detach every hook."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> RoutingRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # ------------------------------------------------------------------ results
    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self._layers]

    def _index(self, layer: int | str) -> int:
        if isinstance(layer, str):
            names = self.layer_names
            if layer not in names:
                raise KeyError(f"no MoE layer named {layer!r}; layers are {names}")
            return names.index(layer)
        layer = require_int("layer", layer)
        if not -len(self._layers) <= layer < len(self._layers):
            raise IndexError(f"layer index {layer} out of range for {len(self._layers)} layers")
        return layer % len(self._layers)

    def stats(self, layer: int | str = 0, *, stage: str = "executed") -> LoadStats:
        """LoadStats of everything ``layer`` routed while recording: ``stage="executed"``
        the final routing (after policies), ``"router"`` the router's own choice."""
        entry = self._layers[self._index(layer)]
        return (entry.total if _stage(stage) == "executed" else entry.router_total).stats()

    def table(self, layer: int | str = 0) -> Tensor:
        """int64 ``[E, L]``, the expert x label counts of ``layer``."""
        entry = self._layers[self._index(layer)]
        if entry.table is None:
            if self.num_labels is None:
                raise ValueError("no labels were recorded (give num_labels and set_labels)")
            return torch.zeros(entry.num_experts, self.num_labels, dtype=torch.int64)
        return entry.table.clone()

    def specialisation(self, layer: int | str = 0, *, top: int = 3) -> Specialisation:
        """Specialisation of ``layer`` from its accumulated expert x label table."""
        return specialisation(self.table(layer), top=top)

    def coactivation(self, first: int | str = 0, second: int | str = 1) -> Tensor:
        """int64 ``[E1, E2]``: co-activation counts of two consecutive layers."""
        i, j = self._index(first), self._index(second)
        if j != i + 1:
            raise ValueError(f"co-activation is recorded for consecutive layers, got {i} and {j}")
        if (i, j) in self._coact:
            return self._coact[(i, j)].clone()
        return torch.zeros(
            self._layers[i].num_experts, self._layers[j].num_experts, dtype=torch.int64
        )

    def cv_history(
        self, layer: int | str = 0, field: str = "cv_load", *, stage: str = "executed"
    ) -> list[float]:
        """One value of a LoadStats field per recorded step (default CV of the load),
        of the executed routing or (``stage="router"``) the router's own choice."""
        name = self._layers[self._index(layer)].name
        if field not in LoadStats.__dataclass_fields__:
            raise ValueError(f"field must be a LoadStats field, got {field!r}")
        history = self.history if _stage(stage) == "executed" else self.router_history
        return [float(getattr(step[name], field)) for step in history]


def _stage(stage: str) -> str:
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    return stage
