"""TopKSelection / TopKRouter: the contract, the formulas against plain-Python
transcriptions, the selection bias, the sequence-wise and global-batch balance losses."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from routelab import FFNExperts, MoE
from routelab.balancing import GlobalLoadCounts, update_balancing
from routelab.losses import load_balance_loss, sequence_balance_loss
from routelab.routers.topk import (
    TOPK_PRESETS,
    TopKGate,
    TopKRouter,
    TopKSelection,
    topk_softmax_routing,
)
from routelab.testing import RouterContract, check_routing


# ---------------------------------------------------------------------- contract
class TestTopKRouterSoftmax(RouterContract):
    expect = {"k": 2}

    def make_router(self, d_model, num_experts):
        return TopKRouter(d_model, num_experts, k=2, balance_weight=1e-2, z_weight=1e-3)


class TestTopKRouterDeepSeekV3(RouterContract):
    """Sigmoid, group-limited (3 groups of 2, top 2), selection bias, scaled weights and
    every loss: weights sum to the scaling factor, so k entries are checked below."""

    def make_router(self, d_model, num_experts):
        return deepseek_router(d_model, num_experts)


class TestTopKRouterUnnormalisedSoftmax(RouterContract):
    def make_router(self, d_model, num_experts):
        return TopKRouter(d_model, num_experts, k=3, normalize=False, global_balance_weight=0.1)


def deepseek_router(d_model: int = 12, num_experts: int = 6) -> TopKRouter:
    return TopKRouter(
        d_model,
        num_experts,
        k=2,
        score="sigmoid",
        scaling_factor=2.5,
        num_groups=3,
        top_groups=2,
        selection_bias=True,
        sequence_balance_weight=1e-3,
        global_balance_weight=1e-2,
        z_weight=1e-3,
    )


def test_deepseek_weights_sum_to_the_scaling_factor():
    router = deepseek_router()
    routing = router(torch.randn(9, 12))
    check_routing(routing, num_tokens=9, num_experts=6)
    assert routing.entries_per_token().tolist() == [2] * 9
    sums = torch.zeros(9).index_add(0, routing.token, routing.weight.detach())
    torch.testing.assert_close(sums, torch.full((9,), 2.5))


# ---------------------------------------------------------------------- formula
def reference_selection(logits, config, bias):
    """A plain-Python transcription of TopKSelection.select for one batch: returns a
    dense [T][E] list of combine weights."""
    T, E = len(logits), len(bias)
    dense = [[0.0] * E for _ in range(T)]
    for t in range(T):
        row = logits[t]
        if config.score == "softmax":
            m = max(row)
            ex = [math.exp(v - m) for v in row]
            scores = [v / sum(ex) for v in ex]
        else:
            scores = [1 / (1 + math.exp(-v)) for v in row]
        values = row if config.softmax_after_topk else scores
        biased = [values[i] + bias[i] for i in range(E)]
        allowed = set(range(E))
        if config.num_groups is not None:
            size = E // config.num_groups
            group_scores = []
            for g in range(config.num_groups):
                members = sorted((biased[i] for i in range(g * size, (g + 1) * size)), reverse=True)
                top = 2 if config.group_score == "top2" else 1
                group_scores.append((sum(members[: min(top, size)]), -g))
            kept = [-g for _, g in sorted(group_scores, reverse=True)[: config.top_groups]]
            allowed = {i for g in kept for i in range(g * size, (g + 1) * size)}
        ranked = sorted(allowed, key=lambda i: (-biased[i], i))
        chosen = ranked[: config.k]
        if config.softmax_after_topk:
            m = max(row[i] for i in chosen)
            ex = {i: math.exp(row[i] - m) for i in chosen}
            weights = {i: ex[i] / sum(ex.values()) for i in chosen}
        else:
            weights = {i: scores[i] for i in chosen}
            if config.normalize:
                total = sum(weights.values())
                weights = {i: w / total for i, w in weights.items()}
        for i, w in weights.items():
            dense[t][i] = w * config.scaling_factor
    return dense


@st.composite
def selections(draw):
    groups = draw(st.sampled_from([None, (2, 1), (4, 2), (4, 3), (8, 2)]))
    E = 8
    after = draw(st.booleans())
    score = "softmax" if after else draw(st.sampled_from(["softmax", "sigmoid"]))
    limit = E if groups is None else groups[1] * (E // groups[0])
    return TopKSelection(
        k=draw(st.integers(1, min(4, limit))),
        score=score,
        normalize=True if after else draw(st.booleans()),
        scaling_factor=draw(st.sampled_from([1.0, 2.5])),
        softmax_after_topk=after,
        num_groups=None if groups is None else groups[0],
        top_groups=None if groups is None else groups[1],
        group_score=draw(st.sampled_from(["top2", "max"])),
    )


@settings(max_examples=40)
@given(config=selections(), T=st.integers(0, 9), seed=st.integers(0, 10_000), biased=st.booleans())
def test_selection_matches_a_plain_python_transcription(config, T, seed, biased):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, 8, generator=gen, dtype=torch.float64) * 2
    bias = torch.randn(8, generator=gen, dtype=torch.float64) * 0.3 if biased else torch.zeros(8)
    sel = config.select(logits, selection_bias=bias)
    dense = torch.zeros(T, 8, dtype=torch.float64)
    dense.scatter_(1, sel.indices, sel.weights)
    expected = reference_selection(logits.tolist(), config, bias.tolist())
    torch.testing.assert_close(dense, torch.tensor(expected, dtype=torch.float64).reshape(T, 8))
    probs = torch.softmax(logits, 1) if config.score == "softmax" else torch.sigmoid(logits)
    probs = probs / probs.sum(1, keepdim=True)
    torch.testing.assert_close(sel.probs, probs)


def test_softmax_before_and_after_differ_only_with_bias_or_groups():
    torch.manual_seed(0)
    logits = torch.randn(50, 8, dtype=torch.float64) * 3
    before = TopKSelection(2)
    after = TopKSelection(2, softmax_after_topk=True)
    a, b = before.select(logits), after.select(logits)
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.weights, b.weights)
    bias = torch.linspace(-1, 1, 8, dtype=torch.float64)  # a bias on probabilities or on logits
    assert not torch.equal(
        before.select(logits, selection_bias=bias).indices,
        after.select(logits, selection_bias=bias).indices,
    )


def test_topk_softmax_routing_selects_on_select_logits():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]], dtype=torch.float64)
    routing = topk_softmax_routing(logits, 2, select_logits=-logits)
    expected = torch.zeros(1, 4, dtype=torch.float64)
    expected[0, 2:] = torch.softmax(logits[0, 2:], 0)
    torch.testing.assert_close(routing.to_dense(), expected)


def test_select_scores_is_select_on_precomputed_scores():
    torch.manual_seed(4)
    logits = torch.randn(12, 8, dtype=torch.float64)
    bias = torch.randn(8, dtype=torch.float64)
    for config in (TopKSelection(3, score="sigmoid"), TopKSelection(2, normalize=False)):
        a = config.select(logits, selection_bias=bias)
        b = config.select_scores(config.scores(logits), selection_bias=bias)
        assert torch.equal(a.indices, b.indices)
        torch.testing.assert_close(a.weights, b.weights)
        torch.testing.assert_close(a.probs, b.probs)
    with pytest.raises(ValueError, match="logits"):
        TopKSelection(2, softmax_after_topk=True).select_scores(logits.softmax(1))


def test_forced_indices_give_the_weights_of_those_experts():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]], dtype=torch.float64)
    sel = TopKSelection(2, score="sigmoid").select(logits, indices=torch.tensor([[0, 1]]))
    s = torch.sigmoid(logits[0, :2])
    torch.testing.assert_close(sel.weights[0], s / s.sum())


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"score": "tanh"}, ValueError, "score"),
        ({"softmax_after_topk": True, "normalize": False}, ValueError, "normalize"),
        ({"softmax_after_topk": True, "score": "sigmoid"}, ValueError, "softmax_after_topk"),
        ({"num_groups": 4}, ValueError, "top_groups"),
        ({"num_groups": 4, "top_groups": 5}, ValueError, "top_groups"),
        ({"num_groups": 3, "top_groups": 1}, ValueError, "divisible"),
        ({"num_groups": 4, "top_groups": 1, "k": 3}, ValueError, "exceeds"),
        ({"scaling_factor": 0.0}, ValueError, "scaling_factor"),
        ({"normalize": 1}, TypeError, "normalize"),
        ({"k": 9}, ValueError, "k"),
        ({"num_groups": 4, "top_groups": 2, "group_score": "mean"}, ValueError, "group_score"),
    ],
)
def test_bad_options_are_clear_errors(options, error, match):
    with pytest.raises(error, match=match):
        TopKRouter(4, 8, **{"k": 2, **options})


def test_bad_forced_indices_are_clear_errors():
    sel = TopKSelection(2)
    logits = torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"\[T, k\]"):
        sel.select(logits, indices=torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="repeat"):
        sel.select(logits, indices=torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="expert ids"):
        sel.select(logits, indices=torch.full((3, 2), 7))


def test_half_precision_input_selects_like_fp32():
    torch.manual_seed(0)
    router = deepseek_router().eval()
    x = torch.randn(30, 12).bfloat16()
    a, b = router(x), router(x.float())
    assert torch.equal(a.expert, b.expert)
    assert a.weight.dtype == torch.float32


# ---------------------------------------------------------------------- selection bias
def test_selection_bias_changes_the_choice_not_the_weights():
    torch.manual_seed(0)
    router = TopKRouter(6, 4, k=2, score="sigmoid", selection_bias=True)
    x = torch.randn(10, 6)
    with torch.no_grad():
        router.selection_bias.bias.copy_(torch.tensor([0.0, 0.0, 5.0, 5.0]))
    routing = router(x)
    assert sorted(set(routing.expert.tolist())) == [2, 3]
    s = torch.sigmoid(x @ router.weight)[:, 2:]
    torch.testing.assert_close(routing.to_dense()[:, 2:], s / s.sum(1, keepdim=True))


def test_selection_bias_moves_only_in_the_update_step():
    torch.manual_seed(0)
    router = TopKRouter(6, 4, k=1, selection_bias=True, selection_bias_rate=0.1)
    with torch.no_grad():
        router.weight.zero_()
        router.weight[:, 0] = 10.0  # expert 0 takes every token
    x = torch.randn(20, 6).abs()
    router(x)
    assert torch.equal(router.selection_bias.bias, torch.zeros(4))
    assert update_balancing(router) == 1
    torch.testing.assert_close(router.selection_bias.bias, torch.tensor([-0.1, 0.1, 0.1, 0.1]))
    router.eval()
    router(x)
    assert update_balancing(router) == 0  # eval forwards are not observed


# ---------------------------------------------------------------------- losses
def loop_sequence_loss(probs, chosen, S):
    T, E = len(probs), len(probs[0])
    k = len(chosen[0])
    losses = []
    for b in range(T // S):
        tokens = range(b * S, (b + 1) * S)
        total = 0.0
        for i in range(E):
            f = E / (k * S) * sum(1 for t in tokens if i in chosen[t])
            p = sum(probs[t][i] for t in tokens) / S
            total += f * p
        losses.append(total)
    return sum(losses) / len(losses)


def loop_balance_loss(probs, chosen, tokens_normaliser=None):
    T, E = len(probs), len(probs[0])
    n = sum(len(c) for c in chosen)
    denominator = T if tokens_normaliser is None else tokens_normaliser
    return E * sum(
        sum(1 for c in chosen for e in c if e == i) / n * sum(p[i] for p in probs) / denominator
        for i in range(E)
    )


@given(B=st.integers(1, 4), S=st.integers(1, 6), k=st.integers(1, 3), seed=st.integers(0, 999))
def test_sequence_balance_loss_matches_a_loop(B, S, k, seed):
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(B * S, 5, generator=gen, dtype=torch.float64), 1)
    chosen = torch.rand(B * S, 5, generator=gen).argsort(1)[:, :k]
    got = sequence_balance_loss(probs, chosen, S)
    assert float(got) == pytest.approx(loop_sequence_loss(probs.tolist(), chosen.tolist(), S))
    whole = sequence_balance_loss(probs, chosen, None)
    expected = loop_sequence_loss(probs.tolist(), chosen.tolist(), B * S)
    assert float(whole) == pytest.approx(expected)


def test_sequence_balance_loss_is_one_when_uniform_and_zero_when_empty():
    probs = torch.full((4, 4), 0.25)
    chosen = torch.tensor([[0], [1], [2], [3]])
    assert float(sequence_balance_loss(probs, chosen, 4)) == pytest.approx(1.0)
    assert float(sequence_balance_loss(torch.zeros(0, 4), torch.zeros(0, 1).long(), None)) == 0
    with pytest.raises(ValueError, match="sequence_length"):
        sequence_balance_loss(probs, chosen, 3)


@given(T=st.integers(1, 12), k=st.integers(1, 3), seed=st.integers(0, 999))
def test_load_balance_loss_matches_a_loop(T, k, seed):
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(T, 4, generator=gen, dtype=torch.float64), 1)
    chosen = torch.rand(T, 4, generator=gen).argsort(1)[:, :k]
    load = torch.bincount(chosen.reshape(-1), minlength=4)
    got = load_balance_loss(probs, load)
    assert float(got) == pytest.approx(loop_balance_loss(probs.tolist(), chosen.tolist()))
    scaled = load_balance_loss(probs, load, num_tokens=2.5)
    assert float(scaled) == pytest.approx(loop_balance_loss(probs.tolist(), chosen.tolist(), 2.5))


def test_router_losses_are_their_formulas_on_the_sequence_layout():
    torch.manual_seed(1)
    B, S, d, E, k = 3, 4, 8, 6, 2
    router = TopKRouter(
        d,
        E,
        k=k,
        score="sigmoid",
        balance_weight=0.5,
        sequence_balance_weight=0.25,
        global_balance_weight=2.0,
        z_weight=0.125,
    )
    moe = MoE(router, FFNExperts(E, d, 5))
    x = torch.randn(B, S, d, dtype=torch.float64)
    moe.double()
    routing = moe(x).routing
    logits = (x.reshape(-1, d) @ router.weight).tolist()
    probs = [[1 / (1 + math.exp(-v)) for v in row] for row in logits]
    probs = [[p / sum(row) for p in row] for row in probs]
    chosen = routing.expert.view(B * S, k).tolist()
    z = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits) / (B * S)
    aux = {name: float(value.detach()) for name, value in routing.aux.items()}
    assert aux["sequence_balance"] == pytest.approx(0.25 * loop_sequence_loss(probs, chosen, S))
    assert aux["balance"] == pytest.approx(0.5 * loop_balance_loss(probs, chosen))
    assert aux["global_balance"] == pytest.approx(2.0 * loop_balance_loss(probs, chosen))
    assert aux["z"] == pytest.approx(0.125 * z)


def test_global_counts_accumulate_over_micro_batches_and_reset_in_the_update():
    torch.manual_seed(2)
    router = TopKRouter(6, 4, k=2, global_balance_weight=1.0).double()
    x1, x2 = torch.randn(5, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    r1, r2 = router(x1).detach(), router(x2).detach()
    both = torch.cat([r1.expert.view(5, 2), r2.expert.view(3, 2)])
    probs = torch.cat([r1.probs, r2.probs]).tolist()
    # micro-batch 2 uses the load of micro-batches 1 and 2, its own P
    expected = sum(
        4 * float((both == i).sum()) / 16 * float(r2.probs[:, i].sum()) / 3 for i in range(4)
    )
    assert float(r2.aux["global_balance"]) == pytest.approx(expected)
    counts = router.global_counts
    assert update_balancing(router) == 1
    assert counts.step_load.tolist() == torch.bincount(both.reshape(-1), minlength=4).tolist()
    assert float(counts.step_tokens) == 8
    global_loss = loop_balance_loss(probs, both.tolist())
    assert float(counts.step_loss) == pytest.approx(global_loss)
    assert float(counts.pending("load").sum()) == 0
    r3 = router(x2).detach()  # a new step: its own load only
    assert float(r3.aux["global_balance"]) == pytest.approx(
        loop_balance_loss(r3.probs.tolist(), r3.expert.view(3, 2).tolist())
    )


def test_global_counts_observe_a_checkpointed_forward_once():
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(3)
    router = TopKRouter(6, 4, k=2, global_balance_weight=1.0)
    x = torch.randn(7, 6, requires_grad=True)
    plain = router(x).aux["global_balance"]
    plain_grad = torch.autograd.grad(plain, x)[0]
    update_balancing(router)
    loss = checkpoint(lambda t: router(t).aux["global_balance"], x, use_reentrant=False)
    loss.backward()
    assert float(router.global_counts.pending_observations) == 1
    assert float(router.global_counts.pending("tokens")) == 7
    torch.testing.assert_close(loss, plain)
    torch.testing.assert_close(x.grad, plain_grad)


def test_global_counts_check_their_input():
    counts = GlobalLoadCounts(4)
    with pytest.raises(ValueError, match=r"\[E\]"):
        counts.accumulate(torch.zeros(3), torch.zeros(2, 4))


def test_topk_gate_is_a_token_choice_router_with_an_optional_z_loss():
    torch.manual_seed(0)
    gate = TopKGate(5, 4, k=1, z_weight=0.1)
    assert gate.differentiable and not TopKGate(5, 4, k=1).differentiable
    routing = gate(torch.randn(3, 5))
    assert set(routing.aux) == {"z"}


def test_presets_build_and_match_their_explicit_configuration():
    torch.manual_seed(5)
    x = torch.randn(20, 16)
    for name in TOPK_PRESETS:
        router = TopKRouter.from_preset(name, 16, 64)
        check_routing(router(x), num_tokens=20, num_experts=64)
    torch.manual_seed(6)
    preset = TopKRouter.from_preset("deepseek-v3", 16, 64, k=4)
    torch.manual_seed(6)
    explicit = TopKRouter(
        16, 64, k=4, score="sigmoid", scaling_factor=2.5, num_groups=8, top_groups=4,
        selection_bias=True, sequence_balance_weight=1e-4,
    )  # fmt: skip
    a, b = preset(x), explicit(x)
    assert torch.equal(a.expert, b.expert) and torch.equal(a.weight, b.weight)
    assert preset.selection.group_score == "top2"
    assert TopKRouter.from_preset("deepseek-v2", 16, 64).selection.group_score == "max"
    with pytest.raises(ValueError, match="known: mixtral"):
        TopKRouter.from_preset("gpt-oss", 16, 64)
