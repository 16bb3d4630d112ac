import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from routelab.routers import DSelectKGate
from routelab.routers.dselect_k import selector_weights, smooth_step
from routelab.testing import RouterContract, check_routing


class TestDSelectKPerExample(RouterContract):
    num_experts = 6  # not a power of two: codes 6 and 7 have no expert

    def make_router(self, d_model, num_experts):
        return DSelectKGate(d_model, num_experts, k=2, gamma=0.5, entropy_weight=1e-3)


class TestDSelectKStatic(RouterContract):
    num_experts = 8

    def make_router(self, d_model, num_experts):
        gate = DSelectKGate(d_model, num_experts, k=3, per_example=False, entropy_weight=1e-2)
        torch.nn.init.normal_(gate.alpha)
        return gate


# ---------------------------------------------------------------- smooth step
@pytest.mark.parametrize("gamma", [0.1, 1.0, 3.0])
def test_smooth_step_ends_and_middle(gamma):
    t = torch.tensor([-2 * gamma, -gamma / 2, 0.0, gamma / 2, 2 * gamma], dtype=torch.float64)
    assert smooth_step(t, gamma).tolist() == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0], abs=1e-12)
    dense = torch.linspace(-gamma, gamma, 2001, dtype=torch.float64)
    values = smooth_step(dense, gamma)
    assert bool((values.diff() >= 0).all())  # monotone
    assert bool(((values >= 0) & (values <= 1)).all())


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_smooth_step_is_continuously_differentiable(gamma):
    # S' from autograd on both sides of each end is 0 (matches the flat parts), and S'
    # varies continuously: no jump between neighbouring points of a fine grid.
    h = 1e-7
    points = torch.tensor(
        [-gamma / 2 - h, -gamma / 2 + h, gamma / 2 - h, gamma / 2 + h], dtype=torch.float64
    ).requires_grad_()
    (grad,) = torch.autograd.grad(smooth_step(points, gamma).sum(), points)
    assert grad.abs().max() < 1e-5
    grid = torch.linspace(-gamma, gamma, 4001, dtype=torch.float64).requires_grad_()
    (slope,) = torch.autograd.grad(smooth_step(grid, gamma).sum(), grid)
    assert slope.diff().abs().max() < 1e-2 / gamma
    assert float(slope.max()) == pytest.approx(1.5 / gamma)  # S'(0) = 3 / (2 gamma)


def test_gradcheck_of_the_smooth_step():
    gen = torch.Generator().manual_seed(0)
    t = (torch.rand(40, dtype=torch.float64, generator=gen) * 3 - 1.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: smooth_step(v, 1.7), (t,))


# ---------------------------------------------------------------- selectors
def brute_force_selector(s, num_experts):
    """r over all codes by explicit bit loops; mask codes >= E, renormalise (or fold)."""
    m = len(s)
    full = []
    for code in range(2**m):
        p = 1.0
        for j in range(m):
            p *= s[j] if (code >> j) & 1 else 1 - s[j]
        full.append(p)
    valid = full[:num_experts]
    mass = sum(valid)
    if mass > 0:
        return [v / mass for v in valid]
    folded = list(valid)
    for code in range(num_experts, 2**m):
        folded[code - 2 ** (m - 1)] += full[code]
    return folded


@given(
    E=st.integers(1, 9),
    data=st.data(),
)
def test_selector_weights_match_brute_force(E, data):
    m = max(1, math.ceil(math.log2(E)))
    s = data.draw(
        st.lists(st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0, 1)), min_size=m, max_size=m)
    )
    got = selector_weights(torch.tensor(s, dtype=torch.float64), E)
    assert got.shape == (E,)
    torch.testing.assert_close(got, torch.tensor(brute_force_selector(s, E), dtype=torch.float64))
    assert float(got.sum()) == pytest.approx(1.0)


@pytest.mark.parametrize("E", [3, 5, 6, 7])
def test_no_weight_reaches_a_missing_expert(E):
    m = math.ceil(math.log2(E))
    # every saturated selector state, the invalid codes included
    for code in range(2**m):
        s = torch.tensor([float((code >> j) & 1) for j in range(m)], dtype=torch.float64)
        r = selector_weights(s, E)
        assert r.shape == (E,) and float(r.sum()) == 1.0
        assert int((r > 0).sum()) == 1  # still one-hot: sparse
        assert int(r.argmax()) == (code if code < E else code - 2 ** (m - 1))
    # and a gate fed huge inputs (every bit saturated) never names expert >= E
    torch.manual_seed(0)
    gate = DSelectKGate(5, E, k=2, gamma=0.1)
    torch.nn.init.normal_(gate.z_proj.weight)
    routing = gate(torch.randn(200, 5, dtype=torch.float32) * 1e3)
    check_routing(routing, num_experts=E)
    assert routing.probs.shape == (200, E)
    torch.testing.assert_close(routing.probs.sum(dim=1), torch.ones(200))
    assert int(routing.entries_per_token().max()) <= 2  # binary selectors: at most k
    (routing.weight.sum() + routing.probs.sum()).backward()  # the fold path has finite grads
    assert all(bool(torch.isfinite(p.grad).all()) for p in gate.parameters())


