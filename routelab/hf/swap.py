"""Router swap: run a ``transformers`` MoE model with one layer's router replaced.

:func:`swap_router` puts a forward hook on the layer's router module that replaces its
output: the model's own scores (``probs [T, E]``, its choice and weights) go through a
routelab replacement, and the result is handed to the model's experts in the router's
own output layout. Replacements:

- any ``Routing -> Routing`` policy (``routelab.policies.CapacityPolicy(1.0)``,
  ``LossFreeBalancingPolicy`` ...), applied to the model's routing (its weights kept);
  entries a policy drops get weight 0 (the token passes through the residual);
- a ``routelab.Router``, called on the router's input hidden states ``[T, d]`` and the
  token ids (``HashRouter``);
- :class:`TopK` (a different k), :class:`Balanced` (exact balanced assignment on the
  model's scores), :class:`Hash` (a hash table on token ids): these choose experts and
  weight them the way the model does (``RouterSpec.combine``: renormalised or not,
  scaled).

:func:`next_token_loss` measures the model's mean next-token cross-entropy on a text.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from routelab._validate import require_int
from routelab.hf.capture import find_routers, routing_from_router_output
from routelab.hf.registry import RouterSpec, router_spec
from routelab.router import Router, check_k
from routelab.routers.hash import HashRouter
from routelab.routing import Routing, even_quota
from solvers import balanced_assignment

__all__ = [
    "Balanced",
    "Hash",
    "ScoreReplacement",
    "SwapInput",
    "TopK",
    "balanced_routing",
    "balanced_topk",
    "model_inputs",
    "next_token_loss",
    "padded_topk",
    "swap_router",
]


@dataclass(frozen=True)
class SwapInput:
    """What a replacement sees of one router call.

    Fields: ``routing`` the model's own choice (``probs [T, E]`` set; before any
    capacity limit); ``hidden [T, d]`` the router's input; ``token_ids [T]`` or None;
    ``spec`` and ``module`` the registry entry and router module.
    """

    routing: Routing
    hidden: Tensor
    token_ids: Tensor | None
    spec: RouterSpec
    module: nn.Module

    @property
    def probs(self) -> Tensor:
        assert self.routing.probs is not None
        return self.routing.probs

    def model_weighted(self, indices: Tensor) -> Routing:
        """The Routing of ``indices [T, k]`` weighted as the model weights its choice."""
        weights = self.spec.combine(self.probs, indices, self.module)
        return Routing.from_topk(indices, weights, self.routing.num_experts, probs=self.probs)


class ScoreReplacement:
    """Base of the replacements that choose on the model's own scores: ``route(SwapInput)``."""

    def route(self, given: SwapInput) -> Routing:
        raise NotImplementedError


class TopK(ScoreReplacement):
    """The model's own selection (bias, group limits) with a different ``k``."""

    def __init__(self, k: int) -> None:
        self.k = require_int("k", k, 1)

    def route(self, given: SwapInput) -> Routing:
        k = check_k(self.k, given.routing.num_experts)
        return given.model_weighted(given.spec.select(given.probs, given.module, k=k))

    def __repr__(self) -> str:
        return f"TopK(k={self.k})"


