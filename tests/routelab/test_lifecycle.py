"""The expert lifecycle: growth (function preservation), freezing, upcycling, pruning,
merging, state dicts, optimiser state and sharding of the re-indexed layers."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from routelab import FFNExperts, ModuleExperts, MoE
from routelab.deep_moe import DeepMoE
from routelab.distributed import shard_experts
from routelab.lifecycle import (
    ExpertTensors,
    distillation_loss,
    expand_model,
    freeze_experts,
    grow_experts,
    merge_experts,
    merge_groups,
    prune_experts,
    register_router_surgery,
    router_surgery,
    successor_pairs,
    transfer_optimizer_state,
    upcycle_ffn,
)
from routelab.policies import LossFreeBalancingPolicy
from routelab.routers import (
    BASERouter,
    CosineTopKGate,
    DSelectKGate,
    ExpertChoiceRouter,
    HashRouter,
    NoisyTopKGate,
    ReMoEGate,
    SinkhornRouter,
    SoftmaxGate,
    SwitchGate,
    TopKGate,
    TopPGate,
)
from routelab.routers.topk import TopKRouter
from routelab.testing import RouterContract, check_routing

D, H, V = 6, 10, 40


def _trained_like(moe: MoE, seed: int) -> MoE:
    """Perturb every parameter (as if trained): no zero-initialised gate left."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moe.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return moe


def _hash_router(E: int) -> HashRouter:
    return HashRouter.fit("random", E, d_model=D, vocab_size=V, seed=3)


ROUTERS = {
    "topk": lambda E: TopKGate(D, E, k=2),
    "topk_no_bias": lambda E: TopKGate(D, E, k=2, bias=False),
    "top1": lambda E: TopKGate(D, E, k=1),
    "softmax": lambda E: SoftmaxGate(D, E),
    "switch": lambda E: SwitchGate(D, E),
    "expert_choice": lambda E: ExpertChoiceRouter(D, E, capacity_factor=1.5),
    "dselect_k": lambda E: DSelectKGate(D, E, k=2),
    "dselect_k_static": lambda E: DSelectKGate(D, E, k=2, per_example=False),
    "hash": _hash_router,
    "top_p": lambda E: TopPGate(D, E, p=0.6),
    "remoe": lambda E: ReMoEGate(D, E, k=2),
    "topk_router_selection_bias": lambda E: TopKRouter(D, E, k=2, selection_bias=True),
    "noisy_topk": lambda E: NoisyTopKGate(D, E, k=2),
}
MASKABLE = sorted(set(ROUTERS) - {"topk_router_selection_bias", "noisy_topk"})
# routers whose preserved output is bit-exact; DSelect-k renormalises its selectors, and a
# hash layer's moved tokens meet their expert's copy in another GEMM (other rounding)
EXACT = {"topk", "topk_no_bias", "top1", "switch", "expert_choice", "top_p", "remoe"}


def _layer(kind: str, E: int = 4, seed: int = 0, **experts_options) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(ROUTERS[kind](E), FFNExperts(E, D, H, **experts_options))
    return _trained_like(moe, seed + 100)


