"""analysis.hash_expected_load / hash_load_imbalance against a plain loop over the table."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from analysis import hash_expected_load, hash_load_imbalance
from routelab.routers import HashRouter


@given(N=st.integers(1, 3), E=st.integers(1, 5), V=st.integers(1, 40), seed=st.integers(0, 99))
def test_expected_load_is_the_loop_over_the_table(N, E, V, seed):
    kind = "random" if N == 1 else "multi-hash"
    extra = {} if N == 1 else {"num_hashes": N}
    router = HashRouter.fit(kind, E, d_model=2, vocab_size=V, seed=seed, **extra)
    counts = np.random.default_rng(seed).integers(0, 7, V)
    expected = [0.0] * (N * E)
    table = router.table.view(N, V).tolist()
    for j in range(N):
        for v in range(V):
            expected[j * E + table[j][v]] += float(counts[v])
    load = hash_expected_load(router, counts)
    assert load.dtype == torch.float64 and load.tolist() == expected
    mean = sum(expected) / len(expected)
    assert hash_load_imbalance(router, counts) == (max(expected) / mean if mean else 1.0)


def test_the_expected_load_is_the_realised_load_of_the_stream():
    stream = torch.randint(30, (500,), generator=torch.Generator().manual_seed(0))
    router = HashRouter.fit("balanced", 4, d_model=2, token_ids=stream, vocab_size=30)
    routing = router(torch.zeros(500, 2), stream)
    counts = torch.bincount(stream, minlength=30)
    assert torch.equal(hash_expected_load(router, counts), routing.load().double())


@pytest.mark.parametrize(
    ("router", "counts", "error", "match"),
    [
        ("not a router", [1, 2], TypeError, "HashRouter"),
        (None, [1, 2], ValueError, r"shape \[V\] = \[3\]"),
        (None, [1, -2, 3], ValueError, ">= 0"),
        (None, [1, float("nan"), 3], ValueError, "finite"),
        (None, [True, False, True], TypeError, "dtype"),
    ],
)
def test_bad_input(router, counts, error, match):
    router = router if router is not None else HashRouter.fit("random", 2, d_model=2, vocab_size=3)
    with pytest.raises(error, match=match):
        hash_expected_load(router, counts)
