"""PNG plots of routing statistics (matplotlib, Agg canvas: no display needed).

Every function draws one figure and writes it to ``path`` (parent folders are
created) and returns the path. Figures are drawn on a ``FigureCanvasAgg`` directly,
so the global matplotlib backend is left alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from analysis.validation import as_float_array, require_int

__all__ = [
    "plot_coactivation",
    "plot_cv_over_steps",
    "plot_cv_panels",
    "plot_heatmap",
    "plot_heatmap_grid",
    "plot_load",
    "plot_sweep",
]


def _array(name: str, values: object, ndim: int) -> np.ndarray:
    return as_float_array(name, values, ndim).numpy()


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=100)
    return path


def plot_load(
    loads: Mapping[str, object] | object, path: str | Path, *, title: str = "Load per expert"
) -> Path:
    """The load per expert relative to the mean (1 = perfectly even).

    ``loads`` is one vector ``[E]`` (a bar chart) or ``{name: [E]}``: up to four series
    are grouped bars, more are drawn as a table (rows: series, columns: experts) coloured
    blue below the mean and red above it, each cell labelled with its value.
    """
    series = dict(loads) if isinstance(loads, Mapping) else {"load": loads}
    if not series:
        raise ValueError("loads must hold at least one load vector")
    arrays = {name: _array(f"loads[{name!r}]", v, 1) for name, v in series.items()}
    relative = {}
    for name, arr in arrays.items():
        mean = arr.mean() if arr.size and arr.mean() > 0 else 1.0
        relative[name] = arr / mean
    if len(relative) > 4:
        return _load_table(relative, path, title)
    num = len(relative)
    fig = Figure(figsize=(max(6.0, 0.3 * num * max(a.size for a in relative.values())), 3.6))
    ax = fig.add_subplot()
    width = 0.8 / num
    for i, (name, arr) in enumerate(relative.items()):
        x = np.arange(arr.size) + (i - (num - 1) / 2) * width
        ax.bar(x, arr, width=width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xlabel("expert")
    ax.set_ylabel("load / mean load")
    ax.set_title(title)
    if num > 1:
        ax.legend(fontsize=7, ncol=min(4, num))
    fig.tight_layout()
    return _save(fig, path)


def _load_table(relative: Mapping[str, np.ndarray], path: str | Path, title: str) -> Path:
    from matplotlib.colors import TwoSlopeNorm

    names = list(relative)
    width = max(a.size for a in relative.values())
    grid = np.full((len(names), width), np.nan)
    for i, name in enumerate(names):
        grid[i, : relative[name].size] = relative[name]
    top = max(2.0, float(np.nanmax(grid)) if np.isfinite(grid).any() else 2.0)
    fig = Figure(figsize=(2.5 + 0.55 * width, 0.8 + 0.32 * len(names)))
    ax = fig.add_subplot()
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=top)
    image = ax.imshow(grid, aspect="auto", cmap="coolwarm", norm=norm)
    if width <= 32:
        for (i, j), value in np.ndenumerate(grid):
            if np.isfinite(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6)
        ax.set_xticks(range(width))
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=7)
    ax.set_xlabel("expert")
    ax.set_title(title + " (load / mean)")
    fig.colorbar(image, ax=ax, label="load / mean load")
    fig.tight_layout()
    return _save(fig, path)


def plot_cv_over_steps(
    curves: Mapping[str, Sequence[float]],
    path: str | Path,
    *,
    steps: Sequence[int] | None = None,
    title: str = "CV(load) over training",
    ylabel: str = "CV(load)",
    smooth: int | None = None,
) -> Path:
    """One line per router: ``{name: [value per step]}`` (e.g. CV of the load).

    ``smooth`` > 1 draws the moving average over that many steps (default: about 1/30
    of the run) so that the per-batch noise does not hide the trend.
    """
    if not curves:
        raise ValueError("curves must hold at least one series")
    fig = Figure(figsize=(8.5, 4.2))
    ax = fig.add_subplot()
    colours = [cm_tab20(i % 20) for i in range(len(curves))]
    for i, (name, values) in enumerate(curves.items()):
        arr = _array(f"curves[{name!r}]", list(values), 1)
        window = smooth if smooth is not None else max(1, arr.size // 30)
        if window > 1 and arr.size >= window:
            arr = np.convolve(arr, np.ones(window) / window, mode="valid")
        x = np.arange(arr.size) + (window - 1 if window > 1 else 0)
        if steps is not None:
            x = np.asarray(steps)[x[x < len(steps)]]
        style = ("-", "--", ":")[(i // 20) % 3] if len(curves) > 20 else ("-", "--")[i % 2]
        ax.plot(x, arr, label=name, linewidth=1.3, color=colours[i], linestyle=style)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_yscale("symlog", linthresh=0.1)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return _save(fig, path)


def cm_tab20(i: int) -> tuple[float, float, float, float]:
    """Colour ``i`` of matplotlib's 20-colour qualitative map."""
    from matplotlib import colormaps

    return colormaps["tab20"](i)