def _inputs(T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(T, D, generator=gen), torch.randint(0, V, (T,), generator=gen)


def _run(moe: MoE, x, ids):
    return moe(x, ids if isinstance(moe.router, HashRouter) else None)


# ---------------------------------------------------------------------- growth
class TestGrownTopKGateIsARouter(RouterContract):
    expect = {"k": 2}

    def make_router(self, d_model, num_experts):
        moe = MoE(TopKGate(d_model, num_experts - 2), FFNExperts(num_experts - 2, d_model, 4))
        return grow_experts(moe, 2, init="scratch", gate="scratch").router


class TestPrunedSwitchGateIsARouter(RouterContract):
    # Switch weights are p_i(x), not summing to 1: no `k` expectation
    def make_router(self, d_model, num_experts):
        moe = MoE(SwitchGate(d_model, num_experts + 3), FFNExperts(num_experts + 3, d_model, 4))
        return prune_experts(moe, torch.arange(num_experts + 3.0), num_remove=3).moe.router


@pytest.mark.parametrize("kind", MASKABLE)
@settings(max_examples=8)
@given(T=st.integers(0, 33), n=st.integers(1, 5), seed=st.integers(0, 10**6))
def test_masked_growth_preserves_the_layer_function(kind, T, n, seed):
    old = _layer(kind, seed=seed % 7)
    grown = grow_experts(old, n, init="copy", gate="masked", seed=seed)
    assert grown.num_experts == old.num_experts + n
    assert grown.router.num_experts == grown.experts.num_experts == 4 + n
    x, ids = _inputs(T, seed)
    for mode in (True, False):
        old.train(mode)
        grown.train(mode)
        torch.manual_seed(seed)
        before = _run(old, x, ids)
        torch.manual_seed(seed)
        after = _run(grown, x, ids)
        if kind in EXACT:
            assert torch.equal(before.output, after.output)
        else:
            torch.testing.assert_close(after.output, before.output, atol=1e-6, rtol=1e-6)
        if before.routing.probs is not None:  # the new columns carry no probability
            torch.testing.assert_close(after.routing.probs[:, :4], before.routing.probs)
            if kind != "hash":
                assert float(after.routing.probs[:, 4:].detach().abs().sum()) == 0.0


def test_scratch_growth_of_a_hash_layer_keeps_only_the_donors_tokens_moving():
    old = _layer("hash", E=3)
    counts = torch.arange(V, dtype=torch.float64) % 7 + 1
    grown = grow_experts(old, 2, init="scratch", token_counts=counts)
    old_table, new_table = old.router.table, grown.router.table
    moved = new_table != old_table
    assert bool((new_table[moved] >= 3).all())  # tokens only move to the new experts
    loads_old = torch.bincount(old_table, weights=counts, minlength=3)
    loads_new = torch.bincount(new_table, weights=counts, minlength=5)
    assert float(loads_new.max()) < float(loads_old.max())  # the heaviest expert was split
    assert float(loads_new.sum()) == float(loads_old.sum())
    # scratch experts are not copies of their donors
    assert not torch.equal(grown.experts.w_in[3], old.experts.w_in[int(old_table[moved][0])])


def test_copy_growth_copies_experts_and_gate_columns_from_the_sources():
    old = _layer("topk")
    loads = torch.tensor([5.0, 9.0, 1.0, 9.0])
    grown = grow_experts(old, 3, init="copy", gate="copy", loads=loads)
    # most loaded first, ties by id, cycling: 1, 3, 0
    for new_id, source in zip((4, 5, 6), (1, 3, 0)):
        assert torch.equal(grown.experts.w_in[new_id], old.experts.w_in[source])
        assert torch.equal(grown.experts.b_out[new_id], old.experts.b_out[source])
        assert torch.equal(grown.router.proj.weight[new_id], old.router.proj.weight[source])
    assert torch.equal(grown.experts.w_in[:4], old.experts.w_in)
    scratch = grow_experts(old, 1, init="scratch", gate="scratch", seed=1)
    assert not any(torch.equal(scratch.experts.w_in[4], old.experts.w_in[e]) for e in range(4))
    assert torch.isfinite(scratch.router.proj.weight).all()


def test_growth_leaves_the_old_layer_untouched_and_is_seeded():
    old = _layer("topk")
    state = {k: v.clone() for k, v in old.state_dict().items()}
    a = grow_experts(old, 2, init="scratch", gate="scratch", seed=5)
    b = grow_experts(old, 2, init="scratch", gate="scratch", seed=5)
    assert all(torch.equal(state[k], v) for k, v in old.state_dict().items())
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


@pytest.mark.parametrize(
    "router",
    [
        NoisyTopKGate(D, 4),
        BASERouter(D, 4),
        DSelectKGate(D, 6),
        TopKRouter(D, 4),
        CosineTopKGate(D, 4),
    ],
    ids=["noisy_topk", "base", "dselect_6", "topk_router", "cosine"],
)
def test_masked_growth_is_refused_where_the_router_cannot_mask(router):
    moe = MoE(router, FFNExperts(router.num_experts, D, H))
    with pytest.raises(ValueError, match="gate='copy'"):
        grow_experts(moe, 2)
    grown = grow_experts(moe, 2, gate="copy", noise=0.1)
    assert grown(torch.randn(5, D)).output.shape == (5, D)


def test_growth_argument_errors():
    moe = _layer("topk")
    with pytest.raises(ValueError, match="n must be >= 1"):
        grow_experts(moe, 0)
    with pytest.raises(ValueError, match="init must be one of"):
        grow_experts(moe, 1, init="clone")
    with pytest.raises(ValueError, match="gate must be one of"):
        grow_experts(moe, 1, gate="zero")
    with pytest.raises(ValueError, match="sources must name"):
        grow_experts(moe, 2, sources=[0])
    with pytest.raises(ValueError, match="loads must have one entry per expert"):
        grow_experts(moe, 1, loads=torch.ones(3))
    with pytest.raises(TypeError, match=r"routelab\.MoE"):
        grow_experts(nn.Linear(2, 2), 1)


def test_a_router_family_registers_in_one_line():
    class MyGate(TopKGate):
        pass

    class Unknown(SoftmaxGate.__mro__[1]):  # a bare Router subclass
        def route(self, x, token_ids):
            raise NotImplementedError

    assert router_surgery(MyGate(D, 4)) is router_surgery(TopKGate(D, 4))  # by the MRO
    with pytest.raises(TypeError, match="register_router_surgery"):
        router_surgery(Unknown(D, 4))
    register_router_surgery(Unknown, ExpertTensors({}))
    assert isinstance(router_surgery(Unknown(D, 4)), ExpertTensors)


def test_policies_with_per_expert_state_are_reindexed():
    torch.manual_seed(0)
    policy = LossFreeBalancingPolicy(4, k=2)
    policy.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    moe = MoE(TopKGate(D, 4), FFNExperts(4, D, H), [policy])
    grown = grow_experts(moe, 2)
    assert grown.policies[0].num_experts == 6
    assert torch.equal(grown.policies[0].bias, torch.tensor([0.1, -0.2, 0.3, 0.0, 0.0, 0.0]))
    pruned = prune_experts(moe, torch.tensor([3.0, 1.0, 2.0, 4.0]), num_remove=1).moe
    assert torch.equal(pruned.policies[0].bias, torch.tensor([0.1, 0.3, 0.0]))


def test_module_experts_grow_prune_and_merge():
    torch.manual_seed(0)
    mods = [nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, D)) for _ in range(3)]
    moe = MoE(TopKGate(D, 3, k=1), ModuleExperts(mods))
    grown = grow_experts(moe, 1, sources=[2])
    x = torch.randn(7, D)
    assert torch.equal(grown(x).output, moe(x).output)
    assert torch.equal(grown.experts.experts[3][0].weight, mods[2][0].weight)
    merged = merge_experts(moe, torch.tensor([1.0, 3.0, 0.0]), groups=[[0, 1], [2]]).moe
    expected = 0.25 * mods[0][0].weight + 0.75 * mods[1][0].weight
    torch.testing.assert_close(merged.experts.experts[0][0].weight, expected)


