"""``routelab inspect-model``: assignment balance of a Hugging Face MoE checkpoint on a text.

:func:`inspect_model` loads a local ``save_pretrained`` directory (model and the
tokenizer saved beside it; nothing is downloaded), runs it over a text and answers,
per MoE layer and for the whole model:

1. **how balanced is the routing**: ``analysis.LoadStats`` of every layer's routing
   (through a :class:`~analysis.RoutingRecorder` fed by ``routelab.hf.RoutingCapture``)
   and the co-activation of consecutive layers;
2. **what would a different router or capacity have done**: the counterfactual tables of
   :mod:`analysis.counterfactual` (capacity drops per factor and drop order, exact
   balanced assignment, loss-free bias), and router swaps (``routelab.hf.swap_router``)
   with the change in next-token loss;
3. **what do the experts specialise in**: ``I(expert; domain)`` per layer against the
   shuffled-label baseline, where the domain of a token is its document's label (the
   first path component of the file under ``--text DIR``: a package of the standard
   library) or labels the caller supplies per token.

It writes ``report.md``, ``metrics.json`` and PNG plots (per-layer load heatmap, drop
curve against the capacity factor, expert x domain heatmaps, co-activation).

Text: ``--text FILE`` is one document; ``--text DIR`` every UTF-8 text file under DIR
(sorted), labelled by its first path component; ``--text stdlib`` the files of
:func:`routelab.corpus.stdlib_files` (the standard library without tests and
third-party packages), labelled by their package (the single-file modules share one
label). ``max_domains`` (default 8) keeps the domains with the most files. Each document is tokenised and cut into
windows of ``seq_len`` tokens (the last one shorter); windows are taken from the labels
in turn until ``max_tokens`` are read, so every domain is represented.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from analysis import plots
from analysis.counterfactual import (
    CapacityDrop,
    layer_counterfactuals,
    model_table,
    sum_drops,
)
from analysis.metrics import concat_routings
from analysis.recorder import RoutingRecorder
from analysis.specialisation import coactivation, shuffled_baseline, specialisation

__all__ = [
    "CURVE_FACTORS",
    "InspectSettings",
    "TextWindows",
    "batched",
    "default_swaps",
    "inspect_model",
    "read_text",
    "swap_targets",
    "write_report",
]

CURVE_FACTORS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0)


@dataclass
class InspectSettings:
    """Sizes of one inspection.

    ``swap_layers``: which layers each router swap replaces, one run per entry:
    ``"auto"`` every MoE layer alone and all together (first, middle and last alone
    beyond 8 layers), ``"all"`` all together only, or comma-separated layer indices.
    ``device``: where the model runs (``"cpu"``, ``"cuda"``). ``batch_size``: windows
    per forward (equal-length consecutive windows stacked); the capacity and balanced
    counterfactuals act per forward, i.e. on B * seq_len tokens, as a layer does per batch.
    """

    seq_len: int = 128
    max_tokens: int = 4096
    capacity_factors: tuple[float, ...] = (1.0, 1.25, 2.0)
    curve_factors: tuple[float, ...] = CURVE_FACTORS
    swaps: bool = True
    swap_layers: str = "auto"
    bias_steps: int = 300
    max_domains: int | None = 8
    batch_size: int = 1
    shuffles: int = 5
    seed: int = 0
    device: str = "cpu"


@dataclass
class TextWindows:
    """Token windows with a label per token.

    Fields: ``windows`` int64 ``[S_i]`` each; ``labels`` int64 ``[S_i]`` each (the label
    of every token); ``label_names`` the name of each label id.
    """

    windows: list[torch.Tensor]
    labels: list[torch.Tensor]
    label_names: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(int(w.numel()) for w in self.windows)


STDLIB = "stdlib"


def _documents(path: Path) -> list[tuple[str, Path]]:
    if str(path) == STDLIB and not path.exists():
        from routelab.corpus import _stdlib_root, stdlib_files

        root = Path(_stdlib_root())
        return [(_package(name), root / name) for name in stdlib_files()]
    if path.is_file():
        return [(path.name, path)]
    if not path.is_dir():
        raise FileNotFoundError(f"--text {path} is neither a file nor a directory")
    found = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for name in sorted(filenames):
            full = Path(dirpath) / name
            rel = full.relative_to(path)
            found.append((rel.parts[0], full))
    found.sort(key=lambda item: item[1].relative_to(path).as_posix())
    if not found:
        raise ValueError(f"--text {path} holds no files")
    return found


def _package(name: str) -> str:
    """The package of a standard-library file: its top-level directory, or
    ``"(modules)"`` for the single-file modules at the top."""
    parts = Path(name).parts
    return parts[0] if len(parts) > 1 else "(modules)"


def _read(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None
    return text if "\x00" not in text else None


def read_text(
    path: str | os.PathLike[str],
    tokenizer: Any,
    *,
    seq_len: int = 128,
    max_tokens: int = 4096,
    max_domains: int | None = None,
) -> TextWindows:
    """Tokenise ``path`` (a file, or a directory of documents) into labelled windows
    (module docstring). ``max_domains`` keeps the labels with the most files (ties by
    name), so that each domain gets enough tokens to measure specialisation."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
    by_label: dict[str, list[Path]] = {}
    for label, file in _documents(Path(path)):
        by_label.setdefault(label, []).append(file)
    names = sorted(by_label)
    if max_domains is not None:
        if max_domains < 1:
            raise ValueError(f"max_domains must be >= 1, got {max_domains}")
        names = sorted(sorted(names, key=lambda n: (-len(by_label[n]), n))[:max_domains])

    def windows_of(files: list[Path]) -> Iterator[torch.Tensor]:
        for file in files:
            text = _read(file)
            if not text:
                continue
            ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
            for start in range(0, ids.numel(), seq_len):
                window = ids[start : start + seq_len]
                if window.numel() >= 2:
                    yield window

    streams = {name: windows_of(by_label[name]) for name in names}
    out = TextWindows([], [], [])
    label_id: dict[str, int] = {}
    total = 0
    while streams and total < max_tokens:
        for name in list(streams):
            window = next(streams[name], None)
            if window is None:
                del streams[name]
                continue
            window = window[: max_tokens - total]
            if window.numel() < 2:
                continue
            if name not in label_id:
                label_id[name] = len(label_id)
                out.label_names.append(name)
            out.windows.append(window)
            out.labels.append(torch.full_like(window, label_id[name]))
            total += int(window.numel())
            if total >= max_tokens:
                break
    if not out.windows:
        raise ValueError(f"--text {path}: no readable text with at least 2 tokens")
    return out


