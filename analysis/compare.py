"""``routelab compare`` and ``routelab sweep``: train small MoE models, measure, report.

For every (data set, row) pair (rows: ``analysis.registry``) :func:`train_and_measure`
trains a small model (``analysis.data``) with Adam on the task loss plus the routing's
auxiliary losses, from the same seed and on the same batches for every row, calls
``routelab.balancing.update_balancing`` after every optimiser step, and measures:

- balance in training, over the last half of the training steps (training-mode
  routings, so BASE shows its exact balance and noisy top-k its noisy routing), at two
  stages: the router's own choice (before any policy) and what the experts executed
  (after capacity / pausing / bias policies). For the two-layer digits model the
  balance columns are the first MoE layer's. CV(load) is also recorded per step.
- specialisation on the held-out split (eval mode): ``I(expert; label)`` in nats of the
  first layer, beside the same routings with the labels shuffled ``shuffles`` times
  (mean and standard deviation: the chance level on a sample of this size).
- stability: the fraction of held-out items whose set of experts changed between the
  middle and the end of training (eval-mode routings of the first held-out batch).
- the task metric on the held-out split, the CPU time per training step (one torch
  thread, so it is the step's compute, little changed by other load on the machine; the
  wall time is in ``metrics.json`` too) and the CPU time of the whole job.

Jobs run in worker processes (one torch thread each; ``workers`` of them at a time):
the models are small, so one process per core is what makes the run fast.
``compare`` writes ``report.md`` (rendered by ``analysis.report``), ``metrics.json``,
PNG plots and ``run.json`` (the run's fingerprint and its files) into a folder it owns: a folder holding a different
run is refused unless ``overwrite=True``, and the previous run's files are removed
before the new ones are written, so two runs never mix.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import multiprocessing
import os
import queue as queue_module
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from analysis import plots
from analysis.data import DATASETS, Dataset, load_dataset, task_loss
from analysis.metrics import LoadStats, concat_routings
from analysis.recorder import RoutingRecorder
from analysis.registry import CompareRow, resolve_routers
from analysis.report import detail_choice, report_markdown
from analysis.specialisation import routing_stability, shuffled_levels
from routelab._validate import require_float, require_int
from routelab.balancing import update_balancing

__all__ = [
    "CompareSettings",
    "Job",
    "RunDirectoryError",
    "RunResult",
    "check_run_directory",
    "compare",
    "default_grid",
    "default_workers",
    "estimate_seconds",
    "plan_jobs",
    "run_fingerprint",
    "run_jobs",
    "sweep",
    "sweep_jobs",
    "train_and_measure",
]

# CPU seconds measured in the default run (docs/report: d = 32, E = 8, batch 256, one torch
# thread per worker), for the estimate printed before a run: per training step, per job
# (model set-up, evaluation, measurement), per worker (process start, data preparation)
# and once (imports, checks, plots in the main process).
SECONDS_PER_STEP = {"tokens": 0.0095, "digits": 0.0100}
SECONDS_PER_JOB = 0.5
SECONDS_PER_WORKER = 4.5
SECONDS_FIXED = 10.0
REFERENCE_K = 2  # the top-k the variable-compute statistics compare with (LoadStats)


@dataclass
class CompareSettings:
    """Sizes of one comparison (see the README for the default run's time).

    Fields: ``steps`` training steps per model, ``d_model``, ``num_experts`` E,
    ``batch_size`` items per step, ``lr`` (Adam), ``seed``, ``quick`` (a slice of the
    token stream, for tests) and ``shuffles`` (label shuffles for the chance level).
    """

    steps: int = 300
    d_model: int = 32
    num_experts: int = 8
    batch_size: int = 256
    lr: float = 3e-3
    seed: int = 0
    quick: bool = False
    shuffles: int = 10

    @classmethod
    def quick_settings(cls, seed: int = 0) -> CompareSettings:
        return cls(steps=8, d_model=16, num_experts=4, batch_size=64, seed=seed, quick=True)

    def validate(self) -> CompareSettings:
        """Raise a ValueError / TypeError naming the first bad field."""
        require_int("steps", self.steps, minimum=1)
        require_int("d_model", self.d_model, minimum=1)
        require_int("num_experts", self.num_experts, minimum=1)
        require_int("batch_size", self.batch_size, minimum=1)
        require_float("lr", self.lr, above=0.0)
        require_int("seed", self.seed, minimum=0)
        require_int("shuffles", self.shuffles, minimum=1)
        return self

    def load(self, dataset: str) -> Dataset:
        """The named data set at these settings' size and seed (cached per process)."""
        return _load_cached(dataset, self.quick, self.seed, self.batch_size, self.steps)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@functools.lru_cache(maxsize=4)
def _load_cached(name: str, quick: bool, seed: int, batch_size: int, steps: int) -> Dataset:
    return load_dataset(name, quick=quick, seed=seed, batch_size=batch_size, steps=steps)


@dataclass
class RunResult:
    """Everything measured for one row on one data set.

    ``chosen`` is the router's own choice, ``executed`` what the experts ran (both over
    the last half of training, first MoE layer); ``dense`` means the router gives every
    item every expert (load metrics then do not apply); ``has_policies`` whether any
    policy followed the router (dropped % applies only then).
    """

    dataset: str
    router: str
    description: str
    configuration: str
    unit: str
    metric_name: str
    metric: float
    chosen: LoadStats
    executed: LoadStats
    eval_stats: LoadStats
    mutual_information: float
    shuffled: list[float]
    normalised_mi: float
    mean_purity: float
    stability: float
    ms_per_step: float
    wall_ms_per_step: float
    cpu_seconds: float
    wall_seconds: float
    cv_history: list[float]
    chosen_cv_history: list[float]
    table: torch.Tensor
    dense: bool
    has_policies: bool
    options: dict[str, Any] = field(default_factory=dict)
    label_names: list[str] = field(default_factory=list)
    dataset_info: dict[str, Any] = field(default_factory=dict)
    coactivation: torch.Tensor | None = None
    layer_stats: list[dict[str, Any]] = field(default_factory=list)

    @property
    def shuffled_mean(self) -> float:
        return float(sum(self.shuffled) / len(self.shuffled))

    @property
    def shuffled_std(self) -> float:
        mean = self.shuffled_mean
        return math.sqrt(sum((v - mean) ** 2 for v in self.shuffled) / len(self.shuffled))

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "router": self.router,
            "description": self.description,
            "configuration": self.configuration,
            "options": self.options,
            "unit": self.unit,
            "metric_name": self.metric_name,
            "metric": self.metric,
            "dense": self.dense,
            "has_policies": self.has_policies,
            "chosen": self.chosen.to_dict(),
            "executed": self.executed.to_dict(),
            "eval": self.eval_stats.to_dict(),
            "mutual_information": self.mutual_information,
            "shuffled_mutual_information": self.shuffled,
            "shuffled_mean": self.shuffled_mean,
            "shuffled_std": self.shuffled_std,
            "normalised_mi": self.normalised_mi,
            "mean_purity": self.mean_purity,
            "stability_changed_fraction": self.stability,
            "ms_per_step": self.ms_per_step,
            "wall_ms_per_step": self.wall_ms_per_step,
            "cpu_seconds": self.cpu_seconds,
            "wall_seconds": self.wall_seconds,
            "cv_load_per_step": self.cv_history,
            "chosen_cv_load_per_step": self.chosen_cv_history,
            "expert_label_table": self.table.tolist(),
            "coactivation": None if self.coactivation is None else self.coactivation.tolist(),
            "layers": self.layer_stats,
        }


