"""Side-by-side comparison of the methods of a multirun (e.g. the paper's methods x seeds), with 95% intervals.

``dph-compare <multirun dir> [--out DIR] [--reference LABEL]`` reads every job directory of a multirun
(a folder with ``.hydra/overrides.yaml``) and groups the jobs by their overrides, minus ``seed`` and
minus the overrides every job shares: one group per method, its seeds pooled. The initial policy is
a method of its own, ``base``: the step-0 evaluation of every job (its forgetting metrics compare
two seeds' step-0 evaluations: the floor that sampling noise alone gives). It writes into the multirun
directory (``sweep=methods_grid`` and ``sweep=paper`` do so by themselves when the grid ends, through
``CompareCallback``):

- ``comparison.csv``: one row per method and metric: the runs, the value and its 95% interval, the
  interval's kind, and the difference to the reference method (GRPO, ``experiment=grpo``, when it is
  in the grid) with its interval and whether that interval excludes 0;
- ``comparison.md``: the headline table: per split, Pass@1, Pass@k at the largest k, forgotten and
  distinct correct answers of each method, as ``value [low, high]``, and the difference to the
  reference, marked ``*`` when its interval excludes 0;
- ``comparison.png``: per split, Pass@k versus k of each method with its 95% band (the base dashed),
  and below it the fraction of the initial policy's solved prompts each method forgot.

The intervals (dph.stats): metrics that are averages over evaluation prompts (Pass@k, reward,
distinct correct answers, forgotten, newly solved, solution coverage; from ``eval_prompts.jsonl``)
get a two-level bootstrap over seeds and prompts, prompts resampled jointly for all methods (every
run is scored on the same prompts); the others (entropy, training metrics) a t-interval over seeds,
and for their differences a bootstrap over seeds. A job without ``summary.json`` (failed or still
running) is counted but not used. Files are written atomically.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from hydra.experimental.callback import Callback
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dph.fileio import write_text_atomic
from dph.metrics import pass_at_k
from dph.plots import load_metrics, save_figure
from dph.stats import bootstrap_difference, bootstrap_means, excludes_zero, t_interval

log = logging.getLogger(__name__)

RUN_METRICS = re.compile(r"^(eval/.+/entropy|train/reward_mean|train/entropy)$")  # per run: t-intervals
IGNORED_OVERRIDES = ("seed=", "hydra.", "++trial=", "trial=")
BASE = "base"
DEFAULT_REFERENCE = "experiment=grpo"
PER_PROMPT = ("reward_mean", "distinct_correct", "forgotten", "newly_solved", "solution_coverage")
DRAWS = 2000


@dataclass
class PromptData:
    """One split of one run: per prompt id, (correct of n, distinct correct answers) at step 0 and at the end."""

    n: int
    initial: dict[str, tuple[int, frozenset]]
    final: dict[str, tuple[int, frozenset]]


@dataclass
class Job:
    """One job directory of a multirun: its overrides, final metrics and per-prompt evaluations."""

    path: Path
    overrides: list[str]
    final: dict[str, float] | None = None  # None: no summary.json (failed or unfinished)
    prompts: dict[str, PromptData] = field(default_factory=dict)


def find_jobs(sweep_dir: Path) -> list[Job]:
    """Every job directory directly under ``sweep_dir``, in job-number order."""
    jobs = []
    for overrides_file in sweep_dir.glob("*/.hydra/overrides.yaml"):
        job_dir = overrides_file.parent.parent
        job = Job(job_dir, [str(o) for o in yaml.safe_load(overrides_file.read_text()) or []])
        summary = job_dir / "summary.json"
        if summary.is_file():
            job.final = {k: float(v) for k, v in json.loads(summary.read_text()).items()
                         if k.startswith(("eval/", "train/")) and isinstance(v, (int, float))}
            job.prompts = _prompt_data(job_dir / "eval_prompts.jsonl")
        jobs.append(job)
    return sorted(jobs, key=lambda j: (not j.path.name.isdigit(), int(j.path.name) if j.path.name.isdigit() else 0,
                                       j.path.name))


def _prompt_data(path: Path) -> dict[str, PromptData]:
    """Per split, the step-0 and the last evaluation of eval_prompts.jsonl."""
    if not path.is_file():
        return {}
    by_split: dict[str, dict[int, dict[str, tuple[int, frozenset]]]] = {}
    n: dict[str, int] = {}
    for r in load_metrics(path):
        by_split.setdefault(r["split"], {}).setdefault(r["train/step"], {})[r["id"]] = (r["correct"],
                                                                                       frozenset(r["answers"]))
        n[r["split"]] = r["n"]
    return {split: PromptData(n[split], steps[min(steps)], steps[max(steps)]) for split, steps in by_split.items()}


def method_labels(jobs: Sequence[Job]) -> list[str]:
    """A label per job: its overrides that not every job shares, without the seed (its method)."""
    def relevant(job: Job) -> list[str]:
        return [o for o in job.overrides if not o.startswith(IGNORED_OVERRIDES)]

    shared = set.intersection(*(set(relevant(j)) for j in jobs)) if jobs else set()
    labels = [" ".join(o for o in relevant(j) if o not in shared) for j in jobs]
    return [label or "(all jobs alike)" for label in labels]


# ------------------------------------------------------------------ per-prompt metrics
def per_prompt_arrays(runs: Sequence[PromptData], metric: str, ids: list[str], base: bool = False
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(num, den) [runs, prompts] of a per-prompt metric (see dph.stats).

    `base`: the initial policy, whose step-0 evaluation in each run is its "final" one; its
    forgetting metrics compare run r's step-0 evaluation with run r+1's (another seed's samples of
    the same policy): the floor that sampling noise alone gives them."""
    num, den = np.zeros((len(runs), len(ids))), np.ones((len(runs), len(ids)))
    for r, data in enumerate(runs):
        other = runs[(r + 1) % len(runs)]
        for p, prompt in enumerate(ids):
            c0, a0 = data.initial[prompt]
            c, a = other.initial[prompt] if base else data.final[prompt]
            num[r, p], den[r, p] = _prompt_metric(metric, data.n, c0, a0, c, a)
    return num, den