def balanced_topk(scores: Tensor, k: int = 1, *, method: str = "exact") -> Tensor:
    """int64 ``[T, k]``: every expert gets an even share of the T*k entries.

    ``scores [T, E]`` finite. Round j = 1..k solves one balanced assignment
    (:func:`solvers.balanced_assignment`, each token one expert, expert quotas the even
    split of T, the larger quotas rotated between rounds so that the k rounds' totals
    differ by at most one) on the scores with the experts a token already holds excluded.
    For k = 1 this is BASE's assignment (Lewis et al. 2021); for k > 1 each round is
    optimal given the earlier ones (a greedy over rounds, not the joint optimum).
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [T, E], got shape {tuple(scores.shape)}")
    T, E = scores.shape
    k = check_k(k, E)
    s = scores.detach().double()
    if T and not bool(torch.isfinite(s).all()):
        raise ValueError("scores must be finite")
    spread = float(s.max() - s.min()) if T else 0.0
    excluded_score = (float(s.min()) if T else 0.0) - 4.0 * spread - 1.0
    quota = torch.tensor(even_quota(T, E))
    extra = T % E
    chosen = torch.zeros(T, E, dtype=torch.bool)
    rounds = []
    for j in range(k):
        cap = torch.roll(quota, (j * extra) % E)
        masked = s.masked_fill(chosen.to(s.device), excluded_score)
        assignment = balanced_assignment(masked, cap.to(s.device), method=method).assignment
        assignment = torch.as_tensor(assignment, device=scores.device).long()
        rows = torch.arange(T, device=scores.device)
        if bool(chosen[rows.cpu(), assignment.cpu()].any()):
            raise RuntimeError(
                f"round {j + 1} of the balanced top-{k} assignment had to reuse an expert "
                "a token already holds (no feasible balanced round remains)"
            )
        chosen[rows.cpu(), assignment.cpu()] = True
        rounds.append(assignment)
    if not rounds:
        return torch.zeros(T, 0, dtype=torch.long, device=scores.device)
    return torch.stack(rounds, dim=1)


def balanced_routing(
    spec: RouterSpec, module: nn.Module, probs: Tensor, k: int, *, method: str = "exact"
) -> Routing:
    """The exact balanced top-k Routing (:func:`balanced_topk`) on a router's selection
    scores ``probs [T, E]`` plus its selection bias (group limits ignored), weighted as
    the router weights its own choice (``spec.combine``)."""
    scores = probs.float()
    bias = spec.bias_of(module)
    if bias is not None:
        scores = scores + bias.to(scores.device)
    indices = balanced_topk(scores, k, method=method)
    weights = spec.combine(probs, indices, module)
    return Routing.from_topk(indices, weights, probs.shape[1], probs=probs)


class Balanced(ScoreReplacement):
    """Exact balanced assignment on the model's scores (``probs`` plus its selection bias;
    group limits ignored), ``k`` experts per token (see :func:`balanced_topk`), weighted
    as the model weights its choice."""

    def __init__(self, k: int = 1, *, method: str = "exact") -> None:
        self.k = require_int("k", k, 1)
        self.method = method

    def route(self, given: SwapInput) -> Routing:
        return balanced_routing(given.spec, given.module, given.probs, self.k, method=self.method)

    def __repr__(self) -> str:
        return f"Balanced(k={self.k})"


class Hash(ScoreReplacement):
    """Hash routing (Roller et al. 2021) by token id, one expert per token, weighted as
    the model weights its choice.

    Args:
        table: int ``[V]`` of expert ids, or a fitted single-hash ``HashRouter``; token
            ids outside ``[0, V)`` fold in modulo V.
    """

    def __init__(self, table: Tensor | HashRouter) -> None:
        if isinstance(table, HashRouter):
            if table.num_hashes != 1:
                raise ValueError("Hash takes a single-hash table (num_hashes = 1)")
            table = table.table.view(-1)
        if not isinstance(table, Tensor) or table.dim() != 1 or table.dtype.is_floating_point:
            raise TypeError("table must be an int tensor [V] of expert ids or a HashRouter")
        self.table = table.long()

    def route(self, given: SwapInput) -> Routing:
        if given.token_ids is None:
            raise ValueError("Hash needs token ids: run the model with input_ids")
        E = given.routing.num_experts
        if int(self.table.max()) >= E or int(self.table.min()) < 0:
            raise ValueError(f"the hash table's expert ids must lie in [0, {E})")
        ids = torch.remainder(given.token_ids.long(), self.table.numel())
        experts = self.table.to(ids.device)[ids].view(-1, 1)
        return given.model_weighted(experts)

    def __repr__(self) -> str:
        return f"Hash(V={self.table.numel()})"


def padded_topk(routing: Routing) -> tuple[Tensor, Tensor, Tensor]:
    """``(indices [T, m], weights [T, m], valid [T, m])`` of any Routing, ``m`` the most
    entries a token has (at least 1); a token with fewer entries is padded with
    ``valid = False`` (expert 0, weight 0)."""
    T = routing.num_tokens
    counts = routing.entries_per_token()
    m = max(int(counts.max()) if T else 1, 1)
    order = torch.argsort(routing.token, stable=True)
    token = routing.token[order]
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(token.shape[0], device=token.device) - starts[token]
    indices = torch.zeros(T, m, dtype=torch.long, device=routing.device)
    weights = torch.zeros(T, m, dtype=routing.weight.dtype, device=routing.device)
    valid = torch.zeros(T, m, dtype=torch.bool, device=routing.device)
    indices[token, slot] = routing.expert[order]
    weights[token, slot] = routing.weight[order]
    valid[token, slot] = True
    return indices, weights, valid


Replacement = ScoreReplacement | Router | Callable[[Routing], Routing]


def _apply(replacement: Any, given: SwapInput) -> Routing:
    if isinstance(replacement, ScoreReplacement):
        return replacement.route(given)
    if isinstance(replacement, Router):
        return replacement(given.hidden, given.token_ids)
    if callable(replacement):
        return replacement(given.routing)
    raise TypeError(
        "replacement must be a routelab.hf ScoreReplacement (TopK, Balanced, Hash), a "
        f"routelab.Router or a Routing -> Routing policy, got {type(replacement).__name__}"
    )


def _token_stream(layer_name: str, config: Any) -> str:
    """Which forward argument holds the token ids a layer routes."""
    if getattr(config, "is_encoder_decoder", False) and layer_name.startswith("decoder"):
        return "decoder_input_ids"
    return "input_ids"


def _layer_index(names: Sequence[str], layer: int | str) -> int:
    if isinstance(layer, str):
        if layer not in names:
            raise KeyError(f"no router named {layer!r}; routers are {list(names)}")
        return list(names).index(layer)
    layer = require_int("layer", layer)
    if not -len(names) <= layer < len(names):
        raise IndexError(f"layer {layer} out of range for {len(names)} MoE layers")
    return layer % len(names)


@contextlib.contextmanager
def swap_router(
    model: nn.Module, layer: int | str | Sequence[int | str], replacement: Any
) -> Iterator[list[Routing]]:
    """Run ``model`` with the router of ``layer`` (index in model order, a router module
    path, or a list of them; ``"all"`` for every layer) replaced by ``replacement``
    (module docstring).

    Yields a list that collects the replacement Routing of every call. Use::

        with swap_router(model, 0, CapacityPolicy(1.0)) as used:
            loss = next_token_loss(model, windows)
    """
    spec = router_spec(model)
    routers = find_routers(model, spec)
    names = [name for name, _ in routers]
    if layer == "all":
        chosen = list(range(len(routers)))
    elif isinstance(layer, (list, tuple)):
        chosen = [_layer_index(names, item) for item in layer]
    else:
        chosen = [_layer_index(names, cast("int | str", layer))]
    used: list[Routing] = []
    token_ids: dict[str, Tensor] = {}
    config = getattr(model, "config", None)

    def remember_ids(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        token_ids.clear()
        if args and isinstance(args[0], Tensor):
            token_ids["input_ids"] = args[0]
        for key in ("input_ids", "decoder_input_ids"):
            if isinstance(kwargs.get(key), Tensor):
                token_ids[key] = kwargs[key]

    def hook_for(name: str) -> Callable[..., Any]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
            with torch.no_grad():
                record = routing_from_router_output(spec, module, output, name=name)
                hidden = inputs[0].reshape(record.chosen.num_tokens, -1)
                ids = token_ids.get(_token_stream(name, config))
                ids = None if ids is None else ids.reshape(-1)
                if ids is not None and ids.shape[0] != record.chosen.num_tokens:
                    ids = None
                given = SwapInput(record.chosen, hidden, ids, spec, module)
                new = _apply(replacement, given)
                if not isinstance(new, Routing):
                    raise TypeError(f"the replacement returned {type(new).__name__}, not a Routing")
                if (new.num_tokens, new.num_experts) != (
                    record.chosen.num_tokens,
                    record.chosen.num_experts,
                ):
                    raise ValueError(
                        f"the replacement routed T, E = {new.num_tokens}, {new.num_experts}; "
                        f"the layer has {record.chosen.num_tokens}, {record.chosen.num_experts}"
                    )
                used.append(new.detach())
                indices, weights, valid = padded_topk(new)
                return spec.pack(module, output, indices, weights, valid)

        return hook

    handles = [model.register_forward_pre_hook(remember_ids, with_kwargs=True)]
    for i in chosen:
        name, module = routers[i]
        handles.append(module.register_forward_hook(hook_for(name), prepend=True))
    try:
        yield used
    finally:
        for handle in handles:
            handle.remove()


def model_inputs(model: nn.Module, ids: Tensor) -> dict[str, Tensor]:
    """The forward arguments that score ``ids [B, S]`` as next-token prediction: causal
    models get ``input_ids`` and ``labels``; encoder-decoder models (Switch) read ``ids``
    in the encoder and predict them in the decoder (``decoder_input_ids`` the labels
    shifted right)."""
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        shifted = cast(Any, model).prepare_decoder_input_ids_from_labels(labels=ids)
        return {"input_ids": ids, "decoder_input_ids": shifted, "labels": ids}
    return {"input_ids": ids, "labels": ids}


def next_token_loss(
    model: nn.Module,
    windows: Sequence[Tensor],
    *,
    before_window: Callable[[int], None] | None = None,
) -> float:
    """Mean next-token cross-entropy (nats per predicted token) of ``model`` over
    ``windows`` (int64 ``[S]`` or ``[B, S]`` each, moved to the model's device), in eval
    mode without gradients. ``before_window(i)`` is called before window i's forward
    (e.g. to set that window's labels on a recorder)."""
    total, count = 0.0, 0
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        with torch.no_grad():
            for i, ids in enumerate(windows):
                ids = (ids.unsqueeze(0) if ids.dim() == 1 else ids).to(device)
                inputs = model_inputs(model, ids)
                B, S = ids.shape
                predicted = B * S if "decoder_input_ids" in inputs else B * (S - 1)
                if predicted == 0:
                    continue
                if before_window is not None:
                    before_window(i)
                loss = model(**inputs).loss
                total += float(loss) * predicted
                count += predicted
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("windows hold no token to predict (each needs S >= 2)")
    return total / count