# ---------------------------------------------------------------------- one job
def _evaluate(model: torch.nn.Module, dataset: Dataset, recorder: RoutingRecorder):
    """The task metric on the held-out split and every batch's first-layer routing."""
    model.eval()
    correct = total = 0
    nll = 0.0
    first_layer = []
    with torch.no_grad():
        for batch in dataset.evaluation:
            recorder.set_labels(batch.labels)
            logits, layer_routings = model(batch.inputs, batch.token_ids)
            first_layer.append(layer_routings[0].detach())
            nll += float(torch.nn.functional.cross_entropy(logits, batch.targets, reduction="sum"))
            correct += int((logits.argmax(1) == batch.targets).sum())
            total += int(batch.targets.shape[0])
    model.train()
    if dataset.higher_is_better:
        return correct / max(total, 1), first_layer
    return math.exp(nll / max(total, 1)), first_layer


def _probe_routing(model: torch.nn.Module, batch: Any):
    was_training = model.training
    model.eval()
    with torch.no_grad():
        _, routings = model(batch.inputs, batch.token_ids)
    model.train(was_training)
    return routings[0].detach()


def build_model(row: CompareRow, dataset: Dataset, settings: CompareSettings) -> torch.nn.Module:
    """The data set's model with ``row``'s MoE layer(s) (``row.build_layer``)."""
    d, e = settings.d_model, settings.num_experts
    return dataset.build_model(lambda i: row.build_layer(d, e, dataset), d, e)


