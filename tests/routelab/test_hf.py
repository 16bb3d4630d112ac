"""routelab.hf on tiny random checkpoints of every registered transformers architecture.

The captured Routing is checked against an independent transcription of each router's
formula applied to the router module's own weights and inputs (not against the
registry's semantics), and router swaps are checked end to end on the model's loss.
"""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from routelab import Routing
from routelab.hf import (
    ARCHITECTURES as REGISTERED,
)
from routelab.hf import (
    Balanced,
    Hash,
    RouterSpec,
    RoutingCapture,
    TopK,
    balanced_topk,
    next_token_loss,
    register_architecture,
    router_spec,
    swap_router,
)
from routelab.hf.swap import padded_topk
from routelab.hf.tiny import load_pretrained
from routelab.policies import CapacityPolicy
from tests.hf_support import ARCHITECTURES, checkpoint, sample_text

SEQ = 48


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: extra threads only spin on a shared machine
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def loaded():
    """model_type -> (model, tokenizer, windows [1, SEQ] x 2), loaded once per module."""
    text = sample_text()
    out = {}
    for model_type in ARCHITECTURES:
        model, tokenizer = load_pretrained(checkpoint(model_type))
        ids = torch.tensor(tokenizer(text)["input_ids"][: 2 * SEQ])
        out[model_type] = (model, tokenizer, [ids[:SEQ], ids[SEQ:]])
    return out


# ---------------------------------------------------------------------- references
def _top(values: list[float], k: int) -> list[int]:
    return sorted(range(len(values)), key=lambda e: -values[e])[:k]


def _softmax(row: list[float]) -> list[float]:
    m = max(row)
    ex = [math.exp(v - m) for v in row]
    return [v / sum(ex) for v in ex]


