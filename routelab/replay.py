"""Router replay: record every MoE layer's routing in one forward, replay it exactly later.

Megatron-Core's router replay and R3 (rollout routing replay) fix the token-to-expert
choice of a later forward to the one recorded earlier (RL: the rollout's routing is
replayed in the training forward); it also compares two routers on identical
assignments. The experts and the combine weights are recomputed in the replaying
forward, from the current parameters; only the choice of experts is the recorded one.

Usage::

    replay = RouterReplay()
    with replay.record(model):        # every MoE / ExpertParallelMoE layer inside model
        first = model(x)
    with replay.replay(model):        # same experts per token, weights recomputed
        second = model(x)

Layers are keyed by their name in ``model.named_modules()``, so the routing recorded in
one model can be replayed into another with the same layer names (a different router,
for instance); a layer called several times per forward records one routing per call and
replays them in order. What is recorded is the router's output, before the policies;
the policies run again on the replayed routing (a capacity policy drops again by the
same rule). A policy that chooses experts itself (``LossFreeBalancingPolicy``,
``PausingPolicy``) would choose again from its current state: for an exact replay keep
the selection inside the router (``TopKRouter(selection_bias=True)``, whose bias is not
applied to a replayed selection).

How a router replays: a token-choice router (``routelab.routers.topk.
TokenChoiceRouter``: ``TopKGate``, ``TopKRouter``, the cosine gate, ...) implements
``replay_route(x, token_ids, recorded, sequence_length=...)``, which recomputes its
logits, weights, probs and losses for the recorded experts. Any other router is run as
usual and its routing must select the recorded (token, expert) pairs (deterministic
routers such as hash or BASE do); a different selection is a clear error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from routelab.routing import Routing

__all__ = ["RouterReplay", "replay_layers", "run_router"]


def replay_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers of ``model`` whose router call can be recorded and replayed (modules
    with the class flag ``supports_router_replay``: MoE and ExpertParallelMoE), by name."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return [
        (name, m)
        for name, m in model.named_modules()
        if getattr(m, "supports_router_replay", False)
    ]


class RouterReplay:
    """The recorded routings of every MoE layer of a model (see the module docstring).

    ``records`` maps a layer name to the routings recorded for it, in call order
    (``token``, ``expert`` and detached ``weight``; no graph is kept).
    """

    def __init__(self) -> None:
        self._records: dict[str, list[Routing]] = {}

    @property
    def records(self) -> dict[str, tuple[Routing, ...]]:
        return {name: tuple(routings) for name, routings in self._records.items()}

    def load(self, records: Mapping[str, Sequence[Routing]]) -> RouterReplay:
        """Set the routings to replay, per layer name, from elsewhere (another process's
        ``records``, or an inference engine's top-k ids via ``Routing.from_topk``)."""
        if not isinstance(records, Mapping):
            raise TypeError(
                f"records must map layer names to routings, got {type(records).__name__}"
            )
        loaded: dict[str, list[Routing]] = {}
        for name, routings in records.items():
            items = list(routings)
            for routing in items:
                if not isinstance(routing, Routing):
                    raise TypeError(
                        f"records[{name!r}] must hold Routings, got {type(routing).__name__}"
                    )
            loaded[str(name)] = [_recorded(r) for r in items]
        self._records.update(loaded)
        return self

    @contextlib.contextmanager
    def record(self, model: nn.Module) -> Iterator[RouterReplay]:
        """Record the routing of every MoE layer of ``model`` in the forwards run inside
        the block (replacing what was recorded for those layers before)."""
        layers = self._layers(model)
        for name, _ in layers:
            self._records[name] = []
        with self._attached(layers, "record"):
            yield self

    @contextlib.contextmanager
    def replay(self, model: nn.Module) -> Iterator[RouterReplay]:
        """Replay the recorded routings in the forwards run inside the block. Every layer
        of ``model`` must have a recording; a layer called more often than recorded is a
        ValueError."""
        layers = self._layers(model)
        missing = [name for name, _ in layers if name not in self._records]
        if missing:
            raise ValueError(f"no routing was recorded for the layers {missing}")
        with self._attached(layers, "replay"):
            yield self

    def _layers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        layers = replay_layers(model)
        if not layers:
            raise ValueError(f"{type(model).__name__} contains no MoE layer to record or replay")
        return layers

    @contextlib.contextmanager
    def _attached(self, layers: list[tuple[str, Any]], mode: str) -> Iterator[None]:
        busy = [name for name, layer in layers if getattr(layer, "_router_replay", None)]
        if busy:
            raise RuntimeError(f"the layers {busy} are already recording or replaying")
        for name, layer in layers:
            layer._router_replay = _LayerSession(self._records[name], mode, name)
        try:
            yield
        finally:
            for _, layer in layers:
                layer._router_replay = None


class _LayerSession:
    """One layer's recording or replay: its list of routings and a replay cursor."""

    def __init__(self, routings: list[Routing], mode: str, name: str) -> None:
        self.routings, self.mode, self.name, self.cursor = routings, mode, name, 0

    def route(
        self, router: nn.Module, fresh: Callable[[], Routing], call: dict[str, Any]
    ) -> Routing:
        if self.mode == "record":
            routing = fresh()
            self.routings.append(_recorded(routing))
            return routing
        if self.cursor >= len(self.routings):
            raise ValueError(
                f"layer {self.name!r} is called more often than recorded "
                f"({len(self.routings)} routing(s))"
            )
        recorded = self.routings[self.cursor]
        self.cursor += 1
        return replay_routing(router, fresh, recorded, **call)


def _recorded(routing: Routing) -> Routing:
    return Routing(
        token=routing.token.detach().clone(),
        expert=routing.expert.detach().clone(),
        weight=routing.weight.detach().clone(),
        num_tokens=routing.num_tokens,
        num_experts=routing.num_experts,
    )


def replay_routing(
    router: nn.Module,
    fresh: Callable[[], Routing],
    recorded: Routing,
    *,
    x: Tensor,
    token_ids: Tensor | None,
    layout: dict[str, Any],
) -> Routing:
    """``recorded``'s experts with this router's recomputed weights (see the module
    docstring); ``fresh()`` is the router's ordinary routing of the same call."""
    if recorded.num_tokens != x.shape[0]:
        raise ValueError(
            f"the recorded routing has T = {recorded.num_tokens} tokens, this call has "
            f"{x.shape[0]}: replay needs the same batch layout"
        )
    replay_route = getattr(router, "replay_route", None)
    if callable(replay_route):
        return replay_route(x, token_ids, recorded.to(x.device), **layout)
    routing = fresh()
    if not _same_pairs(routing, recorded.to(routing.device)):
        raise ValueError(
            f"{type(router).__name__} cannot replay a different selection (it has no "
            "replay_route); token-choice routers built on routelab.routers.topk can"
        )
    return routing


def _pair_ids(routing: Routing) -> Tensor:
    return torch.sort(routing.token * routing.num_experts + routing.expert).values


def _same_pairs(a: Routing, b: Routing) -> bool:
    return (
        a.num_tokens == b.num_tokens
        and a.num_experts == b.num_experts
        and torch.equal(_pair_ids(a), _pair_ids(b))
    )


def run_router(
    layer: nn.Module,
    router: nn.Module,
    x: Tensor,
    token_ids: Tensor | None,
    *,
    sequence_length: int | None = None,
    fresh: Callable[[], Routing] | None = None,
) -> Routing:
    """The router call of an MoE layer: passes the sequence layout to routers that declare
    ``uses_sequence_layout`` (see ``routelab.Router``) and records or replays the
    routing while ``layer`` is inside ``RouterReplay.record`` / ``replay``.

    ``fresh``: how the layer computes its routing when not replaying (default
    ``router(x, token_ids, ...)``; ExpertParallelMoE's global assignment passes its own).
    """
    layout: dict[str, Any] = {}
    if sequence_length is not None and getattr(router, "uses_sequence_layout", False):
        layout["sequence_length"] = sequence_length
    if fresh is None:

        def fresh() -> Routing:
            return router(x, token_ids, **layout)

    session = getattr(layer, "_router_replay", None)
    if session is None:
        return fresh()
    return session.route(router, fresh, {"x": x, "token_ids": token_ids, "layout": layout})