def train_and_measure(
    row: CompareRow,
    dataset: Dataset,
    settings: CompareSettings,
    *,
    on_step: Callable[[int], None] | None = None,
) -> RunResult:
    """Train one model with ``row``'s layer on ``dataset`` and measure it.

    ``on_step(step)`` is called after every training step (progress reporting).
    """
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    torch.manual_seed(settings.seed)
    model = build_model(row, dataset, settings)
    optimiser = torch.optim.Adam(model.parameters(), lr=settings.lr)
    # flops_vs_topk in the stats: FFN work per item relative to a top-2 layer
    train_rec = RoutingRecorder(
        model, num_labels=dataset.num_labels, mode="train", reference_k=REFERENCE_K
    )
    probe = dataset.evaluation[0]
    mid_routing = None
    elapsed = cpu_elapsed = 0.0
    steps = len(dataset.train_batches)
    model.train()
    for step, batch in enumerate(dataset.train_batches):
        start, cpu = time.perf_counter(), time.process_time()
        train_rec.set_labels(batch.labels)
        logits, routings = model(batch.inputs, batch.token_ids)
        loss = task_loss(dataset, logits, batch.targets)
        loss = loss + sum((r.aux_loss for r in routings), torch.zeros(()))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        update_balancing(model)
        elapsed += time.perf_counter() - start
        cpu_elapsed += time.process_time() - cpu
        train_rec.step()
        if step == steps // 2 - 1:
            mid_routing = _probe_routing(model, probe)
        if on_step is not None:
            on_step(step + 1)
    train_rec.remove()
    end_routing = _probe_routing(model, probe)
    stability = routing_stability(mid_routing, end_routing) if mid_routing is not None else 0.0

    eval_rec = RoutingRecorder(
        model, num_labels=dataset.num_labels, mode="eval", reference_k=REFERENCE_K
    )
    metric, eval_routings = _evaluate(model, dataset, eval_rec)
    eval_rec.remove()

    half = steps // 2
    names = train_rec.layer_names

    def last_half(history: list[dict[str, LoadStats]], name: str) -> LoadStats:
        return LoadStats.merge([h[name] for h in (history[half:] or history)])

    layer_stats = [
        {
            "layer": name,
            "chosen": last_half(train_rec.router_history, name).to_dict(),
            "executed": last_half(train_rec.history, name).to_dict(),
            "eval": eval_rec.stats(i).to_dict(),
            "specialisation": eval_rec.specialisation(i).to_dict(),
        }
        for i, name in enumerate(names)
    ]
    chosen = last_half(train_rec.router_history, names[0])
    executed = last_half(train_rec.history, names[0])
    spec = eval_rec.specialisation(0)
    labels = torch.cat([b.labels for b in dataset.evaluation])
    shuffled = shuffled_levels(
        concat_routings(eval_routings),
        labels,
        dataset.num_labels,
        shuffles=settings.shuffles,
        seed=settings.seed,
    )
    return RunResult(
        dataset=dataset.name,
        router=row.name,
        description=row.description,
        configuration=row.configuration(),
        options=dict(row.options),
        label_names=list(dataset.label_names),
        dataset_info=dict(dataset.extra),
        unit=dataset.unit,
        metric_name=dataset.metric,
        metric=metric,
        chosen=chosen,
        executed=executed,
        eval_stats=eval_rec.stats(0),
        mutual_information=spec.mutual_information,
        shuffled=[float(v) for v in shuffled],
        normalised_mi=spec.normalised_mi,
        mean_purity=spec.mean_purity,
        stability=stability,
        ms_per_step=1000.0 * cpu_elapsed / steps,
        wall_ms_per_step=1000.0 * elapsed / steps,
        cpu_seconds=time.process_time() - cpu_start,
        wall_seconds=time.perf_counter() - wall_start,
        cv_history=train_rec.cv_history(0),
        chosen_cv_history=train_rec.cv_history(0, stage="router"),
        table=eval_rec.table(0),
        dense=chosen.num_entries >= chosen.num_tokens * chosen.num_experts > 0,
        has_policies=bool(row.policies),
        coactivation=eval_rec.coactivation(0, 1) if len(names) > 1 else None,
        layer_stats=layer_stats,
    )


