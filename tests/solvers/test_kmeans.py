import itertools

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from solvers import KMeansResult, kmeans


def lloyd_fixed_point_holds(x, result):
    """Every non-empty cluster's centre is the mean of its points."""
    for c in np.unique(result.labels):
        np.testing.assert_allclose(
            result.centers[c], x[result.labels == c].mean(0), atol=1e-6, rtol=1e-6
        )


@given(
    n=st.integers(1, 40),
    d=st.integers(1, 4),
    data=st.data(),
)
def test_labels_are_nearest_centres_and_identical_points_share_them(n, d, data):
    k = data.draw(st.integers(1, n))
    seed = data.draw(st.integers(0, 1000))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    # duplicate some rows exactly
    x[rng.integers(n, size=n // 2)] = x[rng.integers(n, size=n // 2)]
    r = kmeans(x, k, seed=seed)
    assert isinstance(r, KMeansResult)
    assert r.labels.shape == (n,) and r.centers.shape == (k, d)
    dist = ((x[:, None, :] - r.centers[None]) ** 2).sum(-1)
    assert np.all(dist[np.arange(n), r.labels] <= dist.min(1) + 1e-9)
    for i, j in itertools.combinations(range(n), 2):
        if np.array_equal(x[i], x[j]):
            assert r.labels[i] == r.labels[j]
    assert r.inertia == pytest.approx(dist[np.arange(n), r.labels].sum(), abs=1e-9)
    if r.converged:
        lloyd_fixed_point_holds(x, r)


def test_recovers_separated_blobs_and_is_seeded():
    rng = np.random.default_rng(1)
    centres = np.array([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0], [20.0, 20.0]])
    truth = np.repeat(np.arange(4), 50)
    x = centres[truth] + rng.standard_normal((200, 2))
    r = kmeans(x, 4, seed=3)
    # same partition as the truth, up to relabelling
    pairs = set(zip(truth.tolist(), r.labels.tolist()))
    assert len(pairs) == 4
    again = kmeans(x, 4, seed=3)
    np.testing.assert_array_equal(r.labels, again.labels)
    np.testing.assert_array_equal(r.centers, again.centers)


def test_matches_sklearn_inertia_on_blobs():
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(2)
    x = np.concatenate([rng.standard_normal((60, 3)) + 8 * i for i in range(5)])
    ours = kmeans(x, 5, seed=0, n_init=3)
    ref = KMeans(5, n_init=3, random_state=0).fit(x)
    assert ours.inertia <= ref.inertia_ * 1.0001


def test_fewer_distinct_points_than_k():
    x = np.array([[1.0, 1.0]] * 5 + [[2.0, 2.0]] * 5)
    r = kmeans(x, 4, seed=0)
    assert len(set(r.labels[:5].tolist())) == 1 and len(set(r.labels[5:].tolist())) == 1
    assert r.labels[0] != r.labels[5]
    assert r.inertia == 0.0


def test_torch_in_torch_out():
    x = torch.randn(30, 3, generator=torch.Generator().manual_seed(0))
    r = kmeans(x, 3, seed=0)
    assert isinstance(r.labels, torch.Tensor) and r.labels.dtype == torch.int64
    assert isinstance(r.centers, torch.Tensor) and r.centers.shape == (3, 3)
    n = kmeans(x.numpy(), 3, seed=0)
    np.testing.assert_array_equal(n.labels, r.labels.numpy())


@pytest.mark.parametrize(
    ("x", "k", "kwargs", "error", "match"),
    [
        (np.zeros((3, 2)), 4, {}, ValueError, "k must be <="),
        (np.zeros((3, 2)), 0, {}, ValueError, "k must be >= 1"),
        (np.zeros(3), 1, {}, ValueError, "2-D"),
        (np.array([[np.nan]]), 1, {}, ValueError, "finite"),
        (np.zeros((3, 2)), 2.0, {}, TypeError, "k must be an int"),
        (np.zeros((3, 2)), 1, {"n_init": 0}, ValueError, "n_init"),
        (np.zeros((3, 2)), 1, {"seed": 1.5}, TypeError, "seed"),
    ],
)
def test_bad_input_is_a_clear_error(x, k, kwargs, error, match):
    with pytest.raises(error, match=match):
        kmeans(x, k, **kwargs)