@given(T=st.integers(0, 20), E=st.integers(1, 9), seed=st.integers(0, 999), data=st.data())
def test_gate_matches_its_formula(T, E, seed, data):
    k = data.draw(st.integers(1, E))
    per_example = data.draw(st.booleans())
    torch.manual_seed(seed)
    gate = DSelectKGate(4, E, k=k, gamma=0.7, per_example=per_example, entropy_weight=0.1)
    gate = gate.double()
    with torch.no_grad():
        for p in gate.parameters():
            p.normal_()
    x = torch.randn(T, 4, dtype=torch.float64)
    routing = gate(x)
    m = gate.num_bits
    expected = torch.zeros(T, E, dtype=torch.float64)
    entropy = torch.zeros(T, dtype=torch.float64)
    for t in range(T):
        if per_example:
            z = (gate.z_proj(x[t])).view(k, m)
            alpha = gate.alpha_proj(x[t])
        else:
            z, alpha = gate.z, gate.alpha
        w = torch.softmax(alpha, dim=0)
        for i in range(k):
            r = torch.tensor(brute_force_selector(smooth_step(z[i], 0.7).tolist(), E))
            expected[t] += w[i] * r.double()
            entropy[t] -= (r * torch.log(r + 1e-6)).sum()
    dense = routing.to_dense()
    torch.testing.assert_close(dense, expected)
    assert bool((routing.weight > 0).all())  # only the non-zero entries are kept
    assert routing.num_entries == int((expected > 0).sum())
    torch.testing.assert_close(dense.sum(dim=1), torch.ones(T, dtype=torch.float64))
    if T and per_example:
        torch.testing.assert_close(routing.aux["entropy"], 0.1 * entropy.mean())
    if T and not per_example:
        torch.testing.assert_close(routing.aux["entropy"], 0.1 * entropy[0])


def test_entropy_weight_zero_switches_the_loss_off():
    assert DSelectKGate(4, 5)(torch.randn(3, 4)).aux == {}
    assert set(DSelectKGate(4, 5, entropy_weight=1e-3)(torch.randn(3, 4)).aux) == {"entropy"}


# ---------------------------------------------------------------- training
def regression_task(num_tokens, num_experts, clusters):
    """Expert outputs F [T, E] (fixed random signals) and targets from a sparse mixture."""
    gen = torch.Generator().manual_seed(0)
    outputs = torch.randn(num_tokens, num_experts, generator=gen)
    mixtures = torch.zeros(len(clusters), num_experts)
    for c, chosen in enumerate(clusters):
        for expert, weight in chosen.items():
            mixtures[c, expert] = weight
    cluster = torch.arange(num_tokens) % len(clusters)
    target = (mixtures[cluster] * outputs).sum(dim=1)
    return gen, outputs, mixtures[cluster], cluster, target


def train(gate, x, outputs, target, steps, lr=0.05):
    opt = torch.optim.Adam(gate.parameters(), lr=lr)
    for _ in range(steps):
        routing = gate(x)
        loss = ((routing.to_dense() * outputs).sum(dim=1) - target).square().mean()
        opt.zero_grad()
        (loss + routing.aux_loss).backward()
        opt.step()
    return gate.eval()(x)


def test_static_training_selects_exactly_k_experts():
    E, k = 5, 2  # not a power of two
    gen, outputs, mixture, _, target = regression_task(256, E, [{1: 0.7, 3: 0.3}])
    x = torch.randn(256, 8, generator=gen)
    torch.manual_seed(0)
    gate = DSelectKGate(8, E, k=k, per_example=False, entropy_weight=1e-3)
    before = gate(x)
    assert int(before.entries_per_token()[0]) == E  # starts dense (near uniform)
    routing = train(gate, x, outputs, target, steps=150)
    assert torch.equal(routing.entries_per_token(), torch.full((256,), k))  # truly sparse
    assert sorted(routing.expert[:k].tolist()) == [1, 3]
    torch.testing.assert_close(routing.to_dense(), mixture, atol=0.02, rtol=0)