# ---------------------------------------------------------------------- state and optimiser
def test_a_grown_model_saves_and_loads():
    def build(seed: int) -> MoE:
        torch.manual_seed(seed)
        return grow_experts(MoE(SwitchGate(D, 4), FFNExperts(4, D, H)), 3, init="scratch")

    grown = _trained_like(build(0), 9)
    buffer = io.BytesIO()
    torch.save(grown.state_dict(), buffer)
    buffer.seek(0)
    fresh = build(1)  # the same architecture, other weights
    x = torch.randn(9, D)
    assert not torch.equal(fresh(x).output, grown(x).output)
    fresh.load_state_dict(torch.load(buffer))
    assert torch.equal(fresh(x).output, grown(x).output)
    assert fresh.router.proj.bias is not None  # masked growth added the logit bias


def test_optimizer_state_is_carried_to_the_successor_rows():
    moe = _layer("topk")
    opt = torch.optim.Adam(moe.parameters(), lr=1e-2)
    moe(torch.randn(12, D)).output.square().sum().backward()
    opt.step()
    grown = grow_experts(moe, 2, sources=[1, 1])
    new_opt = torch.optim.Adam(grown.parameters(), lr=1e-2)
    sources = [0, 1, 2, 3, None, None]
    pairs = successor_pairs(moe, grown, sources)
    # the 4 expert stacks, the gate weight and bias
    assert transfer_optimizer_state(opt, new_opt, pairs) == 6
    state, old_state = new_opt.state[grown.experts.w_in], opt.state[moe.experts.w_in]
    assert torch.equal(state["exp_avg"][:4], old_state["exp_avg"])
    assert float(state["exp_avg"][4:].abs().sum()) == 0.0
    assert torch.equal(state["step"], old_state["step"])
    bias_state = new_opt.state[grown.router.proj.bias]["exp_avg_sq"]
    assert torch.equal(bias_state[:4], opt.state[moe.router.proj.bias]["exp_avg_sq"])
    # a merge: each merged expert takes its dominant member's moments
    merged = merge_experts(moe, torch.tensor([3.0, 1.0, 2.0, 4.0]), groups=[[0, 1], [2, 3]])
    merge_opt = torch.optim.Adam(merged.moe.parameters(), lr=1e-2)
    transfer_optimizer_state(opt, merge_opt, successor_pairs(moe, merged.moe, merged.sources))
    carried = merge_opt.state[merged.moe.experts.w_out]["exp_avg"]
    assert torch.equal(carried, opt.state[moe.experts.w_out]["exp_avg"][[0, 3]])
    moe(torch.randn(3, D))  # the old model still runs
    grown(torch.randn(3, D)).output.sum().backward()
    new_opt.step()  # the carried state has the right shapes


