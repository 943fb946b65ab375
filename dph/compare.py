"""Side-by-side comparison of the runs of a multirun (e.g. the paper's methods x seeds grid).

``dph-compare <multirun dir> [--out DIR]`` reads every job directory of a multirun (a folder with
``.hydra/overrides.yaml``) and groups the jobs by their overrides, minus ``seed`` and minus the
overrides that every job shares: one group per method, its seeds pooled. It writes into the
multirun directory (and ``sweep=methods_grid`` does so by itself when the grid ends, through
``CompareCallback``):

- ``comparison.csv``: one row per method: its jobs (finished / all), then for every final metric
  (the run's ``summary.json``: ``eval/<split>/...``, ``train/reward_mean``, ``train/entropy``) the
  mean and the standard deviation over seeds (``<metric>`` and ``<metric>:std``), and the same eval
  metrics of the initial policy (``initial/<metric>``, the step-0 evaluation);
- ``comparison.png``: per eval split, Pass@k versus k (log2 axis) of each method after training
  (mean over seeds, the band spans min to max) and of the initial policy (dashed).

A job without ``summary.json`` (failed or still running) is counted but not averaged. Files are
written to a temporary name and moved into place, so the command can run while the grid is running.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import re
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dph.plots import PASSK_KEY, load_metrics, save_figure

log = logging.getLogger(__name__)

FINAL_METRICS = re.compile(r"^(eval/.+|train/reward_mean|train/entropy)$")
IGNORED_OVERRIDES = ("seed=", "hydra.", "++trial=", "trial=")


@dataclass
class Job:
    """One job directory of a multirun: its overrides, final metrics and step-0 evaluation."""

    path: Path
    overrides: list[str]
    final: dict[str, float] | None = None  # None: no summary.json (failed or unfinished)
    initial: dict[str, float] = field(default_factory=dict)


def find_jobs(sweep_dir: Path) -> list[Job]:
    """Every job directory directly under ``sweep_dir``, in job-number order."""
    jobs = []
    for overrides_file in sweep_dir.glob("*/.hydra/overrides.yaml"):
        job_dir = overrides_file.parent.parent
        overrides = [str(o) for o in yaml.safe_load(overrides_file.read_text()) or []]
        job = Job(job_dir, overrides)
        summary = job_dir / "summary.json"
        if summary.is_file():
            job.final = {k: float(v) for k, v in json.loads(summary.read_text()).items()
                         if FINAL_METRICS.match(k) and isinstance(v, (int, float))}
            job.initial = _initial_eval(job_dir / "metrics.jsonl")
        jobs.append(job)
    return sorted(jobs, key=lambda j: (not j.path.name.isdigit(), int(j.path.name) if j.path.name.isdigit() else 0,
                                       j.path.name))


def _initial_eval(path: Path) -> dict[str, float]:
    """The eval metrics logged at step 0 (the initial policy), from metrics.jsonl."""
    if not path.is_file():
        return {}
    initial: dict[str, float] = {}
    for record in load_metrics(path):
        if record.get("train/step") == 0:
            initial.update({k: float(v) for k, v in record.items() if k.startswith("eval/") and isinstance(v, (int, float))})
    return initial


def method_labels(jobs: Sequence[Job]) -> list[str]:
    """A label per job: its overrides that not every job shares, without the seed (its method)."""
    def relevant(job: Job) -> list[str]:
        return [o for o in job.overrides if not o.startswith(IGNORED_OVERRIDES)]

    shared = set.intersection(*(set(relevant(j)) for j in jobs)) if jobs else set()
    labels = [" ".join(o for o in relevant(j) if o not in shared) for j in jobs]
    return [label or "(all jobs alike)" for label in labels]


def _mean_std(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def comparison_rows(jobs: Sequence[Job]) -> list[dict[str, Any]]:
    """One row per method (first-seen order): job counts, mean and std of each final metric over its
    finished jobs, and the mean initial eval metrics."""
    groups: dict[str, list[Job]] = {}
    for label, job in zip(method_labels(jobs), jobs, strict=True):
        groups.setdefault(label, []).append(job)
    rows = []
    for label, members in groups.items():
        done = [j for j in members if j.final is not None]
        row: dict[str, Any] = {"method": label, "jobs_finished": len(done), "jobs": len(members),
                               "job_dirs": " ".join(j.path.name for j in members)}
        for metric in sorted({m for j in done for m in j.final}):
            row[metric], row[f"{metric}:std"] = _mean_std([j.final[metric] for j in done if metric in j.final])
        for metric in sorted({m for j in done for m in j.initial}):
            row[f"initial/{metric}"] = _mean_std([j.initial[metric] for j in done if metric in j.initial])[0]
        rows.append(row)
    return rows


def comparison_csv(rows: Sequence[dict[str, Any]]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def plot_comparison(jobs: Sequence[Job], path: Path) -> Path | None:
    """Pass@k versus k per eval split: each method after training (mean, min-max band) and the
    initial policy (dashed, mean over all jobs). None when no job finished."""
    labels = method_labels(jobs)
    finished = [(label, job) for label, job in zip(labels, jobs, strict=True) if job.final is not None]
    splits: dict[str, set[int]] = {}
    for _, job in finished:
        for metric in job.final:
            match = PASSK_KEY.match(metric)
            if match:
                splits.setdefault(match["split"], set()).add(int(match["k"]))
    if not splits:
        return None
    methods = list(dict.fromkeys(label for label, _ in finished))
    width = max(6.0, 5.2 * len(splits))
    # The legend below the axes: as many columns as its longest entry allows (about 0.07 in a character).
    entry = 0.8 + 0.07 * max(len(f"{m} (n=00)") for m in [*methods, "initial policy"])
    columns = max(1, min(len(methods) + 1, int(width // entry)))
    figure = Figure(figsize=(width, 4.0 + 0.25 * math.ceil((len(methods) + 1) / columns)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(splits), squeeze=False)[0]
    for ax, (split, ks) in zip(axes, splits.items()):
        ks = sorted(ks)
        initial = [[j.initial.get(f"eval/{split}/pass@{k}", math.nan) for _, j in finished] for k in ks]
        ax.plot(ks, [_mean_std(v)[0] for v in initial], linestyle="--", color="0.3", marker=".", label="initial policy")
        for index, method in enumerate(methods):
            runs = [j for label, j in finished if label == method]
            values = [[j.final.get(f"eval/{split}/pass@{k}", math.nan) for j in runs] for k in ks]
            mean = [_mean_std(v)[0] for v in values]
            ax.plot(ks, mean, marker="o", markersize=3, color=f"C{index}", label=f"{method} (n={len(runs)})")
            if len(runs) > 1:
                ax.fill_between(ks, [min(v) for v in values], [max(v) for v in values], color=f"C{index}", alpha=0.15)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set(title=f"{split}: Pass@k vs k", xlabel="k (samples per prompt)", ylabel="Pass@k", ylim=(-0.02, 1.02))
    # One legend for every split, below the axes, where it hides no curve.
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=columns, fontsize="small", frameon=False)
    figure.suptitle("Methods side by side\nmean over seeds (band: min to max); dashed: the initial policy", fontsize="medium")
    return save_figure(figure, path)


def write_comparison(sweep_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write comparison.csv and comparison.png for the multirun in ``sweep_dir``; returns the paths."""
    sweep_dir = Path(sweep_dir)
    out_dir = Path(out_dir) if out_dir is not None else sweep_dir
    jobs = find_jobs(sweep_dir)
    if not jobs:
        raise FileNotFoundError(f"{sweep_dir}: no job directory (<job>/.hydra/overrides.yaml) found")
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "comparison.csv"
    tmp = csv_path.with_name(f".{csv_path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(comparison_csv(comparison_rows(jobs)), encoding="utf-8")
        os.replace(tmp, csv_path)
    finally:
        tmp.unlink(missing_ok=True)
    written = [csv_path]
    plot = plot_comparison(jobs, out_dir / "comparison.png")
    return written + ([plot] if plot is not None else [])


class CompareCallback(Callback):
    """Hydra callback: writes the comparison into the sweep directory when a multirun ends.

    Enable it in a sweep preset: ``hydra.callbacks.compare._target_: dph.compare.CompareCallback``.
    A failure here is logged, never raised: the runs themselves are safe in their directories.
    """

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            for path in write_comparison(sweep_dir):
                log.info("comparison: %s", path)
        except Exception:  # noqa: BLE001 - a report is a by-product; `dph-compare` rebuilds it
            log.warning("could not write the comparison in %s (rerun: dph-compare %s)", sweep_dir, sweep_dir,
                        exc_info=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dph-compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a multirun directory (its job directories are 0/, 1/, ...)")
    parser.add_argument("--out", type=Path, help="output directory (default: the multirun directory)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.sweep_dir.is_dir():
        parser.error(f"{args.sweep_dir} is not a directory: give a multirun directory, e.g. outputs/sweeps/methods_grid/<time>")
    try:
        paths = write_comparison(args.sweep_dir, args.out)
    except FileNotFoundError as e:
        parser.error(str(e))
    for path in paths:
        log.info("%s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
