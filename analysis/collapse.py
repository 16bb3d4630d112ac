"""Representation collapse of routed tokens (the measurement X-MoE motivates).

Chi et al. 2022 ("On the Representation Collapse of Sparse Mixture of Experts") argue
that routing by dot products with E expert embeddings pulls the token representations
toward the span of those embeddings, so the hidden states that reach the experts lose
dimensions. This module measures how spread out a set of representations ``h [T, d]``
is:

- ``effective_rank`` (Roy & Vetterli 2007): ``exp(H(q))`` with ``q = sigma / sum(sigma)``
  the normalised singular values of the centred ``h - mean(h)`` and ``0 log 0 = 0``;
  between 1 (all variation along one direction) and ``min(T - 1, d)`` (isotropic);
  0 when there is no variation at all (T < 2 or identical rows).
- ``rank_fraction``: ``effective_rank / min(T - 1, d)`` in [0, 1] (0 when undefined).
- ``mean_cosine``: the mean pairwise cosine similarity of the (uncentred) rows, over
  pairs of distinct tokens; 1 when every token points the same way.
- per expert (with a routing): the effective rank of the tokens each expert received
  (its routing entries' tokens); 0 for an expert with fewer than two tokens.

Compare routers on the same data: a collapsing router gives lower effective ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from routelab.routing import Routing, require_routing

__all__ = ["CollapseStats", "effective_rank", "representation_collapse"]


def _as_matrix(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor) or not value.is_floating_point() or value.dim() != 2:
        raise TypeError(f"{name} must be a floating tensor [T, d], got {value!r:.80}")
    value = value.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} must be finite (found NaN or inf)")
    return value


def effective_rank(representations: Tensor) -> float:
    """``exp(entropy of the normalised singular values)`` of centred ``[T, d]`` rows."""
    h = _as_matrix("representations", representations)
    if h.shape[0] < 2:
        return 0.0
    sigma = torch.linalg.svdvals(h - h.mean(dim=0, keepdim=True))
    total = float(sigma.sum())
    if total <= 1e-10 * float(h.abs().max()) * h.shape[0]:  # rounding noise of equal rows
        return 0.0
    q = sigma / total
    q = q[q > 0]
    return math.exp(float(-(q * q.log()).sum()))


@dataclass(frozen=True)
class CollapseStats:
    """How spread out routed representations are (see the module docstring).

    Fields:
        effective_rank: of all T representations.
        rank_fraction: effective_rank / min(T - 1, d).
        mean_cosine: mean pairwise cosine similarity of the rows.
        per_expert_effective_rank: float64 ``[E]`` (None without a routing).
        num_tokens, dim: T and d.
    """

    effective_rank: float
    rank_fraction: float
    mean_cosine: float
    per_expert_effective_rank: Tensor | None
    num_tokens: int
    dim: int

    def to_dict(self) -> dict[str, object]:
        per_expert = self.per_expert_effective_rank
        return {
            "effective_rank": self.effective_rank,
            "rank_fraction": self.rank_fraction,
            "mean_cosine": self.mean_cosine,
            "per_expert_effective_rank": None if per_expert is None else per_expert.tolist(),
            "num_tokens": self.num_tokens,
            "dim": self.dim,
        }


def representation_collapse(
    representations: Tensor, routing: Routing | None = None
) -> CollapseStats:
    """The ``CollapseStats`` of ``representations [T, d]`` (e.g. an MoE layer's input).

    With ``routing`` (over the same T tokens) also the effective rank of each expert's
    tokens.
    """
    h = _as_matrix("representations", representations)
    num_tokens, dim = h.shape
    rank = effective_rank(h)
    top = min(num_tokens - 1, dim)
    mean_cosine = 0.0
    if num_tokens >= 2:
        unit = F.normalize(h, dim=1)
        gram = unit @ unit.T
        mean_cosine = float((gram.sum() - gram.diagonal().sum()) / (num_tokens * (num_tokens - 1)))
    per_expert = None
    if routing is not None:
        routing = require_routing(routing)
        if routing.num_tokens != num_tokens:
            raise ValueError(
                f"routing covers {routing.num_tokens} tokens, representations have {num_tokens}"
            )
        token, expert = routing.token.cpu(), routing.expert.cpu()
        per_expert = torch.tensor(
            [effective_rank(h[token[expert == e]]) for e in range(routing.num_experts)],
            dtype=torch.float64,
        )
    return CollapseStats(
        effective_rank=rank,
        rank_fraction=rank / top if top > 0 else 0.0,
        mean_cosine=mean_cosine,
        per_expert_effective_rank=per_expert,
        num_tokens=num_tokens,
        dim=dim,
    )