def _prompt_metric(metric: str, n: int, c0: int, a0: frozenset, c: int, a: frozenset) -> tuple[float, float]:
    if metric.startswith("pass@"):
        return pass_at_k(n, c, int(metric[5:])), 1.0
    if metric == "reward_mean":
        return c / n, 1.0
    if metric == "distinct_correct":
        return float(len(a)), 1.0
    if metric == "forgotten":
        return float(c0 > 0 and c == 0), float(c0 > 0)
    if metric == "newly_solved":
        return float(c0 == 0 and c > 0), float(c0 == 0)
    if metric == "solution_coverage":
        return (len(a0 & a) / len(a0), 1.0) if a0 else (0.0, 0.0)
    raise KeyError(f"unknown per-prompt metric {metric!r}")


# ------------------------------------------------------------------ the comparison
@dataclass
class Comparison:
    methods: list[str]  # base first, then the methods in job order
    runs: dict[str, int]  # finished runs per method
    rows: list[dict[str, Any]]  # one per (method, metric)
    reference: str | None
    splits: dict[str, list[int]]  # split -> the ks of its pass@k


def compare(jobs: Sequence[Job], reference: str | None = DEFAULT_REFERENCE, draws: int = DRAWS) -> Comparison:
    """Values, intervals and differences to `reference` of every method and metric."""
    finished: dict[str, list[Job]] = {}
    for label, job in zip(method_labels(jobs), jobs, strict=True):
        if job.final is not None:
            finished.setdefault(label, []).append(job)
    if reference not in finished:
        reference = None
    every = [j for group in finished.values() for j in group]
    splits = _common_splits(every)
    methods = [BASE, *finished] if splits else list(finished)
    rows: list[dict[str, Any]] = []
    for split, ks in splits.items():
        ids = sorted(set.intersection(*(set(j.prompts[split].final) & set(j.prompts[split].initial) for j in every)))
        for metric in [f"pass@{k}" for k in ks] + list(PER_PROMPT):
            arrays = {m: per_prompt_arrays([j.prompts[split] for j in (every if m == BASE else finished[m])], metric,
                                           ids, base=m == BASE) for m in methods}
            order = list(arrays)
            stats = dict(zip(order, bootstrap_means([arrays[m] for m in order], draws=draws)))
            for m in order:
                diff = (bootstrap_difference(arrays[m], arrays[reference], draws=draws)
                        if reference is not None and m != reference else None)
                rows.append(_row(m, f"eval/{split}/{metric}", len(arrays[m][0]), stats[m], "bootstrap", diff))
    for metric in sorted({k for j in every for k in j.final if RUN_METRICS.match(k)}):
        for m in finished:
            values = [j.final[metric] for j in finished[m] if metric in j.final]
            diff = None
            if reference is not None and m != reference:
                ref = [j.final[metric] for j in finished[reference] if metric in j.final]
                diff = bootstrap_difference(_as_runs(values), _as_runs(ref), draws=draws)
            rows.append(_row(m, metric, len(values), t_interval(values), "t over seeds", diff))
    return Comparison(methods, {BASE: len(every), **{m: len(g) for m, g in finished.items()}}, rows, reference, splits)