def _reference(model_type: str, module: torch.nn.Module, x: torch.Tensor):
    """Per token: ``({expert: weight}, probs [E])`` from a direct transcription of the
    router's formula (Python loops over float64 values)."""
    if model_type == "switch_transformers":
        weight, bias = module.classifier.weight, module.classifier.bias
    else:
        weight, bias = module.weight, getattr(module, "bias", None)
    logits = x.double() @ weight.detach().double().T
    if isinstance(bias, torch.Tensor):
        logits = logits + bias.detach().double()
    out = []
    for row in logits.tolist():
        E = len(row)
        if model_type in ("deepseek_v3", "glm4_moe", "dots1"):
            s = [1 / (1 + math.exp(-v)) for v in row]
            c = [v + b for v, b in zip(s, module.e_score_correction_bias.tolist())]
            size = E // module.num_group
            groups = [sorted(c[g * size : (g + 1) * size])[-2:] for g in range(module.num_group)]
            keep = _top([sum(g) for g in groups], module.topk_group)
            c = [v if e // size in keep else -math.inf for e, v in enumerate(c)]
            chosen = _top(c, module.top_k)
            total = sum(s[e] for e in chosen) + 1e-20
            norm = module.norm_topk_prob
            w = {e: (s[e] / total if norm else s[e]) * module.routed_scaling_factor for e in chosen}
            out.append((w, s))
            continue
        p = _softmax(row)
        if model_type == "deepseek_v2":
            size = E // module.num_group
            keep = _top([max(p[g * size : (g + 1) * size]) for g in range(module.num_group)], 2)
            masked = [v if e // size in keep else 0.0 for e, v in enumerate(p)]
            chosen = _top(masked, module.top_k)
            out.append(({e: p[e] * module.routed_scaling_factor for e in chosen}, p))
        elif model_type == "gpt_oss":
            chosen = _top(row, module.top_k)
            sub = _softmax([row[e] for e in chosen])
            out.append((dict(zip(chosen, sub)), p))
        elif model_type == "switch_transformers":
            out.append(({_top(p, 1)[0]: max(p)}, p))
        else:  # mixtral, qwen2_moe, qwen3_moe, olmoe, flex_olmo
            chosen = _top(p, module.top_k)
            norm = model_type == "mixtral" or module.norm_topk_prob
            total = sum(p[e] for e in chosen)
            out.append(({e: p[e] / total if norm else p[e] for e in chosen}, p))
    return out


def _entries(routing: Routing) -> list[dict[int, float]]:
    rows: list[dict[int, float]] = [{} for _ in range(routing.num_tokens)]
    for t, e, w in zip(routing.token.tolist(), routing.expert.tolist(), routing.weight.tolist()):
        rows[t][e] = w
    return rows


# ---------------------------------------------------------------------- capture
def test_the_required_architectures_are_registered():
    for model_type in (
        "mixtral",
        "qwen2_moe",
        "qwen3_moe",
        "olmoe",
        "deepseek_v3",
        "gpt_oss",
        "switch_transformers",
    ):
        assert model_type in REGISTERED
    assert sorted(REGISTERED) == ARCHITECTURES  # every registered one is tested here


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_captured_routing_is_the_routers_own_output(loaded, model_type):
    model, _, windows = loaded[model_type]
    spec = router_spec(model)
    inputs: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, module in model.named_modules():
        if type(module).__name__ == spec.router_class:

            def keep(mod, args, name=name):
                inputs.setdefault(name, []).append(args[0].detach())

            handles.append(module.register_forward_pre_hook(keep))
    try:
        with RoutingCapture(model) as capture:
            next_token_loss(model, windows[:1])
    finally:
        for h in handles:
            h.remove()
    modules = dict(model.named_modules())
    assert capture.names and len(capture.names) == len(inputs)
    for layer, name in enumerate(capture.names):
        (record,) = capture.layers[layer]
        x = inputs[name][0].reshape(-1, inputs[name][0].shape[-1])
        reference = _reference(model_type, modules[name], x)
        chosen = _entries(record.chosen)
        assert record.spec_agreement == 1.0
        assert record.chosen.num_tokens == x.shape[0] == SEQ
        torch.testing.assert_close(
            record.chosen.probs.double(),
            torch.tensor([p for _, p in reference], dtype=torch.float64),
            atol=1e-5,
            rtol=1e-4,
        )
        for t, (weights, _) in enumerate(reference):
            assert set(chosen[t]) == set(weights), (name, t)
            for e, w in weights.items():
                assert chosen[t][e] == pytest.approx(w, rel=1e-4, abs=1e-6)
        record.routing.validate()
        if model_type != "switch_transformers":
            assert record.routing is record.chosen
            continue
        # Switch keeps, per sequence and expert, the first expert_capacity tokens in order
        capacity = modules[name].expert_capacity
        seen: dict[int, int] = {}
        kept_tokens = set(record.routing.token.tolist())
        for t, weights in enumerate(reference):
            (e,) = weights[0]
            seen[e] = seen.get(e, 0) + 1
            assert (t in kept_tokens) == (seen[e] <= capacity)
        assert record.routing.dropped.num_entries == SEQ - len(kept_tokens)


def test_unknown_architecture_names_what_is_missing(loaded, monkeypatch):
    model = loaded["mixtral"][0]
    monkeypatch.delitem(REGISTERED, "mixtral")
    with pytest.raises(ValueError) as info:
        RoutingCapture(model)
    message = str(info.value)
    for needed in ("'mixtral'", "MixtralTopKRouter", "register_architecture", "modeling_mixtral"):
        assert needed in message


def test_a_spec_whose_router_class_is_absent_is_reported(loaded, monkeypatch):
    model = loaded["olmoe"][0]
    monkeypatch.setitem(REGISTERED, "olmoe", RouterSpec(("olmoe",), "OlmoeRouterV9"))
    with pytest.raises(ValueError, match=r"OlmoeRouterV9.*no such module"):
        router_spec(model)


def test_register_architecture_checks_its_input():
    with pytest.raises(TypeError):
        register_architecture("mixtral")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="registered already"):
        register_architecture(RouterSpec(("mixtral",), "MixtralTopKRouter"))
    with pytest.raises(ValueError, match="score"):
        RouterSpec(("x",), "XRouter", score="relu")


def test_capture_feeds_the_recorder_and_coactivation(loaded):
    from analysis import RoutingRecorder, coactivation, concat_routings, load_stats

    model, _, windows = loaded["qwen3_moe"]
    capture = RoutingCapture(model)
    recorder = RoutingRecorder(
        model, num_labels=2, layers=list(zip(capture.names, capture.num_experts))
    )
    capture.on_routing = lambda r: recorder.record(r.layer, r.routing)
    try:
        for i, ids in enumerate(windows):
            recorder.set_labels(torch.full((ids.numel(),), i))
            next_token_loss(model, [ids])
    finally:
        capture.remove()
        recorder.remove()
    for layer in range(len(capture.names)):
        direct = load_stats(concat_routings(capture.routings(layer)))
        assert recorder.stats(layer).cv_load == pytest.approx(direct.cv_load)
        table = recorder.table(layer)
        assert table.sum(0).tolist() == [2 * SEQ, 2 * SEQ]  # k = 2 entries per token
    pairs = sum(coactivation(a, b) for a, b in zip(capture.routings(0), capture.routings(1)))
    assert torch.equal(recorder.coactivation(0, 1), pairs)


# ---------------------------------------------------------------------- swap
@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_router_swaps_run_and_change_the_loss(loaded, model_type):
    model, tokenizer, windows = loaded[model_type]
    base = next_token_loss(model, windows)
    if model_type == "switch_transformers":
        # the model's own capacity limit, redone by routelab on its pre-capacity choice
        capacity = model.config.expert_capacity
        with swap_router(model, "all", CapacityPolicy(capacity=capacity)):
            same = next_token_loss(model, windows)
    else:
        with swap_router(model, "all", lambda routing: routing):
            same = next_token_loss(model, windows)
    assert same == pytest.approx(base, abs=1e-5)

    E = model.config.num_experts if hasattr(model.config, "num_experts") else None
    with RoutingCapture(model) as capture:
        next_token_loss(model, windows[:1])
    record = capture.layers[0][0]
    E, k = record.chosen.num_experts, record.k
    replacements = [
        CapacityPolicy(0.5),
        Balanced(k),
        Hash(torch.arange(len(tokenizer)) % E),
    ]
    if model_type != "switch_transformers":
        replacements.append(TopK(1))
    for replacement in replacements:
        with swap_router(model, "all", replacement) as used:
            loss = next_token_loss(model, windows)
        assert len(used) == len(capture.names) * len(windows)
        assert abs(loss - base) > 1e-4, replacement
        for routing in used:
            routing.validate()
            if isinstance(replacement, Balanced):
                # every expert gets its exact even share of the T * k entries
                assert int(routing.load().max() - routing.load().min()) <= 1
    assert next_token_loss(model, windows) == base  # hooks removed, model unchanged


def test_swap_one_layer_leaves_the_others(loaded):
    model, _, windows = loaded["olmoe"]
    with RoutingCapture(model) as before:
        next_token_loss(model, windows[:1])
    with swap_router(model, "model.layers.1.mlp.gate", Balanced(2)) as used:
        with RoutingCapture(model) as during:
            next_token_loss(model, windows[:1])
    # capture registered after the swap still sees the swapped layer's new choice
    first_before, first_during = before.layers[0][0].chosen, during.layers[0][0].chosen
    assert torch.equal(first_before.expert, first_during.expert)
    assert len(used) == 1
    assert int(used[0].load().max() - used[0].load().min()) <= 1


def test_swap_checks_its_arguments(loaded):
    model, _, windows = loaded["mixtral"]
    with pytest.raises(KeyError, match="no router named"):
        with swap_router(model, "model.layers.9.mlp.gate", TopK(1)):
            pass
    with pytest.raises(IndexError):
        with swap_router(model, 5, TopK(1)):
            pass
    with pytest.raises(TypeError, match="not a Routing"):
        with swap_router(model, 0, lambda routing: 3):
            next_token_loss(model, windows[:1])
    switch = loaded["switch_transformers"][0]
    with pytest.raises(ValueError, match="one expert per token"):
        with swap_router(switch, 0, TopK(2)):
            next_token_loss(switch, loaded["switch_transformers"][2][:1])
    with pytest.raises(ValueError, match="k must be"):
        TopK(0)


# ---------------------------------------------------------------------- pieces
def _brute_force_best(scores: torch.Tensor) -> float:
    """Best total score over every assignment with the even quotas (tiny T, E)."""
    import itertools

    from routelab.routing import even_quota

    T, E = scores.shape
    quota = even_quota(T, E)
    best = -math.inf
    for assignment in itertools.product(range(E), repeat=T):
        if [assignment.count(e) for e in range(E)] == quota:
            best = max(best, sum(float(scores[t, e]) for t, e in enumerate(assignment)))
    return best


@given(st.integers(1, 6), st.integers(1, 3), st.integers(0, 2**16))
def test_balanced_topk_is_optimal_for_k1_and_balanced_for_any_k(T, E, seed):
    scores = torch.rand(T, E, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    one = balanced_topk(scores, 1)
    total = float(scores.gather(1, one).sum())
    assert total == pytest.approx(_brute_force_best(scores), abs=1e-9)
    for k in range(1, E + 1):
        indices = balanced_topk(scores, k)
        routing = Routing.from_topk(indices, torch.ones(T, k), E)
        routing.validate()  # no token holds an expert twice
        load = routing.load()
        assert int(load.max() - load.min()) <= 1


@given(st.integers(0, 6), st.integers(1, 4), st.integers(0, 2**16))
def test_padded_topk_round_trips(T, E, seed):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(T, E, generator=gen) < 0.5
    combine = torch.rand(T, E, generator=gen) * mask
    routing = Routing.from_dense(combine)
    indices, weights, valid = padded_topk(routing)
    rebuilt = torch.zeros(T, E)
    for t in range(T):
        for j in range(indices.shape[1]):
            if valid[t, j]:
                rebuilt[t, indices[t, j]] += weights[t, j]
            else:
                assert weights[t, j] == 0
    assert torch.equal(rebuilt, routing.to_dense())


def test_hash_checks_its_table_and_needs_token_ids(loaded):
    from routelab.hf.swap import SwapInput

    with pytest.raises(TypeError, match="table"):
        Hash(torch.rand(4))
    model = loaded["mixtral"][0]
    module = next(m for n, m in model.named_modules() if n.endswith("0.mlp.gate"))
    probs = torch.softmax(torch.randn(5, 4), -1)
    routing = Routing.from_topk(probs.topk(2).indices, probs.topk(2).values, 4, probs=probs)
    given = SwapInput(routing, torch.zeros(5, 32), None, router_spec(model), module)
    with pytest.raises(ValueError, match="token ids"):
        Hash(torch.arange(10) % 4).route(given)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        Hash(torch.arange(10)).route(replace(given, token_ids=torch.arange(5)))


def test_a_routelab_router_can_replace_the_models(loaded):
    from routelab.routers import HashRouter

    model, tokenizer, windows = loaded["mixtral"]
    base = next_token_loss(model, windows)
    router = HashRouter.fit(
        "random",
        model.config.num_local_experts,
        d_model=model.config.hidden_size,
        vocab_size=len(tokenizer),
    )
    with swap_router(model, 1, router) as used:
        loss = next_token_loss(model, windows)
    assert loss != pytest.approx(base, abs=1e-4)
    expected = router.lookup(windows[0])[:, 0]
    assert torch.equal(used[0].expert, expected)  # routed by the window's token ids
    assert torch.equal(used[0].weight, torch.ones(SEQ))


def test_a_missing_transformers_says_how_to_install(monkeypatch):
    import routelab.hf.registry as registry

    def no_transformers(name):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(registry, "importlib", SimpleNamespace(import_module=no_transformers))
    with pytest.raises(ImportError, match=r"routelab\[hf\]"):
        registry.require_transformers()