def plot_heatmap(
    table: object,
    path: str | Path,
    *,
    title: str = "Expert x label",
    xlabel: str = "label",
    ylabel: str = "expert",
    normalise: str | None = "row",
    xticklabels: Sequence[str] | None = None,
) -> Path:
    """Heatmap of a count table ``[rows, cols]``.

    ``normalise``: ``"row"`` (each row sums to 1: what each expert receives),
    ``"column"``, or None (raw counts).
    """
    arr = _array("table", table, 2)
    shown = _normalise(arr, normalise)
    rows, cols = arr.shape
    fig = Figure(figsize=(min(12.0, 2.0 + 0.45 * cols), min(10.0, 1.5 + 0.35 * rows)))
    ax = fig.add_subplot()
    image = ax.imshow(shown, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="share" if normalise else "count")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if cols <= 32:
        ax.set_xticks(range(cols))
        if xticklabels is not None:
            ax.set_xticklabels(list(xticklabels), fontsize=7)
    if rows <= 32:
        ax.set_yticks(range(rows))
    fig.tight_layout()
    return _save(fig, path)


def _normalise(arr: np.ndarray, normalise: str | None) -> np.ndarray:
    if normalise not in ("row", "column", None):
        raise ValueError(f"normalise must be 'row', 'column' or None, got {normalise!r}")
    if normalise == "row":
        return arr / np.maximum(arr.sum(1, keepdims=True), 1e-12)
    if normalise == "column":
        return arr / np.maximum(arr.sum(0, keepdims=True), 1e-12)
    return arr