# ---------------------------------------------------------------------- many jobs
@dataclass(frozen=True)
class Job:
    """One training run: a data set, a row and option overrides.

    ``base`` is a ``CompareRow`` or a registered row's name. The row itself travels to the
    worker process (it holds classes and module-level functions, so it pickles), so a row
    built in a script runs as well as a registered one.
    """

    dataset: str
    base: CompareRow | str
    options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.base, str):
            (row,) = resolve_routers([self.base])
            object.__setattr__(self, "base", row)
        if not isinstance(self.base, CompareRow):
            raise TypeError(f"base must be a CompareRow or a row name, got {self.base!r}")
        object.__setattr__(self, "options", tuple(self.options))

    @property
    def router(self) -> str:
        return self.base.name  # type: ignore[union-attr]

    def row(self) -> CompareRow:
        row = self.base
        assert isinstance(row, CompareRow)
        return row.with_options(**dict(self.options)) if self.options else row

    @property
    def label(self) -> str:
        extra = " ".join(f"{k}={v}" for k, v in self.options)
        return f"{self.dataset}/{self.router}" + (f" {extra}" if extra else "")


def plan_jobs(rows: Sequence[CompareRow], datasets: Sequence[str]) -> list[Job]:
    """One job per (data set, row) where the row runs on that data set."""
    return [Job(name, row) for name in datasets for row in rows if name in row.datasets]


def default_workers() -> int:
    """The CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def estimate_seconds(jobs: Sequence[Job], settings: CompareSettings, workers: int) -> float:
    """The expected wall time on a quiet machine (from the measured per-step costs)."""
    scale = (settings.batch_size / 256) * (settings.d_model / 32) ** 0.5
    cpu = sum(
        settings.steps * SECONDS_PER_STEP.get(job.dataset, 0.009) * max(scale, 0.25)
        + SECONDS_PER_JOB
        for job in jobs
    )
    used = max(1, min(workers, len(jobs)))
    return cpu / used + SECONDS_PER_WORKER + SECONDS_FIXED


_PROGRESS: Any = None  # the worker's progress queue (set by the pool initialiser)


def _init_worker(progress: Any) -> None:
    global _PROGRESS
    torch.set_num_threads(1)
    _PROGRESS = progress


def _run_job(index: int, job: Job, settings: CompareSettings) -> RunResult:
    report_every = max(1, settings.steps // 50)

    def on_step(step: int) -> None:
        if _PROGRESS is not None and (step % report_every == 0 or step == settings.steps):
            _PROGRESS.put((index, step))

    return train_and_measure(job.row(), settings.load(job.dataset), settings, on_step=on_step)


class _Bar:
    """A per-step progress bar naming the jobs in flight (tqdm; silent when disabled)."""

    def __init__(self, jobs: Sequence[Job], steps: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.jobs = jobs
        self.steps = steps
        self.done: dict[int, int] = {}
        self.bar = tqdm(
            total=len(jobs) * steps, disable=not enabled, unit="step", dynamic_ncols=True
        )

    def update(self, index: int, step: int) -> None:
        self.bar.update(step - self.done.get(index, 0))
        self.done[index] = step
        running = [
            f"{self.jobs[i].label} {s}/{self.steps}"
            for i, s in sorted(self.done.items())
            if s < self.steps
        ]
        finished = sum(s >= self.steps for s in self.done.values())
        running_text = ", ".join(running[:3]) if running else "done"
        self.bar.set_description(f"{finished}/{len(self.jobs)} runs | {running_text}")

    def close(self) -> None:
        self.bar.close()


def run_jobs(
    jobs: Sequence[Job], settings: CompareSettings, *, workers: int = 1, progress: bool = False
) -> list[RunResult]:
    """Run every job (``workers`` processes with one torch thread each; 1: in this
    process); results in job order, identical for any ``workers``."""
    workers = require_int("workers", workers, minimum=1)
    bar = _Bar(jobs, settings.steps, progress)
    try:
        if workers == 1 or len(jobs) <= 1:
            previous = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                results = []
                for i, job in enumerate(jobs):
                    row = job.row()
                    data = settings.load(job.dataset)
                    results.append(
                        train_and_measure(
                            row, data, settings, on_step=functools.partial(bar.update, i)
                        )
                    )
                return results
            finally:
                torch.set_num_threads(previous)
        context = multiprocessing.get_context("spawn")
        progress_queue = context.Queue()
        with context.Pool(
            min(workers, len(jobs)), initializer=_init_worker, initargs=(progress_queue,)
        ) as pool:
            pending = [pool.apply_async(_run_job, (i, job, settings)) for i, job in enumerate(jobs)]
            while not all(p.ready() for p in pending):
                try:
                    bar.update(*progress_queue.get(timeout=0.2))
                except queue_module.Empty:
                    pass
            while True:
                try:
                    bar.update(*progress_queue.get_nowait())
                except queue_module.Empty:
                    break
            return [p.get() for p in pending]
    finally:
        bar.close()


def _rounded(value: Any, digits: int = 6) -> Any:
    """``value`` with every float rounded to ``digits`` significant digits (compact JSON)."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else value
    if isinstance(value, Mapping):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v, digits) for v in value]
    return value


