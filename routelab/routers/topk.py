"""Token-choice top-k routing: the one selection every token-choice router uses.

``TopKSelection`` is the selection (score function, optional selection bias, group
limits, weight normalisation, routed scaling); ``TokenChoiceRouter`` the base class of
routers built on it (logits -> selection -> Routing, with replay of a recorded
selection); ``TopKGate`` (Shazeer / GShard / Mixtral) and ``TopKRouter`` (the
configurable router of DeepSeek-V2/V3, Qwen-MoE and Megatron-Core) are two of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from routelab._validate import (
    require_bool,
    require_choice,
    require_float,
    require_int,
    validation_enabled,
)
from routelab.balancing import GlobalLoadCounts, SelectionBias
from routelab.losses import (
    check_loss_weight,
    expert_load,
    load_balance_loss,
    router_z_loss,
    sequence_balance_loss,
)
from routelab.router import Router, check_k, check_router_input, router_logits
from routelab.routing import Routing

__all__ = [
    "GROUP_SCORES",
    "SCORE_FUNCTIONS",
    "TOPK_PRESETS",
    "Selection",
    "TokenChoiceRouter",
    "TopKGate",
    "TopKRouter",
    "TopKSelection",
    "topk_indices_of",
    "topk_softmax_routing",
]

SCORE_FUNCTIONS = ("softmax", "sigmoid")
GROUP_SCORES = ("top2", "max")


class Selection(NamedTuple):
    """The result of ``TopKSelection.select`` for ``T`` tokens and ``E`` experts.

    ``indices`` int64 ``[T, k]`` the chosen experts (in selection order), ``weights``
    ``[T, k]`` their combine weights (differentiable), ``probs`` ``[T, E]`` the scores
    normalised per token (``softmax(logits)``, or ``sigmoid / sum sigmoid``): the ``s'``
    of the balance losses and the Routing's ``probs``.
    """

    indices: Tensor
    weights: Tensor
    probs: Tensor

    def routing(self, num_experts: int, aux: dict[str, Tensor] | None = None) -> Routing:
        """The Routing of this selection (token-major entries, ``probs`` attached)."""
        return Routing.from_topk(self.indices, self.weights, num_experts, probs=self.probs, aux=aux)


@dataclass(frozen=True)
class TopKSelection:
    """Token-choice top-k selection, configurable as the routers of today's MoE models.

    From ``logits [T, E]`` (``x W``, at least fp32)::

        s = softmax(logits)  or  sigmoid(logits)                      scores    [T, E]
        v = logits if softmax_after_topk else s                       selection values
        (group-limited)  E experts in G contiguous groups of E/G; a group's score is the
                         sum of its top-2 values of v + b (or its max); only the top-M
                         groups stay
        chosen = TopK(v + b, k)                b [E] the selection bias (or 0)
        w = softmax(logits[chosen])                      if softmax_after_topk
        w = s[chosen] / sum s[chosen]  (normalize)       else; or w = s[chosen]
        w = scaling_factor * w                                        weights   [T, k]

    The selection bias (auxiliary-loss-free balancing, Wang et al. 2024; DeepSeek-V3
    ``TopK(s + b)``) changes which experts are chosen, never the weights, which always
    come from the unbiased ``s`` (or logits). Group-limited routing is DeepSeek-V2's
    device-limited and DeepSeek-V3's node-limited routing: V3 ranks groups by the sum of
    their two highest ``s + b`` (``group_score="top2"``; a group of one expert uses that
    one), V2 by their highest score (``group_score="max"``).

    ``softmax_after_topk`` (Mixtral, GShard; ``TopKGate``) gives the same weights as the
    normalised softmax-before form when nothing else differs; it changes the result with
    a selection bias or group limits (they then act on logits, not probabilities) and it
    is always normalised (``normalize=False`` with it is an error). With sigmoid scores
    and ``k = 1``, ``normalize=True`` makes the weight 1; ``normalize=False`` keeps
    ``s``. A normalised weight row whose chosen scores all underflow to 0 is uniform
    ``1 / k``. Ties are broken by ``torch.topk`` (deterministic on one device, not by
    expert id).

    Fields:
        k: experts per token.
        score: ``"softmax"`` or ``"sigmoid"``.
        normalize: divide the chosen scores by their sum.
        scaling_factor: the routed scaling factor (DeepSeek-V3: 2.5), > 0.
        softmax_after_topk: softmax over the k chosen logits (score must be softmax).
        num_groups: G, or None for no group limit (E must be divisible by G).
        top_groups: M, the groups kept, ``1 <= M <= G`` (required with ``num_groups``).
        group_score: how groups are ranked, ``"top2"`` (V3) or ``"max"`` (V2).
    """

    k: int = 2
    score: str = "softmax"
    normalize: bool = True
    scaling_factor: float = 1.0
    softmax_after_topk: bool = False
    num_groups: int | None = None
    top_groups: int | None = None
    group_score: str = "top2"

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "k", require_int("k", self.k, 1))
        set_(self, "score", require_choice("score", self.score, SCORE_FUNCTIONS))
        set_(self, "normalize", require_bool("normalize", self.normalize))
        set_(self, "group_score", require_choice("group_score", self.group_score, GROUP_SCORES))
        set_(
            self,
            "scaling_factor",
            require_float("scaling_factor", self.scaling_factor, above=0.0),
        )
        set_(
            self, "softmax_after_topk", require_bool("softmax_after_topk", self.softmax_after_topk)
        )
        if self.softmax_after_topk and self.score != "softmax":
            raise ValueError("softmax_after_topk=True needs score='softmax', got score='sigmoid'")
        if self.softmax_after_topk and not self.normalize:
            raise ValueError(
                "softmax_after_topk=True is always normalised (a softmax over the k chosen "
                "logits); normalize=False needs softmax_after_topk=False"
            )
        if (self.num_groups is None) != (self.top_groups is None):
            raise ValueError(
                "group-limited routing needs both num_groups and top_groups, got "
                f"num_groups={self.num_groups!r}, top_groups={self.top_groups!r}"
            )
        if self.num_groups is not None:
            set_(self, "num_groups", require_int("num_groups", self.num_groups, 1))
            set_(self, "top_groups", require_int("top_groups", self.top_groups, 1, self.num_groups))

    def check(self, num_experts: int) -> TopKSelection:
        """Raise a clear error unless this selection fits E experts; returns ``self``."""
        check_k(self.k, num_experts)
        if self.num_groups is not None:
            assert self.top_groups is not None
            if num_experts % self.num_groups:
                raise ValueError(
                    f"num_experts = {num_experts} must be divisible by num_groups = "
                    f"{self.num_groups}"
                )
            allowed = self.top_groups * (num_experts // self.num_groups)
            if self.k > allowed:
                raise ValueError(
                    f"k = {self.k} exceeds the {allowed} experts of the top_groups = "
                    f"{self.top_groups} groups kept (of {num_experts // self.num_groups} each)"
                )
        return self

    # ------------------------------------------------------------------ the selection
    def scores(self, logits: Tensor) -> Tensor:
        """``s = softmax(logits)`` or ``sigmoid(logits)`` ``[T, E]``."""
        return torch.softmax(logits, dim=-1) if self.score == "softmax" else torch.sigmoid(logits)

    def select(
        self,
        logits: Tensor,
        *,
        selection_bias: SelectionBias | Tensor | None = None,
        indices: Tensor | None = None,
    ) -> Selection:
        """Select k experts per token from ``logits [T, E]``; see the class docstring.

        ``selection_bias``: a ``routelab.balancing.SelectionBias`` (its ``b [E]``;
        the chosen experts are observed into its pending load) or a tensor broadcastable
        to ``[T, E]`` added to the selection values. ``indices`` int ``[T, k]``: use this
        selection instead of choosing (router replay; nothing is observed); the weights
        are computed for it as for a chosen one.
        """
        if logits.dim() != 2:
            raise ValueError(f"logits must be [T, E], got shape {tuple(logits.shape)}")
        if not self.softmax_after_topk:
            return self.select_scores(
                self.scores(logits), selection_bias=selection_bias, indices=indices
            )
        self.check(logits.shape[-1])
        indices = self._indices(logits, selection_bias, indices)
        weights = torch.softmax(logits.gather(-1, indices), dim=-1)
        return Selection(indices, self._scaled(weights), torch.softmax(logits, dim=-1))

    def select_scores(
        self,
        scores: Tensor,
        *,
        selection_bias: SelectionBias | Tensor | None = None,
        indices: Tensor | None = None,
    ) -> Selection:
        """The same selection from scores ``s [T, E]`` already computed (a softmax or
        sigmoid output, or any router's ``probs``): ``TopK(s + b)``, weights ``s[chosen]``
        (normalised, scaled). ``probs`` is ``s`` for ``score="softmax"`` (taken as
        normalised) and ``s / sum s`` for ``"sigmoid"``. Not for ``softmax_after_topk``,
        which needs the logits."""
        if self.softmax_after_topk:
            raise ValueError("softmax_after_topk selects on logits: call select(logits)")
        if scores.dim() != 2:
            raise ValueError(f"scores must be [T, E], got shape {tuple(scores.shape)}")
        self.check(scores.shape[-1])
        if self.score == "softmax":
            probs = scores
        else:
            tiny = torch.finfo(scores.dtype).tiny
            probs = scores / scores.sum(dim=-1, keepdim=True).clamp_min(tiny)
        indices = self._indices(scores, selection_bias, indices)
        weights = scores.gather(-1, indices)
        if self.normalize:
            weights = _normalise_rows(weights)
        return Selection(indices, self._scaled(weights), probs)

    def _indices(
        self, values: Tensor, selection_bias: SelectionBias | Tensor | None, indices: Tensor | None
    ) -> Tensor:
        if indices is None:
            return self._choose(values.detach(), selection_bias)
        return _check_indices(indices, values.shape[0], self.k, values.shape[-1])

    def _scaled(self, weights: Tensor) -> Tensor:
        return weights * self.scaling_factor if self.scaling_factor != 1.0 else weights

    def _choose(self, values: Tensor, selection_bias: SelectionBias | Tensor | None) -> Tensor:
        if isinstance(selection_bias, SelectionBias):
            biased = selection_bias.biased(values)
        elif selection_bias is not None:
            biased = values + selection_bias.to(values)
        else:
            biased = values
        if self.num_groups is not None:
            biased = self._mask_groups(biased)
        indices = torch.topk(biased, self.k, dim=-1).indices  # [T, k]
        if isinstance(selection_bias, SelectionBias):
            selection_bias.observe_selection(indices)
        return indices

    def _mask_groups(self, values: Tensor) -> Tensor:
        """``values [T, E]`` with every expert outside its token's top-M groups at -inf."""
        assert self.num_groups is not None and self.top_groups is not None
        num_tokens, num_experts = values.shape
        grouped = values.view(num_tokens, self.num_groups, num_experts // self.num_groups)
        per_group = min(2 if self.group_score == "top2" else 1, grouped.shape[-1])
        group_score = grouped.topk(per_group, dim=-1).values.sum(dim=-1)  # [T, G]
        kept = group_score.topk(self.top_groups, dim=-1).indices  # [T, M]
        keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, kept, True)
        masked = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf"))
        return masked.view(num_tokens, num_experts)


def _normalise_rows(weights: Tensor) -> Tensor:
    """``w / sum(w)`` per row ``[T, k]``; a row summing to 0 becomes uniform ``1 / k``."""
    total = weights.sum(dim=-1, keepdim=True)
    positive = total > 0
    safe = torch.where(positive, total, torch.ones_like(total))
    return torch.where(positive, weights / safe, torch.full_like(weights, 1.0 / weights.shape[-1]))


def _check_indices(indices: object, num_tokens: int, k: int, num_experts: int) -> Tensor:
    if not isinstance(indices, Tensor) or indices.is_floating_point():
        raise TypeError("indices must be an int64 tensor [T, k] of expert ids")
    if tuple(indices.shape) != (num_tokens, k):
        raise ValueError(
            f"indices must be [T, k] = [{num_tokens}, {k}], got {tuple(indices.shape)}"
        )
    indices = indices.long()
    if not validation_enabled():  # the value checks below sync with the host
        return indices
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= num_experts):
        raise ValueError(f"indices must be expert ids in [0, {num_experts})")
    if k > 1 and indices.numel():
        ordered = indices.sort(dim=-1).values
        if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
            raise ValueError("indices repeat an expert within a token")
    return indices