def test_per_example_training_selects_exactly_k_experts_per_input():
    E, k, T = 5, 2, 64
    clusters = [{0: 0.6, 2: 0.4}, {1: 0.7, 4: 0.3}]
    gen, outputs, mixture, cluster, target = regression_task(T, E, clusters)
    centers = torch.zeros(2, 6)
    centers[0, 0] = centers[1, 1] = 2.0
    x = centers[cluster] + 0.1 * torch.randn(T, 6, generator=gen)
    torch.manual_seed(0)
    gate = DSelectKGate(6, E, k=k, entropy_weight=1e-2)
    routing = train(gate, x, outputs, target, steps=100)
    assert torch.equal(routing.entries_per_token(), torch.full((T,), k))
    dense = routing.to_dense()
    assert torch.equal(dense > 0, mixture > 0)  # the right experts for each input
    torch.testing.assert_close(dense, mixture, atol=0.06, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"k": 7}, ValueError),
        ({"gamma": 0.0}, ValueError),
        ({"entropy_weight": -1.0}, ValueError),
        ({"per_example": 1}, TypeError),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        DSelectKGate(4, 6, **kwargs)


def test_all_codes_enumerated_once():  # the bit layout: code l has bit j = (l >> j) & 1
    for m in (1, 2, 3):
        for bits in itertools.product([0.0, 1.0], repeat=m):
            r = selector_weights(torch.tensor(bits), 2**m)
            code = sum(int(b) << j for j, b in enumerate(bits))
            assert r.tolist() == [1.0 if c == code else 0.0 for c in range(2**m)]


def _per_code_selector(steps, num_experts):
    """The per-code formula written out directly: ``[..., 2^m, m]`` factors, product over
    the bits, then the same masking and renormalisation as ``selector_weights``."""
    m = steps.shape[-1]
    codes = torch.arange(2**m)
    on = ((codes[:, None] >> torch.arange(m)) & 1).bool()
    full = torch.where(on, steps.unsqueeze(-2), 1.0 - steps.unsqueeze(-2)).prod(dim=-1)
    if num_experts == 2**m:
        return full
    valid = full[..., :num_experts]
    return valid / valid.sum(dim=-1, keepdim=True)


@pytest.mark.parametrize("E", [2, 5, 8, 64])
def test_selector_weights_and_gradients_match_the_per_code_formula(E):
    """The bit-by-bit construction gives the per-code formula's values and gradients."""
    m = max(1, math.ceil(math.log2(E)))
    gen = torch.Generator().manual_seed(E)
    steps = (0.05 + 0.9 * torch.rand(7, 3, m, generator=gen, dtype=torch.float64)).requires_grad_()
    got = selector_weights(steps, E)
    want = _per_code_selector(steps, E)
    torch.testing.assert_close(got, want, atol=1e-15, rtol=1e-13)
    coef = torch.randn(got.shape, generator=gen, dtype=torch.float64)
    (g_got,) = torch.autograd.grad((got * coef).sum(), steps)
    (g_want,) = torch.autograd.grad((want * coef).sum(), steps)
    torch.testing.assert_close(g_got, g_want, atol=1e-13, rtol=1e-12)


# ------------------------------------------------------------------ reference conventions
def _reference_expert_weights(x, z_kernel, z_bias, w_kernel, w_bias, num_experts, k, gamma):
    """A numpy transcription of google-research dselect_k_moe's example-conditioned gate
    (binary codes from np.binary_repr, most significant bit first; no renormalisation)."""
    import math as _math

    import numpy as np

    m = _math.ceil(_math.log2(num_experts))
    codes = (
        np.array([list(np.binary_repr(v, width=m)) for v in range(num_experts)])
        .astype(int)
        .astype(bool)
    )  # [E, m]
    logits = (x @ z_kernel + z_bias).reshape(-1, k, 1, m)
    t = logits
    step = np.where(
        t <= -gamma / 2,
        0.0,
        np.where(t >= gamma / 2, 1.0, -2 / gamma**3 * t**3 + 3 / (2 * gamma) * t + 0.5),
    )
    selectors = np.prod(np.where(codes[None, None], step, 1 - step), axis=3)  # [T, k, E]
    w = (x @ w_kernel + w_bias)[:, :, None]
    w = np.exp(w - w.max(axis=1, keepdims=True))
    w = w / w.sum(axis=1, keepdims=True)
    return (w * selectors).sum(axis=1), selectors