def plot_heatmap_grid(
    tables: Mapping[str, object],
    path: str | Path,
    *,
    title: str = "Expert x label",
    xlabel: str = "label",
    ylabel: str = "expert",
    normalise: str | None = "row",
    columns: int = 4,
) -> Path:
    """Small multiples: one heatmap per ``{name: table [rows, cols]}`` on a shared scale."""
    if not tables:
        raise ValueError("tables must hold at least one table")
    arrays = {n: _normalise(_array(f"tables[{n!r}]", t, 2), normalise) for n, t in tables.items()}
    columns = max(1, min(columns, len(arrays)))
    rows = -(-len(arrays) // columns)
    fig = Figure(figsize=(3.0 * columns, 2.6 * rows + 0.6))
    vmax = max(float(a.max()) if a.size else 0.0 for a in arrays.values()) or 1.0
    image = None
    for i, (name, arr) in enumerate(arrays.items()):
        ax = fig.add_subplot(rows, columns, i + 1)
        image = ax.imshow(arr, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=6)
        if i % columns == 0:
            ax.set_ylabel(ylabel, fontsize=8)
        if i >= len(arrays) - columns:
            ax.set_xlabel(xlabel, fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    if image is not None:
        fig.colorbar(image, ax=fig.axes, shrink=0.6, label="share" if normalise else "count")
    return _save(fig, path)


def plot_coactivation(
    table: object, path: str | Path, *, title: str = "Expert co-activation, layer 1 x layer 2"
) -> Path:
    """Heatmap of a cross-layer co-activation table ``[E1, E2]`` (rows normalised)."""
    return plot_heatmap(
        table, path, title=title, xlabel="layer-2 expert", ylabel="layer-1 expert", normalise="row"
    )


def _moving_average(values: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)``: the moving average over ``window`` steps, x at each window's last step."""
    if window <= 1 or values.size < window:
        return np.arange(values.size), values
    smooth = np.convolve(values, np.ones(window) / window, mode="valid")
    return np.arange(window - 1, values.size), smooth


def plot_cv_panels(
    curves: Mapping[str, Mapping[str, Sequence[float]]],
    path: str | Path,
    *,
    window_start: int | None = None,
    floors: Mapping[str, float] | None = None,
    title: str = "CV(load) per training step",
    ylabel: str = "CV(load)",
    columns: int = 4,
) -> Path:
    """Small multiples: one panel per row ``{row: {series: [value per step]}}``.

    Each series is drawn per step (thin) and as a moving average over about 1/15 of the
    run (thick), in the same colour in every panel; ``floors[row]`` draws a dashed line
    (e.g. the CV that sampling noise alone gives); ``window_start`` shades the steps from
    there on (e.g. the window a table pools). Panels share both axes.
    """
    if not curves:
        raise ValueError("curves must hold at least one row")
    columns = max(1, min(require_int("columns", columns, minimum=1), len(curves)))
    rows = -(-len(curves) // columns)
    fig = Figure(figsize=(2.6 * columns + 0.4, 1.9 * rows + 0.9))
    series_names: list[str] = []
    for series in curves.values():
        series_names += [s for s in series if s not in series_names]
    colours = {s: cm_tab20(2 * i % 20) for i, s in enumerate(series_names)}
    top = 0.0
    axes: list[Any] = []
    length = max((len(v) for series in curves.values() for v in series.values()), default=1)
    for i, (name, series) in enumerate(curves.items()):
        ax = fig.add_subplot(
            rows, columns, i + 1, sharex=axes[0] if axes else None, sharey=axes[0] if axes else None
        )
        axes.append(ax)
        for label, values in series.items():
            arr = _array(f"curves[{name!r}][{label!r}]", list(values), 1)
            if not arr.size:
                continue
            top = max(top, float(np.percentile(arr, 99)))
            ax.plot(np.arange(arr.size), arr, color=colours[label], linewidth=0.5, alpha=0.35)
            x, smooth = _moving_average(arr, max(1, arr.size // 15))
            ax.plot(x, smooth, color=colours[label], linewidth=1.6, label=label)
        if floors and name in floors:
            ax.axhline(floors[name], color="black", linewidth=0.8, linestyle="--")
        if window_start is not None:
            ax.axvspan(window_start, max(window_start + 1, length - 1), color="0.9", zorder=0)
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=6)
        if i % columns == 0:
            ax.set_ylabel(ylabel, fontsize=7)
        if i >= len(curves) - columns:
            ax.set_xlabel("step", fontsize=7)
    if axes:
        axes[0].set_ylim(0.0, max(top * 1.1, 0.05))
    handles, labels = axes[0].get_legend_handles_labels()
    if floors:
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], color="black", linestyle="--", linewidth=0.8))
        labels.append("sampling-noise level")
    fig.legend(handles, labels, loc="upper right", fontsize=7, ncol=len(labels))
    fig.suptitle(title, fontsize=9, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return _save(fig, path)


def plot_sweep(
    grid: Mapping[str, Sequence[float]],
    cells: Sequence[Mapping[str, object]],
    path: str | Path,
    *,
    quantities: Mapping[str, str],
    title: str = "sweep",
) -> Path:
    """The swept quantities against the option values: one panel per quantity.

    ``grid`` has one or two options; ``cells`` hold ``"options"`` (``{option: value}``)
    and one number per quantity key of ``quantities`` (key -> axis label). One option:
    a line per panel; two options: one line per value of the second option.
    """
    keys = list(grid)
    if not 1 <= len(keys) <= 2:
        raise ValueError(f"grid must vary one or two options, got {keys}")
    if not quantities:
        raise ValueError("quantities must name at least one measured quantity")
    first, second = keys[0], (keys[1] if len(keys) == 2 else None)
    xs = [float(v) for v in grid[first]]
    numeric = sorted(set(xs)) == xs and len(set(xs)) == len(xs)
    positions = xs if numeric else list(range(len(xs)))
    columns = min(3, len(quantities))
    rows = -(-len(quantities) // columns)
    fig = Figure(figsize=(3.4 * columns, 2.7 * rows + 0.5))
    for i, (quantity, label) in enumerate(quantities.items()):
        ax = fig.add_subplot(rows, columns, i + 1)
        for b in grid[second] if second else [None]:
            ys = []
            for a in grid[first]:
                match = [
                    c
                    for c in cells
                    if c["options"][first] == a  # type: ignore[index]
                    and (second is None or c["options"][second] == b)  # type: ignore[index]
                ]
                if len(match) != 1:
                    raise ValueError(f"cells must hold exactly one cell for {first}={a}")
                ys.append(float(match[0][quantity]))  # type: ignore[arg-type]
            ax.plot(positions, ys, marker="o", label=None if b is None else f"{second}={b}")
        ax.set_xlabel(first, fontsize=8)
        ax.set_ylabel(label, fontsize=8)
        ax.tick_params(labelsize=7)
        if not numeric:
            ax.set_xticks(positions)
            ax.set_xticklabels([str(v) for v in grid[first]])
        elif min(xs) > 0 and max(xs) / min(xs) >= 100:
            ax.set_xscale("log")
        if second and i == 0:
            ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