def topk_indices_of(routing: Routing, k: int) -> Tensor:
    """int64 ``[T, k]``: a routing's experts per token, in entry order (token-major
    routings from ``Routing.from_topk`` keep their selection order). Raises a
    ValueError unless every token has exactly k entries."""
    per_token = routing.entries_per_token()
    if routing.num_tokens and not bool((per_token == k).all()):
        raise ValueError(
            f"the recorded routing must give every token exactly k = {k} entries "
            f"(it has between {int(per_token.min())} and {int(per_token.max())})"
        )
    order = torch.argsort(routing.token, stable=True)
    return routing.expert[order].view(routing.num_tokens, k)


def topk_softmax_routing(
    logits: Tensor,
    k: int,
    aux: dict[str, Tensor] | None = None,
    *,
    select_logits: Tensor | None = None,
) -> Routing:
    """``softmax(KeepTopK(logits, k))`` as a Routing; ``logits [T, E]``.

    ``TopKSelection(k, softmax_after_topk=True)``. ``select_logits [T, E]`` (default:
    ``logits``) chooses which k experts are kept, the weights always come from
    ``logits``: noisy gating selects on the noisy logits, and loss-free balancing on
    biased ones.
    """
    selection = TopKSelection(k, softmax_after_topk=True)
    indices = None
    if select_logits is not None:
        indices = torch.topk(select_logits, selection.k, dim=-1).indices
    return selection.select(logits, indices=indices).routing(logits.shape[-1], aux)


