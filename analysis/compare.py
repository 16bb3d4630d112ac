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
- the task metric on the held-out split, wall time per training step and the CPU time
  of the whole job.

Jobs run in worker processes (one torch thread each; ``workers`` of them at a time):
the models are small, so one process per core is what makes the run fast.
:func:`compare` writes ``report.md``, ``metrics.json``, PNG plots and ``run.json`` (the
run's fingerprint and its files) into a folder it owns: a folder holding a different
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
from analysis.registry import REGISTRY, CompareRow, resolve_routers
from analysis.specialisation import routing_stability, shuffled_levels
from routelab._validate import require_float, require_int
from routelab.balancing import update_balancing

__all__ = [
    "CompareSettings",
    "Job",
    "RunDirectoryError",
    "RunResult",
    "compare",
    "default_workers",
    "estimate_seconds",
    "plan_jobs",
    "results_table",
    "run_jobs",
    "sweep",
    "train_and_measure",
]

# Measured CPU seconds per training step (d = 32, E = 8, batch 256, one torch thread, a
# quiet 2-core machine), for the estimate printed before a run.
SECONDS_PER_STEP = {"tokens": 0.0085, "digits": 0.0080}
SECONDS_PER_JOB = 0.6  # model set-up, evaluation and measurement
SECONDS_PER_WORKER = 4.0  # process start and data set preparation


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
    train_rec = RoutingRecorder(model, num_labels=dataset.num_labels, mode="train")
    probe = dataset.evaluation[0]
    mid_routing = None
    elapsed = 0.0
    steps = len(dataset.train_batches)
    model.train()
    for step, batch in enumerate(dataset.train_batches):
        start = time.perf_counter()
        train_rec.set_labels(batch.labels)
        logits, routings = model(batch.inputs, batch.token_ids)
        loss = task_loss(dataset, logits, batch.targets)
        loss = loss + sum((r.aux_loss for r in routings), torch.zeros(()))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        update_balancing(model)
        elapsed += time.perf_counter() - start
        train_rec.step()
        if step == steps // 2 - 1:
            mid_routing = _probe_routing(model, probe)
        if on_step is not None:
            on_step(step + 1)
    train_rec.remove()
    end_routing = _probe_routing(model, probe)
    stability = routing_stability(mid_routing, end_routing) if mid_routing is not None else 0.0

    eval_rec = RoutingRecorder(model, num_labels=dataset.num_labels, mode="eval")
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
        ms_per_step=1000.0 * elapsed / steps,
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
    """One training run: a data set, a row name and option overrides (picklable)."""

    dataset: str
    router: str
    options: tuple[tuple[str, Any], ...] = ()

    def row(self) -> CompareRow:
        row = REGISTRY[self.router]
        return row.with_options(**dict(self.options)) if self.options else row

    @property
    def label(self) -> str:
        extra = " ".join(f"{k}={v}" for k, v in self.options)
        return f"{self.dataset}/{self.router}" + (f" {extra}" if extra else "")


def plan_jobs(rows: Sequence[CompareRow], datasets: Sequence[str]) -> list[Job]:
    """One job per (data set, row) where the row runs on that data set."""
    return [Job(name, row.name) for name in datasets for row in rows if name in row.datasets]


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
    return cpu / used + SECONDS_PER_WORKER


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
        self.bar.set_description(f"{finished}/{len(self.jobs)} runs | " + ", ".join(running[:3]))

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


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its finished child processes (the workers)."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


# ---------------------------------------------------------------------- run folders
class RunDirectoryError(ValueError):
    """The output folder holds another run's files (or cannot be written)."""


MANIFEST = "run.json"


def _fingerprint(kind: str, settings: CompareSettings, jobs: Sequence[Job]) -> dict[str, Any]:
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


# ---------------------------------------------------------------------- tables
def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _metric_digits(value: float) -> int:
    return 3 if value < 100 else 1


def chance_margin(row: Mapping[str, Any]) -> bool:
    """Whether I(expert; label) is within two standard deviations of the shuffled mean."""
    return row["mutual_information"] <= row["shuffled_mean"] + 2 * row["shuffled_std"]


TABLE_HEADER = (
    "router",
    "{metric}",
    "CV(load) chosen",
    "CV(load) executed",
    "max/mean executed",
    "dropped %",
    "no expert %",
    "CV(importance)",
    "experts/{unit}",
    "I(expert; label)",
    "chance I (± sd)",
    "changed %",
    "ms/step",
)


def results_table(rows: Sequence[Mapping[str, Any] | RunResult]) -> str:
    """The markdown table of one data set's results (``RunResult`` s or their
    ``to_dict()`` form, as in ``metrics.json``), one line per row."""
    dicts = [r.to_dict() if isinstance(r, RunResult) else r for r in rows]
    if not dicts:
        return ""
    first = dicts[0]
    header = [c.format(metric=first["metric_name"], unit=first["unit"]) for c in TABLE_HEADER]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in dicts:
        chosen, executed = r["chosen"], r["executed"]
        dense = r["dense"]
        per_item = executed["num_entries"] / executed["num_tokens"] if executed["num_tokens"] else 0
        mark = " (≈ chance)" if chance_margin(r) else ""
        cells = [
            r["router"],
            _fmt(r["metric"], _metric_digits(r["metric"])),
            _fmt(None if dense else chosen["cv_load"]),
            _fmt(None if dense else executed["cv_load"]),
            _fmt(None if dense else executed["max_over_mean"], 2),
            _fmt(100 * executed["dropped_fraction"] if r["has_policies"] else None, 1),
            _fmt(100 * executed["unrouted_fraction"], 1),
            _fmt(executed["cv_importance"]),
            _fmt(per_item, 2),
            _fmt(r["mutual_information"]) + mark,
            f"{r['shuffled_mean']:.3f} ± {r['shuffled_std']:.3f}",
            _fmt(None if dense else 100 * r["stability_changed_fraction"], 1),
            _fmt(r["ms_per_step"], 1),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def configuration_table(rows: Mapping[str, Mapping[str, Any]], datasets: Sequence[str]) -> str:
    """One line per row (``metrics.json["rows"]``): its configuration and where it runs."""
    lines = [
        "| router | configuration | runs on | what it is |",
        "|---|---|---|---|",
    ]
    for name, row in rows.items():
        where = ", ".join(d for d in datasets if d in row["datasets"]) or "(none of these)"
        lines.append(f"| {name} | `{row['configuration']}` | {where} | {row['description']} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------- plots
def noise_floor(result: RunResult, num_experts: int) -> float:
    """The per-step CV(load) that sampling noise alone gives a perfectly balanced router
    with this row's entries per step N: ``sqrt((E - 1) / N)`` (the CV of a multinomial
    load of N entries over E equally likely experts)."""
    window = max(1, len(result.chosen_cv_history) - len(result.chosen_cv_history) // 2)
    per_step = result.chosen.num_entries / window
    return math.sqrt((num_experts - 1) / per_step) if per_step > 0 else 0.0


def detail_choice(rows: Sequence[Mapping[str, Any]]) -> tuple[str, str]:
    """The row that gets the detail plots (``metrics.json`` rows) and why, in a sentence."""
    sparse = [r for r in rows if not r["dense"]] or list(rows)
    few_drops = [r for r in sparse if r["executed"]["dropped_fraction"] < 0.05] or sparse
    best = max(few_drops, key=lambda r: r["mutual_information"] - r["shuffled_mean"])
    why = (
        f"Detail plots: {best['router']}, the row with the largest I(expert; label) above its "
        "chance level among the sparse rows that drop under 5% of their entries (a row that "
        "drops many entries can look specialised by what it drops)."
    )
    return best["router"], why


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
    fingerprint = _fingerprint("compare", settings, jobs)
    out = check_run_directory(out, fingerprint, overwrite)
    if log is not None:
        log(
            f"{len(jobs)} runs of {settings.steps} steps on {min(workers, len(jobs))} worker(s): "
            f"about {estimate_seconds(jobs, settings, workers):.0f} s on a quiet machine"
        )
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    flat = run_jobs(jobs, settings, workers=workers, progress=progress)
    wall, cpu_total = time.perf_counter() - start, _cpu_seconds() - cpu_start
    results: dict[str, list[RunResult]] = {name: [] for name in datasets}
    for result in flat:
        results[result.dataset].append(result)
    results = {name: rs for name, rs in results.items() if rs}
    _clear_previous_run(out)
    plot_files = {name: _write_plots(out, rs, settings) for name, rs in results.items()}
    metrics = {
        "settings": settings.to_dict(),
        "workers": min(workers, len(jobs)),
        "wall_seconds": wall,
        "cpu_seconds": sum(r.cpu_seconds for r in flat),
        "cpu_seconds_with_start_up": cpu_total,
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
    report = report_markdown(metrics)
    files: dict[str, str | bytes] = {p: b"" for ps in plot_files.values() for p in ps}
    files["metrics.json"] = json.dumps(metrics, indent=1) + "\n"
    files["report.md"] = report
    _write_run(out, fingerprint, files)
    if log is not None:
        log(f"wrote {out / 'report.md'}, metrics.json and {len(files) - 2} plots in {wall:.0f} s")
    return results


# ---------------------------------------------------------------------- the report
LABELS = {
    "tokens": "the frequency bucket of the current token (4 buckets of equal stream mass; "
    "bucket 0 = the most frequent ids)",
    "digits": "the digit class of the image (10 classes)",
}


def _summary(name: str, rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """A few sentences on what this data set's results show (computed from them)."""
    better = max if rows[0]["metric_name"] == "test acc" else min
    metric = rows[0]["metric_name"]
    unit = rows[0]["unit"]
    best = better(rows, key=lambda r: r["metric"])
    worst = (min if better is max else max)(rows, key=lambda r: r["metric"])
    out = [
        f"- Task: {best['router']} has the best {metric} ({best['metric']:.3f}), "
        f"{worst['router']} the worst ({worst['metric']:.3f})."
    ]
    sparse = [r for r in rows if not r["dense"]]
    if sparse:
        even = min(sparse, key=lambda r: r["executed"]["cv_load"])
        uneven = max(sparse, key=lambda r: r["executed"]["cv_load"])
        out.append(
            f"- Balance (executed, last half): most even {even['router']} "
            f"(CV {even['executed']['cv_load']:.3f}), least even {uneven['router']} "
            f"(CV {uneven['executed']['cv_load']:.3f})."
        )
        changed = [r for r in sparse if r["has_policies"]]
        if changed:
            gap = max(changed, key=lambda r: r["chosen"]["cv_load"] - r["executed"]["cv_load"])
            dropped = gap["executed"]["dropped_fraction"]
            out.append(
                f"- Policies: {gap['router']}'s policy moves CV(load) the most, from "
                f"{gap['chosen']['cv_load']:.3f} (router's choice) to "
                f"{gap['executed']['cv_load']:.3f} (executed)"
                + (
                    f", dropping {100 * dropped:.1f}% of the entries."
                    if dropped
                    else ", dropping nothing."
                )
            )
    spec = max(rows, key=lambda r: r["mutual_information"] - r["shuffled_mean"])
    at_chance = [r["router"] for r in rows if chance_margin(r)]
    out.append(
        f"- Specialisation on held-out {unit}s: {spec['router']} has the largest "
        f"I(expert; label), {spec['mutual_information']:.3f} nats against a chance level of "
        f"{spec['shuffled_mean']:.3f}; "
        + (
            f"at chance level (within 2 sd): {', '.join(at_chance)}."
            if at_chance
            else "every row is above its chance level."
        )
    )
    hashed = [r for r in rows if r["router"] in ("hash-clustered", "hash-dispersed")]
    learned = [r for r in rows if not r["router"].startswith("hash-")]
    if hashed and learned:
        top = better(learned, key=lambda r: r["metric"])
        parts = ", ".join(f"{r['router']} {r['metric']:.3f}" for r in hashed)
        out.append(
            f"- Information: the clustered / dispersed hash tables are fitted before training "
            f"on the bigram counts of the training tokens, which the learned routers only see "
            f"through training ({parts}; best learned router {top['router']} "
            f"{top['metric']:.3f}): compare them with that advantage in mind."
        )
    return out


COLUMN_NOTES = """\
Columns. chosen: the router's own choice, before any policy; executed: what the experts
ran, after every policy (capacity, pausing, selection bias); both are training-mode
routings over the last half of the training steps, of the first MoE layer. CV(load):
std / mean of the entries per expert (Shazeer et al. 2017 use its square). max/mean:
the busiest expert's load over the mean. dropped %: entries a policy removed (n/a: no
policy follows the router); no expert %: items left with no expert at all (dropped
tokens, or tokens no expert picked under expert choice). CV(importance): of the summed
gate values per expert. experts/item: executed entries per item (the compute per item, in
experts). I(expert; label): mutual information in nats between an entry's expert and its
item's label on the held-out split, eval mode; chance I: the same with the labels
shuffled over the items, mean ± sd over the shuffles ("≈ chance": I within 2 sd of it).
changed %: held-out items of one batch whose set of experts changed between the middle
and the end of training (routing stability; 0 = stable). ms/step: wall time of a
training step in its worker. n/a: the metric does not apply (a dense router gives every
item every expert, so its load is even by construction).
"""


def report_markdown(metrics: Mapping[str, Any]) -> str:
    """The report of a compare run, from its ``metrics.json`` content alone."""
    s = metrics["settings"]
    datasets = list(metrics["datasets"])
    lines = [
        "# routelab compare",
        "",
        f"Each row trains one small model per data set (d_model = {s['d_model']}, E = "
        f"{s['num_experts']} experts, {s['steps']} steps of {s['batch_size']} items, Adam lr "
        f"{s['lr']}, seed {s['seed']}{', quick data' if s['quick'] else ''}), the same "
        f"batches for every row. {sum(len(d['results']) for d in metrics['datasets'].values())} "
        f"runs on {metrics['workers']} worker process(es) took {metrics['wall_seconds']:.0f} s "
        f"of wall time: {metrics['cpu_seconds']:.0f} s of CPU time in the runs, "
        f"{metrics['cpu_seconds_with_start_up']:.0f} s with the workers' start-up and data "
        "preparation.",
        "",
        "## Rows",
        "",
        configuration_table(metrics["rows"], datasets),
        "",
        "Hash rows run on tokens only: a digit image's only id is its index in the data set, "
        "which tells nothing about a held-out image (every table would be a random one).",
        "",
        COLUMN_NOTES,
    ]
    for name, data in metrics["datasets"].items():
        results = data["results"]
        info = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in data["info"].items())
        plot_files = metrics["plots"].get(name, [])
        lines += [
            f"## {name}",
            "",
            f"Items: {results[0]['unit']}s ({info}). Task metric: {results[0]['metric_name']}. "
            f"Label for specialisation: {LABELS.get(name, 'the item label')}.",
            "",
            "What this run shows:",
            "",
            *_summary(name, results),
            "",
            results_table(results),
            "",
            f"![load]({name}_load.png)",
            "",
            f"Per-step CV(load) ({name}_cv_load.png): one panel per row, the router's choice "
            "and the executed routing; the dashed line is the CV that sampling noise alone gives "
            "a perfectly balanced router at this batch size; the shaded half is the window of "
            "the table's columns (which pool the whole half, so they sit below the per-step "
            "values).",
            "",
            f"![cv]({name}_cv_load.png)",
            "",
            f"![experts x labels]({name}_experts_x_labels.png)",
            "",
            detail_choice(results)[1],
            "",
        ]
        lines += [f"![{p}]({p})" for p in plot_files if "detail" in p or "coactivation" in p]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


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
    grid = {k: list(v) for k, v in (grid or _default_grid(row)).items()}
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
    cells_options = []
    for a in grid[rows_key]:
        for b in col_values:
            cells_options.append({rows_key: a} if cols_key is None else {rows_key: a, cols_key: b})
    jobs = [Job(dataset, router, tuple(opts.items())) for opts in cells_options]
    workers = default_workers() if workers is None else require_int("workers", workers, minimum=1)
    fingerprint = {**_fingerprint("sweep", settings, jobs), "grid": grid}
    out = check_run_directory(out, fingerprint, overwrite)
    results = run_jobs(jobs, settings, workers=workers, progress=progress)
    cells = [{"options": opts, **_cell(r)} for opts, r in zip(cells_options, results)]
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


def _default_grid(row: CompareRow) -> dict[str, list[float]]:
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


# ---------------------------------------------------------------------- README tables
README_ROWS = (
    "top2",
    "noisy-top2",
    "noisy-top2-noloss",
    "switch-cf1.0",
    "switch-cf2.0",
    "expert-choice",
    "base",
    "top2-lossfree",
    "hash-balanced",
    "hash-clustered",
)
README_BEGIN = "<!-- begin compare tables: generated from docs/report/metrics.json -->"
README_END = "<!-- end compare tables -->"


def readme_block(metrics: Mapping[str, Any]) -> str:
    """The README's excerpt of a committed report: per data set, the ``README_ROWS`` rows
    of its table, with the run's size and time (between the README markers)."""
    s = metrics["settings"]
    lines = [
        README_BEGIN,
        "<!-- regenerate: routelab compare --out docs/report --overwrite, then "
        "python -m analysis.compare readme docs/report -->",
        "",
        f"From the committed report [docs/report/report.md](docs/report/report.md) (d = "
        f"{s['d_model']}, E = {s['num_experts']}, {s['steps']} steps of {s['batch_size']}, seed "
        f"{s['seed']}; {sum(len(d['results']) for d in metrics['datasets'].values())} runs on "
        f"{metrics['workers']} worker processes in {metrics['wall_seconds']:.0f} s). "
        "Columns are explained in the report.",
    ]
    for name, data in metrics["datasets"].items():
        rows = [r for r in data["results"] if r["router"] in README_ROWS]
        lines += [
            "",
            f"{name} ({len(rows)} of the report's {len(data['results'])} rows):",
            "",
            results_table(rows),
        ]
    lines += ["", README_END]
    return "\n".join(lines)


def update_readme(readme: str | Path, report: str | Path) -> bool:
    """Rewrite the README's generated block from ``report/metrics.json``; True if changed."""
    readme, metrics_path = Path(readme), Path(report) / "metrics.json"
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"{readme} has no {README_BEGIN!r} ... {README_END!r} block")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    new = head + readme_block(json.loads(metrics_path.read_text())) + tail
    readme.write_text(new)
    return new != text


if __name__ == "__main__":  # python -m analysis.compare readme REPORT_DIR [README]
    import sys

    if len(sys.argv) not in (3, 4) or sys.argv[1] != "readme":
        sys.exit("usage: python -m analysis.compare readme REPORT_DIR [README.md]")
    changed = update_readme(sys.argv[3] if len(sys.argv) == 4 else "README.md", sys.argv[2])
    print("README updated" if changed else "README already in step")
