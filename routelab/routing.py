"""The one data type that flows through routelab: a sparse token-to-expert assignment.

Every router, differentiable or combinatorial, returns a :class:`Routing` in
coordinate (COO) form: entry ``n`` sends token ``token[n]`` to expert
``expert[n]`` with combine weight ``weight[n]``. Top-k gates give N = T*k
entries, dense softmax N = T*E, expert choice E*c, BASE and hashing N = T.
Policies map a Routing to a Routing; experts execute any Routing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn

import torch
from torch import Tensor

from routelab._validate import (
    INT64_MAX,
    all_finite,
    ceil_fraction,
    exact_fraction,
    require_float,
    require_int,
    validation_enabled,
)
from routelab.losses import expert_load

__all__ = ["Routing"]


class FrozenAux(dict):  # type: ignore[type-arg]
    """``Routing.aux``: a read-only ``dict[str, Tensor]`` (a Routing is immutable).

    Build a Routing with more losses through the constructor or
    ``dataclasses.replace(routing, aux={**routing.aux, "name": loss})``.
    """

    def _refuse(self, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError(
            "Routing.aux is read-only (a Routing is immutable); build a new Routing with "
            "dataclasses.replace(routing, aux={**routing.aux, ...})"
        )

    __setitem__ = __delitem__ = update = pop = popitem = setdefault = clear = _refuse
    __ior__ = _refuse  # type: ignore[assignment]

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenAux, (dict(self),))

    def __copy__(self) -> FrozenAux:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> FrozenAux:
        import copy

        return FrozenAux({k: copy.deepcopy(v, memo) for k, v in self.items()})


@dataclass(eq=False, frozen=True)
class Routing:
    """A sparse token-to-expert assignment in COO form.

    Fields:
        token: int64 ``[N]``, token index in the flattened batch, ``0 <= token < num_tokens``.
        expert: int64 ``[N]``, expert id, ``0 <= expert < num_experts``.
        weight: float ``[N]``, combine weight; carries the gradient back into the router.
        num_tokens: T.
        num_experts: E.
        probs: float ``[T, E]`` or None, the router's full distribution where it has one.
        aux: named scalar losses, already multiplied by their coefficients.
        dropped: the entries a capacity policy removed (a Routing over the same T and E),
            or None where no capacity policy ran.
        capacity: the per-expert capacity the last capacity policy enforced, or None.

    Construction checks shapes, dtypes and devices (cheap, no host sync). The value
    invariants (ids in range, no duplicate pair, finite non-negative weights) are
    checked by :meth:`validate`.

    A Routing is immutable (a frozen dataclass): assigning to a field raises
    ``dataclasses.FrozenInstanceError``, and ``aux`` is a read-only copy of the mapping
    given (never shared with the caller or with another Routing). Derive new Routings
    with the constructor, :meth:`select`, :meth:`with_weight` or
    ``dataclasses.replace(routing, field=...)``, which re-runs every check.
    """

    token: Tensor
    expert: Tensor
    weight: Tensor
    num_tokens: int
    num_experts: int
    probs: Tensor | None = None
    aux: Mapping[str, Tensor] = field(default_factory=dict)
    dropped: Routing | None = None
    capacity: int | None = None

    def __post_init__(self) -> None:
        T = require_int("num_tokens", self.num_tokens, 0, INT64_MAX)
        E = require_int("num_experts", self.num_experts, 1, INT64_MAX)
        if T * E > INT64_MAX:  # (token, expert) pairs are indexed as token * E + expert
            raise ValueError(f"num_tokens * num_experts = {T} * {E} does not fit in int64")
        object.__setattr__(self, "num_tokens", T)
        object.__setattr__(self, "num_experts", E)
        for name in ("token", "expert", "weight"):
            value = getattr(self, name)
            if not isinstance(value, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
            if value.dim() != 1:
                raise ValueError(f"{name} must be 1-D [N], got shape {tuple(value.shape)}")
        for name in ("token", "expert"):
            if getattr(self, name).dtype != torch.int64:
                raise TypeError(f"{name} must be int64, got {getattr(self, name).dtype}")
        if not self.weight.is_floating_point():
            raise TypeError(f"weight must be a floating tensor, got {self.weight.dtype}")
        n = self.token.shape[0]
        if self.expert.shape[0] != n or self.weight.shape[0] != n:
            raise ValueError(
                "token, expert and weight must have the same length N, got "
                f"{n}, {self.expert.shape[0]}, {self.weight.shape[0]}"
            )
        device = self.token.device
        for name in ("expert", "weight"):
            if getattr(self, name).device != device:
                raise ValueError(
                    f"{name} is on {getattr(self, name).device} but token is on {device}"
                )
        if self.probs is not None:
            if not isinstance(self.probs, Tensor):
                raise TypeError(f"probs must be a Tensor or None, got {type(self.probs).__name__}")
            if tuple(self.probs.shape) != (self.num_tokens, self.num_experts):
                raise ValueError(
                    f"probs must have shape [T, E] = [{self.num_tokens}, {self.num_experts}], "
                    f"got {tuple(self.probs.shape)}"
                )
        if not isinstance(self.aux, Mapping):
            raise TypeError(f"aux must be a dict[str, Tensor], got {type(self.aux).__name__}")
        for key, value in self.aux.items():
            if not isinstance(key, str):
                raise TypeError(f"aux keys must be str, got {key!r}")
            if not isinstance(value, Tensor) or value.numel() != 1:
                raise ValueError(f"aux[{key!r}] must be a scalar tensor, got {value!r}")
        # a copy: never shared (a plain dict inside torch.compile, which cannot rebuild a
        # dict subclass created in the graph; eager code always gets the read-only one)
        aux = dict(self.aux) if torch.compiler.is_compiling() else FrozenAux(self.aux)
        object.__setattr__(self, "aux", aux)
        if self.dropped is not None and not isinstance(self.dropped, Routing):
            raise TypeError(f"dropped must be a Routing or None, got {type(self.dropped).__name__}")
        if self.capacity is not None:
            object.__setattr__(self, "capacity", require_int("capacity", self.capacity, 0))
        if self.dropped is not None and (
            self.dropped.num_tokens != self.num_tokens
            or self.dropped.num_experts != self.num_experts
        ):
            raise ValueError("dropped must be a Routing over the same num_tokens and num_experts")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_topk(
        cls,
        indices: Tensor,
        weights: Tensor,
        num_experts: int,
        *,
        probs: Tensor | None = None,
        aux: Mapping[str, Tensor] | None = None,
    ) -> Routing:
        """Build from top-k tensors: ``indices`` int ``[T, k]``, ``weights`` float ``[T, k]``.

        Entries are laid out token-major: entry ``t * k + j`` is token t's j-th choice.
        """
        for name, value in (("indices", indices), ("weights", weights)):
            if not isinstance(value, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
        if indices.dim() != 2 or weights.shape != indices.shape:
            raise ValueError(
                "indices and weights must both be [T, k], got "
                f"{tuple(indices.shape)} and {tuple(weights.shape)}"
            )
        num_tokens, k = indices.shape
        token = torch.arange(num_tokens, device=indices.device).repeat_interleave(k)
        return cls(
            token=token,
            expert=indices.reshape(-1).long(),
            weight=weights.reshape(-1),
            num_tokens=num_tokens,
            num_experts=num_experts,
            probs=probs,
            aux=dict(aux or {}),
        )

    @classmethod
    def from_dense(
        cls,
        combine: Tensor,
        *,
        probs: Tensor | None = None,
        aux: Mapping[str, Tensor] | None = None,
        keep_zeros: bool = False,
    ) -> Routing:
        """Build from a dense combine matrix ``combine [T, E]``.

        Only the non-zero entries are kept unless ``keep_zeros`` (dense softmax keeps all
        T*E entries even where a weight underflows to zero). Weights stay differentiable.
        """
        if not isinstance(combine, Tensor):
            raise TypeError(f"combine must be a torch.Tensor, got {type(combine).__name__}")
        if combine.dim() != 2:
            raise ValueError(f"combine must be [T, E], got shape {tuple(combine.shape)}")
        num_tokens, num_experts = combine.shape
        if keep_zeros or (
            not torch.compiler.is_compiling()  # (a host sync: eager only)
            and int(torch.count_nonzero(combine)) == combine.numel()
        ):
            # every entry, row-major (nonzero()'s order): the weights are combine itself,
            # no gather and no scatter in backward
            token = torch.arange(num_tokens, device=combine.device).repeat_interleave(num_experts)
            expert = torch.arange(num_experts, device=combine.device).repeat(num_tokens)
            weight = combine.reshape(-1)
        else:
            token, expert = torch.nonzero(combine, as_tuple=True)
            weight = combine[token, expert]
        return cls(
            token=token,
            expert=expert,
            weight=weight,
            num_tokens=num_tokens,
            num_experts=num_experts,
            probs=probs,
            aux=dict(aux or {}),
        )

    # ------------------------------------------------------------------ derived
    @property
    def num_entries(self) -> int:
        """N, the number of (token, expert) entries."""
        return int(self.token.shape[0])

    @property
    def device(self) -> torch.device:
        return self.token.device

    @property
    def aux_loss(self) -> Tensor:
        """Sum of the auxiliary losses in ``aux``; a zero scalar when there are none."""
        if not self.aux:
            return self.weight.new_zeros(())
        return torch.stack([v.reshape(()) for v in self.aux.values()]).sum()

    def load(self) -> Tensor:
        """int64 ``[E]``: the number of entries each expert received."""
        return expert_load(self.expert, self.num_experts)  # fixed size: torch.compile traces it

    def entries_per_token(self) -> Tensor:
        """int64 ``[T]``: the number of experts each token was sent to."""
        return expert_load(self.token, self.num_tokens)  # the same count over token ids

    def check_ids(self) -> Routing:
        """Raise a ValueError when a token or expert id is out of range (one host sync);
        a no-op with ``routelab.validation(False)``. Returns ``self``.

        Executors and :meth:`to_dense` call it, so a bad id is a clear error instead of
        an entry landing on the next token's row, an IndexError or a bincount error."""
        if not validation_enabled() or not self.num_entries:
            return self
        bounds = torch.stack(
            [self.token.min(), self.token.max(), self.expert.min(), self.expert.max()]
        ).tolist()
        t_min, t_max, e_min, e_max = bounds
        if t_min < 0 or t_max >= self.num_tokens:
            raise ValueError(
                f"token ids out of range [0, {self.num_tokens}): min {t_min}, max {t_max}"
            )
        if e_min < 0 or e_max >= self.num_experts:
            raise ValueError(
                f"expert ids out of range [0, {self.num_experts}): min {e_min}, max {e_max}"
            )
        return self

    def to_dense(self) -> Tensor:
        """The combine matrix ``[T, E]`` (differentiable in ``weight``); out-of-range ids
        raise (see :meth:`check_ids`)."""
        self.check_ids()
        flat = self.token * self.num_experts + self.expert
        dense = self.weight.new_zeros(self.num_tokens * self.num_experts)
        dense = dense.index_add(0, flat, self.weight)
        return dense.view(self.num_tokens, self.num_experts)

    def select(self, keep: Tensor, **changes: Any) -> Routing:
        """A new Routing with the entries where the bool ``keep [N]`` holds (or at int
        indices); ``changes`` replace further fields (e.g. ``dropped=``, ``capacity=``)."""
        if not isinstance(keep, Tensor):
            raise TypeError(f"keep must be a bool or integer tensor, got {type(keep).__name__}")
        if keep.is_floating_point() or keep.is_complex():
            raise TypeError(f"keep must be a bool or integer tensor, got {keep.dtype}")
        if keep.dtype == torch.bool and tuple(keep.shape) != (self.num_entries,):
            raise ValueError(
                f"a bool keep must have shape [N] = [{self.num_entries}], got {tuple(keep.shape)}"
            )
        return replace(
            self,
            token=self.token[keep],
            expert=self.expert[keep],
            weight=self.weight[keep],
            **changes,
        )

    def with_weight(self, weight: Tensor) -> Routing:
        """The same entries with new combine weights ``[N]``."""
        return replace(self, weight=weight)

    def to(self, device: torch.device | str) -> Routing:
        return replace(
            self,
            token=self.token.to(device),
            expert=self.expert.to(device),
            weight=self.weight.to(device),
            probs=None if self.probs is None else self.probs.to(device),
            aux={k: v.to(device) for k, v in self.aux.items()},
            dropped=None if self.dropped is None else self.dropped.to(device),
        )

    def detach(self) -> Routing:
        return replace(
            self,
            weight=self.weight.detach(),
            probs=None if self.probs is None else self.probs.detach(),
            aux={k: v.detach() for k, v in self.aux.items()},
            dropped=None if self.dropped is None else self.dropped.detach(),
        )

    # ------------------------------------------------------------------ invariants
    def validate(
        self,
        *,
        k: int | None = None,
        capacity: int | Tensor | None = None,
        balanced: bool | Tensor | None = None,
        atol: float = 1e-5,
    ) -> Routing:
        """Check every invariant; raise ValueError naming the one that failed.

        Always checked: ids in range, no duplicate (token, expert) pair, weights finite
        and >= 0, probs finite where present, aux finite. Optional expectations:

        - ``k``: every token has exactly k entries whose weights sum to 1 (a top-k gate
          before any capacity policy).
        - ``capacity``: no expert holds more than ``capacity`` entries (int or int ``[E]``).
        - ``balanced``: ``True`` means an even split (loads differ by at most one and every
          token has exactly one entry); an int tensor ``[E]`` is the exact quota per expert.

        Returns ``self`` so it can be chained.
        """
        if k is not None:
            k = require_int("k", k, 0)
        if capacity is not None and not isinstance(capacity, Tensor):
            capacity = require_int("capacity", capacity, 0)
        atol = require_float("atol", atol, minimum=0.0)
        T, E = self.num_tokens, self.num_experts
        if self.num_entries:
            if int(self.token.min()) < 0 or int(self.token.max()) >= T:
                raise ValueError(
                    f"token ids out of range [0, {T}): min {int(self.token.min())}, "
                    f"max {int(self.token.max())}"
                )
            if int(self.expert.min()) < 0 or int(self.expert.max()) >= E:
                raise ValueError(
                    f"expert ids out of range [0, {E}): min {int(self.expert.min())}, "
                    f"max {int(self.expert.max())}"
                )
            pairs = self.token * E + self.expert
            if torch.unique(pairs).numel() != self.num_entries:
                raise ValueError("duplicate (token, expert) pairs in the routing")
            w = self.weight.detach()
            if not all_finite(w):
                raise ValueError("routing weights must be finite (found NaN or inf)")
            if bool((w < 0).any()):
                raise ValueError(f"routing weights must be >= 0, min is {float(w.min())}")
        if self.probs is not None and not all_finite(self.probs.detach()):
            raise ValueError("probs must be finite (found NaN or inf)")
        for key, value in self.aux.items():
            if not all_finite(value.detach()):
                raise ValueError(f"aux[{key!r}] is not finite: {value.item()}")
        if k is not None:
            self._check_top_k(k, atol)
        if capacity is not None:
            self._check_capacity(capacity)
        if balanced is not None and balanced is not False:
            self._check_balanced(balanced)
        return self

    def _check_top_k(self, k: int, atol: float) -> None:
        per_token = self.entries_per_token()
        if self.num_tokens and not bool((per_token == k).all()):
            bad = int(torch.nonzero(per_token != k)[0, 0])
            raise ValueError(
                f"top-k invariant: every token must have exactly k={k} entries, "
                f"token {bad} has {int(per_token[bad])}"
            )
        sums = torch.zeros(self.num_tokens, dtype=torch.float64, device=self.device)
        sums = sums.index_add(0, self.token, self.weight.detach().double())
        if self.num_tokens and not bool(torch.allclose(sums, torch.ones_like(sums), atol=atol)):
            worst = float((sums - 1).abs().max())
            raise ValueError(
                f"top-k invariant: weights of each token must sum to 1 (worst |sum - 1| = {worst:.3g})"
            )

    def _check_capacity(self, capacity: int | Tensor) -> None:
        load = self.load()
        if isinstance(capacity, int) and not isinstance(capacity, bool):
            capacity = min(capacity, INT64_MAX)  # any larger capacity holds trivially
        cap = torch.as_tensor(capacity, device=load.device)
        over = load > cap
        if bool(over.any()):
            e = int(torch.nonzero(over)[0, 0])
            limit = int(cap) if cap.dim() == 0 else int(cap[e])
            raise ValueError(
                f"capacity invariant: expert {e} holds {int(load[e])} entries, capacity is {limit}"
            )

    def _check_balanced(self, balanced: bool | Tensor) -> None:
        load = self.load()
        if balanced is True:
            per_token = self.entries_per_token()
            if self.num_tokens and not bool((per_token == 1).all()):
                raise ValueError("balanced invariant: every token must have exactly one entry")
            if self.num_tokens and int(load.max() - load.min()) > 1:
                raise ValueError(
                    f"balanced invariant: loads must differ by at most one, got {load.tolist()}"
                )
            return
        quota = torch.as_tensor(balanced, device=load.device)
        if quota.shape != load.shape or not bool((quota == load).all()):
            raise ValueError(
                f"balanced invariant: loads {load.tolist()} differ from the quota {quota.tolist()}"
            )

    def __repr__(self) -> str:
        extra = ""
        if self.dropped is not None:
            extra = f", dropped={self.dropped.num_entries}, capacity={self.capacity}"
        return (
            f"Routing(T={self.num_tokens}, E={self.num_experts}, N={self.num_entries}, "
            f"probs={'yes' if self.probs is not None else 'no'}, aux={sorted(self.aux)}{extra})"
        )


