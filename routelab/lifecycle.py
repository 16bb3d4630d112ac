"""The expert lifecycle: grow, freeze, upcycle, prune and merge the experts of an MoE layer.

Every operation is one re-indexing of a layer's experts: the new layer's expert ``j``
starts from old expert ``sources[j]`` (or from scratch), which the executor, the router
and every per-expert buffer of the policies apply in their own way.

- :func:`grow_experts`: add n experts to a trained layer (Lifelong-MoE, Chen et al.
  2023); new experts are copies of existing ones or freshly initialised; the router
  gains n outputs. ``gate="masked"`` gives the new gate columns zero weights and the
  logit bias :data:`MASK_LOGIT`, so before any training step the grown layer computes
  exactly the old layer's function (softmax probabilities underflow to 0 for the new
  columns; top-k never selects them).
- :func:`freeze_experts`: gradient masks (and, with :meth:`Freeze.guard`, an optimiser
  post-step restore) that keep chosen experts and their gate columns bit-identical.
- :func:`expand_model`: grow every MoE layer of a model and freeze its old experts and
  gate columns, the Lifelong-MoE step per new data distribution;
  :func:`distillation_loss` is the paper's output-level regulariser.
- :func:`upcycle_ffn`: sparse upcycling (Komatsuzaki et al. 2023): an MoE whose experts
  are copies of a dense FFN, with a fresh router; function-preserving wherever the
  router's weights per token sum to 1.
- :func:`prune_experts` and :func:`merge_experts`: remove the least-used experts, or
  merge groups of experts by frequency-weighted parameter averaging (MC-SMoE, Li et
  al. 2024), from recorded routing loads (``analysis.RoutingRecorder`` /
  ``analysis.load_stats(...).load``).

Routers: how a router re-indexes its experts is a :class:`RouterSurgery`, found by
:func:`router_surgery` (the router's own ``expert_surgery()`` method if it has one,
else the registry keyed by class, searched along the MRO). A router family whose gate
is a linear map registers in one line::

    register_router_surgery(MyGate, ExpertTensors({"proj.weight": 0, "proj.bias": 0},
                                                  logit_bias="proj.bias"))

Registered here: TopKGate (``proj`` and its selection bias), SoftmaxGate, SwitchGate,
ExpertChoiceRouter (``proj``; the per-expert capacity is kept), TopPGate, ReMoEGate
(``proj``; the target sparsity ``1 - k/E`` follows E), NoisyTopKGate (``w_gate``,
``w_noise``), TopKRouter (``weight [d, E]``), CosineTopKGate (``expert_embeddings``),
BASERouter and SinkhornRouter (``expert_embeddings``) -- the last four have no logit
bias, so no ``"masked"`` growth (their scores are bias-free products) --, DSelectKGate
(:class:`DSelectKSurgery`: growth only, masked growth from a power-of-two E) and
HashRouter (:class:`HashSurgery`: a documented re-balancing of the table). Not
registered: MoEPlusPlusGate (its zero-computation experts and the gating residual from
the previous layer tie E to the executor and to the layer before).

State dicts: a grown / pruned / merged model has new parameter shapes. Save it with
``state_dict()``; load it into a model built the same way (build the old architecture
and apply the same lifecycle call, then ``load_state_dict``), or ``torch.save`` the
module. Optimisers: parameters are replaced, so build a new optimiser after any
lifecycle call; :func:`transfer_optimizer_state` with :func:`successor_pairs` carries
Adam-style per-parameter state over (old experts' moments to their new rows, zeros for
new rows).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, NamedTuple, Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from routelab._validate import require_choice, require_float, require_int
from routelab.experts import Experts, FFNExperts, ModuleExperts
from routelab.moe import MoE
from routelab.router import Router
from routelab.routers import (
    BASERouter,
    CosineTopKGate,
    DSelectKGate,
    ExpertChoiceRouter,
    HashRouter,
    NoisyTopKGate,
    ReMoEGate,
    SoftmaxGate,
    SwitchGate,
    TopKGate,
    TopPGate,
)
from routelab.routers.topk import TopKRouter

__all__ = [
    "EXPERT_INITS",
    "GATE_INITS",
    "MASK_LOGIT",
    "DSelectKSurgery",
    "Expansion",
    "ExpertPlan",
    "ExpertTensors",
    "Freeze",
    "HashSurgery",
    "Reindexed",
    "RouterSurgery",
    "distillation_loss",
    "expand_model",
    "expert_param_names",
    "freeze_experts",
    "grow_experts",
    "merge_experts",
    "moe_layers",
    "prune_experts",
    "register_router_surgery",
    "reindex_experts",
    "reindex_moe",
    "router_surgery",
    "stacked_tensors",
    "successor_pairs",
    "transfer_optimizer_state",
    "upcycle_ffn",
]

MASK_LOGIT = -1.0e4
"""The logit bias of a masked gate column: ``exp(MASK_LOGIT - max)`` is exactly 0 in fp32."""

GATE_INITS = ("masked", "copy", "scratch")
EXPERT_INITS = ("copy", "scratch")


# ---------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class ExpertPlan:
    """How a new layer's experts come from an old layer's E experts.

    Fields:
        num_old: E, the old layer's number of experts.
        sources: for each new expert j, the old expert it starts from (None: scratch).
        added: for each new expert j, whether it is an added expert (its gate column is
            built by ``gate``) rather than a kept / merged old one (its column is old
            column ``sources[j]``).
        redirect: for each old expert, the new expert that takes its traffic (None: none
            does; prune). Table-based routers (hash) use it; gates ignore it.
        gate: ``"masked"`` (zero weights, logit bias ``mask_logit``), ``"copy"`` (the
            source's column, plus ``noise``) or ``"scratch"`` (drawn from the old
            columns' per-entry mean and standard deviation) for added columns.
        mask_logit: the masked columns' logit bias (default :data:`MASK_LOGIT`).
        noise: relative noise added to copied columns (multiples of the old columns'
            per-entry standard deviation).
        token_counts: token frequencies ``[V]`` for re-balancing hash tables (None: 1 each).
        generator: the random source of scratch and noisy draws.
    """

    num_old: int
    sources: tuple[int | None, ...]
    added: tuple[bool, ...]
    redirect: tuple[int | None, ...]
    gate: str = "masked"
    mask_logit: float = MASK_LOGIT
    noise: float = 0.0
    token_counts: Tensor | None = None
    generator: torch.Generator | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        require_choice("gate", self.gate, GATE_INITS)
        if len(self.sources) != len(self.added) or not self.sources:
            raise ValueError("sources and added must be non-empty and of the same length")
        if len(self.redirect) != self.num_old:
            raise ValueError(f"redirect must have num_old = {self.num_old} entries")
        for j, (s, a) in enumerate(zip(self.sources, self.added)):
            if s is not None and not 0 <= s < self.num_old:
                raise ValueError(
                    f"sources[{j}] = {s} is not an old expert id in [0, {self.num_old})"
                )
            if s is None and not a:
                raise ValueError(f"sources[{j}] is None but expert {j} is not an added expert")
        for e, r in enumerate(self.redirect):
            if r is not None and not 0 <= r < self.num_new:
                raise ValueError(
                    f"redirect[{e}] = {r} is not a new expert id in [0, {self.num_new})"
                )

    @property
    def num_new(self) -> int:
        return len(self.sources)

    @property
    def is_identity_prefix(self) -> bool:
        """The first E new experts are the old ones in order (growth)."""
        E = self.num_old
        return self.sources[:E] == tuple(range(E)) and not any(self.added[:E])

    def randn(self, shape: Sequence[int], like: Tensor) -> Tensor:
        return torch.randn(tuple(shape), generator=self.generator, dtype=torch.float64).to(like)


class Reindexed(NamedTuple):
    """A lifecycle result: the new layer and how its experts map to the old ones.

    ``sources[j]``: the old expert new expert j started from (None: scratch);
    ``id_map[e]``: the new id of old expert e's traffic (-1: removed).
    """

    moe: MoE
    sources: tuple[int | None, ...]
    id_map: Tensor


# ---------------------------------------------------------------------- router surgery
class RouterSurgery(Protocol):
    """How one router family re-indexes its experts."""

    def reindex(self, router: Router, plan: ExpertPlan) -> tuple[Router, tuple[int | None, ...]]:
        """A new router over ``plan.num_new`` experts (the old one untouched) and the
        effective sources (a surgery may choose sources the plan left open: hash donors)."""
        ...

    def expert_axes(self, router: Router) -> dict[str, int]:
        """``{tensor name: axis}`` of the router's tensors that index experts (freezing)."""
        ...


_SURGERIES: dict[type, RouterSurgery] = {}


def register_router_surgery(cls: type, surgery: RouterSurgery) -> None:
    """Register how routers of class ``cls`` (and its subclasses) re-index experts."""
    if not isinstance(cls, type):
        raise TypeError(f"cls must be a class, got {cls!r}")
    if not callable(getattr(surgery, "reindex", None)):
        raise TypeError(f"surgery must have a reindex(router, plan) method, got {surgery!r}")
    _SURGERIES[cls] = surgery


def router_surgery(router: Router) -> RouterSurgery:
    """The router's :class:`RouterSurgery`: its own ``expert_surgery()`` if it defines
    one, else the registered surgery of its class or nearest registered base class."""
    own = getattr(router, "expert_surgery", None)
    if callable(own):
        return own()
    for cls in type(router).__mro__:
        if cls in _SURGERIES:
            return _SURGERIES[cls]
    raise TypeError(
        f"no lifecycle surgery is registered for {type(router).__name__}: call "
        "routelab.lifecycle.register_router_surgery(cls, ExpertTensors({...})) naming the "
        "router tensors that index experts"
    )


def _get_tensor(module: nn.Module, name: str) -> Tensor | None:
    """The parameter / buffer at a dotted name, or None where it (or its owner) is absent."""
    owner_name, _, attr = name.rpartition(".")
    try:
        owner = module.get_submodule(owner_name) if owner_name else module
    except AttributeError:
        return None
    value = getattr(owner, attr, None)
    return value if isinstance(value, Tensor) else None


def _set_tensor(module: nn.Module, name: str, value: Tensor, *, requires_grad: bool) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if attr in owner._buffers:
        owner._buffers[attr] = value
    else:
        setattr(owner, attr, nn.Parameter(value, requires_grad=requires_grad))
    if isinstance(owner, nn.Linear) and attr == "weight":
        owner.out_features = int(value.shape[0])


def _reindex_tensor(
    old: Tensor, axis: int, plan: ExpertPlan, *, is_logit_bias: bool, gate: str
) -> Tensor:
    """The new tensor: kept slices copied, added slices built by ``gate`` (see ExpertPlan)."""
    with torch.no_grad():
        moved = old.detach().movedim(axis, 0)
        stats = moved.double()
        mean = stats.mean(0)
        std = stats.std(0, unbiased=False) if moved.shape[0] > 1 else torch.zeros_like(mean)
        rows = []
        for source, added in zip(plan.sources, plan.added):
            if not added:
                rows.append(moved[source])
            elif gate == "masked":
                fill = plan.mask_logit if is_logit_bias else 0.0
                rows.append(torch.full_like(moved[0], fill))
            elif gate == "copy" and source is not None:
                noise = plan.noise * std * plan.randn(std.shape, std) if plan.noise else 0.0
                rows.append((stats[source] + noise).to(moved.dtype))
            else:
                rows.append((mean + std * plan.randn(std.shape, std)).to(moved.dtype))
        return torch.stack(rows).movedim(0, axis).contiguous()


@dataclass(frozen=True)
class ExpertTensors:
    """Surgery for routers whose tensors index experts along one axis (linear gates).

    Args:
        tensors: ``{dotted tensor name: expert axis}``, parameters or buffers, e.g.
            ``{"proj.weight": 0, "proj.bias": 0}`` for an ``nn.Linear(d, E)`` gate or
            ``{"w_gate": 1}`` for a ``[d, E]`` parameter. Missing (None) tensors are
            skipped.
        logit_bias: the tensor(s) whose new entries take ``plan.mask_logit`` in masked
            growth: the per-expert logit bias (a missing ``nn.Linear`` bias is added, zeros
            for the old experts) and any selection bias added to the selection values.
            None: the router cannot mask (``"masked"`` growth raises a ValueError naming
            the router).
        adjust: ``(new_router, old_E, new_E) -> None``, for attributes that depend on E.

    Submodules of the router that carry ``num_experts`` (a selection bias, global load
    counts: :class:`routelab.balancing.BalancingState` controllers) get their ``[E, ...]``
    buffers re-indexed too (kept experts keep their state, added ones start at 0), as
    the policies' do; tensors named in ``tensors`` are handled first.
    """

    tensors: Mapping[str, int]
    logit_bias: str | tuple[str, ...] | None = None
    adjust: Callable[[Router, int, int], None] | None = None

    @property
    def _logit_biases(self) -> tuple[str, ...]:
        if self.logit_bias is None:
            return ()
        return (self.logit_bias,) if isinstance(self.logit_bias, str) else self.logit_bias

    def reindex(self, router: Router, plan: ExpertPlan) -> tuple[Router, tuple[int | None, ...]]:
        gate = plan.gate if any(plan.added) else "copy"
        if gate == "masked" and self.logit_bias is None:
            raise ValueError(
                f"{type(router).__name__} has no logit bias, so gate='masked' cannot keep new "
                "experts unchosen; grow it with gate='copy' or gate='scratch'"
            )
        new = copy.deepcopy(router)
        E_old, E_new = plan.num_old, plan.num_new
        for name, axis in self.tensors.items():
            old = _get_tensor(router, name)
            owner = name.rpartition(".")[0]
            if old is None and name in self._logit_biases and gate == "masked" and owner:
                owner_module = getattr(router, owner, None)
                if isinstance(owner_module, nn.Linear):  # add the bias the mask needs
                    weight = owner_module.weight
                    old = torch.zeros(E_old, dtype=weight.dtype, device=weight.device)
            if old is None:
                continue
            if old.shape[axis] != E_old:
                raise ValueError(
                    f"{type(router).__name__}.{name} has {old.shape[axis]} entries on axis "
                    f"{axis}, expected num_experts = {E_old}"
                )
            value = _reindex_tensor(
                old, axis, plan, is_logit_bias=name in self._logit_biases, gate=gate
            )
            _set_tensor(new, name, value, requires_grad=old.requires_grad)
        for module in list(new.children()):
            _reindex_expert_state(module, plan)
        new.num_experts = E_new
        k = getattr(new, "k", None)
        if isinstance(k, int) and k > E_new:
            raise ValueError(
                f"{type(router).__name__} routes k = {k} experts per token, more than the "
                f"{E_new} experts left"
            )
        if self.adjust is not None:
            self.adjust(new, E_old, E_new)
        return new, plan.sources

    def expert_axes(self, router: Router) -> dict[str, int]:
        return {n: a for n, a in self.tensors.items() if _get_tensor(router, n) is not None}


def _keep_expert_capacity(router: Router, old: int, new: int) -> None:
    """Expert choice: ``c = ceil(capacity_factor * T / E)`` per expert stays the same
    (the factor scaled exactly, as the rational the router computes with)."""
    assert isinstance(router, ExpertChoiceRouter)
    router.set_capacity_factor(router.capacity_fraction * Fraction(new, old))


def _softmax_flags(router: Router, old: int, new: int) -> None:
    router.differentiable = new > 1  # type: ignore[misc]


class DSelectKSurgery:
    """DSelect-k (Hazimeh et al. 2021) encodes expert ids in ``m = ceil(log2 E)`` bits.

    Only growth is supported (experts appended after the old ones; pruning and merging
    would re-number the binary codes). Growing past ``2^m`` adds bits: each selector's
    new bits start at ``z = -gamma`` (weight 0), where the smooth step is exactly 0, so
    every code with a new bit set has weight 0 and the old codes keep their weights:
    masked growth is function-preserving when the old E is a power of two (up to the
    selector renormalisation's rounding, ~1e-7). When it is not, the codes ``E .. 2^m - 1``
    were masked and become valid, which moves weight to them whatever the new bits
    are: ``"masked"`` growth then raises a ValueError. Other gate modes start new bits
    as the paper initialises them (uniform in ``±gamma/100``). The gate's parameters are
    shared by all experts, so :meth:`expert_axes` is empty: freezing freezes none of
    the gate (freeze it whole with ``requires_grad_(False)`` if wanted).
    """

    def reindex(self, router: Router, plan: ExpertPlan) -> tuple[Router, tuple[int | None, ...]]:
        assert isinstance(router, DSelectKGate)
        E_old, E_new = plan.num_old, plan.num_new
        if not plan.is_identity_prefix or not all(plan.added[E_old:]) or E_new < E_old:
            raise ValueError(
                "DSelectKGate supports growth only (new experts after the old ones): its "
                "experts are binary codes, which pruning or merging would re-number"
            )
        m_old = router.num_bits
        if plan.gate == "masked" and E_new > E_old and E_old != 2**m_old:
            raise ValueError(
                f"DSelectKGate with E = {E_old} (not a power of two) cannot grow "
                f"function-preservingly: codes {E_old}..{2**m_old - 1} become valid experts; "
                "use gate='copy' or 'scratch'"
            )
        new = copy.deepcopy(router)
        m_new = max(1, math.ceil(math.log2(E_new)))
        new.num_experts = E_new
        new.num_bits = m_new
        extra = m_new - m_old
        if extra:
            masked = plan.gate == "masked"
            bound = router.gamma / 100
            gen = plan.generator

            def widen(z: Tensor) -> Tensor:  # [..., m_old] -> [..., m_new]
                shape = (*z.shape[:-1], extra)
                if masked:
                    fresh = torch.full(shape, -router.gamma, dtype=z.dtype, device=z.device)
                else:
                    fresh = (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound
                    fresh = fresh.to(z)
                return torch.cat([z, fresh], dim=-1)

            with torch.no_grad():
                if router.per_example:
                    k, d = router.k, router.d_model
                    w = router.z_proj.weight.detach().view(k, m_old, d).transpose(1, 2)
                    w = (
                        widen(w)
                        if not masked
                        else torch.cat(
                            [w, torch.zeros(k, d, extra, dtype=w.dtype, device=w.device)], dim=-1
                        )
                    )
                    b = widen(router.z_proj.bias.detach().view(k, m_old))
                    new.z_proj = nn.Linear(d, k * m_new).to(w)
                    new.z_proj.weight.copy_(w.transpose(1, 2).reshape(k * m_new, d))
                    new.z_proj.bias.copy_(b.reshape(-1))
                else:
                    new.z = nn.Parameter(widen(router.z.detach()))
        return new, plan.sources

    def expert_axes(self, router: Router) -> dict[str, int]:
        return {}


class HashSurgery:
    """Hash routing (Roller et al. 2021): the table is re-balanced, never re-learned.

    For the plan's old experts the table is re-mapped through ``plan.redirect``: a kept
    or merged expert's tokens follow it; the tokens of a removed expert are dealt,
    heaviest first (weights ``plan.token_counts``, default 1 per token; ties by id), to
    the currently least-loaded expert. Then each added expert takes half of a donor's
    load: its source if given, else the currently most-loaded expert (ties: lowest id);
    the donor's tokens are split heaviest first, each to whichever of the two holds
    less so far (a two-way LPT split; ties stay with the donor). The donor becomes the
    added expert's effective source, so with ``init="copy"`` growth is exactly
    function-preserving (the moved tokens meet an identical copy of their expert).
    Single-hash tables only (multi-hash groups would re-number every expert).
    """

    def reindex(self, router: Router, plan: ExpertPlan) -> tuple[Router, tuple[int | None, ...]]:
        assert isinstance(router, HashRouter)
        if router.num_hashes != 1:
            raise ValueError("HashRouter lifecycle surgery supports single-hash tables only")
        V, E_new = router.vocab_size, plan.num_new
        weights = torch.ones(V, dtype=torch.float64)
        if plan.token_counts is not None:
            counts = torch.as_tensor(plan.token_counts).detach().cpu().double().reshape(-1)
            if counts.shape[0] != V or bool((counts < 0).any()):
                raise ValueError(f"token_counts must be [V] = [{V}] and >= 0")
            weights = counts
        old_table = router.table.detach().cpu().reshape(-1)
        redirect = torch.tensor([-1 if r is None else r for r in plan.redirect])
        table = redirect[old_table]
        loads = torch.bincount(table[table >= 0], weights=weights[table >= 0], minlength=E_new)
        loads = loads[:E_new].clone()
        orphans = torch.nonzero(table < 0).reshape(-1).tolist()
        orphans.sort(key=lambda v: (-float(weights[v]), v))
        receivers = [j for j in range(E_new) if not plan.added[j]]
        for v in orphans:
            j = min(receivers, key=lambda e: (float(loads[e]), e))
            table[v] = j
            loads[j] += weights[v]
        sources = list(plan.sources)
        for j in range(E_new):
            if not plan.added[j]:
                continue
            if sources[j] is not None:
                donor = int(redirect[sources[j]])
                if donor < 0:
                    raise ValueError(f"sources[{j}] = {sources[j]} is an expert being removed")
            else:
                donor = min(range(j), key=lambda e: (-float(loads[e]), e)) if j else 0
                sources[j] = _old_source(sources, plan, donor)
            members = torch.nonzero(table == donor).reshape(-1).tolist()
            members.sort(key=lambda v: (-float(weights[v]), v))
            kept = moved = 0.0
            for v in members:
                if moved < kept:
                    table[v] = j
                    moved += float(weights[v])
                else:
                    kept += float(weights[v])
            loads[donor], loads[j] = kept, moved
        table = table.to(router.table.device)
        new = HashRouter(
            router.d_model,
            E_new,
            table=table,
            out_of_range=router.out_of_range,
            strategy=router.strategy,
        )
        new.train(router.training)
        return new, tuple(sources)

    def expert_axes(self, router: Router) -> dict[str, int]:
        return {}


def _old_source(sources: list[int | None], plan: ExpertPlan, new_id: int) -> int | None:
    """The old expert a new expert descends from (following added experts' sources)."""
    return sources[new_id] if plan.added[new_id] else plan.sources[new_id]


def _check_selection(router: Router, old: int, new: int) -> None:
    """Token-choice routers: the top-k selection (k, group limits) must fit E."""
    selection = getattr(router, "selection", None)
    if selection is not None:
        selection.check(new)


def _remoe_target(router: Router, old: int, new: int) -> None:
    """ReMoE: the controller's target sparsity is ``1 - k / E``."""
    if router.k >= new:  # type: ignore[operator]
        raise ValueError(f"ReMoEGate needs k = {router.k} < num_experts = {new}")
    router.controller.target_sparsity = 1.0 - router.k / new  # type: ignore[union-attr, operator]


_LINEAR = {"proj.weight": 0, "proj.bias": 0}
_SELECTION_BIAS = {"selection_bias.bias": 0}
register_router_surgery(
    TopKGate,
    ExpertTensors(
        {**_LINEAR, **_SELECTION_BIAS},
        logit_bias=("proj.bias", "selection_bias.bias"),
        adjust=_check_selection,
    ),
)
register_router_surgery(
    TopKRouter, ExpertTensors({"weight": 1, **_SELECTION_BIAS}, adjust=_check_selection)
)
register_router_surgery(
    CosineTopKGate,
    ExpertTensors({"expert_embeddings": 0, **_SELECTION_BIAS}, adjust=_check_selection),
)
register_router_surgery(TopPGate, ExpertTensors(_LINEAR, logit_bias="proj.bias"))
register_router_surgery(
    ReMoEGate, ExpertTensors(_LINEAR, logit_bias="proj.bias", adjust=_remoe_target)
)
register_router_surgery(
    SoftmaxGate, ExpertTensors(_LINEAR, logit_bias="proj.bias", adjust=_softmax_flags)
)
register_router_surgery(SwitchGate, ExpertTensors(_LINEAR, logit_bias="proj.bias"))
register_router_surgery(
    ExpertChoiceRouter,
    ExpertTensors(_LINEAR, logit_bias="proj.bias", adjust=_keep_expert_capacity),
)
register_router_surgery(NoisyTopKGate, ExpertTensors({"w_gate": 1, "w_noise": 1}))
register_router_surgery(BASERouter, ExpertTensors({"expert_embeddings": 0}))
register_router_surgery(DSelectKGate, DSelectKSurgery())
register_router_surgery(HashRouter, HashSurgery())


# ---------------------------------------------------------------------- experts
def stacked_tensors(experts: Experts) -> dict[str, Tensor] | None:
    """The executor's per-expert tensors ``{name: [E, ...]}``
    (:meth:`routelab.experts.Experts.expert_tensors`: FFNExperts and every executor that
    stacks its experts), or None for executors of separate modules (ModuleExperts)."""
    try:
        return experts.expert_tensors()
    except (TypeError, AttributeError, NotImplementedError):
        return None


def expert_param_names(experts: Experts) -> list[str]:
    """The names of an executor's stacked parameters ``[E, ...]`` (empty for
    ModuleExperts)."""
    tensors = stacked_tensors(experts) or {}
    return [n for n, t in tensors.items() if isinstance(t, nn.Parameter)]


def reindex_experts(
    experts: Experts,
    sources: Sequence[int | None],
    *,
    groups: Sequence[Sequence[int]] | None = None,
    group_weights: Tensor | None = None,
    seed: int = 0,
) -> Experts:
    """A new executor whose expert j is a copy of old expert ``sources[j]`` (None: fresh).

    With ``groups`` (one list of old ids per new expert) new expert j is instead the
    weighted average of its group's floating tensors, weights ``group_weights [E_old]``
    normalised within each group (MC-SMoE's frequency-weighted merge; other tensors are
    taken from ``sources[j]``). Stacked executors (FFNExperts and any executor with
    ``expert_tensors`` / ``with_expert_tensors``: every per-expert tensor, one added later
    included) and ``ModuleExperts`` lists are handled; fresh experts are initialised by
    the executor's own ``reset_parameters`` under ``torch.manual_seed(seed)`` (the global
    RNG is restored afterwards).
    """
    if groups is not None and len(groups) != len(sources):
        raise ValueError(f"groups ({len(groups)}) and sources ({len(sources)}) must match")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tensors = stacked_tensors(experts)
        if tensors is not None:
            return _reindex_stacked(experts, tensors, sources, groups, group_weights)
        if isinstance(experts, ModuleExperts):
            return _reindex_modules(experts, sources, groups, group_weights)
    raise TypeError(
        f"experts must stack its experts (expert_tensors) or be ModuleExperts, got "
        f"{type(experts).__name__}"
    )


def _fresh_tensors(experts: Experts, count: int) -> dict[str, Tensor]:
    """``count`` freshly initialised experts of the executor's kind, as stacked tensors."""
    fresh = experts.select_experts([0] * count)
    reset = getattr(fresh, "reset_parameters", None)
    if not callable(reset):
        raise ValueError(
            f"{type(experts).__name__} has no reset_parameters: grow it with init='copy'"
        )
    reset()
    return fresh.expert_tensors()


def _reindex_stacked(experts, tensors, sources, groups, group_weights) -> Experts:
    E_new = len(sources)
    mix = None if groups is None else _group_mix(groups, group_weights, experts.num_experts)
    fresh = _fresh_tensors(experts, E_new) if any(s is None for s in sources) else {}
    new: dict[str, Tensor] = {}
    with torch.no_grad():
        for name, old in tensors.items():
            if mix is not None and old.is_floating_point():
                merged = torch.einsum("ge,e...->g...", mix.to(old.device), old.double())
                new[name] = merged.to(old.dtype)
                continue
            rows = [old[s] if s is not None else fresh[name][j] for j, s in enumerate(sources)]
            new[name] = torch.stack(rows)
    return experts.with_expert_tensors(new)


def _group_mix(groups: Sequence[Sequence[int]], weights: Tensor | None, E_old: int) -> Tensor:
    """``[E_new, E_old]`` averaging matrix: row g holds group g's normalised weights."""
    w = torch.ones(E_old, dtype=torch.float64) if weights is None else weights.double().cpu()
    mix = torch.zeros(len(groups), E_old, dtype=torch.float64)
    for g, members in enumerate(groups):
        idx = torch.tensor(list(members), dtype=torch.long)
        total = float(w[idx].sum())
        mix[g, idx] = w[idx] / total if total > 0 else 1.0 / len(members)
    return mix


def _reindex_modules(experts, sources, groups, group_weights) -> ModuleExperts:
    old = list(experts.experts)
    if groups is not None:
        mix = _group_mix(groups, group_weights, len(old))
        modules = []
        for g, members in enumerate(groups):
            merged = copy.deepcopy(old[members[0]])
            states = [old[e].state_dict() for e in members]
            averaged = {
                key: sum(float(mix[g, e]) * s[key].double() for e, s in zip(members, states)).to(
                    value.dtype
                )
                if value.is_floating_point()
                else value
                for key, value in states[0].items()
            }
            merged.load_state_dict(averaged)
            modules.append(merged)
    else:
        modules = []
        for source in sources:
            module = copy.deepcopy(old[0 if source is None else source])
            if source is None:
                for sub in module.modules():
                    if callable(getattr(sub, "reset_parameters", None)):
                        sub.reset_parameters()
            modules.append(module)
    return ModuleExperts(modules, d_out=experts.d_out)


def _reindex_expert_state(module: nn.Module, plan: ExpertPlan) -> None:
    """In place: every submodule (``module`` included) with ``num_experts == E_old`` gets
    its buffers ``[E_old, ...]`` re-indexed along axis 0 (kept experts keep their state,
    added ones start at 0) and ``num_experts = E_new``."""
    E_old = plan.num_old
    for sub in module.modules():
        if getattr(sub, "num_experts", None) != E_old:
            continue
        for name, buf in list(sub._buffers.items()):
            if buf is None or buf.dim() == 0 or buf.shape[0] != E_old:
                continue
            rows = [
                buf[s] if s is not None and not a else torch.zeros_like(buf[0])
                for s, a in zip(plan.sources, plan.added)
            ]
            sub._buffers[name] = torch.stack(rows)
        cast(Any, sub).num_experts = plan.num_new


def _reindex_policy(policy: nn.Module, plan: ExpertPlan) -> nn.Module:
    """A copy of a policy with its per-expert state re-indexed (:func:`_reindex_expert_state`)."""
    new = copy.deepcopy(policy)
    _reindex_expert_state(new, plan)
    k = getattr(new, "k", None)
    if isinstance(k, int) and k > plan.num_new:
        raise ValueError(f"{type(policy).__name__} has k = {k} > {plan.num_new} experts")
    return new


# ---------------------------------------------------------------------- the layer
def _check_moe(moe: object) -> MoE:
    if not isinstance(moe, MoE):
        raise TypeError(f"moe must be a routelab.MoE, got {type(moe).__name__}")
    return moe


def reindex_moe(
    moe: MoE,
    plan: ExpertPlan,
    *,
    groups: Sequence[Sequence[int]] | None = None,
    group_weights: Tensor | None = None,
    seed: int = 0,
) -> Reindexed:
    """Apply ``plan`` to a layer's router, experts and policies; the old layer is untouched.

    ``groups`` / ``group_weights``: merge the experts (see :func:`reindex_experts`).
    """
    _check_moe(moe)
    if plan.num_old != moe.num_experts:
        raise ValueError(f"plan is for {plan.num_old} experts, the layer has {moe.num_experts}")
    router, sources = router_surgery(moe.router).reindex(moe.router, plan)
    experts = reindex_experts(
        moe.experts, sources, groups=groups, group_weights=group_weights, seed=seed
    )
    policies = [_reindex_policy(p, plan) for p in moe.policies]
    new = _rebuild(moe, router, experts, policies)
    id_map = torch.tensor([-1 if r is None else r for r in plan.redirect], dtype=torch.long)
    return Reindexed(new, tuple(sources), id_map)


def _rebuild(moe: MoE, router: Router, experts: Experts, policies: Sequence[nn.Module]) -> MoE:
    """A copy of ``moe`` (its class, mode, shared experts and any other state deep-copied)
    with ``router``, ``experts`` and ``policies`` in place of its own."""
    if router.num_experts != experts.num_experts:
        raise ValueError(f"router has {router.num_experts} experts, executor {experts.num_experts}")
    memo = {
        id(moe.router): router,
        id(moe.experts): experts,
        id(moe.policies): nn.ModuleList(policies),
    }
    return copy.deepcopy(moe, memo)


def _most_loaded(loads: Tensor | None, n: int, E: int) -> list[int]:
    """``n`` expert ids, most loaded first (ties: lowest id), cycling; 0, 1, ... without loads."""
    if loads is None:
        return [j % E for j in range(n)]
    order = sorted(range(E), key=lambda e: (-float(loads[e]), e))
    return [order[j % E] for j in range(n)]


def _check_loads(loads: object, E: int, name: str = "loads") -> Tensor:
    if not isinstance(loads, Tensor):
        loads = torch.as_tensor(loads)
    loads = loads.detach().cpu().double().reshape(-1)
    if loads.shape[0] != E:
        raise ValueError(f"{name} must have one entry per expert, [{E}], got {tuple(loads.shape)}")
    if not bool(torch.isfinite(loads).all()) or bool((loads < 0).any()):
        raise ValueError(f"{name} must be finite and >= 0")
    return loads


def grow_experts(
    moe: MoE,
    n: int,
    *,
    init: str = "copy",
    sources: Sequence[int] | None = None,
    gate: str = "masked",
    mask_logit: float = MASK_LOGIT,
    noise: float = 0.0,
    loads: Tensor | None = None,
    token_counts: Tensor | None = None,
    seed: int = 0,
) -> MoE:
    """A copy of ``moe`` with ``n`` experts added after the old E (ids ``E .. E+n-1``).

    Args:
        moe: the trained layer (left untouched).
        n: experts to add, >= 1.
        init: ``"copy"``: each new expert copies a source expert (``sources``, else the
            most-loaded experts by ``loads``, else experts 0, 1, ...; a hash router picks
            its donors itself); ``"scratch"``: the executor's fresh initialisation.
        sources: n old expert ids to copy (``init="copy"``).
        gate: the new gate columns: ``"masked"`` (zero weight, logit bias ``mask_logit``:
            the grown layer computes the old function exactly until training moves the
            new columns), ``"copy"`` (the source's column, plus ``noise``) or
            ``"scratch"`` (drawn per entry from the old columns' mean and std).
        mask_logit: the masked columns' bias (default :data:`MASK_LOGIT`; a moderate value
            such as -10 keeps them almost unchosen but learnable through the softmax).
            Exactness needs ``exp(mask_logit / temperature - max logit)`` to underflow to 0
            in fp32: for SoftmaxGate's temperature tau, ``mask_logit / tau < -104``.
        noise: relative noise on copied gate columns (in units of the columns' std).
        loads: recorded load per expert ``[E]`` (chooses copy sources).
        token_counts: token frequencies ``[V]`` for hash re-balancing.
        seed: seeds scratch experts and noisy / scratch gate columns.
    """
    _check_moe(moe)
    n = require_int("n", n, 1)
    init = require_choice("init", init, EXPERT_INITS)
    E = moe.num_experts
    if sources is not None:
        sources = [require_int("sources[i]", s, 0, E - 1) for s in sources]
        if len(sources) != n:
            raise ValueError(f"sources must name n = {n} experts, got {len(sources)}")
        if init != "copy":
            raise ValueError("sources are only used with init='copy'")
    loads_t = None if loads is None else _check_loads(loads, E)
    is_hash = isinstance(moe.router, HashRouter)
    if init == "copy" and sources is None:
        new_sources: list[int | None] = [None] * n if is_hash else list(_most_loaded(loads_t, n, E))
    elif init == "copy":
        new_sources = list(sources)  # type: ignore[arg-type]
    else:
        new_sources = [None] * n
    plan = ExpertPlan(
        num_old=E,
        sources=(*range(E), *new_sources),
        added=(False,) * E + (True,) * n,
        redirect=tuple(range(E)),
        gate=require_choice("gate", gate, GATE_INITS),
        mask_logit=require_float("mask_logit", mask_logit),
        noise=require_float("noise", noise, minimum=0.0),
        token_counts=token_counts,
        generator=torch.Generator().manual_seed(seed),
    )
    result = reindex_moe(moe, plan, seed=seed)
    if init == "scratch" and is_hash:
        # the hash surgery named donors: fresh experts stay fresh
        experts = reindex_experts(moe.experts, plan.sources, seed=seed)
        return _rebuild(result.moe, result.moe.router, experts, list(result.moe.policies))
    return result.moe


def _shrink_arguments(moe: MoE, loads: object, **either: object) -> tuple[int, Tensor]:
    """Validate a prune / merge call: the layer, its loads ``[E]`` and exactly one of the
    two ``either`` options; returns ``(E, loads as float64)``."""
    _check_moe(moe)
    E = moe.num_experts
    if sum(v is not None for v in either.values()) != 1:
        raise ValueError(f"give exactly one of {' or '.join(either)}")
    return E, _check_loads(loads, E)


def prune_experts(
    moe: MoE,
    loads: Tensor,
    *,
    num_remove: int | None = None,
    keep: Sequence[int] | None = None,
) -> Reindexed:
    """Remove the least-used experts of a layer (ties: the highest id goes first).

    ``loads [E]``: recorded load per expert (e.g. ``RoutingRecorder.stats(i).load`` or
    ``analysis.load_stats(routing).load``). Give ``num_remove`` (remove that many) or
    ``keep`` (the ids to keep). The kept experts keep their order and are re-numbered
    ``0 .. E'-1``; the router's columns of removed experts go with them (a top-k gate then
    renormalises over the remaining experts; a hash table deals the removed experts'
    tokens to the least-loaded kept ones). Returns :class:`Reindexed` with ``id_map[e]``
    the new id of old expert e, or -1.
    """
    E, loads_t = _shrink_arguments(moe, loads, num_remove=num_remove, keep=keep)
    if keep is None:
        num_remove = require_int("num_remove", num_remove, 0, E - 1)
        order = sorted(range(E), key=lambda e: (float(loads_t[e]), -e))
        kept = sorted(set(range(E)) - set(order[:num_remove]))
    else:
        kept = sorted({require_int("keep[i]", e, 0, E - 1) for e in keep})
        if not kept:
            raise ValueError("keep must name at least one expert")
    new_id = {e: j for j, e in enumerate(kept)}
    plan = ExpertPlan(
        num_old=E,
        sources=tuple(kept),
        added=(False,) * len(kept),
        redirect=tuple(new_id.get(e) for e in range(E)),
    )
    return reindex_moe(moe, plan)


def merge_groups(
    loads: Tensor, num_groups: int, features: Tensor
) -> tuple[list[list[int]], list[int]]:
    """MC-SMoE grouping: the ``num_groups`` most-used experts are the dominant ones; every
    other expert joins the dominant expert whose ``features`` row is most similar (cosine;
    ties: the more used dominant expert). Returns ``(groups, dominants)``, groups in
    dominant-id order, each listing its dominant expert first."""
    E = loads.shape[0]
    num_groups = require_int("num_groups", num_groups, 1, E)
    order = sorted(range(E), key=lambda e: (-float(loads[e]), e))
    dominants = sorted(order[:num_groups])
    f = F.normalize(features.detach().double().reshape(E, -1), dim=1)
    similarity = f @ f.t()
    rank = {e: i for i, e in enumerate(order)}
    groups = {d: [d] for d in dominants}
    for e in range(E):
        if e in groups:
            continue
        best = max(dominants, key=lambda d: (float(similarity[e, d]), -rank[d]))
        groups[best].append(e)
    return [groups[d] for d in dominants], dominants


def merge_experts(
    moe: MoE,
    loads: Tensor,
    *,
    num_groups: int | None = None,
    groups: Sequence[Sequence[int]] | None = None,
    features: Tensor | None = None,
) -> Reindexed:
    """Merge groups of experts into one each by frequency-weighted parameter averaging
    (MC-SMoE: Li et al. 2024, "Merge, Then Compress: Demystify Efficient SMoE with Hints
    from Its Routing Policy").

    Formula (group G, usage frequencies ``f_e = loads[e]``)::

        W_G = sum_{e in G} f_e W_e / sum_{e in G} f_e      for every expert parameter W

    Groups: given (``groups``, lists of old ids; the router keeps the column of each
    group's most-used member), or found by MC-SMoE's rule (:func:`merge_groups`) from
    ``num_groups`` and ``features [E, F]``, the per-expert vectors compared by cosine
    similarity: MC-SMoE uses the router logits on calibration tokens
    (``logits.t()``, ``[E, T]``); the default is the flattened expert weights. The
    router column of a merged expert is its dominant (most-used) member's: tokens that
    chose a dropped member now choose among the remaining columns. ``id_map[e]`` is the
    merged expert old expert e went into (a hash table redirects e's tokens there).
    """
    E, loads_t = _shrink_arguments(moe, loads, num_groups=num_groups, groups=groups)
    if groups is None:
        if features is None:
            stacked = stacked_tensors(moe.experts)
            if stacked is None:
                raise ValueError("pass features=[E, F] to group ModuleExperts")
            features = torch.cat(
                [t.detach().reshape(E, -1).double() for t in stacked.values()], dim=1
            )
        if features.shape[0] != E:
            raise ValueError(f"features must be [E, F] with E = {E}, got {tuple(features.shape)}")
        groups, _ = merge_groups(loads_t, num_groups, features)  # type: ignore[arg-type]
    groups = [list(g) for g in groups]
    flat = sorted(e for g in groups for e in g)
    if flat != list(range(E)) or any(not g for g in groups):
        raise ValueError(f"groups must partition the experts 0..{E - 1} into non-empty groups")
    heads = [min(g, key=lambda e: (-float(loads_t[e]), e)) for g in groups]
    redirect = [0] * E
    for j, g in enumerate(groups):
        for e in g:
            redirect[e] = j
    plan = ExpertPlan(
        num_old=E,
        sources=tuple(heads),
        added=(False,) * len(groups),
        redirect=tuple(redirect),
    )
    return reindex_moe(moe, plan, groups=groups, group_weights=loads_t)


# ---------------------------------------------------------------------- upcycling
_ACTIVATION_MODULES = {nn.ReLU: "relu", nn.GELU: "gelu", nn.SiLU: "silu"}


def _dense_ffn_parts(ffn: nn.Module) -> tuple[nn.Linear, str, nn.Linear]:
    if isinstance(ffn, nn.Sequential) and len(ffn) == 3:
        first, act, second = ffn
        kind = _ACTIVATION_MODULES.get(type(act))
        if (
            isinstance(first, nn.Linear)
            and isinstance(second, nn.Linear)
            and kind is not None
            and (first.bias is None) == (second.bias is None)
            and not (isinstance(act, nn.GELU) and act.approximate != "none")
        ):
            return first, kind, second
    raise TypeError(
        "ffn must be nn.Sequential(nn.Linear(d, h), nn.ReLU() | nn.GELU() | nn.SiLU(), "
        f"nn.Linear(h, d)) with both or neither biased, or a one-expert FFNExperts; got {ffn!r}"
    )


def upcycle_ffn(ffn: nn.Module, router: Router, *, noise: float = 0.0, seed: int = 0) -> MoE:
    """Sparse upcycling (Komatsuzaki et al. 2023, "Sparse Upcycling: Training
    Mixture-of-Experts from Dense Checkpoints"): an MoE whose E experts are copies of a
    dense FFN, routed by ``router`` (fresh, over E = ``router.num_experts`` experts).

    ``ffn``: ``nn.Sequential(Linear(d, h), ReLU | GELU | SiLU, Linear(h, d))`` or an
    ``FFNExperts`` with one expert. Every expert computes ``FFN(x)``, so the layer's
    output is ``(sum of the token's combine weights) * FFN(x)``: equal to the dense FFN
    (up to rounding) for routers whose weights per token sum to 1 (top-k, noisy top-k,
    softmax, DSelect-k, hash), but not for Switch (weight = the top probability), BASE
    (a sigmoid), or expert choice (a token may get no expert). ``noise`` > 0 perturbs each
    copy by that fraction of each weight's std (breaks the symmetry; no longer exact).
    """
    if not isinstance(router, Router):
        raise TypeError(f"router must be a routelab.Router, got {type(router).__name__}")
    noise = require_float("noise", noise, minimum=0.0)
    E = router.num_experts
    if isinstance(ffn, FFNExperts):
        if ffn.num_experts != 1:
            raise ValueError(f"ffn must be a one-expert FFNExperts, got {ffn.num_experts}")
        experts = reindex_experts(ffn, [0] * E)
    else:
        first, kind, second = _dense_ffn_parts(ffn)
        d, h = first.in_features, first.out_features
        if second.in_features != h or second.out_features != d:
            raise ValueError(f"ffn's second Linear must map {h} -> {d}")
        factory: dict[str, Any] = {"device": first.weight.device, "dtype": first.weight.dtype}
        experts = FFNExperts(E, d, h, activation=kind, bias=first.bias is not None, **factory)
        with torch.no_grad():
            experts.w_in.copy_(first.weight.t().expand(E, d, h))
            experts.w_out.copy_(second.weight.t().expand(E, h, d))
            if first.bias is not None:
                cast(Tensor, experts.b_in).copy_(first.bias.expand(E, h))
                cast(Tensor, experts.b_out).copy_(second.bias.expand(E, d))
    if experts.d_model != router.d_model:
        raise ValueError(f"router has d_model = {router.d_model}, the FFN {experts.d_model}")
    if noise:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name in expert_param_names(experts):
                p = getattr(experts, name)
                scale = p.detach().double().std() if p[0].numel() > 1 else torch.tensor(0.0)
                jitter = torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale * noise
                p.add_(jitter.to(p))
    return MoE(router, experts)


# ---------------------------------------------------------------------- freezing
class Freeze:
    """Keeps chosen experts of an MoE layer and their gate columns fixed in training.

    Gradient masks (``Tensor.register_hook``) zero the frozen slices' gradients of every
    stacked expert parameter and of every router tensor that indexes experts
    (:meth:`RouterSurgery.expert_axes`), so a frozen slice gets a gradient of exactly 0:
    SGD, and Adam / AdamW with ``weight_decay=0`` started after the freeze, leave it
    bit-identical. Optimisers that move a parameter without a gradient (weight decay,
    momentum from earlier steps) need :meth:`guard`, which restores the frozen slices
    after every ``optimizer.step()``.

    ``ModuleExperts``: the frozen experts' modules get ``requires_grad_(False)``.
    """

    def __init__(self, moe: MoE, experts: Iterable[int], *, gate: bool = True) -> None:
        _check_moe(moe)
        E = moe.num_experts
        self.frozen = sorted({require_int("experts[i]", e, 0, E - 1) for e in experts})
        self.moe = moe
        self._handles: list[Any] = []
        self._slices: list[tuple[nn.Parameter, Tensor, Tensor]] = []  # param, keep, saved
        self._modules: list[nn.Module] = []
        frozen = torch.zeros(E, dtype=torch.bool)
        frozen[self.frozen] = True
        targets: list[tuple[Tensor, int]] = []
        stacked = stacked_tensors(moe.experts)
        if stacked is not None:
            targets += [(t, 0) for t in stacked.values()]
        elif isinstance(moe.experts, ModuleExperts):
            for e in self.frozen:
                moe.experts.experts[e].requires_grad_(False)
                self._modules.append(moe.experts.experts[e])
        if gate:
            axes = router_surgery(moe.router).expert_axes(moe.router)
            targets += [(cast(Tensor, _get_tensor(moe.router, n)), a) for n, a in axes.items()]
        for param, axis in targets:
            if not isinstance(param, nn.Parameter) or not self.frozen:
                continue
            shape = [1] * param.dim()
            shape[axis] = E
            keep = (~frozen).view(shape).to(device=param.device)
            self._handles.append(param.register_hook(lambda g, keep=keep: _masked(g, keep)))
            self._slices.append((param, keep, param.detach().clone()))

    @property
    def parameters(self) -> list[nn.Parameter]:
        """The parameters that hold frozen slices."""
        return [p for p, _, _ in self._slices]

    def guard(self, optimizer: torch.optim.Optimizer) -> Freeze:
        """Restore the frozen slices after every ``optimizer.step()`` (exact for any
        optimiser, weight decay and stale momentum included). Returns self."""
        self._handles.append(optimizer.register_step_post_hook(lambda *_: self.restore()))
        return self

    @torch.no_grad()
    def restore(self) -> None:
        """Write the frozen slices back to their values at freezing time."""
        for param, keep, saved in self._slices:
            param.copy_(torch.where(keep, param, saved.to(param.device)))

    def remove(self) -> None:
        """Unfreeze: remove the hooks, make frozen expert modules trainable again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in self._modules:
            module.requires_grad_(True)
        self._modules.clear()


def _masked(grad: Tensor, keep: Tensor) -> Tensor:
    """The gradient with frozen slices set to exactly 0 (also where it is NaN or inf)."""
    return torch.where(keep, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))


def freeze_experts(moe: MoE, experts: Iterable[int], *, gate: bool = True) -> Freeze:
    """Freeze experts ``experts`` of ``moe`` (and, with ``gate``, their router columns);
    see :class:`Freeze`."""
    return Freeze(moe, experts, gate=gate)


# ---------------------------------------------------------------------- models
def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """Every :class:`MoE` inside ``model`` (outermost only), with its module path."""
    found: list[tuple[str, MoE]] = []
    for name, module in model.named_modules():
        if isinstance(module, MoE) and not any(name.startswith(p + ".") for p, _ in found):
            found.append((name, module))
    return found


def _replace(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    if not name:
        return module
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)
    return model


class Expansion(NamedTuple):
    """:func:`expand_model`'s result: the grown model and one :class:`Freeze` per layer."""

    model: nn.Module
    freezes: list[Freeze]


def expand_model(
    model: nn.Module,
    n: int,
    *,
    freeze: bool = True,
    layer_loads: Sequence[Tensor] | None = None,
    **grow_options: Any,
) -> Expansion:
    """The Lifelong-MoE expansion step (Chen et al. 2023) for a new data distribution.

    A deep copy of ``model`` (the old one stays, e.g. as the distillation teacher) in
    which every MoE layer has ``n`` more experts (:func:`grow_experts` with
    ``grow_options``) and, with ``freeze``, the old experts and the old gate columns are
    frozen (:class:`Freeze`); every other parameter stays trainable. ``layer_loads``:
    one recorded load ``[E]`` per MoE layer (in :func:`moe_layers` order), passed to each
    layer's growth as ``loads`` (copy sources: the most-used experts). Call
    ``Freeze.guard(optimizer)`` on each freeze for optimisers with weight decay.
    """
    n = require_int("n", n, 1)
    new = copy.deepcopy(model)
    freezes: list[Freeze] = []
    layers = moe_layers(new)
    if layer_loads is not None and len(layer_loads) != len(layers):
        raise ValueError(f"layer_loads must hold one load per MoE layer ({len(layers)})")
    for i, (name, layer) in enumerate(layers):
        old_E = layer.num_experts
        if layer_loads is not None:
            grow_options["loads"] = layer_loads[i]
        grown = grow_experts(layer, n, **grow_options)
        new = _replace(new, name, grown)
        if freeze:
            freezes.append(Freeze(grown, range(old_E)))
    return Expansion(new, freezes)


def distillation_loss(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0
) -> Tensor:
    """Output-level regulariser of Lifelong-MoE: distil the previous model's outputs on
    the new data (as in Learning without Forgetting, Li & Hoiem 2017).

    Formula (``[T, C]`` logits, temperature tau, the teacher detached)::

        L = tau^2 * (1/T) sum_t KL( softmax(z_teacher_t / tau) || softmax(z_student_t / tau) )

    Teacher outputs with fewer classes than the student (class-incremental heads) are
    compared on the teacher's classes: the student's first ``C_teacher`` logits.
    """
    tau = require_float("temperature", temperature, above=0.0)
    if student_logits.dim() != 2 or teacher_logits.dim() != 2:
        raise ValueError("student_logits and teacher_logits must be [T, C]")
    C = teacher_logits.shape[1]
    if student_logits.shape[0] != teacher_logits.shape[0] or student_logits.shape[1] < C:
        raise ValueError(
            f"logits must be [T, C] over the same T with the student's C >= the teacher's; "
            f"got {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    log_student = F.log_softmax(student_logits[:, :C].float() / tau, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.detach().float() / tau, dim=-1)
    kl = F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")
    return kl * tau**2


# ---------------------------------------------------------------------- optimisers
def transfer_optimizer_state(
    old_optimizer: torch.optim.Optimizer,
    new_optimizer: torch.optim.Optimizer,
    pairs: Iterable[tuple[nn.Parameter, nn.Parameter, int, Sequence[int | None]]],
) -> int:
    """Carry per-parameter optimiser state (Adam's ``exp_avg``, ``exp_avg_sq``, momentum
    buffers) from old parameters to their lifecycle successors.

    ``pairs``: ``(old_param, new_param, expert_axis, sources)``; slot j of the new
    parameter's state along ``expert_axis`` takes the old state's slot ``sources[j]``
    (zeros for None). Scalar entries (Adam's ``step``) are copied. Parameters whose
    shapes did not change pass ``sources = range(E)``. Returns the number of
    parameters whose state was carried over. Without this, a new optimiser simply
    starts from zero state, which is what the Lifelong-MoE experiments do.
    """
    carried = 0
    for old_p, new_p, axis, sources in pairs:
        state = old_optimizer.state.get(old_p)
        if not state:
            continue
        new_state: dict[str, Any] = {}
        for key, value in state.items():
            if isinstance(value, Tensor) and value.dim() and value.shape == old_p.shape:
                moved = value.movedim(axis, 0)
                rows = [moved[s] if s is not None else torch.zeros_like(moved[0]) for s in sources]
                new_state[key] = torch.stack(rows).movedim(0, axis).contiguous()
            else:
                new_state[key] = value.clone() if isinstance(value, Tensor) else value
        new_optimizer.state[new_p] = new_state
        carried += 1
    return carried


def successor_pairs(
    old: MoE, new: MoE, sources: Sequence[int | None]
) -> list[tuple[nn.Parameter, nn.Parameter, int, Sequence[int | None]]]:
    """The ``(old_param, new_param, expert_axis, sources)`` pairs of a lifecycle call, for
    :func:`transfer_optimizer_state`: the expert stacks (axis 0; ``FFNExperts``), the
    router tensors that index experts (:meth:`RouterSurgery.expert_axes`) and every other
    parameter of the same name and shape (identity). ``sources``: the call's
    :attr:`Reindexed.sources` (a merged expert takes its dominant member's state).
    """
    _check_moe(old)
    _check_moe(new)
    sources = list(sources)
    if len(sources) != new.num_experts:
        raise ValueError(f"sources must name {new.num_experts} experts, got {len(sources)}")
    axes: dict[str, int] = {}
    axes.update({f"experts.{n}": 0 for n in expert_param_names(old.experts)})
    for name, axis in router_surgery(old.router).expert_axes(old.router).items():
        axes[f"router.{name}"] = axis
    old_params = dict(old.named_parameters())
    pairs: list[tuple[nn.Parameter, nn.Parameter, int, Sequence[int | None]]] = []
    for name, new_p in new.named_parameters():
        old_p = old_params.get(name)
        if old_p is None:
            continue
        if name in axes and old_p.dim() == new_p.dim():
            pairs.append((old_p, new_p, axes[name], sources))
        elif old_p.shape == new_p.shape:
            pairs.append((old_p, new_p, 0, range(old_p.shape[0]) if old_p.dim() else [0]))
    return pairs