def default_swaps(
    k: int,
    num_experts: int,
    token_ids: torch.Tensor,
    vocab_size: int,
    *,
    one_expert_per_token: bool = False,
):
    """``[(name, replacement)]``: capacity 1.0 under the first and the last drop order,
    exact balanced assignment with the model's k, a different k (not where the router's
    layout dispatches ``one_expert_per_token``, as Switch's), and a balanced hash table
    fitted on the text's token counts."""
    from routelab.hf import Balanced, Hash, TopK
    from routelab.policies import CapacityPolicy
    from routelab.routers import HashRouter

    orders = dict.fromkeys((CapacityPolicy.DROP_ORDERS[0], CapacityPolicy.DROP_ORDERS[-1]))
    swaps: list[tuple[str, Any]] = [
        (f"capacity-1.0-{order}", CapacityPolicy(1.0, drop_order=order)) for order in orders
    ]
    swaps.append((f"balanced-k{k}", Balanced(k)))
    if not one_expert_per_token:
        other = k + 1 if k == 1 else k - 1
        swaps.append((f"top{other}", TopK(other)))
    table = HashRouter.fit(
        "balanced",
        num_experts,
        d_model=1,
        token_ids=token_ids.remainder(vocab_size),
        vocab_size=vocab_size,
    )
    swaps.append(("hash-balanced", Hash(table)))
    return swaps


