import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from routelab.losses import cv_squared
from routelab.routers import NoisyTopKGate
from routelab.routers.noisy_topk import kth_excluding, smooth_load
from routelab.testing import RouterContract


class TestNoisyTopKGate(RouterContract):
    expect = {"k": 2}

    def make_router(self, d_model, num_experts):
        return NoisyTopKGate(d_model, num_experts, k=2)  # zero init, both losses


class TestNoisyTopKGateTop1LoadOnly(RouterContract):
    """k = 1: the weight is constantly 1, gradients arrive through the load loss only."""

    expect = {"k": 1}

    def make_router(self, d_model, num_experts):
        gate = NoisyTopKGate(d_model, num_experts, k=1, importance_weight=0, load_weight=0.5)
        torch.nn.init.normal_(gate.w_gate)
        torch.nn.init.normal_(gate.w_noise)
        return gate


def random_gate(d, E, k, seed, **kwargs):
    torch.manual_seed(seed)
    gate = NoisyTopKGate(d, E, k=k, **kwargs).double()
    with torch.no_grad():
        gate.w_gate.normal_()
        gate.w_noise.normal_(0, 0.5)
    return gate


def keep_topk_softmax(h, k):
    masked = torch.full_like(h, float("-inf"))
    idx = h.topk(k, dim=1).indices
    masked.scatter_(1, idx, h.gather(1, idx))
    return torch.softmax(masked, dim=1)


@given(T=st.integers(0, 15), E=st.integers(1, 7), seed=st.integers(0, 999), data=st.data())
def test_noisy_topk_matches_its_formula(T, E, seed, data):
    k = data.draw(st.integers(1, E))
    gate = random_gate(4, E, k, seed)
    x = torch.randn(T, 4, dtype=torch.float64)
    clean = x @ gate.w_gate
    torch.testing.assert_close(gate.eval()(x).to_dense(), keep_topk_softmax(clean, k))
    torch.manual_seed(seed)
    routing = gate.train()(x)
    torch.manual_seed(seed)
    eps = torch.randn_like(clean) if T else clean
    h = clean + eps * (F.softplus(x @ gate.w_noise) + gate.noise_epsilon)
    torch.testing.assert_close(routing.to_dense(), keep_topk_softmax(h, k))
    torch.testing.assert_close(routing.probs, torch.softmax(h, dim=1))


def test_noise_is_off_in_eval_mode():
    gate = random_gate(6, 5, 2, seed=0)
    x = torch.randn(20, 6, dtype=torch.float64)
    runs = []
    for mode_train, seed in [(False, 1), (False, 2), (True, 1), (True, 2)]:
        torch.manual_seed(seed)
        runs.append(gate.train(mode_train)(x).to_dense())
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[2], runs[3])
    torch.testing.assert_close(runs[0], keep_topk_softmax(x @ gate.w_gate, 2))


def test_importance_is_uniform_at_zero_init():
    E, k, T = 4, 2, 4000
    gate = NoisyTopKGate(8, E, k=k)
    x = torch.randn(T, 8)
    assert torch.equal(gate.eval()(x).probs, torch.full((T, E), 1.0 / E))  # no signal
    torch.manual_seed(0)
    routing = gate.train()(x)  # only noise: every expert equally likely
    importance = routing.to_dense().sum(dim=0)
    # each token adds a weight in [0, 1] to an expert: sd of the sum <= sqrt(T) / 2
    assert (importance - T / E).abs().max() < 5 * T**0.5 / 2
    assert (routing.load() - T * k / E).abs().max() < 5 * T**0.5 / 2
    assert routing.aux["importance"].item() < 1e-2