def require_routing(value: object, name: str = "routing") -> Routing:
    """``value`` if it is a :class:`Routing`, else a TypeError naming the argument."""
    if not isinstance(value, Routing):
        raise TypeError(f"{name} must be a routelab.Routing, got {type(value).__name__}")
    return value


def even_quota(num_tokens: int, num_experts: int) -> list[int]:
    """An even split of T tokens over E experts: sizes differ by at most one."""
    base, extra = divmod(num_tokens, num_experts)
    return [base + (1 if e < extra else 0) for e in range(num_experts)]


def capacity_from_factor(factor: object, num_entries: int, num_experts: int) -> int:
    """``ceil(factor * N / E)``, the Switch/GShard capacity for N = T*k entries, computed
    exactly on the decimal the user wrote: ``factor`` is read as
    ``fractions.Fraction(str(factor))``, so ``capacity_from_factor(1.1, 100, 10)`` is 11
    (the float product ``1.1 * 100 / 10`` is 11.000000000000002, whose ceiling is 12).

    ``factor``: a finite number > 0 (float, int, Fraction or Decimal); ``num_entries``
    N >= 0; ``num_experts`` E >= 1.
    """
    fraction = exact_fraction("capacity_factor", factor)
    num_entries = require_int("num_entries", num_entries, 0)
    num_experts = require_int("num_experts", num_experts, 1)
    return ceil_fraction(fraction * num_entries / num_experts)
