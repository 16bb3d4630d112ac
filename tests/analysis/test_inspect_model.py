"""Counterfactual tables and ``routelab inspect-model`` on tiny HF checkpoints.

Every counterfactual number is checked against a direct computation on the recorded
scores (loops over experts and tokens), not against the code's own expressions.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from analysis.counterfactual import (
    balanced_counterfactual,
    capacity_drops,
    fit_balancing_bias,
    model_table,
)
from analysis.inspect_model import InspectSettings, TextWindows, inspect_model
from analysis.specialisation import specialisation
from routelab.hf import RoutingCapture, next_token_loss
from routelab.hf.tiny import load_pretrained
from routelab.policies import CapacityPolicy
from tests.hf_support import checkpoint, sample_text


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module", params=["deepseek_v3", "mixtral", "switch_transformers"])
def recorded(request):
    """(model_type, model, tokenizer, windows, capture) with two windows recorded."""
    model, tokenizer = load_pretrained(checkpoint(request.param))
    ids = torch.tensor(tokenizer(sample_text())["input_ids"][:120])
    windows = [ids[:64], ids[64:]]
    with RoutingCapture(model) as capture:
        next_token_loss(model, windows)
    return request.param, model, tokenizer, windows, capture


def _direct_drops(routing, factor, order):
    """(dropped entries, tokens left with none, dropped weight) by filling each expert's
    slots in the drop order's priority, written out per expert."""
    E = routing.num_experts
    N = routing.num_entries
    capacity = math.ceil(factor * N / E)
    entries = list(
        zip(routing.token.tolist(), routing.expert.tolist(), routing.weight.tolist(), range(N))
    )
    if order == "token":
        key = lambda item: (item[0], item[3])  # noqa: E731
    elif order == "score":
        key = lambda item: (-item[2], item[3])  # noqa: E731
    else:
        return None
    kept = []
    for e in range(E):
        mine = sorted((item for item in entries if item[1] == e), key=key)
        kept += mine[:capacity]
    kept_tokens = {item[0] for item in kept}
    dropped_weight = sum(w for _, _, w, _ in entries) - sum(item[2] for item in kept)
    return N - len(kept), routing.num_tokens - len(kept_tokens), dropped_weight


def test_capacity_drops_match_a_direct_computation(recorded):
    _, _, _, _, capture = recorded
    records = capture.layers[0]
    rows = capacity_drops(records, (0.5, 1.0, 1.25, 2.0))
    assert {r.drop_order for r in rows} == set(CapacityPolicy.DROP_ORDERS)
    for row in rows:
        per_call = [_direct_drops(r.chosen, row.capacity_factor, row.drop_order) for r in records]
        # the count dropped is sum_e max(0, load_e - C) under every order
        count = 0
        for r in records:
            C = math.ceil(row.capacity_factor * r.chosen.num_entries / r.chosen.num_experts)
            count += int((r.chosen.load() - C).clamp_min(0).sum())
        assert row.dropped == count
        assert row.entries == sum(r.chosen.num_entries for r in records)
        if per_call[0] is None:
            continue
        assert row.unrouted == sum(c[1] for c in per_call)
        assert row.dropped_weight == pytest.approx(sum(c[2] for c in per_call), abs=1e-5)
    by_key = {(r.capacity_factor, r.drop_order): r for r in rows}
    # score priority never drops more combine weight than token order
    for factor in (0.5, 1.0, 1.25, 2.0):
        assert (
            by_key[(factor, "score")].dropped_weight
            <= by_key[(factor, "token")].dropped_weight + 1e-6
        )


def test_balanced_counterfactual_matches_a_direct_computation(recorded):
    _, _, _, _, capture = recorded
    records = capture.layers[-1]
    result = balanced_counterfactual(records, bias_steps=100)
    from routelab.hf.swap import balanced_routing

    moved_tokens = moved_entries = 0
    greedy = balanced = 0.0
    for r in records:
        other = balanced_routing(r.spec, r.module, r.chosen.probs, r.k)
        load = other.load()
        assert int(load.max() - load.min()) <= 1  # exact even split of T * k
        probs = r.chosen.probs.double()
        a = {(t, e) for t, e in zip(r.chosen.token.tolist(), r.chosen.expert.tolist())}
        b = {(t, e) for t, e in zip(other.token.tolist(), other.expert.tolist())}
        moved_entries += len(a - b)
        for t in range(r.chosen.num_tokens):
            if {e for (u, e) in a if u == t} != {e for (u, e) in b if u == t}:
                moved_tokens += 1
        greedy += sum(float(probs[t, e]) for t, e in a)
        balanced += sum(float(probs[t, e]) for t, e in b)
    assert result.moved_entry_fraction == pytest.approx(moved_entries / result.entries)
    assert result.moved_token_fraction == pytest.approx(moved_tokens / result.tokens)
    assert result.score_lost == pytest.approx(1 - balanced / greedy, abs=1e-9)
    assert result.balanced.max_over_mean <= result.greedy.max_over_mean + 1e-12