# ---------------------------------------------------------------------- freezing
def _train_step(model, optimiser, x, ids=None):
    optimiser.zero_grad()
    out = model(x, ids)
    (out.output.square().mean() + out.aux_loss).backward()
    optimiser.step()


# the router tensors that index experts, and their expert axis, per router kind
GATE_TENSORS = {
    "topk": {"router.proj.weight": 0, "router.proj.bias": 0},
    "switch": {"router.proj.weight": 0},
    "softmax": {"router.proj.weight": 0, "router.proj.bias": 0},
    "expert_choice": {"router.proj.weight": 0, "router.proj.bias": 0},
    "noisy_topk": {"router.w_gate": 1, "router.w_noise": 1},
    "topk_router_selection_bias": {"router.weight": 1},
}


@pytest.mark.parametrize("kind", sorted(GATE_TENSORS))
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_a_training_step_leaves_frozen_experts_and_gate_columns_bit_identical(kind, opt):
    grown = grow_experts(_layer(kind), 2, gate="scratch", init="scratch", seed=1)
    freeze = freeze_experts(grown, range(4))
    before = {k: v.clone() for k, v in grown.state_dict().items()}
    optimiser = (
        torch.optim.SGD(grown.parameters(), lr=0.1, momentum=0.9)
        if opt == "sgd"
        else torch.optim.Adam(grown.parameters(), lr=0.1)
    )
    for step in range(3):
        x = torch.randn(32, D, generator=torch.Generator().manual_seed(step))
        _train_step(grown, optimiser, x)
    after = grown.state_dict()
    tensors = {f"experts.{n}": 0 for n in ("w_in", "w_out", "b_in", "b_out")}
    tensors.update(GATE_TENSORS[kind])
    for name, axis in tensors.items():
        old, new = before[name].movedim(axis, 0), after[name].movedim(axis, 0)
        assert torch.equal(new[:4], old[:4]), name
        assert not torch.equal(new[4:], old[4:]), name
    assert len(freeze.parameters) == len(tensors)


def test_weight_decay_needs_the_guard_which_keeps_frozen_slices_exact():
    grown = grow_experts(_layer("topk"), 2, gate="scratch", init="scratch")
    x = torch.randn(32, D)
    unguarded = grow_experts(_layer("topk"), 2, gate="scratch", init="scratch")
    freeze_experts(unguarded, range(4))
    opt = torch.optim.AdamW(unguarded.parameters(), lr=0.1, weight_decay=0.5)
    before = unguarded.experts.w_in[:4].detach().clone()
    _train_step(unguarded, opt, x)
    assert not torch.equal(unguarded.experts.w_in[:4], before)  # decay moved them

    freeze = freeze_experts(grown, range(4))
    opt = torch.optim.AdamW(grown.parameters(), lr=0.1, weight_decay=0.5)
    freeze.guard(opt)
    before = grown.experts.w_in[:4].detach().clone()
    _train_step(grown, opt, x)
    assert torch.equal(grown.experts.w_in[:4], before)
    freeze.remove()
    _train_step(grown, opt, x)
    assert not torch.equal(grown.experts.w_in[:4], before)