def _direct_load(clean, noisy, std, k):
    """Shazeer et al. 2017, Appendix A, written out independently of the code:
    Load_i = sum_x Phi((clean_i - kth_greatest(noisy without i)) / std_i), with the k-th
    greatest found by sorting in Python and Phi from scipy (k = E: every expert, 1)."""
    from scipy.stats import norm

    clean, noisy, std = (t.detach().double().numpy() for t in (clean, noisy, std))
    T, E = clean.shape
    load = np.zeros(E)
    for t in range(T):
        for i in range(E):
            others = sorted((noisy[t, j] for j in range(E) if j != i), reverse=True)
            if k > len(others):
                load[i] += 1.0
            else:
                load[i] += norm.cdf((clean[t, i] - others[k - 1]) / std[t, i])
    return load


@given(T=st.integers(0, 25), E=st.integers(1, 6), seed=st.integers(0, 999), data=st.data())
def test_losses_match_their_formulas(T, E, seed, data):
    k = data.draw(st.integers(1, E))
    gate = random_gate(3, E, k, seed, importance_weight=0.3, load_weight=0.7)
    x = torch.randn(T, 3, dtype=torch.float64)

    def cv2(v):
        v = np.asarray(v, dtype=np.float64)
        return 0.0 if v.mean() == 0 else float((v.std() / v.mean()) ** 2)  # population std

    for train in (True, False):
        torch.manual_seed(seed)
        routing = gate.train(train)(x)
        importance = routing.to_dense().sum(dim=0).detach().numpy()
        assert routing.aux["importance"].item() == pytest.approx(0.3 * cv2(importance), abs=1e-9)
        if train and T:
            clean = x @ gate.w_gate
            std = F.softplus(x @ gate.w_noise) + gate.noise_epsilon
            torch.manual_seed(seed)
            h = clean + torch.randn_like(clean) * std
            load = _direct_load(clean, h, std, k)
        else:
            load = routing.load().numpy()
        assert routing.aux["load"].item() == pytest.approx(0.7 * cv2(load), abs=1e-9)


def test_zero_weights_switch_the_losses_off():
    gate = NoisyTopKGate(4, 3, importance_weight=0, load_weight=0)
    assert gate(torch.randn(5, 4)).aux == {}
    assert set(NoisyTopKGate(4, 3, load_weight=0)(torch.randn(5, 4)).aux) == {"importance"}


@given(
    values=st.lists(st.lists(st.integers(-2, 2), min_size=5, max_size=5), min_size=1, max_size=6),
    k=st.integers(1, 5),
)
def test_kth_excluding_matches_brute_force(values, k):
    v = torch.tensor(values, dtype=torch.float64)
    got = kth_excluding(v, k)
    for t, row in enumerate(values):
        for i in range(5):
            rest = sorted(row[:i] + row[i + 1 :], reverse=True)
            expected = rest[k - 1] if k <= len(rest) else float("-inf")
            assert float(got[t, i]) == expected
    if k < 5:  # the top k+1 passed in (as the gate does): the same thresholds
        top = torch.topk(v, k + 1, dim=-1).values
        assert torch.equal(kth_excluding(v, k, top=top), got)


def test_smooth_load_matches_monte_carlo_frequency():
    """P(x, i) = probability that i is in the top k when only i's noise is resampled."""
    T, E, k, n = 6, 5, 2, 4000
    gate = random_gate(4, E, k, seed=3)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, 4, dtype=torch.float64, generator=gen)
    with torch.no_grad():
        clean = x @ gate.w_gate
        std = F.softplus(x @ gate.w_noise) + gate.noise_epsilon
        h = clean + torch.randn(T, E, generator=gen, dtype=torch.float64) * std
        estimate = smooth_load(clean, h, std, k)
        freq = torch.empty(T, E, dtype=torch.float64)
        for i in range(E):
            resampled = h.expand(n, T, E).clone()
            eps = torch.randn(n, T, generator=gen, dtype=torch.float64)
            resampled[:, :, i] = clean[:, i] + eps * std[:, i]
            chosen = resampled.topk(k, dim=-1).indices  # an independent check: full top-k
            freq[:, i] = (chosen == i).any(dim=-1).double().mean(dim=0)
    p = estimate.clamp(1e-3, 1 - 1e-3)
    tolerance = 4.5 * (p * (1 - p) / n).sqrt() + 1e-3  # binomial standard error
    assert ((freq - estimate).abs() <= tolerance).all(), (freq - estimate).abs().max()
    assert 0.05 < float(estimate.mean()) < 0.95  # not a degenerate case
    assert ((estimate > 0.1) & (estimate < 0.9)).sum() >= 5


