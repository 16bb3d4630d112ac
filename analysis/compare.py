"""``routelab compare`` and ``routelab sweep``: train small MoE models, measure, report.

For every (data set, router configuration) pair :func:`train_and_measure` trains a
small model (see :mod:`analysis.data`) with Adam on the task loss plus the routing's
auxiliary losses, from the same seed and the same batches for every router, and
measures:

- **balance in training**: a :class:`~analysis.RoutingRecorder` in ``"train"`` mode
  records every training step; the table's balance columns (CV(importance), CV(load),
  max/mean load, dropped %) are the load statistics accumulated over the **last half
  of the training steps** (training-mode routings, so BASE shows its exact balance and
  noisy top-k its noisy routing); CV(load) is also plotted for every step. For the
  two-layer digits model the balance columns are the first MoE layer's.
- **specialisation in evaluation**: a second recorder in ``"eval"`` mode routes the
  held-out split once at the end: ``I(expert; label)`` (nats) of the first layer, a
  shuffled-label baseline on the same routings, the expert x label table and, for the
  two-layer model, the cross-layer co-activation table.
- **stability**: the fraction of held-out tokens whose experts changed between the
  middle and the end of training (eval-mode routings of the first evaluation batch).
- **task metric** on the held-out split and the wall time per training step.

:func:`compare` writes ``report.md``, ``metrics.json`` and PNG plots into a folder.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from analysis import plots
from analysis.data import DATASETS, Dataset, load_dataset, task_loss
from analysis.metrics import LoadStats, concat_routings
from analysis.recorder import RoutingRecorder
from analysis.registry import RouterConfig, resolve_routers
from analysis.specialisation import routing_stability, shuffled_baseline

__all__ = ["CompareSettings", "RunResult", "compare", "sweep", "train_and_measure"]


@dataclass
class CompareSettings:
    """Sizes of one comparison (the defaults finish in a few minutes on 2 CPU cores)."""

    steps: int = 300
    d_model: int = 32
    num_experts: int = 8
    batch_size: int = 256
    lr: float = 3e-3
    seed: int = 0
    quick: bool = False

    @classmethod
    def quick_settings(cls, seed: int = 0) -> CompareSettings:
        return cls(steps=8, d_model=16, num_experts=4, batch_size=64, seed=seed, quick=True)

    def load(self, dataset: str) -> Dataset:
        """The named data set at these settings' size and seed."""
        return load_dataset(
            dataset,
            quick=self.quick,
            seed=self.seed,
            d_model=self.d_model,
            batch_size=self.batch_size,
        )


@dataclass
class RunResult:
    """Everything measured for one router on one data set."""

    dataset: str
    router: str
    description: str
    metric_name: str
    metric: float
    train_stats: LoadStats
    eval_stats: LoadStats
    mutual_information: float
    shuffled_mi: float
    normalised_mi: float
    mean_purity: float
    stability: float
    ms_per_step: float
    cv_history: list[float]
    table: torch.Tensor
    coactivation: torch.Tensor | None = None
    layer_stats: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "router": self.router,
            "description": self.description,
            "metric_name": self.metric_name,
            "metric": self.metric,
            "train": self.train_stats.to_dict(),
            "eval": self.eval_stats.to_dict(),
            "mutual_information": self.mutual_information,
            "shuffled_mutual_information": self.shuffled_mi,
            "normalised_mi": self.normalised_mi,
            "mean_purity": self.mean_purity,
            "stability_changed_fraction": self.stability,
            "ms_per_step": self.ms_per_step,
            "cv_load_per_step": self.cv_history,
            "expert_label_table": self.table.tolist(),
            "coactivation": None if self.coactivation is None else self.coactivation.tolist(),
            "layers": self.layer_stats,
        }


def _evaluate(
    model: torch.nn.Module, dataset: Dataset, on_batch: Callable[[Any], None] | None = None
) -> tuple[float, list[list]]:
    """The task metric on the evaluation split and every layer's eval routings."""
    model.eval()
    correct = total = 0
    nll = 0.0
    routings: list[list] = []
    with torch.no_grad():
        for batch in dataset.evaluation:
            if on_batch is not None:
                on_batch(batch)
            logits, layer_routings = model(batch.inputs, batch.token_ids)
            routings.append([r.detach() for r in layer_routings])
            nll += float(torch.nn.functional.cross_entropy(logits, batch.targets, reduction="sum"))
            correct += int((logits.argmax(1) == batch.targets).sum())
            total += int(batch.targets.shape[0])
    model.train()
    if dataset.higher_is_better:
        return correct / max(total, 1), routings
    return math.exp(nll / max(total, 1)), routings


