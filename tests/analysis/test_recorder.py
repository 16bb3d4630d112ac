import pytest
import torch
from torch import nn

from analysis import (
    RoutingRecorder,
    coactivation,
    concat_routings,
    contingency,
    load_stats,
    specialisation,
)
from routelab import FFNExperts, MoE
from routelab.deep_moe import DeepMoE
from routelab.policies import CapacityPolicy
from routelab.routers import TopKGate

FIELDS = (
    "cv_importance",
    "cv_load",
    "max_over_mean",
    "min_over_mean",
    "gini",
    "entropy",
    "unused_fraction",
    "dropped_fraction",
    "unrouted_fraction",
)


def _moe(d=8, e=5, capacity=3):
    torch.manual_seed(0)
    return MoE(TopKGate(d, e, k=2), FFNExperts(e, d, 16), [CapacityPolicy(capacity=capacity)])


def test_streaming_equals_batch_computation():
    moe = _moe()
    recorder = RoutingRecorder(moe, num_labels=3)
    gen = torch.Generator().manual_seed(1)
    routings, labels = [], []
    for size in (7, 0, 13, 4):
        x = torch.randn(size, 8, generator=gen)
        y = torch.randint(3, (size,), generator=gen)
        recorder.set_labels(y)
        routings.append(moe(x).routing)
        labels.append(y)
        recorder.step()
    whole = concat_routings(routings)
    batch, streamed = load_stats(whole), recorder.stats(0)
    assert torch.equal(batch.load, streamed.load)
    assert torch.allclose(batch.importance, streamed.importance)
    for name in FIELDS:
        assert getattr(streamed, name) == pytest.approx(getattr(batch, name)), name
    assert streamed.num_tokens == 24 and streamed.num_dropped == whole.dropped.num_entries
    kept = sum(r.num_entries for r in routings)
    assert streamed.capacity_utilisation == pytest.approx(kept / (4 * 3 * 5))
    assert torch.equal(recorder.table(0), contingency(whole, torch.cat(labels), 3))
    assert recorder.specialisation(0).mutual_information == pytest.approx(
        specialisation(whole, torch.cat(labels), num_labels=3).mutual_information
    )
    # one history record per step, equal to that step's own statistics
    assert len(recorder.history) == 4
    for record, routing in zip(recorder.history, routings):
        assert torch.equal(record[recorder.layer_names[0]].load, load_stats(routing).load)
    assert recorder.cv_history(0) == pytest.approx([load_stats(r).cv_load for r in routings])


def test_memory_does_not_grow_with_tokens():
    moe = _moe()
    recorder = RoutingRecorder(moe, num_labels=3)
    sizes = []
    for size in (10, 1000):
        recorder.set_labels(torch.zeros(size, dtype=torch.int64))
        moe(torch.randn(size, 8))
        layer = recorder._layers[0]
        sizes.append((layer.total.load.numel(), layer.table.numel()))
    assert sizes[0] == sizes[1] == (5, 15)


def test_coactivation_of_stacked_layers_and_mode_filter():
    torch.manual_seed(0)
    model = DeepMoE(6, 3, d_model=8, num_experts=4)
    recorder = RoutingRecorder(model, mode="train")
    assert recorder.layer_names == ["layers.0", "layers.1"]
    expected = torch.zeros(4, 4, dtype=torch.int64)
    for size in (5, 9):
        out = model(torch.randn(size, 6))
        expected += coactivation(*out.routings)
    model.eval()
    model(torch.randn(20, 6))  # not recorded in "train" mode
    assert torch.equal(recorder.coactivation(0, 1), expected)
    assert recorder.stats(1).num_tokens == 14
    recorder.remove()
    model.train()
    model(torch.randn(3, 6))
    assert recorder.stats("layers.1").num_tokens == 14


def test_context_manager_reset_and_errors():
    moe = _moe()
    with pytest.raises(ValueError, match=r"no routelab\.MoE"):
        RoutingRecorder(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="mode"):
        RoutingRecorder(moe, mode="sometimes")
    with RoutingRecorder(moe, num_labels=2) as recorder:
        recorder.set_labels(torch.tensor([0, 1, 1]))
        with pytest.raises(ValueError, match="labels cover 3 tokens"):
            moe(torch.randn(4, 8))
        with pytest.raises(ValueError, match="< num_labels = 2, got max 2"):
            recorder.set_labels(torch.tensor([0, 2]))
        recorder.set_labels(None)
        moe(torch.randn(4, 8))
        assert recorder.stats().num_tokens == 4
        recorder.reset()
        assert recorder.stats().num_tokens == 0 and recorder.history == []
        with pytest.raises(KeyError, match="no MoE layer"):
            recorder.stats("nope")
        with pytest.raises(IndexError):
            recorder.stats(3)
    assert not moe._forward_hooks


def test_variable_compute_through_the_recorder_counts_null_experts_as_free():
    from routelab import Routing
    from routelab.null_experts import NullExperts

    class FixedRouter(torch.nn.Module):  # token t -> experts {t % 2, 2 + t % 2}
        num_experts, d_model = 4, 3

        def forward(self, x, token_ids=None):
            T = x.shape[0]
            token = torch.arange(T).repeat_interleave(2)
            expert = torch.stack([torch.arange(T) % 2, 2 + torch.arange(T) % 2], 1).reshape(-1)
            return Routing(token, expert, torch.full((2 * T,), 0.5), T, 4)

    layer = MoE(
        FixedRouter(), NullExperts(FFNExperts(2, 3, 4), num_zero=1, num_copy=1, num_constant=0)
    )
    with RoutingRecorder(layer, reference_k=2) as recorder:
        layer(torch.randn(6, 3))
        stats = recorder.stats(0)
    assert stats.null_experts == (2, 3)
    assert stats.experts_per_token_mean == 2.0 and stats.ffn_entries_per_token == 1.0
    assert stats.flops_vs_topk == 0.5
    assert stats.experts_per_token_hist.tolist() == [0, 0, 6, 0, 0]