def test_fitted_bias_gives_the_load_it_reports(recorded):
    _, _, _, _, capture = recorded
    records = capture.layers[0]
    fit = fit_balancing_bias(records, steps=150)
    first = records[0]
    probs = torch.cat([r.chosen.probs for r in records])
    chosen = first.spec.select(probs, first.module, k=first.k, extra_bias=fit.bias)
    load = torch.bincount(chosen.reshape(-1), minlength=probs.shape[1])
    assert torch.equal(load, fit.load)
    assert fit.max_over_mean == pytest.approx(float(load.max()) / float(load.double().mean()))
    greedy = torch.cat([r.chosen.expert for r in records]).bincount(minlength=probs.shape[1])
    assert fit.max_over_mean <= float(greedy.max()) / float(greedy.double().mean()) + 1e-12


def test_model_table_sums_the_layers(recorded):
    _, _, _, _, capture = recorded
    per_layer = [
        {
            "capacity": capacity_drops(calls, (1.0,)),
            "balanced": balanced_counterfactual(calls, bias_steps=5),
        }
        for calls in capture.layers
    ]
    table = model_table(per_layer)
    for row in table["capacity"]:
        same = [
            r for layer in per_layer for r in layer["capacity"] if r.drop_order == row["drop_order"]
        ]
        assert row["dropped"] == sum(r.dropped for r in same)
        assert row["dropped_fraction"] == pytest.approx(
            sum(r.dropped for r in same) / sum(r.entries for r in same)
        )
    tokens = sum(layer["balanced"].tokens for layer in per_layer)
    moved = sum(
        layer["balanced"].moved_token_fraction * layer["balanced"].tokens for layer in per_layer
    )
    assert table["balanced"]["moved_token_fraction"] == pytest.approx(moved / tokens)


def test_inspect_model_with_token_labels(recorded):
    _, model, tokenizer, windows, _ = recorded
    windows = [windows[0][:56], windows[0][8:], windows[1]]  # two of equal length, then one
    labels = [torch.arange(w.numel()) % 3 for w in windows]  # a label per token
    data = TextWindows(windows, labels, ["a", "b", "c"])
    settings = InspectSettings(swaps=False, bias_steps=20, batch_size=2)
    metrics = inspect_model(model, data, tokenizer=tokenizer, settings=settings)
    batches = [torch.stack(windows[:2]), windows[2]]
    assert metrics["loss"] == pytest.approx(next_token_loss(model, batches), abs=1e-5)
    with RoutingCapture(model) as capture:
        next_token_loss(model, batches)
    from analysis.metrics import concat_routings

    for i, layer in enumerate(metrics["layers"]):
        assert [r.chosen.num_tokens for r in capture.layers[i]] == [112, 56]
        routing = concat_routings(capture.routings(i))
        direct = specialisation(routing, torch.cat(labels), num_labels=3)
        assert layer["specialisation"]["mutual_information"] == pytest.approx(
            direct.mutual_information
        )
        assert layer["specialisation"]["shuffled_mutual_information"] >= 0
        assert layer["spec_agreement"] == 1.0
        assert layer["load"] == routing.load().tolist()
        # the capacity counterfactual acts per forward: 112 + 56 tokens
        row = next(r for r in layer["capacity"] if r["drop_order"] == "token")
        C = [
            math.ceil(row["capacity_factor"] * r.chosen.num_entries / r.chosen.num_experts)
            for r in capture.layers[i]
        ]
        assert row["dropped"] == sum(
            int((r.chosen.load() - c).clamp_min(0).sum()) for r, c in zip(capture.layers[i], C)
        )