# ---------------------------------------------------------------------- routers
class TokenChoiceRouter(Router):
    """Base class of token-choice routers: ``logits(x) [T, E] -> TopKSelection -> Routing``.

    Subclasses implement ``logits`` (use ``routelab.router.router_logits`` for
    fp32 operands) and may extend ``aux_losses``. The base class selects with
    ``self.selection``, adds the router z-loss (Zoph et al. 2022, ST-MoE eq. 5:
    ``z_weight * (1/T) sum_x logsumexp(logits(x))^2``, entry ``aux["z"]``) and supports
    router replay (``replay_route``: the recorded experts, weights recomputed).

    Args:
        d_model: d.
        num_experts: E.
        selection: the ``TopKSelection``.
        z_weight: the z-loss coefficient >= 0 (0: off).
        selection_bias: a ``routelab.balancing.SelectionBias`` over E experts, or None.
    """

    uses_sequence_layout = True

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        selection: TopKSelection,
        *,
        z_weight: float = 0.0,
        selection_bias: SelectionBias | None = None,
    ) -> None:
        super().__init__(d_model, num_experts)
        if not isinstance(selection, TopKSelection):
            raise TypeError(f"selection must be a TopKSelection, got {type(selection).__name__}")
        self.selection = selection.check(num_experts)
        self.z_weight = check_loss_weight("z_weight", z_weight)
        if selection_bias is not None:
            if not isinstance(selection_bias, SelectionBias):
                raise TypeError(
                    f"selection_bias must be a SelectionBias, got {type(selection_bias).__name__}"
                )
            if selection_bias.num_experts != num_experts:
                raise ValueError(
                    f"selection_bias has {selection_bias.num_experts} experts, expected "
                    f"{num_experts}"
                )
        self.selection_bias = selection_bias

    @property
    def k(self) -> int:
        return self.selection.k

    def logits(self, x: Tensor) -> Tensor:
        """The router logits ``[T, E]`` of validated ``x [T, d]`` (at least fp32)."""
        raise NotImplementedError

    def aux_losses(
        self, logits: Tensor, selection: Selection, sequence_length: int | None
    ) -> dict[str, Tensor]:
        """The named, weighted auxiliary losses of one batch (base: the z-loss)."""
        if self.z_weight > 0:
            return {"z": self.z_weight * router_z_loss(logits)}
        return {}

    def route(
        self, x: Tensor, token_ids: Tensor | None, *, sequence_length: int | None = None
    ) -> Routing:
        return self._route(x, sequence_length, None)

    def replay_route(
        self,
        x: Tensor,
        token_ids: Tensor | None,
        recorded: Routing,
        *,
        sequence_length: int | None = None,
    ) -> Routing:
        """The routing of ``x [T, d]`` with the experts of ``recorded`` (k per token) and
        weights, probs and losses recomputed from this router's current parameters."""
        check_router_input(x, self.d_model, token_ids, need_token_ids=self.requires_token_ids)
        if recorded.num_tokens != x.shape[0] or recorded.num_experts != self.num_experts:
            raise ValueError(
                f"recorded routing is over T = {recorded.num_tokens}, E = "
                f"{recorded.num_experts}; this call has T = {x.shape[0]}, E = {self.num_experts}"
            )
        return self._route(x, sequence_length, topk_indices_of(recorded, self.k))

    def _route(self, x: Tensor, sequence_length: int | None, indices: Tensor | None) -> Routing:
        logits = self.logits(x)
        bias = self.selection_bias if indices is None else None
        selection = self.selection.select(logits, selection_bias=bias, indices=indices)
        if indices is not None and self.selection_bias is not None:
            self.selection_bias.observe_selection(selection.indices)
        aux = self.aux_losses(logits, selection, sequence_length)
        return selection.routing(self.num_experts, aux)

    def extra_repr(self) -> str:
        s = self.selection
        text = f"{super().extra_repr()}, k={s.k}, score={s.score!r}"
        if not s.normalize:
            text += ", normalize=False"
        if s.scaling_factor != 1.0:
            text += f", scaling_factor={s.scaling_factor}"
        if s.num_groups is not None:
            text += f", num_groups={s.num_groups}, top_groups={s.top_groups}"
            if s.group_score != "top2":
                text += f", group_score={s.group_score!r}"
        if self.z_weight:
            text += f", z_weight={self.z_weight}"
        return text


