"""Capture every MoE layer's routing of a ``transformers`` model during a normal forward.

:class:`RoutingCapture` puts a forward hook on each router module the registry names
(:func:`routelab.hf.router_spec`); every call becomes a :class:`LayerRouting` holding
the Routing exactly as the model used it (indices and weights from the router's own
output, ``probs`` the score function of its logits) and the registry's re-selection
on those scores (a check that the spec describes the model).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, cast

import torch
from torch import Tensor, nn

from routelab.hf.registry import RouterSpec, router_spec
from routelab.routing import Routing

__all__ = ["LayerRouting", "RoutingCapture", "find_routers", "routing_from_router_output"]


def find_routers(model: nn.Module, spec: RouterSpec | None = None) -> list[tuple[str, nn.Module]]:
    """``[(module path, router module)]`` of every MoE layer, in model order."""
    spec = router_spec(model) if spec is None else spec
    found = [(n, m) for n, m in model.named_modules() if type(m).__name__ == spec.router_class]
    if not found:
        raise ValueError(f"the model has no {spec.router_class} module")
    return found


@dataclass(frozen=True)
class LayerRouting:
    """One router call of one MoE layer.

    Fields:
        layer: index of the layer in model order; name: its router's module path.
        routing: the Routing the model used (T = tokens of the call, flattened
            batch-major; k entries per token by descending weight, weights as the experts
            apply them; entries
            a capacity limit removed are in ``routing.dropped``); ``probs [T, E]``.
        chosen: the router's choice before any capacity limit (``routing`` itself
            where the router has none): the counterfactuals start from it.
        k: experts per token.
        spec_agreement: fraction of tokens whose expert set the registry's re-selection
            on ``probs`` reproduces (1.0 when the spec describes the model).
        spec, module: the registry entry and the router module (for re-selection:
            ``spec.select(chosen.probs, module, k, extra_bias)``).
    """

    layer: int
    name: str
    routing: Routing
    chosen: Routing
    k: int
    spec_agreement: float
    spec: RouterSpec = field(repr=False)
    module: nn.Module = field(repr=False)


def _same_sets(a: Tensor, b: Tensor) -> Tensor:
    """bool ``[T]``: rows of ``a [T, k]`` and ``b [T, k]`` hold the same set."""
    return (a.sort(-1).values == b.sort(-1).values).all(-1)


def routing_from_router_output(
    spec: RouterSpec, module: nn.Module, output: Any, *, layer: int = 0, name: str = ""
) -> LayerRouting:
    """The :class:`LayerRouting` of one router call's ``output`` (see the module docstring)."""
    logits, indices, weights, kept = spec.unpack(module, output)
    logits = logits.detach()
    probs = spec.scores(logits)
    # each token's entries by descending weight (choice rank 0 first, as Routing.from_topk
    # lays out a top-k gate; DeepSeek's routers return them unsorted)
    weights, order = weights.detach().float().sort(dim=-1, descending=True, stable=True)
    indices = indices.detach().long().gather(1, order)
    if kept is not None:
        kept = kept.gather(1, order)
    E = probs.shape[-1]
    chosen = Routing.from_topk(indices, weights, E, probs=probs)
    if kept is None:
        routing = chosen
    else:
        flat = kept.reshape(-1)
        routing = chosen.select(flat)
        dropped = chosen.select(~flat)
        routing = Routing(
            routing.token,
            routing.expert,
            routing.weight,
            routing.num_tokens,
            E,
            probs=probs,
            dropped=Routing(dropped.token, dropped.expert, dropped.weight, dropped.num_tokens, E),
        )
    k = indices.shape[1]
    again = spec.select(probs, module, k=k)
    agreement = float(_same_sets(again, indices).double().mean()) if indices.shape[0] else 1.0
    return LayerRouting(layer, name, routing, chosen, k, agreement, spec, module)


class RoutingCapture:
    """Record the routing of every MoE layer of a ``transformers`` model.

    Use::

        with RoutingCapture(model) as capture:
            model(input_ids)
        capture.layers[0][0].routing      # layer 0's Routing of the first forward

    Args:
        model: a ``transformers`` model whose ``config.model_type`` is registered.
        keep: store every LayerRouting in :attr:`layers` (False: only call listeners).
        on_routing: called as ``on_routing(layer_routing)`` for every router call.
        device: where the stored and passed-on routings live (default ``"cpu"``, so that a
            long text does not hold accelerator memory; None keeps the model's device).

    :attr:`layers` holds, per layer (model order, :attr:`names`), one LayerRouting per
    router call. :meth:`remove` (or leaving the ``with`` block) detaches the hooks.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        keep: bool = True,
        on_routing: Callable[[LayerRouting], None] | None = None,
        device: torch.device | str | None = "cpu",
    ) -> None:
        self.spec = router_spec(model)
        self.device = device
        self.routers = find_routers(model, self.spec)
        self.names = [name for name, _ in self.routers]
        self.keep = keep
        self.on_routing = on_routing
        self.layers: list[list[LayerRouting]] = [[] for _ in self.routers]
        self._handles = [
            module.register_forward_hook(self._hook(i, name))
            for i, (name, module) in enumerate(self.routers)
        ]

    def _hook(self, index: int, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            with torch.no_grad():
                record = routing_from_router_output(
                    self.spec, module, output, layer=index, name=name
                )
                if self.device is not None:
                    chosen = record.chosen.to(self.device)
                    same = record.routing is record.chosen
                    routing = chosen if same else record.routing.to(self.device)
                    record = replace(record, routing=routing, chosen=chosen)
            if self.keep:
                self.layers[index].append(record)
            if self.on_routing is not None:
                self.on_routing(record)

        return hook

    @property
    def num_experts(self) -> list[int]:
        """E of every layer."""
        return [int(cast(Any, m).num_experts) for _, m in self.routers]

    def routings(self, layer: int) -> list[Routing]:
        """Every Routing ``layer`` made, in call order."""
        return [record.routing for record in self.layers[layer]]

    def clear(self) -> None:
        for calls in self.layers:
            calls.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> RoutingCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