def test_expand_model_grows_every_layer_and_freezes_the_old_experts():
    torch.manual_seed(0)
    model = DeepMoE(8, 3, d_model=D, num_experts=4, num_layers=2)
    expansion = expand_model(model, 2)
    grown = expansion.model
    assert [layer.num_experts for layer in grown.layers] == [6, 6]
    assert [layer.num_experts for layer in model.layers] == [4, 4]  # teacher kept
    x = torch.randn(10, 8)
    assert torch.equal(grown(x).logits, model(x).logits)  # masked growth: same function
    opt = torch.optim.Adam(grown.parameters(), lr=0.05)
    for layer in grown.layers:  # let the new columns be chosen at all
        with torch.no_grad():
            layer.router.proj.bias[4:] = 0.0
    before = {k: v.clone() for k, v in grown.state_dict().items()}
    loss = distillation_loss(grown(x).logits, model(x).logits) + grown(x).logits.square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    after = grown.state_dict()
    for i in range(2):
        key = f"layers.{i}.experts.w_in"
        assert torch.equal(after[key][:4], before[key][:4])
    assert not torch.equal(after["head.weight"], before["head.weight"])  # the rest trains
    assert len(expansion.freezes) == 2


def test_distillation_loss_is_the_tempered_kl_divergence():
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 7, generator=gen), torch.randn(5, 4, generator=gen)
    tau = 2.0
    p = torch.softmax(teacher / tau, dim=1)
    q = torch.softmax(student[:, :4] / tau, dim=1)
    reference = tau**2 * float((p * (p / q).log()).sum(dim=1).mean())
    assert abs(float(distillation_loss(student, teacher, temperature=tau)) - reference) < 1e-5
    assert float(distillation_loss(teacher, teacher)) == pytest.approx(0.0, abs=1e-7)
    assert float(distillation_loss(torch.zeros(0, 3), torch.zeros(0, 3))) == 0.0
    with pytest.raises(ValueError, match="student's C"):
        distillation_loss(torch.randn(5, 3), torch.randn(5, 4))


# ---------------------------------------------------------------------- upcycling
def _dense(activation: nn.Module, bias: bool = True) -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(D, H, bias=bias), activation, nn.Linear(H, D, bias=bias))


@pytest.mark.parametrize(
    "make_router",
    [
        lambda: TopKGate(D, 4, k=2),
        lambda: SoftmaxGate(D, 4),
        lambda: NoisyTopKGate(D, 4, k=2),
        lambda: _hash_router(4),
    ],
    ids=["topk", "softmax", "noisy_topk", "hash"],
)
@pytest.mark.parametrize("activation", [nn.ReLU(), nn.GELU(), nn.SiLU()], ids=str)
def test_upcycled_layer_computes_the_dense_ffn(make_router, activation):
    ffn = _dense(activation)
    moe = upcycle_ffn(ffn, make_router())
    x, ids = _inputs(17, 0)
    torch.testing.assert_close(_run(moe, x, ids).output, ffn(x), atol=1e-6, rtol=1e-5)
    assert moe.num_experts == 4


def test_upcycling_a_one_expert_stack_and_errors():
    torch.manual_seed(0)
    single = FFNExperts(1, D, H, activation="swiglu")
    moe = upcycle_ffn(single, TopKGate(D, 3, k=2))
    for name in ("w_in", "w_out", "w_gate", "b_in"):
        assert torch.equal(getattr(moe.experts, name)[2], getattr(single, name)[0])
    noisy = upcycle_ffn(_dense(nn.ReLU()), TopKGate(D, 3), noise=0.1)
    assert not torch.equal(noisy.experts.w_in[0], noisy.experts.w_in[1])
    with pytest.raises(TypeError, match=r"nn\.Sequential"):
        upcycle_ffn(nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, D)), TopKGate(D, 2))
    with pytest.raises(ValueError, match="d_model"):
        upcycle_ffn(_dense(nn.ReLU()), TopKGate(D + 1, 2))
    with pytest.raises(ValueError, match="one-expert"):
        upcycle_ffn(FFNExperts(2, D, H), TopKGate(D, 2))


