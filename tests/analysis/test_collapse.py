import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from analysis.collapse import effective_rank, representation_collapse
from routelab import Routing


def numpy_effective_rank(h: np.ndarray) -> float:
    """Roy & Vetterli 2007 on centred rows: exp(entropy of sigma / sum sigma)."""
    if h.shape[0] < 2:
        return 0.0
    sigma = np.linalg.svd(h - h.mean(axis=0), compute_uv=False)
    if sigma.sum() == 0:
        return 0.0
    q = sigma / sigma.sum()
    return math.exp(-sum(v * math.log(v) for v in q if v > 0))


@given(T=st.integers(2, 12), d=st.integers(1, 6), seed=st.integers(0, 1000))
def test_effective_rank_and_cosine_match_the_definitions(T, d, seed):
    h = np.random.default_rng(seed).normal(size=(T, d))
    stats = representation_collapse(torch.from_numpy(h))
    assert stats.effective_rank == pytest.approx(numpy_effective_rank(h), rel=1e-9)
    assert stats.rank_fraction == pytest.approx(stats.effective_rank / min(T - 1, d), rel=1e-9)
    unit = h / np.linalg.norm(h, axis=1, keepdims=True)
    pairs = [unit[i] @ unit[j] for i in range(T) for j in range(T) if i != j]
    assert stats.mean_cosine == pytest.approx(float(np.mean(pairs)), abs=1e-12)


def test_collapsed_and_isotropic_extremes():
    line = torch.arange(10.0)[:, None] * torch.tensor([[1.0, 2.0, -1.0]])
    assert effective_rank(line) == pytest.approx(1.0)
    cross = torch.cat([torch.eye(4), -torch.eye(4)])  # centred, equal variance on 4 axes
    assert effective_rank(cross) == pytest.approx(4.0)
    same = torch.full((5, 3), 0.1)
    stats = representation_collapse(same)
    assert stats.effective_rank == 0.0 and stats.mean_cosine == pytest.approx(1.0)
    assert representation_collapse(torch.zeros(1, 3)).effective_rank == 0.0
    assert representation_collapse(torch.zeros(0, 3)).rank_fraction == 0.0


def test_per_expert_effective_rank_uses_each_experts_tokens():
    torch.manual_seed(0)
    h = torch.cat([torch.randn(6, 3), torch.arange(6.0)[:, None] * torch.ones(1, 3)])
    routing = Routing(torch.arange(12), torch.tensor([0] * 6 + [1] * 6), torch.ones(12), 12, 3)
    per_expert = representation_collapse(h, routing).per_expert_effective_rank
    assert per_expert[0] == pytest.approx(effective_rank(h[:6]))
    assert per_expert[1] == pytest.approx(1.0)
    assert per_expert[2] == 0.0  # no tokens
    with pytest.raises(ValueError, match="tokens"):
        representation_collapse(h[:5], routing)
    with pytest.raises(TypeError, match="representations"):
        representation_collapse(torch.ones(3, dtype=torch.long))