class TopKGate(TokenChoiceRouter):
    """Top-k gate (Shazeer et al. 2017 without noise; GShard/Mixtral-style routing).

    Formula::

        logits = x W + b                                   [T, E]
        TopK(v, k)_i = v_i if v_i is among the k largest of v, else -inf
        G(x) = softmax(TopK(logits, k))                    [T, E], k non-zeros per row

    ``TopKSelection(k, softmax_after_topk=True)``. Each token gets exactly k entries
    (ties broken by torch.topk, deterministically) whose weights sum to 1. ``probs`` holds
    the full ``softmax(logits) [T, E]``. With k = 1 the weight is exactly 1, so no
    gradient reaches the gate (``differentiable`` is False); SwitchGate keeps the
    probability as the weight.

    Args:
        d_model: d.
        num_experts: E.
        k: experts per token, ``1 <= k <= E``.
        bias: whether the gate has a bias b.
        z_weight: router z-loss coefficient (``aux["z"]``), 0 by default.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        k: int = 2,
        bias: bool = True,
        z_weight: float = 0.0,
    ) -> None:
        selection = TopKSelection(check_k(k, num_experts), softmax_after_topk=True)
        super().__init__(d_model, num_experts, selection, z_weight=z_weight)
        self.differentiable = self.k > 1 or self.z_weight > 0
        self.proj = nn.Linear(d_model, num_experts, bias=bias)

    def logits(self, x: Tensor) -> Tensor:
        return router_logits(x, self.proj.weight.t(), self.proj.bias)


class TopKRouter(TokenChoiceRouter):
    """The configurable token-choice router of DeepSeek-V2/V3, Qwen-MoE and Megatron-Core.

    ``logits = x W`` (fp32 operands, ``W [d, E]``, no bias), then the
    ``TopKSelection`` (score function, normalisation, routed scaling factor,
    softmax before / after the top-k, group-limited routing, selection bias), then the
    auxiliary losses below, each off at weight 0 (entries of ``Routing.aux``). ``s'`` is
    the routing's ``probs [T, E]`` (scores normalised per token), ``TopK(t)`` the experts
    actually chosen for token t, ``load_i`` the number of tokens choosing expert i:

    - ``balance`` (Switch / GShard for top-k; Fedus et al. 2021, Megatron-Core's
      ``aux_loss``), over the batch:
      ``balance_weight * E * sum_i (load_i / (k T)) * (1/T) sum_t s'_{t,i}``.
    - ``sequence_balance`` (DeepSeek-V3's complementary sequence-wise loss, eq. 17-20):
      per sequence of S tokens ``sum_i f_i P_i`` with ``f_i = E/(k S) sum_t 1[i in TopK(t)]``,
      ``P_i = (1/S) sum_t s'_{t,i}``, averaged over the sequences, times
      ``sequence_balance_weight`` (alpha). The sequences are the router's sequence
      layout (``MoE`` passes ``x [B, S, d]``'s S; without it the batch is one sequence).
    - ``global_balance`` (Qiu et al. 2025, Demons in the Detail; Qwen3-MoE): the balance
      loss with ``load_i`` counted over the global batch so far, all micro-batches of
      this optimiser step on all ranks of ``global_balance_group``
      (``routelab.balancing.GlobalLoadCounts``), while ``s'`` keeps its local
      gradient; see ``routelab.losses.load_balance_loss``.
    - ``z``: the router z-loss (Zoph et al. 2022).

    Selection bias (``selection_bias=True``): a ``routelab.balancing.SelectionBias``
    ``b [E]`` inside the top-k, ``TopK(v + b)``, weights from the unbiased scores; it
    changes only in ``update_balancing(model, group)`` after ``optimizer.step()``.

    Args:
        d_model: d.
        num_experts: E.
        k: experts per token.
        score: ``"softmax"`` or ``"sigmoid"``.
        normalize: normalise the k chosen scores to sum 1.
        scaling_factor: routed scaling factor multiplying the weights (DeepSeek-V3: 2.5).
        softmax_after_topk: softmax over the chosen logits (Mixtral) instead of over all.
        num_groups: G expert groups for group-limited routing (or None).
        top_groups: M groups kept per token.
        group_score: rank groups by their ``"top2"`` sum (DeepSeek-V3) or ``"max"`` (V2).
        selection_bias: add the loss-free balancing bias inside the top-k.
        selection_bias_rate: its update speed (DeepSeek-V3: 1e-3).
        balance_weight: coefficient of the micro-batch balance loss.
        sequence_balance_weight: alpha of the sequence-wise balance loss.
        global_balance_weight: coefficient of the global-batch balance loss.
        global_balance_group: the data-parallel process group whose ranks' counts the
            global-batch loss all-reduces in every training forward (None: this process).
        z_weight: router z-loss coefficient.

    ``differentiable`` is False only when no gradient can reach ``W`` (normalised k = 1
    without losses).
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        k: int = 2,
        score: str = "softmax",
        normalize: bool = True,
        scaling_factor: float = 1.0,
        softmax_after_topk: bool = False,
        num_groups: int | None = None,
        top_groups: int | None = None,
        group_score: str = "top2",
        selection_bias: bool = False,
        selection_bias_rate: float = 1e-3,
        balance_weight: float = 0.0,
        sequence_balance_weight: float = 0.0,
        global_balance_weight: float = 0.0,
        global_balance_group: dist.ProcessGroup | None = None,
        z_weight: float = 0.0,
    ) -> None:
        selection = TopKSelection(
            k,
            score=score,
            normalize=normalize,
            scaling_factor=scaling_factor,
            softmax_after_topk=softmax_after_topk,
            num_groups=num_groups,
            top_groups=top_groups,
            group_score=group_score,
        )
        bias = None
        if require_bool("selection_bias", selection_bias):
            bias = SelectionBias(num_experts, rate=selection_bias_rate)
        super().__init__(d_model, num_experts, selection, z_weight=z_weight, selection_bias=bias)
        self.balance_weight = check_loss_weight("balance_weight", balance_weight)
        self.sequence_balance_weight = check_loss_weight(
            "sequence_balance_weight", sequence_balance_weight
        )
        self.global_balance_weight = check_loss_weight(
            "global_balance_weight", global_balance_weight
        )
        self.global_counts = (
            GlobalLoadCounts(num_experts, group=global_balance_group)
            if self.global_balance_weight > 0
            else None
        )
        losses = self.balance_weight + self.sequence_balance_weight + self.global_balance_weight
        weights_move = self.k > 1 or not normalize
        self.differentiable = weights_move or (losses + self.z_weight > 0)
        self.weight = nn.Parameter(torch.empty(d_model, num_experts))
        nn.init.kaiming_uniform_(self.weight.t(), a=5**0.5)  # nn.Linear's initialisation

    @classmethod
    def from_preset(
        cls, name: str, d_model: int, num_experts: int, **overrides: object
    ) -> TopKRouter:
        """``TopKRouter(d_model, num_experts, **TOPK_PRESETS[name], **overrides)``: the
        router of a published model family (see ``TOPK_PRESETS``)."""
        if name not in TOPK_PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(TOPK_PRESETS)}")
        return cls(d_model, num_experts, **{**TOPK_PRESETS[name], **overrides})  # type: ignore[arg-type]

    def logits(self, x: Tensor) -> Tensor:
        return router_logits(x, self.weight)

    def aux_losses(
        self, logits: Tensor, selection: Selection, sequence_length: int | None
    ) -> dict[str, Tensor]:
        aux = super().aux_losses(logits, selection, sequence_length)
        probs, chosen = selection.probs, selection.indices
        if self.balance_weight > 0:
            load = expert_load(chosen, self.num_experts)
            aux["balance"] = self.balance_weight * load_balance_loss(probs, load)
        if self.sequence_balance_weight > 0:
            aux["sequence_balance"] = self.sequence_balance_weight * sequence_balance_loss(
                probs, chosen, sequence_length
            )
        if self.global_counts is not None:
            load = expert_load(chosen, self.num_experts)
            global_load, tokens = self.global_counts.accumulate(load, probs)
            aux["global_balance"] = self.global_balance_weight * load_balance_loss(
                probs, global_load, num_tokens=tokens
            )
        return aux

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.selection_bias is not None:
            text += f", selection_bias_rate={self.selection_bias.rate}"
        for name in ("balance_weight", "sequence_balance_weight", "global_balance_weight"):
            if getattr(self, name):
                text += f", {name}={getattr(self, name)}"
        return text