# ---------------------------------------------------------------------- pruning
def test_pruning_removes_the_least_used_experts_and_their_columns():
    moe = _layer("softmax", E=5)
    loads = torch.tensor([10.0, 0.0, 7.0, 2.0, 7.0])
    result = prune_experts(moe, loads, num_remove=2)
    assert result.sources == (0, 2, 4)
    assert result.id_map.tolist() == [0, -1, 1, -1, 2]
    pruned = result.moe
    x = torch.randn(11, D)
    # independent reference: softmax over the kept logits, dense sum over kept experts
    logits = moe.router.proj(x)[:, [0, 2, 4]]
    gates = torch.softmax(logits, dim=1)
    ref = sum(
        gates[:, j : j + 1] * moe.experts.expert_forward(e, x) for j, e in enumerate([0, 2, 4])
    )
    torch.testing.assert_close(pruned(x).output, ref)
    with pytest.raises(ValueError, match="exactly one of"):
        prune_experts(moe, loads)
    with pytest.raises(ValueError, match="num_remove must be <= 4"):
        prune_experts(moe, loads, num_remove=5)
    with pytest.raises(ValueError, match="k = 2"):
        prune_experts(_layer("topk"), torch.ones(4), num_remove=3)


def test_pruning_a_hash_layer_deals_orphaned_tokens_to_the_least_loaded():
    moe = _layer("hash", E=4)
    counts = torch.ones(V, dtype=torch.float64)
    result = prune_experts(moe, torch.tensor([5.0, 1.0, 5.0, 5.0]), keep=[0, 2, 3])
    old, new = moe.router.table, result.moe.router.table
    kept = old != 1
    assert torch.equal(new[kept], result.id_map[old[kept]])
    loads = torch.bincount(new, weights=counts, minlength=3)
    assert float(loads.max() - loads.min()) <= 1.0 + float(
        torch.bincount(old, minlength=4)[[0, 2, 3]].max()
        - torch.bincount(old, minlength=4)[[0, 2, 3]].min()
    )
    ids = torch.arange(V)
    out = result.moe(torch.randn(V, D), ids)
    assert out.routing.expert.max() < 3


# ---------------------------------------------------------------------- merging
def test_merging_averages_each_group_weighted_by_frequency():
    moe = _layer("topk", E=4)
    loads = torch.tensor([6.0, 2.0, 1.0, 3.0])
    result = merge_experts(moe, loads, groups=[[0, 2], [1, 3]])
    merged = result.moe
    for name in ("w_in", "w_out", "b_in", "b_out"):
        old = getattr(moe.experts, name).detach()
        torch.testing.assert_close(getattr(merged.experts, name)[0], (6 * old[0] + old[2]) / 7)
        torch.testing.assert_close(getattr(merged.experts, name)[1], (2 * old[1] + 3 * old[3]) / 5)
    # the router keeps each group's most used member's column: 0 and 3
    assert torch.equal(merged.router.proj.weight, moe.router.proj.weight[[0, 3]])
    assert result.id_map.tolist() == [0, 1, 0, 1]
    assert result.sources == (0, 3)


def test_mc_smoe_grouping_joins_each_expert_to_its_most_similar_dominant():
    loads = torch.tensor([9.0, 1.0, 8.0, 2.0, 3.0])
    features = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 1.0], [-1.0, 0.2]])
    groups, dominants = merge_groups(loads, 2, features)
    assert dominants == [0, 2]
    assert groups == [[0, 1], [2, 3, 4]]
    moe = _layer("hash", E=5)
    result = merge_experts(moe, loads, num_groups=2, features=features)
    old, new = moe.router.table, result.moe.router.table
    assert torch.equal(new, result.id_map[old])  # a hash table follows the merge exactly
    default = merge_experts(_layer("topk", E=5), loads, num_groups=3)
    assert default.moe.num_experts == 3
    with pytest.raises(ValueError, match="partition"):
        merge_experts(_layer("topk"), torch.ones(4), groups=[[0, 1], [1, 2, 3]])


# ---------------------------------------------------------------------- sharding
@pytest.mark.parametrize("operation", ["grow", "prune", "merge"])
def test_shards_of_reindexed_layers_hold_the_global_experts(operation):
    moe = _layer("topk", E=6)
    loads = torch.tensor([4.0, 3.0, 2.0, 1.0, 5.0, 6.0])
    if operation == "grow":
        layer = grow_experts(moe, 2)
    elif operation == "prune":
        layer = prune_experts(moe, loads, num_remove=2).moe
    else:
        layer = merge_experts(moe, loads, num_groups=4).moe
    E = layer.num_experts
    assert E % 2 == 0
    shards = [shard_experts(layer.experts, r, 2) for r in range(2)]
    for name in ("w_in", "w_out", "b_in", "b_out"):
        full = getattr(layer.experts, name)
        assert torch.equal(torch.cat([getattr(s, name) for s in shards]), full)


