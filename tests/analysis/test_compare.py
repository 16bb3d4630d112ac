"""What compare measures is sound: residual pass-through, the information hash tables
get, balance before and after the policies, n/a where a metric does not apply, a
chance level with its spread, seeded runs that repeat in any number of workers."""

import math

import pytest
import torch

from analysis.compare import (
    CompareSettings,
    Job,
    build_model,
    noise_floor,
    run_jobs,
    train_and_measure,
)
from analysis.data import load_dataset
from analysis.recorder import RoutingRecorder
from analysis.registry import REGISTRY, CompareRow, PolicySpec
from analysis.report import detail_choice, results_table
from analysis.specialisation import shuffled_baseline, shuffled_levels
from routelab import FFNExperts, MoE, Routing
from routelab.policies import CapacityPolicy
from routelab.routers import TopKGate

QUICK = CompareSettings.quick_settings()


@pytest.fixture(scope="module")
def digits():
    return QUICK.load("digits")


@pytest.fixture(scope="module")
def tokens():
    return QUICK.load("tokens")


def test_a_dropped_image_passes_through_the_digits_model(digits):
    """Capacity 0 drops every image in both layers: the output must then be the model
    without its MoE layers (head(relu(relu(embed(x))))), not the head of a zero vector."""
    row = CompareRow(
        "drop-all", TopKGate, {"k": 1}, policies=(PolicySpec(CapacityPolicy, {"capacity": 0}),)
    )
    torch.manual_seed(0)
    model = build_model(row, digits, QUICK)
    batch = digits.evaluation[0]
    logits, routings = model(batch.inputs)
    assert all(r.num_entries == 0 for r in routings)
    h = torch.relu(model.embed(batch.inputs))
    expected = model.head(torch.relu(torch.relu(h)))  # each layer: relu(0 + h)
    torch.testing.assert_close(logits, expected)
    assert not torch.allclose(logits, model.head(torch.zeros_like(h)).expand_as(logits))


def test_hash_tables_see_only_the_training_batches(tokens):
    seen = torch.cat([b.token_ids for b in tokens.train_batches])
    assert seen.shape[0] == QUICK.steps * QUICK.batch_size
    assert torch.equal(tokens.fit_token_ids, seen)
    # embeddings: rows of ids never seen in training carry no counts (all-zero rows)
    unseen = torch.ones(tokens.vocab_size, dtype=torch.bool)
    unseen[seen] = False
    assert bool(unseen.any())
    assert float(tokens.embeddings[unseen].abs().max()) < 1e-6


def test_every_model_trains_on_the_same_batches():
    a = load_dataset("digits", quick=True, steps=3, batch_size=8)
    b = load_dataset("digits", quick=True, steps=3, batch_size=8)
    for x, y in zip(a.train_batches, b.train_batches):
        assert torch.equal(x.token_ids, y.token_ids)
    assert len(a.train_batches) == 3


def test_recorder_keeps_the_routers_choice_and_the_executed_routing():
    torch.manual_seed(0)
    router = TopKGate(8, 4, k=1)
    moe = MoE(router, FFNExperts(4, 8, 16), [CapacityPolicy(0.5)])
    x = torch.randn(64, 8)
    chosen = router(x)  # the router's own choice, computed independently
    expected_chosen = torch.bincount(chosen.expert, minlength=4).double()
    with RoutingRecorder(moe, mode="all") as recorder:
        out = moe(x)
        recorder.step()
    assert torch.equal(recorder.stats(0, stage="router").load, expected_chosen)
    executed = torch.bincount(out.routing.expert, minlength=4).double()
    assert torch.equal(recorder.stats(0).load, executed)
    assert int(executed.max()) <= math.ceil(0.5 * 64 / 4)  # capacity 8
    assert recorder.stats(0, stage="router").num_dropped == 0
    assert recorder.stats(0).num_dropped == 64 - int(executed.sum())
    assert len(recorder.router_history) == len(recorder.history) == 1
    with pytest.raises(ValueError, match="stage"):
        recorder.stats(0, stage="before")


def _fake(router, *, dense=False, has_policies=False, mi=0.5, shuffled=(0.01, 0.03)):
    stats = {
        "cv_load": 0.25,
        "max_over_mean": 1.5,
        "dropped_fraction": 0.1,
        "unrouted_fraction": 0.0,
        "cv_importance": 0.2,
        "num_entries": 200,
        "num_tokens": 100,
    }
    mean = sum(shuffled) / len(shuffled)
    return {
        "router": router,
        "metric_name": "test acc",
        "metric": 0.9,
        "unit": "image",
        "dense": dense,
        "has_policies": has_policies,
        "chosen": stats,
        "executed": stats,
        "mutual_information": mi,
        "shuffled_mean": mean,
        "shuffled_std": math.sqrt(sum((v - mean) ** 2 for v in shuffled) / len(shuffled)),
        "stability_changed_fraction": 0.25,
        "ms_per_step": 3.0,
    }


