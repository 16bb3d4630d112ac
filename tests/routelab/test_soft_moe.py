import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from routelab import FFNExperts
from routelab.soft_moe import SoftMoE


def paper_soft_moe(layer: SoftMoE, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Puigcerver et al. 2024, Algorithm 1, for one group X [S, d] (numpy, loops)."""
    d = x.shape[1]
    phi = layer.phi.detach().numpy()
    n, p = phi.shape[1], layer.slots_per_expert
    if layer.normalize:
        xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        pn = phi / np.maximum(np.linalg.norm(phi, axis=0, keepdims=True), 1e-12)
        logits = layer.scale.item() * xn @ pn
    else:
        logits = x @ phi
    dispatch = np.exp(logits - logits.max(0)) / np.exp(logits - logits.max(0)).sum(0)
    combine = np.exp(logits - logits.max(1, keepdims=True))
    combine /= combine.sum(1, keepdims=True)
    slots = dispatch.T @ x  # [n, d]
    outs = np.zeros((n, d))
    for s in range(n):
        row = torch.from_numpy(slots[s : s + 1])
        outs[s] = layer.experts.expert_forward(s // p, row).detach().numpy()[0]
    return combine @ outs, dispatch, combine


@given(
    groups=st.integers(1, 3),
    S=st.integers(0, 7),
    E=st.integers(1, 4),
    p=st.integers(1, 3),
    normalize=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_soft_moe_matches_the_papers_algorithm(groups, S, E, p, normalize, seed):
    torch.manual_seed(seed)
    layer = SoftMoE(5, E, FFNExperts(E, 5, 6), slots_per_expert=p, normalize=normalize)
    layer = layer.double()
    with torch.no_grad():
        if normalize:
            layer.scale.fill_(1.7)
    x = torch.randn(groups, S, 5, dtype=torch.float64)
    out = layer(x)
    assert out.output.shape == x.shape
    for g in range(groups if S else 0):
        y, dispatch, combine = paper_soft_moe(layer, x[g].numpy())
        np.testing.assert_allclose(out.output[g].detach().numpy(), y, atol=1e-10)
        got_d = out.dispatch[g].reshape(S, E * p).detach().numpy()
        np.testing.assert_allclose(got_d, dispatch, atol=1e-12)
        got_c = out.combine[g].reshape(S, E * p).detach().numpy()
        np.testing.assert_allclose(got_c, combine, atol=1e-12)
    # the slot routing: every expert processes exactly p slots of every group
    assert out.slot_routing.load().tolist() == [groups * p] * E
    # the token-level view: each token's combine mass over the experts sums to 1
    if S:
        sums = out.routing.to_dense().sum(1)
        torch.testing.assert_close(sums, torch.ones_like(sums))


def test_groups_do_not_mix_but_tokens_in_a_group_do():
    torch.manual_seed(0)
    layer = SoftMoE(4, 3, FFNExperts(3, 4, 8), slots_per_expert=2)
    x = torch.randn(2, 5, 4)
    base = layer(x).output
    changed = x.clone()
    changed[1, 4] += 1.0  # the last token of group 1
    out = layer(changed).output
    torch.testing.assert_close(out[0], base[0])  # group 0 untouched
    assert not torch.allclose(out[1, 0], base[1, 0])  # an earlier token sees a later one


def test_group_size_splits_a_flat_batch():
    torch.manual_seed(1)
    layer = SoftMoE(4, 2, FFNExperts(2, 4, 8), group_size=3)
    x = torch.randn(6, 4)
    grouped = SoftMoE(4, 2, layer.experts)
    grouped.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(x).output, grouped(x.view(2, 3, 4)).output.view(6, 4))
    # 7 tokens: groups of 3, 3 and 1 (the last one padded with two masked positions)
    x = torch.randn(7, 4)
    out = layer(x)
    parts = [grouped(x[a:b]).output for a, b in ((0, 3), (3, 6), (6, 7))]
    torch.testing.assert_close(out.output, torch.cat(parts))
    assert out.dispatch.shape == (3, 3, 2, 1) and out.routing.num_tokens == 7
    assert out.dispatch[2, 1:].abs().sum().item() == 0.0  # padding: no dispatch weight
    assert out.combine[2, 1:].abs().sum().item() == 0.0


def test_gradients_reach_phi_scale_experts_and_input():
    torch.manual_seed(0)
    layer = SoftMoE(4, 3, FFNExperts(3, 4, 8))
    x = torch.randn(6, 4, requires_grad=True)
    layer(x).output.square().sum().backward()
    for p in (layer.phi, layer.scale, layer.experts.w_in, x):
        assert p.grad is not None and float(p.grad.abs().sum()) > 0


def test_half_precision_input_computes_weights_in_fp32():
    torch.manual_seed(0)
    layer = SoftMoE(4, 2, FFNExperts(2, 4, 8)).to(torch.bfloat16)
    out = layer(torch.randn(5, 4, dtype=torch.bfloat16))
    assert out.output.dtype == torch.bfloat16
    assert out.dispatch.dtype == torch.float32 and out.combine.dtype == torch.float32


def test_bad_input_is_a_clear_error():
    layer = SoftMoE(4, 2, FFNExperts(2, 4, 8))
    with pytest.raises(ValueError, match="d_model"):
        layer(torch.randn(3, 5))
    with pytest.raises(ValueError, match="d_model"):
        layer(torch.randn(4))
    with pytest.raises(TypeError, match="floating"):
        layer(torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="num_experts"):
        SoftMoE(4, 3, FFNExperts(2, 4, 8))


def test_soft_moe_layers_stack_in_deep_moe_and_are_recorded():
    from analysis import RoutingRecorder
    from routelab.deep_moe import DeepMoE

    torch.manual_seed(0)
    model = DeepMoE(
        5,
        3,
        d_model=8,
        num_experts=4,
        make_layer=lambda i: SoftMoE(8, 4, FFNExperts(4, 8, 16), group_size=4),
    )
    with RoutingRecorder(model, reference_k=2) as recorder:
        out = model(torch.randn(10, 5))
        assert out.logits.shape == (10, 3)
        stats = recorder.stats(0)
        chosen = recorder.stats(0, stage="router")  # no router, no policies: the same
    assert stats.num_tokens == 10 and float(stats.importance.sum()) == pytest.approx(10.0)
    assert chosen.num_entries == stats.num_entries == 10 * 4
    # FFN work: 3 groups of 4 (the last padded) x 4 slots = 12 rows for 10 tokens
    assert stats.ffn_entries_per_token == pytest.approx(12 / 10)
    assert stats.flops_vs_topk == pytest.approx(12 / 10 / 2)