def test_a_selection_bias_follows_its_experts():
    moe = _layer("topk_router_selection_bias")
    with torch.no_grad():
        moe.router.selection_bias.bias.copy_(torch.tensor([0.5, -0.5, 0.25, 0.0]))
    grown = grow_experts(moe, 2, sources=[1, 2], gate="copy")
    bias = grown.router.selection_bias
    assert bias.num_experts == 6
    assert torch.equal(bias.bias, torch.tensor([0.5, -0.5, 0.25, 0.0, -0.5, 0.25]))
    assert torch.equal(grown.router.weight[:, 4], moe.router.weight[:, 1])
    x = torch.randn(9, D)
    out = grown(x)
    assert out.routing.num_experts == 6
    pruned = prune_experts(moe, torch.tensor([1.0, 4.0, 3.0, 2.0]), num_remove=1).moe
    assert torch.equal(pruned.router.selection_bias.bias, torch.tensor([-0.5, 0.25, 0.0]))


def test_remoe_growth_moves_its_target_sparsity():
    moe = _layer("remoe")
    grown = grow_experts(moe, 4)
    assert grown.router.controller.target_sparsity == pytest.approx(1 - 2 / 8)
    with pytest.raises(ValueError, match="k = 2 < num_experts"):
        prune_experts(moe, torch.ones(4), num_remove=2)


def test_shared_experts_and_the_layer_class_survive_the_lifecycle():
    from routelab.moe import SharedExperts

    torch.manual_seed(0)
    moe = MoE(
        TopKGate(D, 4), FFNExperts(4, D, H), shared_experts=SharedExperts(D, 8, num_experts=2)
    )
    x = torch.randn(7, D)
    grown = grow_experts(moe, 2)
    assert isinstance(grown.shared_experts, SharedExperts)
    assert grown.shared_experts is not moe.shared_experts  # a copy, not shared
    assert torch.equal(grown(x).output, moe(x).output)
    pruned = prune_experts(moe, torch.tensor([1.0, 2.0, 3.0, 4.0]), num_remove=1).moe
    assert torch.equal(pruned.shared_experts.ffn.w_in, moe.shared_experts.ffn.w_in)


def test_every_per_expert_tensor_of_a_stacked_executor_is_reindexed():
    class ScaledExperts(FFNExperts):  # an executor with one more per-expert tensor
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.register_buffer("scale", torch.arange(float(self.num_experts)))

    torch.manual_seed(0)
    moe = MoE(TopKGate(D, 4), ScaledExperts(4, D, H))
    grown = grow_experts(moe, 2, sources=[3, 1])
    assert isinstance(grown.experts, ScaledExperts)
    assert grown.experts.scale.tolist() == [0.0, 1.0, 2.0, 3.0, 3.0, 1.0]
    merged = merge_experts(moe, torch.tensor([1.0, 1.0, 3.0, 1.0]), groups=[[0, 1], [2, 3]])
    assert merged.moe.experts.scale.tolist() == [0.5, 2.25]  # frequency-weighted


@settings(max_examples=15)
@given(
    E=st.integers(1, 6),
    n=st.integers(1, 4),
    vocab=st.integers(1, 60),
    seed=st.integers(0, 10**6),
)
def test_hash_growth_only_moves_tokens_from_their_donor_and_never_raises_the_peak(
    E, n, vocab, seed
):
    gen = torch.Generator().manual_seed(seed)
    table = torch.randint(0, E, (vocab,), generator=gen)
    counts = torch.randint(0, 5, (vocab,), generator=gen).double()
    moe = MoE(HashRouter(D, E, table=table), FFNExperts(E, D, H))
    grown = grow_experts(moe, n, token_counts=counts)
    new = grown.router.table
    assert int(new.max()) < E + n and bool((new >= 0).all())
    moved = new != table
    assert bool((new[moved] >= E).all())  # a token either stays or goes to a new expert
    old_load = torch.bincount(table, weights=counts, minlength=E)
    new_load = torch.bincount(new, weights=counts, minlength=E + n)
    assert float(new_load.max()) <= float(old_load.max())
    assert float(new_load.sum()) == float(old_load.sum())
    # each new expert copies the expert its tokens came from: the function is preserved
    for j in range(E, E + n):
        donors = {int(e) for e in table[new == j]}
        assert len(donors) <= 1
        if donors:
            assert torch.equal(grown.experts.w_in[j], moe.experts.w_in[donors.pop()])