def test_batched_stacks_equal_length_neighbours():
    from analysis.inspect_model import batched

    windows = [torch.arange(4), torch.arange(4) + 1, torch.arange(4) + 2, torch.arange(3)]
    data = TextWindows(windows, [w * 0 for w in windows], ["x"])
    shapes = [tuple(ids.shape) for ids, _ in batched(data, 2)]
    assert shapes == [(2, 4), (1, 4), (1, 3)]
    assert torch.equal(batched(data, 2)[0][0][1], windows[1])
    with pytest.raises(ValueError, match="batch_size"):
        batched(data, 0)


@pytest.mark.slow
def test_cli_writes_the_report(tmp_path, capsys):
    from analysis.cli import main

    text = tmp_path / "text"
    for i, package in enumerate(("json", "email")):
        (text / package).mkdir(parents=True)
        (text / package / "module.py").write_text(sample_text(offset=50 + 7 * i))
    out = tmp_path / "report"
    path = checkpoint("mixtral")
    code = main(
        [
            "inspect-model",
            str(path),
            "--text",
            str(text),
            "--out",
            str(out),
            "--max-tokens",
            "300",
            "--seq-len",
            "64",
        ]
    )
    assert code == 0
    assert "report:" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tokens"] == 300
    assert metrics["label_names"] == ["email", "json"]
    assert metrics["model"]["model_type"] == "mixtral"
    assert {"capacity", "balanced"} <= set(metrics["model_table"])
    assert any(row["delta"] for row in metrics["swaps"] if row["loss"] is not None)
    for name in ("report.md", "load_heatmap.png", "drop_curve.png", "expert_domain.png"):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    for section in (
        "Balance per layer",
        "Counterfactual capacity",
        "balanced assignment",
        "Router swap",
        "Domain specialisation",
    ):
        assert section in report


def test_cli_usage_errors(tmp_path, capsys):
    from analysis.cli import main

    assert main(["inspect-model", str(tmp_path), "--text", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
    code = main(["inspect-model", str(checkpoint("olmoe")), "--text", str(tmp_path / "none")])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


class _CharTokenizer:
    def __call__(self, text):
        return {"input_ids": [ord(c) % 50 for c in text]}


def test_read_text_labels_documents_by_their_first_path_component(tmp_path):
    from analysis.inspect_model import read_text

    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "a.py").write_text("x" * 30)
    (tmp_path / "pkg" / "sub" / "b.py").write_text("y" * 30)
    (tmp_path / "top.txt").write_text("z" * 30)
    (tmp_path / "binary.bin").write_bytes(b"\x00\x01")
    data = read_text(tmp_path, _CharTokenizer(), seq_len=20, max_tokens=70)
    assert data.num_tokens == 70
    # windows are taken from the labels in turn: pkg, top.txt, pkg, top.txt, pkg ...
    names = [data.label_names[int(lab[0])] for lab in data.labels]
    assert names[:4] == ["pkg", "top.txt", "pkg", "top.txt"]
    assert set(data.label_names) == {"pkg", "top.txt"}
    for window, labels in zip(data.windows, data.labels):
        assert window.shape == labels.shape and 2 <= window.numel() <= 20
    with pytest.raises(FileNotFoundError):
        read_text(tmp_path / "missing", _CharTokenizer())


def test_swap_targets():
    from analysis.inspect_model import swap_targets

    assert swap_targets(3, "auto") == [0, 1, 2, "all"]
    assert swap_targets(20, "auto") == [0, 10, 19, "all"]
    assert swap_targets(20, "all") == ["all"]
    assert swap_targets(20, "3,5") == [3, 5]
    for bad in ("3,x", "", "25"):
        with pytest.raises(ValueError, match="swap_layers"):
            swap_targets(20, bad)


def test_a_router_the_forward_never_calls_is_reported(recorded, monkeypatch):
    import routelab.hf.capture as capture_module

    _, model, tokenizer, windows, _ = recorded
    ghost = torch.nn.Linear(2, 2)
    ghost.num_experts = 4
    real = capture_module.find_routers
    monkeypatch.setattr(
        capture_module, "find_routers", lambda m, spec=None: [*real(m, spec), ("ghost", ghost)]
    )
    data = TextWindows(windows, [w * 0 for w in windows], ["all"])
    with pytest.raises(ValueError, match=r"\['ghost'\] were not called"):
        inspect_model(model, data, tokenizer=tokenizer, settings=InspectSettings(swaps=False))
