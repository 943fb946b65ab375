"""What a sweep leaves beside its study: a summary, a table of trials and plots, from storage alone.

``dph-sweep-report <storage> [<study>] [--out DIR]`` (storage: a journal file or an RDB URL; the
study may be left out when the storage holds one) writes, and the optuna sweeper rewrites after each
batch of trials in ``hydra.sweep.dir``:

- ``summary.yaml``: directions, trial counts by state, the best trial (value, params, overrides,
  job directory) or, with several objectives, the Pareto front (``study.best_trials``);
- ``trials.csv``: one row per trial: number, state, value(s), duration, params, fail reason;
- ``history.png``: each objective over trial numbers (with the best so far for one objective);
- ``objective_vs_<param>.png`` for each numeric param: objective(s) against the param (log x when it
  was sampled log-uniform), one row per categorical param with points coloured by its value (e.g.
  the objective against ``divergence.weight`` per ``divergence``);
- ``pareto_front.png`` with several objectives: each pair of objectives, the front highlighted.

Files are written to a temporary name and moved into place, so readers never see half a file; it is
safe to run while a sweep is writing to the same storage.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import logging
import math
import os
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

import optuna
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.axes import Axes
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter
from optuna.distributions import CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState

from dph.plots import save_figure
from dph.pruning import StorageError, display_storage, is_rdb_url, open_storage

log = logging.getLogger(__name__)

FAIL_REASON_ATTR = "fail_reason"   # user and system attribute: why a trial failed
INTERRUPTED_ATTR = "interrupted"   # user attribute: the trial never ran to an end (not counted)
OVERRIDES_ATTR = "overrides"       # user attribute: the sampled overrides given to the job
JOB_DIR_ATTR = "job_dir"           # user attribute: the job's output directory
COUNTED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)
ABSENT = "(absent)"                # legend entry of trials where a conditional param was not sampled


def counts_toward_n_trials(trial: FrozenTrial) -> bool:
    """Whether a trial counts toward ``hydra.sweeper.n_trials`` (interrupted ones are run again)."""
    return trial.state in COUNTED_STATES and not trial.user_attrs.get(INTERRUPTED_ATTR, False)


def objective_names(study: optuna.Study) -> list[str]:
    """The objectives' metric names (set by the sweeper from optimized_metric), else value / value_<i>."""
    names = study.metric_names
    if names:
        return list(names)
    return ["value"] if len(study.directions) == 1 else [f"value_{i}" for i in range(len(study.directions))]


# ------------------------------------------------------------------ files
def _atomic_write(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _trial_entry(trial: FrozenTrial, names: list[str]) -> dict[str, Any]:
    entry: dict[str, Any] = {"number": trial.number}
    if len(names) == 1:
        entry["value"] = trial.value
    else:
        entry["values"] = dict(zip(names, trial.values))
    entry["params"] = dict(trial.params)
    for key in (OVERRIDES_ATTR, JOB_DIR_ATTR):
        if key in trial.user_attrs:
            entry[key] = trial.user_attrs[key]
    return entry


def summary(study: optuna.Study, storage: str | None = None) -> dict[str, Any]:
    """The study in a few lines: counts by state and the best trial or the Pareto front."""
    trials = study.get_trials(deepcopy=False)
    names = objective_names(study)
    counts = {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}
    out: dict[str, Any] = {"study_name": study.study_name}
    if storage is not None:
        out["storage"] = storage
    out["directions"] = [d.name.lower() for d in study.directions]
    out["objectives"] = names
    out["trials"] = {"total": len(trials), "counted": sum(counts_toward_n_trials(t) for t in trials),
                     **{state: n for state, n in counts.items() if n}}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if len(names) == 1:
        out["best"] = _trial_entry(study.best_trial, names) if complete else None
    else:
        out["pareto_front"] = [_trial_entry(t, names) for t in sorted(study.best_trials, key=lambda t: t.number)]
    return out


def trials_csv(study: optuna.Study) -> str:
    """One row per trial: number, state, objective value(s), duration, params, fail reason, job dir."""
    trials = study.get_trials(deepcopy=False)
    names = objective_names(study)
    params = sorted({name for t in trials for name in t.params})
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["number", "state", *names, "duration_s", "datetime_start",
                     *[f"params_{p}" for p in params], FAIL_REASON_ATTR, JOB_DIR_ATTR])
    for t in trials:
        values = list(t.values) if t.values is not None else []
        values += [None] * (len(names) - len(values))
        duration = t.duration.total_seconds() if t.duration is not None else None
        start = t.datetime_start.isoformat(timespec="seconds") if t.datetime_start else None
        reason = t.user_attrs.get(FAIL_REASON_ATTR, t.system_attrs.get(FAIL_REASON_ATTR))
        row = [t.number, t.state.name, *values, duration, start, *[t.params.get(p) for p in params],
               reason, t.user_attrs.get(JOB_DIR_ATTR)]
        writer.writerow(["" if v is None else v for v in row])
    return buffer.getvalue()


