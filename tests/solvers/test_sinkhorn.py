"""Tests for solvers._sinkhorn: the numpy sweeps (scaling domain where the spread allows,
log domain otherwise) against the torch log-domain twin, an independent implementation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from solvers import _sinkhorn
from solvers._sinkhorn import sinkhorn_potentials, sinkhorn_potentials_numpy


@st.composite
def sinkhorn_problems(draw):
    """``(S [T, E], cap [E], tau)``: gaussian scores scaled to spread 1, capacities with
    spare room (the dummy row) and closed experts (capacity 0), tau from 0.005 to 1."""
    T = draw(st.integers(1, 200))
    E = draw(st.integers(1, 12))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    S = rng.standard_normal((T, E))
    S = S / max(float(np.ptp(S)), 1e-12)
    cap = rng.integers(0, 3, E) * (-(-T // E))  # some closed, some double
    open_ = draw(st.integers(0, E - 1))
    cap[open_] += max(T - int(cap.sum()), 0) + draw(st.integers(0, 5))  # sum >= T
    return S, cap, draw(st.sampled_from([0.005, 0.01, 0.05, 1.0]))


def _torch_reference(S, cap, tau, max_iter, tol):
    g, it = sinkhorn_potentials(
        torch.from_numpy(S), torch.from_numpy(cap), tau=tau, max_iter=max_iter, tol=tol
    )
    return g.numpy(), it


@given(sinkhorn_problems())
def test_numpy_sweeps_equal_the_torch_log_domain_twin(problem):
    S, cap, tau = problem
    # tol = 0: both run every sweep, so the potentials compare after the same iterations
    g, it = sinkhorn_potentials_numpy(S, cap, tau=tau, max_iter=30, tol=0.0)
    g_ref, it_ref = _torch_reference(S, cap, tau, 30, 0.0)
    assert it == it_ref == 30
    open_ = cap > 0
    np.testing.assert_allclose(g[open_], g_ref[open_], rtol=1e-9, atol=1e-9 * tau)
    assert (g[~open_] == g_ref[~open_]).all()  # closed experts: the sentinel, exactly


def test_scaling_sweeps_taken_at_the_default_temperature_and_match_log_domain():
    rng = np.random.default_rng(3)
    T, E, tau = 4096, 32, 1e-2  # spread / tau = 100: the scaling domain
    S = rng.standard_normal((T, E))
    S /= np.ptp(S)
    cap = np.full(E, T // E)
    X = S / tau
    log_c = np.where(cap > 0, np.log(np.maximum(cap, 1).astype(np.float64)), -np.inf)
    K = float(cap.sum()) - T
    scaled = _sinkhorn._sweeps_scaling(X, cap, log_c, K, 100, 1e-4)
    assert scaled is not None
    g_log, it_log = _sinkhorn._sweeps_log(X, cap, log_c, K, 100, 1e-4)
    assert scaled[1] == it_log < 100  # converged, after the same number of sweeps
    np.testing.assert_allclose(scaled[0][cap > 0], g_log[cap > 0], rtol=1e-12, atol=1e-9)
    g, it = sinkhorn_potentials_numpy(S, cap, tau=tau, max_iter=100, tol=1e-4)
    assert it == it_log
    np.testing.assert_array_equal(g, scaled[0] * tau)


@pytest.mark.parametrize("tau", [1e-4, 1e-6])
def test_large_spread_runs_the_log_domain(tau, monkeypatch):
    """spread / tau above 200 would underflow the kernel: the log-domain sweeps run."""

    def refuse(*args):
        raise AssertionError("the scaling sweeps must not run at this spread")

    monkeypatch.setattr(_sinkhorn, "_sweeps_scaling", refuse)
    rng = np.random.default_rng(0)
    S = rng.standard_normal((64, 4))
    S /= np.ptp(S)
    cap = np.full(4, 16)
    g, it = sinkhorn_potentials_numpy(S, cap, tau=tau, max_iter=20, tol=0.0)
    g_ref, it_ref = _torch_reference(S, cap, tau, 20, 0.0)
    assert it == it_ref
    np.testing.assert_allclose(g, g_ref, rtol=1e-9, atol=1e-9 * tau)