#: The routers of published MoE families as ``TopKRouter`` options (their released
#: configurations; loss weights as in their papers). ``num_groups`` needs E divisible by
#: it (the models use E = 160 / 256). Build with ``TopKRouter.from_preset(name, d, E)``.
TOPK_PRESETS: dict[str, dict[str, object]] = {
    # Mixtral (Jiang et al. 2024): softmax over the top-2 logits
    "mixtral": {"k": 2, "softmax_after_topk": True},
    # Qwen2-MoE (57B-A14B): softmax over all experts, top-8 not renormalised, aux 1e-3
    "qwen2-moe": {"k": 8, "normalize": False, "balance_weight": 1e-3},
    # Qwen3-MoE: top-8 renormalised, global-batch balance loss 1e-3 (Qiu et al. 2025)
    "qwen3-moe": {"k": 8, "global_balance_weight": 1e-3},
    # DeepSeek-V2: softmax, top-6 in the top 3 of 8 groups ranked by their max, x16,
    # not renormalised, expert-level balance per sequence alpha_1 = 0.003
    "deepseek-v2": {
        "k": 6,
        "normalize": False,
        "scaling_factor": 16.0,
        "num_groups": 8,
        "top_groups": 3,
        "group_score": "max",
        "sequence_balance_weight": 3e-3,
    },
    # DeepSeek-V3: sigmoid, top-8 in the top 4 of 8 groups (top-2 sums), renormalised,
    # x2.5, loss-free bias (gamma = 1e-3), sequence-wise loss alpha = 1e-4
    "deepseek-v3": {
        "k": 8,
        "score": "sigmoid",
        "scaling_factor": 2.5,
        "num_groups": 8,
        "top_groups": 4,
        "selection_bias": True,
        "selection_bias_rate": 1e-3,
        "sequence_balance_weight": 1e-4,
    },
}