def _cells(table, router):
    line = next(line for line in table.splitlines() if line.startswith(f"| {router} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_table_shows_n_a_where_a_metric_does_not_apply_and_flags_chance():
    table = results_table(
        [
            _fake("dense", dense=True, mi=0.0, shuffled=(0.0, 0.0)),
            _fake("sparse"),
            _fake("capped", has_policies=True, mi=0.02),
        ]
    )
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    dense = dict(zip(header, _cells(table, "dense")))
    sparse = dict(zip(header, _cells(table, "sparse")))
    capped = dict(zip(header, _cells(table, "capped")))
    for column in ("CV(load) chosen", "CV(load) executed", "max/mean executed", "changed %"):
        assert dense[column] == "n/a" and sparse[column] != "n/a"
    assert sparse["dropped %"] == "n/a" and capped["dropped %"] == "10.0"
    assert sparse["experts/image"] == "2.00"
    assert sparse["chance I (± sd)"] == "0.020 ± 0.010"
    assert "≈ chance" in capped["I(expert; label)"]  # 0.02 <= 0.02 + 2 * 0.01
    assert "≈ chance" not in sparse["I(expert; label)"]
    assert detail_choice([_fake("dense", dense=True), _fake("sparse")])[0] == "sparse"


def test_shuffled_levels_spread_and_independent_reference():
    # expert = label: I(expert; label) = H(label); shuffled levels sit far below it
    labels = torch.arange(400) % 4
    routing = Routing(torch.arange(400), labels.clone(), torch.ones(400), 400, 4)
    levels = shuffled_levels(routing, labels, 4, shuffles=12, seed=3)
    assert levels.shape == (12,) and len(set(levels.tolist())) > 1
    assert float(levels.max()) < 0.1 < math.log(4)
    assert shuffled_baseline(routing, labels, 4, shuffles=12, seed=3) == pytest.approx(
        float(levels.mean())
    )
    # shuffle i uses seed + i: the first value is the single-shuffle baseline of that seed
    assert float(levels[1]) == pytest.approx(shuffled_baseline(routing, labels, 4, seed=4))


def test_noise_floor_is_the_multinomial_cv():
    """sqrt((E - 1) / N) is the root-mean-square CV of uniform multinomial loads."""
    torch.manual_seed(0)
    entries, experts = 512, 8
    loads = torch.stack(
        [
            torch.bincount(torch.randint(0, experts, (entries,)), minlength=experts)
            for _ in range(4000)
        ]
    ).double()
    cv = loads.std(1, unbiased=False) / loads.mean(1)
    simulated = float(cv.pow(2).mean().sqrt())
    assert simulated == pytest.approx(math.sqrt((experts - 1) / entries), rel=0.03)

    class _Result:
        chosen_cv_history = [0.0] * 10
        chosen = type("S", (), {"num_entries": entries * 5})()

    assert noise_floor(_Result(), experts) == pytest.approx(math.sqrt((experts - 1) / entries))


@pytest.mark.slow
def test_seeded_runs_repeat_in_process_and_in_workers(digits):
    settings = CompareSettings.quick_settings()
    settings.steps = 4
    a = train_and_measure(REGISTRY["noisy-top2"], settings.load("digits"), settings)
    b = train_and_measure(REGISTRY["noisy-top2"], settings.load("digits"), settings)
    assert a.metric == b.metric and a.cv_history == b.cv_history
    assert torch.equal(a.table, b.table)
    custom = CompareRow("custom-top1", TopKGate, {"k": 1})  # not registered: travels as is
    jobs = [
        Job("digits", "noisy-top2"),
        Job("digits", "switch-cf1.0", (("capacity_factor", 2.0),)),
        Job("digits", custom),
    ]
    serial = run_jobs(jobs, settings, workers=1)
    parallel = run_jobs(jobs, settings, workers=2)
    assert serial[0].metric == a.metric
    for x, y in zip(serial, parallel):
        assert x.router == y.router and x.metric == y.metric
        assert x.cv_history == y.cv_history and torch.equal(x.table, y.table)
    assert "capacity_factor=2.0" in serial[1].configuration
    assert parallel[2].router == "custom-top1" and parallel[2].chosen.num_entries > 0
    with pytest.raises(ValueError, match="unknown router"):
        Job("digits", "nope")