def test_gradcheck_of_the_load_estimator():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, dtype=torch.float64, generator=gen)
    eps = torch.randn(5, 4, dtype=torch.float64, generator=gen)
    w_gate = torch.randn(3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    w_noise = torch.randn(3, 4, dtype=torch.float64, generator=gen, requires_grad=True)

    def load_loss(wg, wn):
        clean, std = x @ wg, F.softplus(x @ wn) + 1e-2
        return cv_squared(smooth_load(clean, clean + eps * std, std, k=2).sum(dim=0))

    assert torch.autograd.gradcheck(load_loss, (w_gate, w_noise))
    # and directly in its three inputs (clean logits, noisy logits, noise std)
    clean = torch.randn(5, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    noisy = torch.randn(5, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    std = torch.rand(5, 4, dtype=torch.float64, generator=gen).add(0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda c, h, s: smooth_load(c, h, s, 2), (clean, noisy, std))

    def with_top(c, h, s):  # the gate's path: the top k+1 of the noisy logits passed in
        return smooth_load(c, h, s, 2, noisy_top=torch.topk(h, 3, dim=-1).values)

    assert torch.autograd.gradcheck(with_top, (clean, noisy, std))


@given(seed=st.integers(0, 999), ties=st.booleans(), k=st.integers(1, 4))
def test_smooth_load_equals_the_elementwise_composition(seed, ties, k):
    """The fused estimator against ndtr((clean - kth_excluding(noisy)) / std) through
    autograd: the same values, the same gradients; with ties in the noisy logits too."""
    gen = torch.Generator().manual_seed(seed)
    T, E = 7, 5

    def leaf(t):
        return t.to(torch.float64).requires_grad_()

    clean = leaf(torch.randn(T, E, generator=gen))
    noisy_values = torch.randint(-2, 3, (T, E), generator=gen) if ties else torch.randn(T, E)
    noisy = leaf(noisy_values)
    std = leaf(torch.rand(T, E, generator=gen) + 0.1)
    copies = [leaf(t.detach()) for t in (clean, noisy, std)]
    got = smooth_load(clean, noisy, std, k)
    threshold = kth_excluding(copies[1], k)
    want = torch.special.ndtr((copies[0] - threshold) / copies[2])
    assert torch.equal(got, want)
    coef = torch.randn(T, E, generator=gen, dtype=torch.float64)
    got_grads = torch.autograd.grad((got * coef).sum(), (clean, noisy, std))
    want_grads = torch.autograd.grad((want * coef).sum(), copies)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


def test_gradient_reaches_w_noise_through_the_load_loss():
    gate = NoisyTopKGate(6, 4, k=2, importance_weight=0, load_weight=1.0)  # zero init
    torch.manual_seed(0)
    gate(torch.randn(32, 6)).aux["load"].backward()
    assert gate.w_noise.grad is not None and gate.w_noise.grad.abs().sum() > 0
    assert gate.w_gate.grad.abs().sum() > 0


def test_cv_squared():
    v = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)
    assert float(cv_squared(v)) == pytest.approx((np.std(v.numpy()) / 3.0) ** 2)
    zero = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    loss = cv_squared(zero)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(zero.grad, torch.zeros(3, dtype=torch.float64))
    assert float(cv_squared(torch.tensor([5.0]))) == 0.0
    assert torch.autograd.gradcheck(cv_squared, (v.clone().requires_grad_(),))


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"k": 0}, ValueError),
        ({"importance_weight": -0.1}, ValueError),
        ({"load_weight": "1"}, TypeError),
        ({"noise_epsilon": float("inf")}, ValueError),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        NoisyTopKGate(4, 3, **kwargs)
