"""The compare report, rendered from ``metrics.json`` alone: the results table, the row
configurations, a summary computed from the results, the column notes, and the README's
excerpt of a committed report (``python -m analysis.report REPORT_DIR`` re-renders both).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "README_BEGIN",
    "README_END",
    "README_ROWS",
    "chance_margin",
    "configuration_table",
    "detail_choice",
    "readme_block",
    "refresh",
    "report_markdown",
    "results_table",
    "update_readme",
]


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
    "CPU ms/step",
)


def _per_item(stats: Mapping[str, Any]) -> float:
    """Executed entries per item (``LoadStats.experts_per_token_mean``)."""
    if "experts_per_token_mean" in stats:
        return float(stats["experts_per_token_mean"])
    return stats["num_entries"] / stats["num_tokens"] if stats["num_tokens"] else 0.0


def _ffn_per_item(stats: Mapping[str, Any]) -> float:
    """Entries per item on experts that spend FFN compute (``ffn_entries_per_token``)."""
    return float(stats.get("ffn_entries_per_token", _per_item(stats)))


def results_table(rows: Sequence[Any]) -> str:
    """The markdown table of one data set's results (``RunResult`` s or their
    ``to_dict()`` form, as in ``metrics.json``), one line per row."""
    dicts = [r if isinstance(r, Mapping) else r.to_dict() for r in rows]
    if not dicts:
        return ""
    first = dicts[0]
    header = [c.format(metric=first["metric_name"], unit=first["unit"]) for c in TABLE_HEADER]
    free = any(_ffn_per_item(r["executed"]) != _per_item(r["executed"]) for r in dicts)
    if free:  # some row has experts without FFN compute (null experts): show the compute
        header.insert(TABLE_HEADER.index("experts/{unit}") + 1, f"FFN experts/{first['unit']}")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in dicts:
        chosen, executed = r["chosen"], r["executed"]
        dense = r["dense"]
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
            _fmt(_per_item(executed), 2),
            *([_fmt(_ffn_per_item(executed), 2)] if free else []),
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
and the end of training (routing stability; 0 = stable). ms/step: CPU time of a
training step in its worker (one torch thread; other load on the machine changes it
little, unlike the wall time, which metrics.json also holds). n/a: the metric does not apply (a dense router gives every
item every expert, so its load is even by construction).
"""


def _timing(metrics: Mapping[str, Any]) -> str:
    """The run's time: wall time here, CPU time, and what that means on a quiet machine."""
    text = (
        f"Wall time {metrics['total_wall_seconds']:.0f} s here (runs {metrics['wall_seconds']:.0f}"
        f" s); CPU time {metrics['cpu_seconds']:.0f} s in the runs, "
        f"{metrics['cpu_seconds_with_start_up']:.0f} s in the workers with their start-up and "
        f"data preparation, {metrics['main_cpu_seconds']:.0f} s in the main process (plots, "
        "report)"
    )
    return (
        text + f": about {metrics['quiet_machine_seconds']:.0f} s of wall time on a quiet "
        f"machine with {metrics['workers']} free cores (main CPU + worker CPU / workers), "
        "plus about 3 s of imports."
    )


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
        f"runs on {metrics['workers']} worker process(es). {_timing(metrics)}",
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
        "python -m analysis.report docs/report -->",
        "",
        f"From the committed report [docs/report/report.md](docs/report/report.md) (d = "
        f"{s['d_model']}, E = {s['num_experts']}, {s['steps']} steps of {s['batch_size']}, seed "
        f"{s['seed']}; {sum(len(d['results']) for d in metrics['datasets'].values())} runs on "
        f"{metrics['workers']} worker processes). {_timing(metrics)} Columns are explained in "
        "the report.",
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


def refresh(report: str | Path, readme: str | Path = "README.md") -> None:
    """Re-render ``report/report.md`` and the README block from ``report/metrics.json``
    (both are functions of it alone: no training)."""
    report = Path(report)
    metrics = json.loads((report / "metrics.json").read_text())
    (report / "report.md").write_text(report_markdown(metrics))
    update_readme(readme, report)


if __name__ == "__main__":  # python -m analysis.report REPORT_DIR [README.md]
    import sys

    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python -m analysis.report REPORT_DIR [README.md]")
    refresh(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else "README.md")
    print(f"rendered {sys.argv[1]}/report.md and the README's compare tables")