def _as_runs(values: list[float]) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(values, float)[:, None]
    return x, np.ones_like(x)


def _row(method: str, metric: str, runs: int, stats: tuple[float, float, float], interval: str,
         diff: tuple[float, float, float] | None) -> dict[str, Any]:
    row = {"method": method, "metric": metric, "runs": runs, "value": stats[0], "ci_low": stats[1],
           "ci_high": stats[2], "interval": interval}
    if diff is not None:
        row.update(diff=diff[0], diff_low=diff[1], diff_high=diff[2], significant=excludes_zero(diff[1], diff[2]))
    return row


def _common_splits(jobs: Sequence[Job]) -> dict[str, list[int]]:
    """The splits every finished job has per-prompt results for, with the ks of their pass@k."""
    if not jobs or not all(j.prompts for j in jobs):
        return {}
    splits = set.intersection(*(set(j.prompts) for j in jobs))
    out = {}
    for split in sorted(splits, key=list(jobs[0].prompts).index):
        n = min(j.prompts[split].n for j in jobs)
        out[split] = [k for k in (1 << i for i in range(n.bit_length())) if k <= n] + ([n] if n & (n - 1) else [])
    return out


# ------------------------------------------------------------------ outputs
def comparison_csv(comparison: Comparison) -> str:
    columns = ["method", "metric", "runs", "value", "ci_low", "ci_high", "interval", "diff", "diff_low", "diff_high",
               "significant"]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(comparison.rows)
    return out.getvalue()