@settings(max_examples=15)
@given(E=st.integers(2, 7), data=st.data())
def test_pruned_softmax_layer_is_the_softmax_over_the_kept_experts(E, data):
    num_remove = data.draw(st.integers(0, E - 1))
    seed = data.draw(st.integers(0, 10**6))
    torch.manual_seed(seed)
    moe = _trained_like(MoE(SoftmaxGate(D, E), FFNExperts(E, D, H)), seed)
    loads = torch.randint(0, 4, (E,), generator=torch.Generator().manual_seed(seed)).double()
    result = prune_experts(moe, loads, num_remove=num_remove)
    kept = [e for e in range(E) if int(result.id_map[e]) >= 0]
    assert len(kept) == E - num_remove
    dropped_loads = [float(loads[e]) for e in range(E) if e not in kept]
    assert not dropped_loads or max(dropped_loads) <= min(float(loads[e]) for e in kept)
    x = torch.randn(9, D)
    gates = torch.softmax(moe.router.proj(x)[:, kept], dim=1)
    ref = sum(gates[:, j : j + 1] * moe.experts.expert_forward(e, x) for j, e in enumerate(kept))
    torch.testing.assert_close(result.moe(x).output, ref, atol=1e-5, rtol=1e-5)


def test_a_non_finite_gradient_on_frozen_experts_is_masked_to_zero():
    grown = grow_experts(_layer("topk"), 2, init="scratch")
    freeze_experts(grown, range(4))
    w = grown.experts.w_in
    scale = torch.ones_like(w)
    scale[:4] = float("inf")
    (w * scale.detach()).sum().backward()
    assert float(w.grad[:4].abs().sum()) == 0.0
    assert bool((w.grad[4:] == 1).all())


SMOKE = {
    "topk": lambda E: TopKGate(D, E, k=2),
    "softmax": lambda E: SoftmaxGate(D, E),
    "switch": lambda E: SwitchGate(D, E),
    "expert_choice": lambda E: ExpertChoiceRouter(D, E),
    "noisy_topk": lambda E: NoisyTopKGate(D, E, k=2),
    "topk_router": lambda E: TopKRouter(D, E, k=2, selection_bias=True, balance_weight=0.01),
    "cosine": lambda E: CosineTopKGate(D, E, k=2),
    "top_p": lambda E: TopPGate(D, E),
    "remoe": lambda E: ReMoEGate(D, E, k=2),
    "base": lambda E: BASERouter(D, E),
    "sinkhorn": lambda E: SinkhornRouter(D, E),
    "dselect_k": lambda E: DSelectKGate(D, E, k=2),
    "hash": _hash_router,
}


@pytest.mark.parametrize("kind", sorted(SMOKE))
def test_every_registered_router_grows_prunes_and_merges_into_valid_routings(kind):
    torch.manual_seed(0)
    moe = _trained_like(MoE(SMOKE[kind](6), FFNExperts(6, D, H)), 1)
    loads = torch.tensor([6.0, 1.0, 5.0, 2.0, 4.0, 3.0])
    layers = {"grown": grow_experts(moe, 2, gate="copy", noise=0.1, loads=loads)}
    if kind == "dselect_k":  # binary codes: growth only
        with pytest.raises(ValueError, match="growth only"):
            prune_experts(moe, loads, num_remove=2)
        with pytest.raises(ValueError, match="growth only"):
            merge_experts(moe, loads, num_groups=3)
    else:
        layers["pruned"] = prune_experts(moe, loads, num_remove=2).moe
        layers["merged"] = merge_experts(moe, loads, num_groups=3).moe
    x, ids = _inputs(17, 2)
    for name, layer in layers.items():
        for mode in (True, False):
            layer.train(mode)
            out = _run(layer, x, ids)
            check_routing(out.routing, num_tokens=17, num_experts=layer.num_experts)
            assert out.output.shape == (17, D) and bool(torch.isfinite(out.output).all()), name