def train_and_measure(
    config: RouterConfig,
    dataset: Dataset,
    settings: CompareSettings,
    *,
    options: dict[str, Any] | None = None,
) -> RunResult:
    """Train one model with ``config``'s router on ``dataset`` and measure it."""
    torch.manual_seed(settings.seed)

    def make_layer(d: int, e: int):
        return config.build(d, e, dataset, **(options or {}))

    model = dataset.build_model(make_layer, settings.d_model, settings.num_experts)
    optimiser = torch.optim.Adam(model.parameters(), lr=settings.lr)
    train_rec = RoutingRecorder(model, num_labels=dataset.num_labels, mode="train")
    gen = torch.Generator().manual_seed(settings.seed + 12345)
    probe = dataset.evaluation[0]
    mid_routing = None
    elapsed = 0.0
    model.train()
    for step in range(settings.steps):
        batch = dataset.train(gen, settings.batch_size)
        start = time.perf_counter()
        train_rec.set_labels(batch.labels)
        logits, routings = model(batch.inputs, batch.token_ids)
        loss = task_loss(dataset, logits, batch.targets)
        loss = loss + sum((r.aux_loss for r in routings), torch.zeros(()))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        elapsed += time.perf_counter() - start
        train_rec.step()
        if step == settings.steps // 2:
            mid_routing = _probe_routing(model, probe)
    train_rec.remove()
    end_routing = _probe_routing(model, probe)
    stability = routing_stability(mid_routing, end_routing) if mid_routing is not None else 0.0

    eval_rec = RoutingRecorder(model, num_labels=dataset.num_labels, mode="eval")
    model.eval()
    metric, eval_routings = _evaluate_recorded(model, dataset, eval_rec)
    eval_rec.remove()

    window = train_rec.history[settings.steps // 2 :] or train_rec.history
    names = train_rec.layer_names
    layer_stats = []
    for i, name in enumerate(names):
        stats_i = LoadStats.merge([h[name] for h in window])
        spec_i = eval_rec.specialisation(i)
        layer_stats.append(
            {
                "layer": name,
                "train": stats_i.to_dict(),
                "eval": eval_rec.stats(i).to_dict(),
                "specialisation": spec_i.to_dict(),
            }
        )
    train_stats = LoadStats.merge([h[names[0]] for h in window])
    spec = eval_rec.specialisation(0)
    first_layer = concat_routings([rs[0] for rs in eval_routings])
    labels = torch.cat([b.labels for b in dataset.evaluation])
    shuffled = shuffled_baseline(first_layer, labels, dataset.num_labels, seed=settings.seed)
    coact = eval_rec.coactivation(0, 1) if len(names) > 1 else None
    return RunResult(
        dataset=dataset.name,
        router=config.name,
        description=config.description,
        metric_name=dataset.metric,
        metric=metric,
        train_stats=train_stats,
        eval_stats=eval_rec.stats(0),
        mutual_information=spec.mutual_information,
        shuffled_mi=shuffled,
        normalised_mi=spec.normalised_mi,
        mean_purity=spec.mean_purity,
        stability=stability,
        ms_per_step=1000.0 * elapsed / max(settings.steps, 1),
        cv_history=train_rec.cv_history(0),
        table=eval_rec.table(0),
        coactivation=coact,
        layer_stats=layer_stats,
    )


def _probe_routing(model: torch.nn.Module, batch: Any):
    was_training = model.training
    model.eval()
    with torch.no_grad():
        _, routings = model(batch.inputs, batch.token_ids)
    model.train(was_training)
    return routings[0].detach()


def _evaluate_recorded(model, dataset, recorder) -> tuple[float, list[list]]:
    return _evaluate(model, dataset, on_batch=lambda batch: recorder.set_labels(batch.labels))


# ---------------------------------------------------------------------- reports
COLUMNS = (
    "router",
    "{metric}",
    "CV(importance)",
    "CV(load)",
    "max/mean load",
    "dropped %",
    "I(expert; label)",
    "shuffled I",
    "ms/step",
)


def _fmt(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}"


def results_table(results: Sequence[RunResult]) -> str:
    """The markdown table of one data set's results (one row per router)."""
    if not results:
        return ""
    header = [c.format(metric=results[0].metric_name) for c in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in results:
        s = r.train_stats
        row = [
            r.router,
            _fmt(r.metric, 3 if r.metric < 100 else 1),
            _fmt(s.cv_importance),
            _fmt(s.cv_load),
            _fmt(s.max_over_mean, 2),
            _fmt(100 * s.dropped_fraction, 1),
            _fmt(r.mutual_information),
            _fmt(r.shuffled_mi),
            _fmt(r.ms_per_step, 1),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _write_plots(out: Path, dataset: Dataset, results: Sequence[RunResult]) -> list[str]:
    name = dataset.name
    files = []
    loads = {r.router: r.train_stats.load for r in results}
    files.append(plots.plot_load(loads, out / f"{name}_load.png", title=f"{name}: load per expert"))
    files.append(
        plots.plot_cv_over_steps(
            {r.router: r.cv_history for r in results},
            out / f"{name}_cv_load.png",
            title=f"{name}: CV(load) per training step (moving average)",
        )
    )
    files.append(
        plots.plot_heatmap_grid(
            {f"{r.router} (I={r.mutual_information:.2f})": r.table for r in results},
            out / f"{name}_experts_x_labels.png",
            title=f"{name}: expert x label (rows: share of each expert's entries)",
            xlabel="label",
        )
    )
    coact = {r.router: r.coactivation for r in results if r.coactivation is not None}
    if coact:
        files.append(
            plots.plot_heatmap_grid(
                coact,
                out / f"{name}_coactivation.png",
                title=f"{name}: layer-1 x layer-2 expert co-activation (rows normalised)",
                xlabel="layer-2 expert",
                ylabel="layer-1 expert",
            )
        )
    # the single heatmap: the most specialised router among those that drop < 5%
    few_drops = [r for r in results if r.train_stats.dropped_fraction < 0.05] or list(results)
    best = max(few_drops, key=lambda r: r.mutual_information)
    files.append(
        plots.plot_heatmap(
            best.table,
            out / f"{name}_{best.router}_experts_x_labels.png",
            title=f"{name} / {best.router}: expert x label (I = {best.mutual_information:.3f})",
            xticklabels=dataset.label_names,
        )
    )
    if best.coactivation is not None:
        files.append(
            plots.plot_coactivation(
                best.coactivation,
                out / f"{name}_{best.router}_coactivation.png",
                title=f"{name} / {best.router}: layer-1 x layer-2 co-activation",
            )
        )
    return [str(Path(f).relative_to(out)) for f in files]


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit="run", dynamic_ncols=True)


def compare(
    out: str | Path,
    *,
    routers: Sequence[str] | None = None,
    datasets: Sequence[str] = DATASETS,
    settings: CompareSettings | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, list[RunResult]]:
    """Train and measure every router on every data set; write the report into ``out``.

    Returns ``{dataset: [RunResult per router]}``. Files written: ``report.md``,
    ``metrics.json`` and the PNG plots listed in ``metrics.json["plots"]``.
    """
    settings = settings or CompareSettings()
    configs = resolve_routers(list(routers) if routers else None)
    for name in datasets:
        if name not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[RunResult]] = {}
    prepared: dict[str, Dataset] = {}
    bar = _progress(len(configs) * len(datasets), progress)
    start = time.perf_counter()
    for name in datasets:
        dataset = settings.load(name)
        prepared[name] = dataset
        results[name] = []
        for config in configs:
            bar.set_description(f"{name} / {config.name}")
            results[name].append(train_and_measure(config, dataset, settings))
            bar.update(1)
    bar.close()
    wall = time.perf_counter() - start
    plot_files: dict[str, list[str]] = {}
    for name, rows in results.items():
        plot_files[name] = _write_plots(out, prepared[name], rows)
    metrics = {
        "settings": settings.__dict__,
        "wall_seconds": wall,
        "torch_threads": torch.get_num_threads(),
        "datasets": {
            name: {"info": prepared[name].extra, "results": [r.to_dict() for r in rows]}
            for name, rows in results.items()
        },
        "plots": plot_files,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    (out / "report.md").write_text(_report_markdown(results, prepared, settings, plot_files, wall))
    if log is not None:
        log(
            f"wrote {out / 'report.md'}, {out / 'metrics.json'} and {sum(map(len, plot_files.values()))} plots"
        )
    return results


def _report_markdown(results, prepared, settings, plot_files, wall) -> str:
    s = settings
    lines = [
        "# routelab compare",
        "",
        f"d_model = {s.d_model}, E = {s.num_experts} experts, {s.steps} steps of "
        f"{s.batch_size} tokens, Adam lr {s.lr}, seed {s.seed}{' (quick)' if s.quick else ''}; "
        f"{wall:.0f} s in all.",
        "",
        "Balance columns: training-mode routings of the last half of the training steps "
        "(first MoE layer). I(expert; label) in nats on the held-out split (eval mode), "
        "beside the same routings with shuffled labels. dropped %: entries removed by "
        "capacity / pausing policies.",
    ]
    for name, rows in results.items():
        dataset = prepared[name]
        label = "token-frequency bucket" if name == "tokens" else "digit class"
        lines += [
            "",
            f"## {name}",
            "",
            f"Task metric: {dataset.metric}; label: {label}; {dataset.extra}.",
            "",
            results_table(rows),
            "",
            "Plots: " + ", ".join(f"[{p}]({p})" for p in plot_files[name]),
            "",
            f"![load]({name}_load.png)",
            "",
            f"![cv]({name}_cv_load.png)",
            "",
            f"![experts x labels]({name}_experts_x_labels.png)",
        ]
        if name == "digits" or any(r.coactivation is not None for r in rows):
            lines += ["", f"![co-activation]({name}_coactivation.png)"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- sweep
def sweep(
    out: str | Path,
    *,
    router: str = "noisy-top2",
    grid: dict[str, Sequence[float]] | None = None,
    dataset: str = "digits",
    settings: CompareSettings | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train ``router`` for every cell of ``grid`` (option -> values; one or two options).

    Writes ``sweep.md`` (one balance table per measured quantity, rows the first
    option, columns the second) and ``sweep.json``; returns the cells.
    """
    settings = settings or CompareSettings()
    grid = dict(
        grid or {"importance_weight": [0.0, 0.01, 0.1, 1.0], "load_weight": [0.0, 0.01, 0.1, 1.0]}
    )
    if not 1 <= len(grid) <= 2:
        raise ValueError(f"grid must vary one or two options, got {list(grid)}")
    (config,) = resolve_routers([router])
    data = settings.load(dataset)
    keys = list(grid)
    rows_key, cols_key = keys[0], keys[1] if len(keys) == 2 else None
    col_values = list(grid[cols_key]) if cols_key else [None]
    cells = []
    bar = _progress(len(grid[rows_key]) * len(col_values), progress)
    for a in grid[rows_key]:
        for b in col_values:
            options = {rows_key: a} if cols_key is None else {rows_key: a, cols_key: b}
            bar.set_description(" ".join(f"{k}={v}" for k, v in options.items()))
            result = train_and_measure(config, data, settings, options=options)
            cells.append({"options": options, **_cell(result)})
            bar.update(1)
    bar.close()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(
        json.dumps({"router": router, "dataset": dataset, "grid": grid, "cells": cells}, indent=1)
    )
    lines = [f"# routelab sweep: {router} on {dataset}", ""]
    titles = {"metric": f"metric ({data.metric})", "mutual_information": "I(expert; label)"}
    quantities = ("cv_load", "cv_importance", "max_over_mean", "dropped_pct")
    for quantity in (*quantities, "mutual_information", "metric"):
        lines += [f"## {titles.get(quantity, quantity)}", ""]
        head = [f"{rows_key} \\ {cols_key}" if cols_key else rows_key]
        head += [str(b) for b in col_values] if cols_key else [quantity]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join("---" for _ in head) + "|")
        for a in grid[rows_key]:
            row = [str(a)]
            for b in col_values:
                cell = next(
                    c
                    for c in cells
                    if c["options"][rows_key] == a
                    and (cols_key is None or c["options"][cols_key] == b)
                )
                row.append(f"{cell[quantity]:.3f}")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    (out / "sweep.md").write_text("\n".join(lines))
    return cells


def _cell(result: RunResult) -> dict[str, float]:
    s = result.train_stats
    return {
        "cv_load": s.cv_load,
        "cv_importance": s.cv_importance,
        "max_over_mean": s.max_over_mean,
        "dropped_pct": 100 * s.dropped_fraction,
        "metric": result.metric,
        "mutual_information": result.mutual_information,
    }