def comparison_markdown(comparison: Comparison) -> str:
    """Per split: Pass@1, Pass@k (largest k), forgotten, distinct correct answers; value [95% interval]
    and the difference to the reference method (* when its interval excludes 0)."""
    rows = {(r["method"], r["metric"]): r for r in comparison.rows}
    ref = comparison.reference
    lines = []
    for split, ks in comparison.splits.items():
        metrics = [("Pass@1", "pass@1"), (f"Pass@{ks[-1]}", f"pass@{ks[-1]}"), ("forgotten", "forgotten"),
                   ("distinct correct", "distinct_correct")]
        lines += [f"**{split}**" + (f" (difference to {ref} in parentheses; * its 95% interval excludes 0)" if ref else ""),
                  "", "| method | runs | " + " | ".join(name for name, _ in metrics) + " |",
                  "|---|---|" + "---|" * len(metrics)]
        for method in comparison.methods:
            cells = []
            for _, metric in metrics:
                r = rows.get((method, f"eval/{split}/{metric}"))
                cells.append("" if r is None else _cell(r))
            lines.append(f"| {method} | {comparison.runs[method]} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _cell(row: dict[str, Any]) -> str:
    text = f"{row['value']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"
    if "diff" in row:
        text += f" ({row['diff']:+.3f}{'*' if row['significant'] else ''})"
    return text


def _colours(n: int) -> list[tuple[float, ...]]:
    """n distinct colours: matplotlib's tab10 for up to 10 methods, tab20 for up to 20 (then repeating)."""
    from matplotlib import colormaps

    palette = colormaps["tab10" if n <= 10 else "tab20"]
    return [palette(i % palette.N) for i in range(n)]


def plot_comparison(comparison: Comparison, path: Path) -> Path | None:
    """Per split: Pass@k versus k with 95% bands (base dashed); forgotten per method with intervals."""
    if not comparison.splits:
        return None
    rows = {(r["method"], r["metric"]): r for r in comparison.rows}
    splits, methods = list(comparison.splits), comparison.methods
    width = max(6.0, 5.2 * len(splits))
    entry = 0.8 + 0.07 * max(len(f"{m} (n=00)") for m in methods)  # the legend, below: as many columns as fit
    columns = max(1, min(len(methods), int(width // entry)))
    figure = Figure(figsize=(width, 7.6 + 0.25 * math.ceil(len(methods) / columns)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, len(splits), squeeze=False, height_ratios=[3, 2])
    trained = [m for m in methods if m != BASE]
    colour = dict(zip(trained, _colours(len(trained))), **{BASE: "0.3"})
    for column, split in enumerate(splits):
        ks, ax = comparison.splits[split], axes[0][column]
        for method in methods:
            points = [rows[(method, f"eval/{split}/pass@{k}")] for k in ks]
            style = dict(linestyle="--", marker=".") if method == BASE else dict(marker="o", markersize=3)
            style["color"] = colour[method]
            ax.plot(ks, [p["value"] for p in points], label=f"{method} (n={comparison.runs[method]})", **style)
            ax.fill_between(ks, [p["ci_low"] for p in points], [p["ci_high"] for p in points],
                            color=style["color"], alpha=0.12)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set(title=f"{split}: Pass@k vs k", xlabel="k (samples per prompt)", ylabel="Pass@k", ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
        bars = [rows[(m, f"eval/{split}/forgotten")] for m in trained]
        ax = axes[1][column]
        x = np.arange(len(bars))
        ax.bar(x, [b["value"] for b in bars], color=[colour[m] for m in trained],
               yerr=[[b["value"] - b["ci_low"] for b in bars], [b["ci_high"] - b["value"] for b in bars]], capsize=3)
        ax.set_xticks(x, [m.removeprefix("experiment=") for m in trained], rotation=30, ha="right", fontsize="small")
        ax.set(title=f"{split}: initially solved prompts forgotten",
               ylabel="forgotten", ylim=(0, max([0.05, *(b["ci_high"] for b in bars if math.isfinite(b["ci_high"]))]) * 1.1))
        ax.grid(alpha=0.3, axis="y")
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=columns, fontsize="small", frameon=False)
    figure.suptitle("Methods side by side: value and 95% interval (bootstrap over seeds and prompts)", fontsize="medium")
    return save_figure(figure, path)


def write_comparison(sweep_dir: str | Path, out_dir: str | Path | None = None,
                     reference: str | None = DEFAULT_REFERENCE, draws: int = DRAWS) -> list[Path]:
    """Write comparison.csv, comparison.md and comparison.png for the multirun in ``sweep_dir``."""
    sweep_dir = Path(sweep_dir)
    out_dir = Path(out_dir) if out_dir is not None else sweep_dir
    jobs = find_jobs(sweep_dir)
    if not jobs:
        raise FileNotFoundError(f"{sweep_dir}: no job directory (<job>/.hydra/overrides.yaml) found")
    out_dir.mkdir(parents=True, exist_ok=True)
    comparison = compare(jobs, reference, draws)
    written = [write_text_atomic(out_dir / "comparison.csv", comparison_csv(comparison)),
               write_text_atomic(out_dir / "comparison.md", comparison_markdown(comparison))]
    plot = plot_comparison(comparison, out_dir / "comparison.png")
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
    parser.add_argument("--reference", default=DEFAULT_REFERENCE,
                        help=f"the method the others are compared with (default: {DEFAULT_REFERENCE})")
    parser.add_argument("--draws", type=int, default=DRAWS, help="bootstrap replicates")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.sweep_dir.is_dir():
        parser.error(f"{args.sweep_dir} is not a directory: give a multirun directory, e.g. outputs/sweeps/methods_grid/<time>")
    try:
        paths = write_comparison(args.sweep_dir, args.out, args.reference, args.draws)
    except FileNotFoundError as e:
        parser.error(str(e))
    for path in paths:
        log.info("%s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