@pytest.mark.parametrize("E", [8, 4, 6, 5])
def test_reference_parameters_load_and_give_the_reference_gate(E):
    import numpy as np

    rng = np.random.default_rng(E)
    d, k, gamma, T = 5, 2, 1.0, 11
    m = max(1, int(np.ceil(np.log2(E))))
    # inside the smooth region (|z| < gamma / 2): no selector collapses onto a missing code
    z_kernel, z_bias = rng.uniform(-0.08, 0.08, (d, k * m)), rng.uniform(-0.1, 0.1, k * m)
    w_kernel, w_bias = rng.uniform(-1, 1, (d, k)), rng.uniform(-1, 1, k)
    x = rng.normal(size=(T, d))
    reference, selectors = _reference_expert_weights(
        x, z_kernel, z_bias, w_kernel, w_bias, E, k, gamma
    )
    gate = DSelectKGate(d, E, k=k, gamma=gamma).double()
    gate.load_reference_parameters(z_kernel, w_kernel, z_bias, w_bias)
    ours, r = gate.gate_weights(torch.from_numpy(x))
    if E & (E - 1) == 0:  # a power of two: the same gate
        np.testing.assert_allclose(ours.detach().numpy(), reference, rtol=1e-12, atol=1e-12)
    # any E: our selectors are the reference's renormalised over the valid codes
    expected = selectors / selectors.sum(axis=-1, keepdims=True)
    np.testing.assert_allclose(r.detach().numpy(), expected, rtol=1e-10, atol=1e-12)