# ------------------------------------------------------------------ plots
def _new_figure(rows: int, columns: int, width: float = 4.8, height: float = 3.6):
    figure = Figure(figsize=(width * columns, height * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False)
    for ax in axes.ravel():
        ax.grid(alpha=0.3)
    return figure, axes


def _file_part(name: str) -> str:
    return re.sub(r"[^\w.\-]+", "_", name).strip("_") or "param"


def _plot_history(study: optuna.Study, trials: list[FrozenTrial], names: list[str], path: Path) -> Path:
    figure, axes = _new_figure(1, len(names))
    maximize = [d == optuna.study.StudyDirection.MAXIMIZE for d in study.directions]
    for index, (ax, name) in enumerate(zip(axes[0], names)):
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        ax.scatter([t.number for t in done], [t.values[index] for t in done], s=18, color="C0", label="complete")
        if len(names) == 1:
            pruned = [t for t in trials if t.state == TrialState.PRUNED and t.value is not None]
            if pruned:
                ax.scatter([t.number for t in pruned], [t.value for t in pruned], s=18, marker="x",
                           color="C3", label="pruned (last report)")
            best, steps, bests = None, [], []
            for t in sorted(done, key=lambda t: t.number):
                if best is None or (t.value > best if maximize[0] else t.value < best):
                    best = t.value
                steps.append(t.number)
                bests.append(best)
            last = max(t.number for t in trials)
            if steps and steps[-1] < last:  # carry the best to the latest trial
                steps.append(last)
                bests.append(bests[-1])
            if steps:
                ax.step(steps, bests, where="post", color="C1", label="best so far")
        ax.set(title=name, xlabel="trial", ylabel=name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize="small")
    figure.suptitle(f"{study.study_name}: objective per trial")
    return save_figure(figure, path, dpi=100)


def wrap_title(text: str, width_inches: float, points: float = 12.0) -> str:
    """``text`` broken into lines that fit ``width_inches`` at a font of ``points`` (about 0.6 em a
    character), at spaces or, in long names, after '/' '.' '_'."""
    chars = max(12, int(width_inches * 72 / (0.6 * points)))
    lines = []
    for paragraph in text.split("\n"):
        lines += textwrap.wrap(paragraph, chars, break_long_words=True, break_on_hyphens=False) or [""]
    return "\n".join(lines)


def _round_1sig(value: float, up: bool) -> float:
    """``value`` (> 0) rounded down or up to one significant digit: 0.0137 -> 0.01 or 0.02."""
    exponent = math.floor(math.log10(value))
    scale = 10.0 ** exponent
    digit = math.ceil(value / scale - 1e-9) if up else math.floor(value / scale + 1e-9)
    return digit * scale


def set_log_axis(ax: Axes, values: list[float], axis: str = "x") -> None:
    """A log axis over ``values`` (> 0) with labelled major ticks however narrow their range: the
    limits are rounded out to one significant digit, and the major ticks are decades (labelled
    10^k) over more than two decades, else 1-2-5, 1-2-3-5 or every digit of each decade (labelled
    0.02, 0.05, ...), so that at least two major ticks carry a label."""
    low, high = min(values) / 1.1, max(values) * 1.1
    low, high = _round_1sig(low, up=False), _round_1sig(high, up=True)
    decades = math.log10(high / low)
    target = ax.xaxis if axis == "x" else ax.yaxis
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
    (ax.set_xlim if axis == "x" else ax.set_ylim)(low, high)
    if decades > 2:
        target.set_major_locator(LogLocator(base=10))
    else:
        subs = (1.0, 2.0, 5.0) if decades > 1 else (1.0, 2.0, 3.0, 5.0) if decades > 0.5 else tuple(range(1, 10))
        target.set_major_locator(LogLocator(base=10, subs=subs))
        target.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    target.set_minor_locator(LogLocator(base=10, subs=tuple(range(1, 10))))
    target.set_minor_formatter(NullFormatter())


def _plot_param(study: optuna.Study, trials: list[FrozenTrial], names: list[str], param: str,
                categorical: list[str], log_x: bool, path: Path) -> Path:
    return save_figure(param_figure(study, trials, names, param, categorical, log_x), path, dpi=100)


def param_figure(study: optuna.Study, trials: list[FrozenTrial], names: list[str], param: str,
                 categorical: list[str], log_x: bool) -> Figure:
    """Objective(s) against ``param``, one row per categorical param (points coloured by its value,
    the legend beside the axes so that it hides no point)."""
    rows = [c for c in categorical if c != param] or [None]
    width = 4.8 + (1.6 if rows != [None] else 0.0)  # room for the legend right of the axes
    figure, axes = _new_figure(len(rows), len(names), width=width)
    with_param = [t for t in trials if param in t.params]
    for row, colour_by in enumerate(rows):
        groups: dict[str, list[FrozenTrial]] = {}
        for t in with_param:
            key = "all" if colour_by is None else str(t.params.get(colour_by, ABSENT))
            groups.setdefault(key, []).append(t)
        for index, name in enumerate(names):
            ax = axes[row][index]
            for colour, (label, group) in enumerate(sorted(groups.items())):
                ax.scatter([t.params[param] for t in group], [t.values[index] for t in group], s=20,
                           color=f"C{colour}", label=label if colour_by is not None else None)
            if log_x and with_param:
                set_log_axis(ax, [float(t.params[param]) for t in with_param])
            ax.set(xlabel=param + (" (log scale)" if log_x else ""), ylabel=name)
            if len(rows) > 1:
                ax.set_title(wrap_title(f"by {colour_by}", 4.8, 11), fontsize="medium")
            if colour_by is not None and groups:
                ax.legend(title=colour_by, fontsize="small", title_fontsize="small", loc="upper left",
                          bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    title = f"{study.study_name}: {' / '.join(names)} vs {param} ({len(with_param)} complete trials)"
    figure.suptitle(wrap_title(title, width * len(names) - 0.4), fontsize="large")
    return figure


def _plot_pareto(study: optuna.Study, trials: list[FrozenTrial], names: list[str], path: Path) -> Path:
    pairs = list(itertools.combinations(range(len(names)), 2))
    columns = min(len(pairs), 3)
    figure, axes = _new_figure(math.ceil(len(pairs) / columns), columns)
    front = {t.number for t in study.best_trials}
    for ax, (i, j) in zip(axes.ravel(), pairs):
        others = [t for t in trials if t.number not in front]
        best = sorted((t for t in trials if t.number in front), key=lambda t: t.values[i])
        ax.scatter([t.values[i] for t in others], [t.values[j] for t in others], s=18, color="0.6", label="dominated")
        ax.plot([t.values[i] for t in best], [t.values[j] for t in best], marker="o", color="C3", label="Pareto front")
        for t in best:
            ax.annotate(str(t.number), (t.values[i], t.values[j]), textcoords="offset points", xytext=(4, 4),
                        fontsize="x-small")
        ax.set(xlabel=names[i], ylabel=names[j], title=f"{names[j]} vs {names[i]}")
        ax.legend(fontsize="small")
    for ax in axes.ravel()[len(pairs):]:
        ax.set_visible(False)
    figure.suptitle(f"{study.study_name}: Pareto front ({len(front)} of {len(trials)} complete trials)")
    return save_figure(figure, path, dpi=100)


def plot_study(study: optuna.Study, out_dir: Path) -> list[Path]:
    """Write the sweep's PNGs (see the module docstring); nothing before a trial completes."""
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        return []
    names = objective_names(study)
    written = [_plot_history(study, trials, names, out_dir / "history.png")]
    distributions: dict[str, Any] = {}
    for t in complete:
        for name, distribution in t.distributions.items():
            distributions.setdefault(name, distribution)
    categorical = [p for p, d in distributions.items() if isinstance(d, CategoricalDistribution)]
    for param, distribution in distributions.items():
        if param not in categorical:
            log_x = any(getattr(t.distributions.get(param), "log", False) for t in complete)
            written.append(_plot_param(study, complete, names, param, categorical, log_x,
                                       out_dir / f"objective_vs_{_file_part(param)}.png"))
    if len(names) > 1:
        written.append(_plot_pareto(study, complete, names, out_dir / "pareto_front.png"))
    return written


def write_report(study: optuna.Study, out_dir: str | Path, storage: str | None = None) -> list[Path]:
    """Write ``summary.yaml``, ``trials.csv`` and the plots into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [
        _atomic_write(out_dir / "summary.yaml", yaml.safe_dump(summary(study, storage), sort_keys=False)),
        _atomic_write(out_dir / "trials.csv", trials_csv(study)),
    ]
    return written + plot_study(study, out_dir)


# ------------------------------------------------------------------ command line
def _default_out_dir(storage: str) -> Path:
    """Beside the journal file or sqlite database; the current directory for a server URL."""
    if not is_rdb_url(storage):
        return Path(storage).expanduser().resolve().parent
    if storage.startswith("sqlite:///"):
        return Path(storage[len("sqlite:///"):]).expanduser().resolve().parent
    return Path.cwd()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dph-sweep-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("storage", help="the study's journal file (e.g. <sweep dir>/optuna.journal) or an RDB URL")
    parser.add_argument("study", nargs="?", help="the study name (optional when the storage holds one study)")
    parser.add_argument("--out", type=Path, help="output directory (default: beside the journal file / sqlite "
                                                   "database, else the current directory)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if not is_rdb_url(args.storage) and not Path(args.storage).expanduser().is_file():
        parser.error(f"{args.storage} is not a file: give the sweep's journal file (<sweep dir>/optuna.journal) "
                     "or an RDB URL such as sqlite:///path/to/study.db")
    try:
        storage = open_storage(args.storage)
    except StorageError as e:
        parser.error(f"{display_storage(args.storage)} {e}")
    studies = optuna.get_all_study_names(storage)
    name = args.study
    if name is None:
        if len(studies) != 1:
            parser.error(f"the storage holds {len(studies)} studies: name one of {', '.join(studies) or '(none)'}")
        name = studies[0]
    if name not in studies:
        parser.error(f"no study {name!r} in {display_storage(args.storage)}: choose one of {', '.join(studies) or '(none)'}")
    study = optuna.load_study(study_name=name, storage=storage)
    out_dir = args.out or _default_out_dir(args.storage)
    for path in write_report(study, out_dir, storage=display_storage(args.storage)):
        log.info("%s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