def _cpu_seconds() -> tuple[float, float]:
    """CPU seconds of this process and of its finished child processes (the workers)."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


# ---------------------------------------------------------------------- run folders
class RunDirectoryError(ValueError):
    """The output folder holds another run's files (or cannot be written)."""


MANIFEST = "run.json"


def run_fingerprint(kind: str, settings: CompareSettings, jobs: Sequence[Job]) -> dict[str, Any]:
    """What identifies a run: its kind, the package version, the settings and every job's
    data set, row and configuration (``run.json`` keeps it)."""
    from importlib.metadata import version

    return {
        "kind": kind,
        "version": version("routelab"),
        "settings": settings.to_dict(),
        "jobs": [
            {"dataset": j.dataset, "router": j.router, "configuration": j.row().configuration()}
            for j in jobs
        ],
    }


def check_run_directory(out: str | Path, fingerprint: dict[str, Any], overwrite: bool) -> Path:
    """Check, before any work, that ``out`` may receive this run.

    Allowed: a new or empty folder, or one holding a run with the same fingerprint (it is
    replaced), or any run of ours with ``overwrite``. Refused: a folder with files but no
    ``run.json`` (not a routelab report), or a different run without ``overwrite``; and a
    folder that cannot be written. Raises RunDirectoryError with what to do.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunDirectoryError(f"--out {str(out)!r} is a file, not a folder")
    manifest = out / MANIFEST
    if out.is_dir() and any(out.iterdir()):
        if not manifest.is_file():
            raise RunDirectoryError(
                f"--out {str(out)!r} is not empty and holds no routelab report ({MANIFEST}); "
                "choose a new folder"
            )
        try:
            previous = json.loads(manifest.read_text())
        except (OSError, ValueError) as err:
            raise RunDirectoryError(f"cannot read {manifest}: {err}") from None
        if previous.get("fingerprint") != fingerprint and not overwrite:
            old = previous.get("fingerprint", {})
            raise RunDirectoryError(
                f"--out {str(out)!r} holds a different run ({_describe(old)}); choose another "
                "folder or pass --overwrite to replace it"
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise RunDirectoryError(f"--out {str(out)!r} is not writable: {err.strerror}") from None
    return out


def _describe(fingerprint: Mapping[str, Any]) -> str:
    jobs = fingerprint.get("jobs", [])
    routers = sorted({j["router"] for j in jobs})
    datasets = sorted({j["dataset"] for j in jobs})
    steps = fingerprint.get("settings", {}).get("steps")
    shown = ", ".join(routers[:4]) + (", ..." if len(routers) > 4 else "")
    return f"{fingerprint.get('kind', '?')}: {len(routers)} routers ({shown}) on {'+'.join(datasets)}, {steps} steps"


def _clear_previous_run(out: Path) -> None:
    manifest = out / MANIFEST
    if not manifest.is_file():
        return
    for name in json.loads(manifest.read_text()).get("files", []):
        path = out / name
        if path.is_file() and path.resolve().parent == out.resolve():
            path.unlink()
    manifest.unlink()


def _write_run(out: Path, fingerprint: dict[str, Any], files: dict[str, str | bytes]) -> None:
    """Replace the previous run's files by ``files`` (name -> text); plots already
    written are listed in ``files`` with value b"" (kept as they are)."""
    for name, content in files.items():
        if isinstance(content, str):
            (out / name).write_text(content)
    (out / MANIFEST).write_text(
        json.dumps({"fingerprint": fingerprint, "files": sorted(files)}, indent=1) + "\n"
    )


def noise_floor(result: RunResult, num_experts: int) -> float:
    """The per-step CV(load) that sampling noise alone gives a perfectly balanced router
    with this row's entries per step N: ``sqrt((E - 1) / N)``, the root-mean-square CV of
    a multinomial load of N entries over E equally likely experts."""
    window = max(1, len(result.chosen_cv_history) - len(result.chosen_cv_history) // 2)
    per_step = result.chosen.num_entries / window
    return math.sqrt((num_experts - 1) / per_step) if per_step > 0 else 0.0


def _write_plots(out: Path, results: Sequence[RunResult], settings: CompareSettings) -> list[str]:
    name, unit, label_names = results[0].dataset, results[0].unit, results[0].label_names
    files = []
    loads = {r.router: r.executed.load for r in results}
    files.append(
        plots.plot_load(
            loads,
            out / f"{name}_load.png",
            title=f"{name}: executed load per expert, last half of training",
        )
    )
    files.append(
        plots.plot_cv_panels(
            {
                r.router: {"chosen": r.chosen_cv_history, "executed": r.cv_history}
                for r in results
                if not r.dense
            }
            or {r.router: {"executed": r.cv_history} for r in results},
            out / f"{name}_cv_load.png",
            window_start=settings.steps // 2,
            floors={r.router: noise_floor(r, settings.num_experts) for r in results if not r.dense},
            title=f"{name}: CV(load) per training step (thin) and its moving average (thick)",
        )
    )
    files.append(
        plots.plot_heatmap_grid(
            {f"{r.router} (I={r.mutual_information:.2f})": r.table for r in results},
            out / f"{name}_experts_x_labels.png",
            title=f"{name}: expert x label on held-out {unit}s (rows: share of each expert's entries)",
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
    name_best, _ = detail_choice([r.to_dict() for r in results])
    best = next(r for r in results if r.router == name_best)
    files.append(
        plots.plot_heatmap(
            best.table,
            out / f"{name}_detail_experts_x_labels.png",
            title=f"{name} / {best.router}: expert x label (I = {best.mutual_information:.3f})",
            xticklabels=label_names,
        )
    )
    if best.coactivation is not None:
        files.append(
            plots.plot_coactivation(
                best.coactivation,
                out / f"{name}_detail_coactivation.png",
                title=f"{name} / {best.router}: layer-1 x layer-2 co-activation",
            )
        )
    return [str(Path(f).relative_to(out)) for f in files]


# ---------------------------------------------------------------------- compare
def compare(
    out: str | Path,
    *,
    routers: Sequence[str] | None = None,
    datasets: Sequence[str] = DATASETS,
    settings: CompareSettings | None = None,
    workers: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, list[RunResult]]:
    """Train and measure every row on every data set; write the report into ``out``.

    ``workers``: processes (default: the CPU cores available). Returns ``{dataset:
    [RunResult per row]}``. Files: ``report.md``, ``metrics.json``, the PNG plots listed
    in ``metrics.json["plots"]`` and ``run.json``. See the module docstring for
    ``overwrite``.
    """
    settings = (settings or CompareSettings()).validate()
    rows = resolve_routers(list(routers) if routers is not None else None)
    for name in datasets:
        if name not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    jobs = plan_jobs(rows, datasets)
    if not jobs:
        raise ValueError(f"none of the rows {[r.name for r in rows]} runs on {list(datasets)}")
    workers = default_workers() if workers is None else require_int("workers", workers, minimum=1)
    fingerprint = run_fingerprint("compare", settings, jobs)
    out = check_run_directory(out, fingerprint, overwrite)
    if log is not None:
        log(
            f"{len(jobs)} runs of {settings.steps} steps on {min(workers, len(jobs))} worker(s): "
            f"about {estimate_seconds(jobs, settings, workers):.0f} s on a quiet machine"
        )
    start, own_start, children_start = time.perf_counter(), *_cpu_seconds()
    flat = run_jobs(jobs, settings, workers=workers, progress=progress)
    wall = time.perf_counter() - start
    own, children = _cpu_seconds()
    worker_cpu = children - children_start if workers > 1 else own - own_start
    results: dict[str, list[RunResult]] = {name: [] for name in datasets}
    for result in flat:
        results[result.dataset].append(result)
    results = {name: rs for name, rs in results.items() if rs}
    _clear_previous_run(out)
    plot_files = {name: _write_plots(out, rs, settings) for name, rs in results.items()}
    used = min(workers, len(jobs))
    main_cpu = _cpu_seconds()[0] - own_start - (worker_cpu if used == 1 else 0.0)
    metrics = {
        "settings": settings.to_dict(),
        "workers": used,
        "wall_seconds": wall,
        "total_wall_seconds": time.perf_counter() - start,
        "cpu_seconds": sum(r.cpu_seconds for r in flat),
        "cpu_seconds_with_start_up": worker_cpu,
        "main_cpu_seconds": main_cpu,
        "quiet_machine_seconds": main_cpu + worker_cpu / used,
        "rows": {
            row.name: {
                "configuration": row.configuration(),
                "description": row.description,
                "datasets": list(row.datasets),
            }
            for row in rows
        },
        "datasets": {
            name: {"info": rs[0].dataset_info, "results": [r.to_dict() for r in rs]}
            for name, rs in results.items()
        },
        "plots": plot_files,
    }
    metrics = _rounded(metrics)  # the report is rendered from exactly what metrics.json holds
    report = report_markdown(metrics)
    files: dict[str, str | bytes] = {p: b"" for ps in plot_files.values() for p in ps}
    files["metrics.json"] = json.dumps(metrics, separators=(",", ":")) + "\n"
    files["report.md"] = report
    _write_run(out, fingerprint, files)
    if log is not None:
        log(f"wrote {out / 'report.md'}, metrics.json and {len(files) - 2} plots in {wall:.0f} s")
    return results


# ---------------------------------------------------------------------- sweep
SWEEP_QUANTITIES = {
    "metric": "task metric",
    "cv_load_chosen": "CV(load) chosen",
    "cv_load": "CV(load) executed",
    "max_over_mean": "max/mean executed",
    "dropped_pct": "dropped %",
    "mutual_information": "I(expert; label)",
}


def sweep(
    out: str | Path,
    *,
    router: str = "noisy-top2",
    grid: Mapping[str, Sequence[float]] | None = None,
    dataset: str = "digits",
    settings: CompareSettings | None = None,
    workers: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Train ``router`` for every cell of ``grid`` (option -> values; one or two options,
    any of ``REGISTRY[router].sweepable()``).

    Writes ``sweep.md`` (one table per measured quantity: rows the first option,
    columns the second), ``sweep.json``, ``sweep.png`` and ``run.json``; returns the cells.
    """
    settings = (settings or CompareSettings()).validate()
    (row,) = resolve_routers([router])
    if dataset not in row.datasets:
        raise ValueError(f"router {router!r} does not run on {dataset!r} (runs on {row.datasets})")
    grid = {k: list(v) for k, v in (grid or default_grid(row)).items()}
    if not 1 <= len(grid) <= 2:
        raise ValueError(f"grid must vary one or two options, got {list(grid)}")
    for name, values in grid.items():
        if not values:
            raise ValueError(f"grid option {name!r} has no values")
        for value in values:
            row.with_options(**{name: value})  # unknown names / bad kinds raise here
    keys = list(grid)
    rows_key, cols_key = keys[0], keys[1] if len(keys) == 2 else None
    col_values = list(grid[cols_key]) if cols_key else [None]
    cells_options, jobs = sweep_jobs(row, grid, dataset)
    workers = default_workers() if workers is None else require_int("workers", workers, minimum=1)
    fingerprint = {**run_fingerprint("sweep", settings, jobs), "grid": grid}
    out = check_run_directory(out, fingerprint, overwrite)
    results = run_jobs(jobs, settings, workers=workers, progress=progress)
    cells: list[dict[str, Any]] = [
        {"options": opts, **_cell(r)} for opts, r in zip(cells_options, results)
    ]
    _clear_previous_run(out)
    metric_name, unit = results[0].metric_name, results[0].unit
    plots.plot_sweep(
        grid,
        cells,
        out / "sweep.png",
        quantities={k: v.replace("task metric", metric_name) for k, v in SWEEP_QUANTITIES.items()},
        title=f"sweep: {router} on {dataset}",
    )
    lines = [
        f"# routelab sweep: {router} on {dataset}",
        "",
        f"`{row.configuration()}`, varying {', '.join(keys)}; {settings.steps} steps of "
        f"{settings.batch_size} {unit}s per cell. Columns as in `routelab compare`'s "
        "report (chosen: the router's choice; executed: after the policies; last half of "
        "training).",
        "",
        "![sweep](sweep.png)",
        "",
    ]
    titles = dict(SWEEP_QUANTITIES, metric=f"task metric ({metric_name})")
    for quantity, title in titles.items():
        lines += [f"## {title}", ""]
        head = [f"{rows_key} \\ {cols_key}" if cols_key else rows_key]
        head += [str(b) for b in col_values] if cols_key else [title]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join("---" for _ in head) + "|")
        for a in grid[rows_key]:
            line = [str(a)]
            for b in col_values:
                cell = next(
                    c
                    for c in cells
                    if c["options"][rows_key] == a
                    and (cols_key is None or c["options"][cols_key] == b)
                )
                line.append(f"{cell[quantity]:.3f}")
            lines.append("| " + " | ".join(line) + " |")
        lines.append("")
    payload = {"router": router, "dataset": dataset, "grid": grid, "cells": cells}
    _write_run(
        out,
        fingerprint,
        {
            "sweep.json": json.dumps(payload, indent=1) + "\n",
            "sweep.md": "\n".join(lines),
            "sweep.png": b"",
        },
    )
    return cells