def _load(model: nn.Module | str | os.PathLike[str], tokenizer: Any) -> tuple[nn.Module, Any]:
    if isinstance(model, nn.Module):
        if tokenizer is None:
            raise ValueError("give the tokenizer with a model object (or pass a checkpoint path)")
        return model, tokenizer
    from routelab.hf.tiny import load_pretrained

    loaded, saved_tokenizer = load_pretrained(model)
    return loaded, saved_tokenizer if tokenizer is None else tokenizer


def inspect_model(
    model: nn.Module | str | os.PathLike[str],
    text: str | os.PathLike[str] | TextWindows,
    out: str | os.PathLike[str] | None = None,
    *,
    tokenizer: Any = None,
    settings: InspectSettings | None = None,
) -> dict[str, Any]:
    """Inspect ``model`` (a checkpoint directory or a loaded model with its ``tokenizer``)
    on ``text`` (a file, a directory, or prepared :class:`TextWindows` with per-token
    labels). Writes the report into ``out`` when given; returns the metrics dict."""
    from routelab.hf import RoutingCapture, require_transformers

    settings = settings or InspectSettings()
    clock = _Clock()
    model, tokenizer = _load(model, tokenizer)
    model.to(settings.device).eval()
    data = (
        text
        if isinstance(text, TextWindows)
        else read_text(
            text,
            tokenizer,
            seq_len=settings.seq_len,
            max_tokens=settings.max_tokens,
            max_domains=settings.max_domains,
        )
    )
    clock.lap("load")
    num_labels = max(
        1, len(data.label_names) or int(max(int(lab.max()) for lab in data.labels)) + 1
    )
    capture = RoutingCapture(model)
    recorder = RoutingRecorder(
        model, num_labels=num_labels, layers=list(zip(capture.names, capture.num_experts))
    )
    capture.on_routing = lambda record: recorder.record(record.layer, record.routing)
    labels_per_layer: list[list[torch.Tensor]] = [[] for _ in capture.names]
    batches = batched(data, settings.batch_size)
    try:
        with torch.no_grad():
            loss = _loss_with_labels(model, batches, recorder, capture, labels_per_layer)
    finally:
        capture.remove()
        recorder.remove()
    clock.lap("forward_with_capture")
    silent = [name for name, calls in zip(capture.names, capture.layers) if not calls]
    if silent:
        raise ValueError(
            f"the routers {silent} were not called during the forward: a fused MoE kernel "
            "may bypass the router module (load the model without hub kernels, e.g. "
            "use_kernels=False), or these layers are not used by this model's forward"
        )
    layers, per_layer_cf = [], []
    for i, name in enumerate(capture.names):
        layer, cf = _layer_metrics(
            name, capture.layers[i], recorder, i, torch.cat(labels_per_layer[i]), settings
        )
        layers.append(layer)
        per_layer_cf.append(cf)
    coact = {}
    for i in range(len(capture.names) - 1):
        a = concat_routings(capture.routings(i))
        b = concat_routings(capture.routings(i + 1))
        if a.num_tokens == b.num_tokens:
            coact[f"{capture.names[i]} -> {capture.names[i + 1]}"] = coactivation(a, b).tolist()
    clock.lap("counterfactuals")
    swaps = _swaps(model, batches, capture, loss, settings.swap_layers) if settings.swaps else []
    clock.lap("swaps")
    metrics = {
        "model": {
            "class": type(model).__name__,
            "model_type": cast(Any, model).config.model_type,
            "router_class": capture.spec.router_class,
            "semantics": capture.spec.notes,
            "transformers": require_transformers().__version__,
            "path": str(getattr(model, "name_or_path", "")),
        },
        "tokens": data.num_tokens,
        "windows": len(data.windows),
        "label_names": data.label_names,
        "loss": loss,
        "layers": layers,
        "model_table": model_table(per_layer_cf),
        "drop_curve": _model_curve(layers),
        "coactivation": coact,
        "swaps": swaps,
        "timing": clock.per_1000(data.num_tokens),
    }
    if out is not None:
        write_report(metrics, out)
        metrics["timing"] = clock.per_1000(data.num_tokens, "report")
        (Path(out) / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


class _Clock:
    """Seconds per phase of one inspection."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.phases: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = now - self.last
        self.last = now

    def per_1000(self, tokens: int, final: str | None = None) -> dict[str, float]:
        if final is not None:
            self.lap(final)
        total = time.perf_counter() - self.start
        scale = 1000 / max(tokens, 1)
        out = {f"{name}_seconds_per_1000_tokens": s * scale for name, s in self.phases.items()}
        return {**out, "total_seconds_per_1000_tokens": total * scale, "total_seconds": total}


def _layer_metrics(
    name: str,
    records: Sequence[Any],
    recorder: RoutingRecorder,
    index: int,
    labels: torch.Tensor,
    settings: InspectSettings,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The metrics of one layer, and its counterfactuals (for the whole-model table)."""
    factors = tuple(sorted({*settings.capacity_factors, *settings.curve_factors}))
    cf = layer_counterfactuals(records, factors=factors, bias_steps=settings.bias_steps)
    curve = cf["capacity"]
    cf = {**cf, "capacity": [r for r in curve if r.capacity_factor in settings.capacity_factors]}
    routing = concat_routings([r.routing for r in records])
    table = recorder.table(index)
    spec = specialisation(table)
    num_labels = table.shape[1]
    layer = {
        "name": name,
        "num_experts": routing.num_experts,
        "k": records[0].k,
        "tokens": routing.num_tokens,
        "spec_agreement": min(r.spec_agreement for r in records),
        "load_stats": recorder.stats(index).to_dict(),
        "load": routing.load().tolist(),
        "capacity": [row.to_dict() for row in cf["capacity"]],
        "balanced": cf["balanced"].to_dict(),
        "specialisation": {
            **spec.to_dict(),
            "shuffled_mutual_information": sum(
                shuffled_baseline(routing, labels, num_labels, seed=settings.seed + i)
                for i in range(settings.shuffles)
            )
            / max(settings.shuffles, 1),
            "expert_label_table": spec.table.tolist(),
        },
        "drop_curve": [row.to_dict() for row in curve],
    }
    return layer, cf


def swap_targets(num_layers: int, swap_layers: str) -> list[int | str]:
    """The layer targets of the router swaps (:class:`InspectSettings`)."""
    if swap_layers == "all":
        return ["all"]
    if swap_layers == "auto":
        alone = range(num_layers) if num_layers <= 8 else (0, num_layers // 2, num_layers - 1)
        return [*alone, "all"]
    try:
        chosen = [int(part) for part in swap_layers.split(",") if part.strip()]
    except ValueError:
        raise ValueError(
            f"swap_layers must be 'auto', 'all' or layer indices like 0,3; got {swap_layers!r}"
        ) from None
    bad = [i for i in chosen if not 0 <= i < num_layers]
    if bad or not chosen:
        raise ValueError(f"swap_layers {swap_layers!r}: indices must lie in [0, {num_layers})")
    return list(chosen)


def _swaps(
    model: nn.Module,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    capture: Any,
    loss: float,
    swap_layers: str,
) -> list[dict]:
    """Every default swap at every target of ``swap_layers``: the change in loss."""
    from routelab.hf import next_token_loss, swap_router

    windows = [ids for ids, _ in batches]
    stream = torch.cat([ids.reshape(-1) for ids in windows])
    vocab = int(getattr(model.config, "vocab_size", int(stream.max()) + 1))
    first = capture.layers[0][0]
    targets = swap_targets(len(capture.names), swap_layers)
    rows: list[dict[str, Any]] = []
    swaps = default_swaps(
        first.k,
        first.chosen.num_experts,
        stream,
        vocab,
        one_expert_per_token=capture.spec.one_expert_per_token,
    )
    for swap_name, replacement in swaps:
        for target in targets:
            row: dict[str, Any] = {
                "replacement": swap_name,
                "layer": target if target == "all" else capture.names[target],
            }
            try:
                with swap_router(model, target, replacement) as used:
                    swapped = next_token_loss(model, windows)
            except ValueError as error:
                row.update(loss=None, delta=None, error=str(error))
            else:
                row.update(loss=swapped, delta=swapped - loss, calls=len(used))
            rows.append(row)
    return rows


def _loss_with_labels(
    model: nn.Module,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    recorder: RoutingRecorder,
    capture: Any,
    labels_per_layer: list[list[torch.Tensor]],
) -> float:
    """The baseline next-token loss, one forward per batch with its labels set (and kept
    per layer call, for the shuffled-label baseline)."""
    from routelab.hf import next_token_loss

    def before(i: int) -> None:
        labels = batches[i][1].reshape(-1)
        recorder.set_labels(labels)
        for calls in labels_per_layer:
            calls.append(labels)

    try:
        return next_token_loss(model, [ids for ids, _ in batches], before_window=before)
    finally:
        recorder.set_labels(None)


def batched(data: TextWindows, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(ids [B, S], labels [B, S])]``: consecutive windows of equal length stacked,
    up to ``batch_size`` per batch (a router call then routes B * S tokens)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    group: list[int] = []
    for i, window in enumerate(data.windows):
        if group and (len(group) == batch_size or data.windows[group[0]].numel() != window.numel()):
            out.append(_stack(data, group))
            group = []
        group.append(i)
    if group:
        out.append(_stack(data, group))
    return out


def _stack(data: TextWindows, group: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.stack([data.windows[i] for i in group]),
        torch.stack([data.labels[i] for i in group]),
    )


def _model_curve(layers: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = sum_drops(
        [[CapacityDrop(**_fields(r)) for r in layer["drop_curve"]] for layer in layers]
    )
    return [
        {
            "capacity_factor": row.capacity_factor,
            "drop_order": row.drop_order,
            "dropped_percent": 100.0 * row.dropped_fraction,
            "dropped_weight_percent": 100.0 * row.dropped_weight_fraction,
            "unrouted_percent": 100.0 * row.unrouted_fraction,
        }
        for row in rows
    ]


def _fields(row: dict[str, Any]) -> dict[str, Any]:
    return {key: row[key] for key in CapacityDrop.__dataclass_fields__}


def _agreement_warning(layers: Sequence[dict[str, Any]]) -> list[str]:
    """A warning when the registry's re-selection misses the model's own choice: the
    counterfactuals and swaps that re-select (TopK, Balanced, the bias fit) are then
    not the model's semantics."""
    off = [layer["name"] for layer in layers if layer["spec_agreement"] < 1.0]
    if not off:
        return []
    return [
        "",
        f"**Warning**: the registry's selection rule reproduces the model's choice only "
        f"partly in {', '.join(off)} (see 'registry agrees %'): the RouterSpec does not "
        "describe this router exactly; re-selecting counterfactuals are approximate.",
    ]


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _num(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def write_report(metrics: dict[str, Any], out: str | os.PathLike[str]) -> Path:
    """Write ``report.md``, ``metrics.json`` and the plots of :func:`inspect_model`'s
    metrics into ``out``; returns it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    layers = metrics["layers"]
    tables = {layer["name"]: layer["specialisation"]["expert_label_table"] for layer in layers}
    # layers x experts, load / mean, blue below and red above the mean (plots' load table)
    relative = {}
    for layer in layers:
        load = np.asarray(layer["load"], dtype=np.float64)
        relative[layer["name"]] = load / max(float(load.mean()), 1e-12)
    plots._load_table(relative, out / "load_heatmap.png", "Load per expert, per layer")
    curve = metrics["drop_curve"]
    factors = sorted({row["capacity_factor"] for row in curve})
    orders = sorted({row["drop_order"] for row in curve})
    plots.plot_sweep(
        {"capacity_factor": factors, "drop_order": orders},
        [
            {"options": {k: row[k] for k in ("capacity_factor", "drop_order")}, **row}
            for row in curve
        ],
        out / "drop_curve.png",
        quantities={
            "dropped_percent": "dropped entries %",
            "dropped_weight_percent": "dropped combine weight %",
            "unrouted_percent": "tokens unrouted %",
        },
        title="Counterfactual capacity: whole model",
    )
    if metrics["label_names"]:
        plots.plot_heatmap_grid(
            tables, out / "expert_domain.png", title="Expert x domain", xlabel="domain"
        )
    for pair, table in list(metrics["coactivation"].items())[:1]:
        plots.plot_coactivation(table, out / "coactivation.png", title=f"Co-activation {pair}")

    model = metrics["model"]
    lines = [
        f"# inspect-model: {model['class']} ({model['model_type']})",
        "",
        f"transformers {model['transformers']}; router `{model['router_class']}`: "
        f"{model['semantics']}.",
        f"{metrics['tokens']} tokens in {metrics['windows']} windows; next-token loss "
        f"{metrics['loss']:.4f} nats. Inspect time before this report "
        f"{metrics['timing']['total_seconds_per_1000_tokens']:.2f} s per 1000 tokens "
        f"(forward with capture "
        f"{metrics['timing']['forward_with_capture_seconds_per_1000_tokens']:.3f} s).",
        *_agreement_warning(layers),
        "",
        "## Balance per layer",
        "",
        "| layer | E | k | CV(load) | max/mean | min/mean | unused % | dropped % "
        "| registry agrees % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for layer in layers:
        s = layer["load_stats"]
        lines.append(
            f"| {layer['name']} | {layer['num_experts']} | {layer['k']} | {_num(s['cv_load'])} "
            f"| {_num(s['max_over_mean'])} | {_num(s['min_over_mean'])} "
            f"| {_pct(s['unused_fraction'])} | {_pct(s['dropped_fraction'])} "
            f"| {_pct(layer['spec_agreement'])} |"
        )
    lines += [
        "",
        "![load](load_heatmap.png)",
        "",
        "## Counterfactual capacity",
        "",
        "Per capacity factor: dropped entries % (the same under every drop order), then per "
        "drop order the dropped combine weight % / tokens left with no expert %.",
        "",
    ]
    factors = sorted({row["capacity_factor"] for row in layers[0]["capacity"]})
    orders = list(dict.fromkeys(row["drop_order"] for row in layers[0]["capacity"]))
    header = ["layer", "cf", "dropped %", *(f"{o}: weight % / unrouted %" for o in orders)]
    lines += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    whole = {"name": "**whole model**", "capacity": metrics["model_table"]["capacity"]}
    for layer in [*layers, whole]:
        rows = {(r["capacity_factor"], r["drop_order"]): r for r in layer["capacity"]}
        for f in factors:
            cells = [layer["name"], f"{f}", _pct(rows[(f, orders[0])]["dropped_fraction"])]
            for o in orders:
                r = rows[(f, o)]
                cells.append(
                    f"{_pct(r['dropped_weight_fraction'])} / {_pct(r['unrouted_fraction'])}"
                )
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "![drop curve](drop_curve.png)",
        "",
        "## Exact balanced assignment (on the model's own scores)",
        "",
        "| layer | tokens moved % | entries moved % | score lost % | greedy max/mean "
        "| balanced max/mean | loss-free bias max/mean |",
        "|---|---|---|---|---|---|---|",
    ]
    for layer in layers:
        b = layer["balanced"]
        lines.append(
            f"| {layer['name']} | {_pct(b['moved_token_fraction'])} "
            f"| {_pct(b['moved_entry_fraction'])} | {_pct(b['score_lost'])} "
            f"| {_num(b['greedy_max_over_mean'])} | {_num(b['balanced_max_over_mean'])} "
            f"| {_num(b['bias']['max_over_mean'])} |"
        )
    mb = metrics["model_table"]["balanced"]
    lines.append(
        f"| **whole model** | {_pct(mb['moved_token_fraction'])} | "
        f"{_pct(mb['moved_entry_fraction'])} | {_pct(mb['score_lost'])} | | | |"
    )
    if metrics["swaps"]:
        lines += [
            "",
            "## Router swap: change in next-token loss",
            "",
            f"Baseline loss {metrics['loss']:.4f}.",
            "",
            "| replacement | layer | loss | delta |",
            "|---|---|---|---|",
        ]
        for row in metrics["swaps"]:
            if row["loss"] is None:
                lines.append(f"| {row['replacement']} | {row['layer']} | - | {row['error']} |")
            else:
                lines.append(
                    f"| {row['replacement']} | {row['layer']} | {row['loss']:.4f} "
                    f"| {row['delta']:+.5f} |"
                )
    lines += [
        "",
        "## Domain specialisation",
        "",
        f"Domains: {', '.join(metrics['label_names']) or '(labels given per token)'}.",
        "",
        "| layer | I(expert; domain) | shuffled labels (mean) | NMI | mean purity |",
        "|---|---|---|---|---|",
    ]
    for layer in layers:
        sp = layer["specialisation"]
        lines.append(
            f"| {layer['name']} | {_num(sp['mutual_information'], 4)} "
            f"| {_num(sp['shuffled_mutual_information'], 4)} | {_num(sp['normalised_mi'], 4)} "
            f"| {_num(sp['mean_purity'])} |"
        )
    if metrics["label_names"]:
        lines += ["", "![expert x domain](expert_domain.png)"]
    if metrics["coactivation"]:
        lines += ["", "![co-activation](coactivation.png)"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out


def run_cli(args: Any, usage_error: type[Exception]) -> int:
    """``routelab inspect-model``: check the arguments, inspect, print where the report is."""
    path, text = Path(args.path), Path(args.text)
    if not (path / "config.json").is_file():
        raise usage_error(f"{path} is not a checkpoint directory (no config.json in it)")
    if not text.exists() and str(text) != STDLIB:
        raise usage_error(f"--text {text} does not exist (or use --text {STDLIB})")
    if args.seq_len < 2 or args.max_tokens < 2:
        raise usage_error("--seq-len and --max-tokens must be >= 2")
    try:
        swap_targets(1 << 30, args.swap_layers)  # the form; the range is checked once loaded
    except ValueError as error:
        raise usage_error(f"--swap-layers: {error}") from None
    try:
        from routelab.hf import require_transformers

        require_transformers().utils.logging.disable_progress_bar()
    except ImportError as error:
        raise usage_error(str(error)) from None
    settings = InspectSettings(
        seq_len=args.seq_len,
        max_tokens=args.max_tokens,
        swaps=not args.no_swaps,
        swap_layers=args.swap_layers,
        device=args.device,
        max_domains=args.max_domains,
        batch_size=args.batch_size,
    )
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        metrics = inspect_model(path, text, args.out, settings=settings)
    except ValueError as error:  # unknown architecture, unreadable text
        raise usage_error(str(error)) from None
    finally:
        torch.set_num_threads(previous)
    timing = metrics["timing"]["total_seconds_per_1000_tokens"]
    print(f"{metrics['tokens']} tokens, loss {metrics['loss']:.4f}, {timing:.2f} s per 1000 tokens")
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0