def test_reference_static_parameters_load():
    import numpy as np

    z_logits = np.array([[[0.9, -0.9, 0.9]], [[-0.9, -0.9, 0.9]]])  # MSB first: 5 and 1
    gate = DSelectKGate(3, 8, k=2, per_example=False).double()
    gate.load_reference_parameters(z_logits, np.zeros((2, 1)))
    weights, _ = gate.gate_weights(torch.zeros(1, 3, dtype=torch.float64))
    assert torch.nonzero(weights[0]).flatten().tolist() == [1, 5]
    torch.testing.assert_close(weights[0, [1, 5]], torch.tensor([0.5, 0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="z must have"):
        gate.load_reference_parameters(np.zeros((2, 2)), np.zeros(2))
    with pytest.raises(ValueError, match="z_bias"):
        DSelectKGate(3, 8, k=2).load_reference_parameters(np.zeros((3, 6)), np.zeros((3, 2)))


def test_selector_entropy_value_and_gradient():
    from routelab.routers.dselect_k import _SelectorEntropy

    r = torch.rand(5, 3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    r[0, 0, :3] = 0.0  # exact zeros: finite gradient thanks to eps
    r.requires_grad_(True)
    torch.testing.assert_close(_SelectorEntropy.apply(r), -(r * torch.log(r + 1e-6)).sum())
    inside = (0.1 + 0.8 * r.detach()).requires_grad_(True)  # finite differences stay >= 0
    assert torch.autograd.gradcheck(_SelectorEntropy.apply, (inside,))


# ------------------------------------------------------------------ fused path (E = 2^m)
def _paper_smooth_step(t, gamma):
    """Eq. 3 written out: the polynomial between -gamma/2 and gamma/2, 0 and 1 outside."""
    inner = -2.0 * t**3 / gamma**3 + 1.5 * t / gamma + 0.5
    return torch.where(t <= -gamma / 2, 0.0, torch.where(t >= gamma / 2, 1.0, inner))


@pytest.mark.parametrize("gamma", [0.1, 1.0, 1.7])
def test_smooth_step_values_and_slope_match_the_formula(gamma):
    gen = torch.Generator().manual_seed(0)
    t = (torch.randn(500, dtype=torch.float64, generator=gen) * gamma).requires_grad_()
    t_ref = t.detach().clone().requires_grad_()
    ends = torch.tensor([-gamma / 2, gamma / 2], dtype=torch.float64)
    t_ends, t_ends_ref = ends.clone().requires_grad_(), ends.clone().requires_grad_()
    got, want = smooth_step(t, gamma), _paper_smooth_step(t_ref, gamma)
    assert torch.equal(got, want)  # the same operations in the same order
    coef = torch.randn(500, dtype=torch.float64, generator=gen)
    (got * coef).sum().backward()
    (want * coef).sum().backward()
    torch.testing.assert_close(t.grad, t_ref.grad, rtol=1e-12, atol=1e-12)
    smooth_step(t_ends, gamma).sum().backward()  # S' = 0 at both ends, as autograd gives
    _paper_smooth_step(t_ends_ref, gamma).sum().backward()
    assert torch.equal(t_ends.grad, t_ends_ref.grad)


def _reference_gate(gate, x):
    """Dense G and the aux entropy from the plain composition (``gate_weights``: the
    selectors of ``selector_weights``, a matmul, the elementwise entropy)."""
    gates, r = gate.gate_weights(x)
    entropy = -(r * torch.log(r + 1e-6)).sum() / max(r.shape[0], 1)
    if not gate.per_example:
        gates = gates.expand(x.shape[0], gate.num_experts)
    return gates, gate.entropy_weight * entropy


@given(
    T=st.integers(0, 12),
    m=st.integers(1, 7),
    seed=st.integers(0, 999),
    scale=st.sampled_from([0.3, 30.0]),  # 30: most bits saturate, so the gate is sparse
    data=st.data(),
)
def test_fused_gate_matches_the_composition(T, m, seed, scale, data):
    E = 2**m
    k = data.draw(st.integers(1, min(E, 4)))
    per_example = data.draw(st.booleans())
    torch.manual_seed(seed)
    gate = DSelectKGate(5, E, k=k, gamma=0.7, entropy_weight=0.1, per_example=per_example)
    gate = gate.double()
    with torch.no_grad():
        for p in gate.parameters():
            p.normal_(0, scale)
    x = torch.randn(T, 5, dtype=torch.float64)
    routing = gate(x)
    want, want_entropy = _reference_gate(gate, x)
    dense = routing.to_dense()
    torch.testing.assert_close(dense, want, rtol=1e-12, atol=1e-15)
    assert torch.equal(dense != 0, want != 0)  # the same entries: exact zeros agree
    torch.testing.assert_close(routing.aux["entropy"], want_entropy, rtol=1e-12, atol=1e-15)
    coef = torch.randn(T, E, dtype=torch.float64)
    params = list(gate.parameters())
    got_loss = (routing.to_dense() * coef).sum() + routing.aux_loss
    want_loss = (want * coef).sum() + want_entropy
    if not got_loss.requires_grad:
        return
    got_grads = torch.autograd.grad(got_loss, params, allow_unused=True)
    want_grads = torch.autograd.grad(want_loss, params, allow_unused=True)
    for got_g, want_g in zip(got_grads, want_grads, strict=True):
        if want_g is None:
            assert got_g is None or not bool(got_g.any())
        else:
            torch.testing.assert_close(got_g, want_g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("with_entropy", [False, True])
def test_gradcheck_of_the_code_mixture(with_entropy):
    from routelab.routers.dselect_k import _CodeMixture

    gen = torch.Generator().manual_seed(0)
    T, k, lo, hi = 3, 2, 2, 4
    # inside (0.05, 0.95): the finite differences keep every weight positive
    low = (0.05 + 0.9 * torch.rand(lo, T * k, generator=gen, dtype=torch.float64)).requires_grad_()
    high = (0.05 + 0.9 * torch.rand(hi, T * k, generator=gen, dtype=torch.float64)).requires_grad_()
    mix = torch.softmax(torch.randn(T, k, generator=gen, dtype=torch.float64), -1).requires_grad_()

    def fused(a, b, w):
        gates, entropy = _CodeMixture.apply(a, b, w, with_entropy)
        return gates, entropy

    assert torch.autograd.gradcheck(fused, (low, high, mix))
    gates, entropy = fused(low, high, mix)
    # against the outer products written out: r[t, i, h * lo + a] = high[h, ti] low[a, ti]
    r = (high.t().reshape(T, k, hi, 1) * low.t().reshape(T, k, 1, lo)).reshape(T, k, hi * lo)
    torch.testing.assert_close(gates, (mix.unsqueeze(-1) * r).sum(dim=1))
    expected = -(r * torch.log(r + 1e-6)).sum() if with_entropy else torch.zeros(())
    torch.testing.assert_close(entropy, expected.to(entropy.dtype))


def test_entropy_blocks_give_the_unblocked_values(monkeypatch):
    from routelab.routers import dselect_k

    gen = torch.Generator().manual_seed(0)
    low = torch.rand(8, 37, generator=gen, dtype=torch.float64)
    high = torch.rand(4, 37, generator=gen, dtype=torch.float64)
    whole = dselect_k._entropy_and_gradients(low, high, True)
    monkeypatch.setattr(dselect_k, "_BLOCK_WEIGHTS", 32 * 5)  # 5 selectors a block, 2 left
    blocked = dselect_k._entropy_and_gradients(low, high, True)
    for got, want in zip(blocked, whole, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-15)
    r = high.t().reshape(37, 4, 1) * low.t().reshape(37, 1, 8)  # [N, hi, lo]
    torch.testing.assert_close(whole[0], -(r * torch.log(r + 1e-6)).sum())
    torch.testing.assert_close(dselect_k._entropy_and_gradients(low, high, False)[0], whole[0])