def sweep_jobs(
    router: CompareRow | str, grid: Mapping[str, Sequence[float]], dataset: str
) -> tuple[list[dict[str, Any]], list[Job]]:
    """The cells of ``grid`` (every combination, first option slowest) and their jobs."""
    keys = list(grid)
    cells: list[dict[str, Any]] = [{}]
    for key in keys:
        cells = [{**cell, key: value} for cell in cells for value in grid[key]]
    return cells, [Job(dataset, router, tuple(cell.items())) for cell in cells]


def default_grid(row: CompareRow) -> dict[str, list[float]]:
    """The grid ``routelab sweep`` uses without ``--grid`` (noisy top-2's loss weights)."""
    if row.name.startswith("noisy-top2"):
        return {"importance_weight": [0.0, 0.01, 0.1, 1.0], "load_weight": [0.0, 0.01, 0.1, 1.0]}
    raise ValueError(
        f"give --grid OPTION=v1,v2,... for {row.name!r}; its options: " + ", ".join(row.sweepable())
    )


def _cell(result: RunResult) -> dict[str, float]:
    s = result.executed
    return {
        "cv_load_chosen": result.chosen.cv_load,
        "cv_load": s.cv_load,
        "cv_importance": s.cv_importance,
        "max_over_mean": s.max_over_mean,
        "dropped_pct": 100 * s.dropped_fraction,
        "metric": result.metric,
        "mutual_information": result.mutual_information,
        "shuffled_mean": result.shuffled_mean,
    }
