"""Plots of one run from its ``metrics.jsonl`` (matplotlib Agg, files only, no windows).

``plot_run(load_metrics(run_dir / "metrics.jsonl"), run_dir)`` writes, when the metrics exist:

- ``passk_over_steps.png``: per eval split, Pass@k over steps for a few k (1, 4, 16 and the
  largest), with the split's eval entropy on a dashed twin axis;
- ``passk_vs_k.png``: per eval split, Pass@k versus k (log2 axis) at the first evaluation
  (initial policy) and at the last one (trained policy);
- ``train_curves.png``: reward, entropy, divergence and the loss terms over training steps.

Each file is written to a temporary name in the same directory, then moved into place.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from dph.loggers import NON_FINITE

_log = logging.getLogger(__name__)

STEP_KEY = "train/step"
PASSK_KEY = re.compile(r"^eval/(?P<split>.+)/pass@(?P<k>\d+)$")
SHOWN_KS = (1, 4, 16)  # plus the largest k of the split
TRAIN_PANELS = (  # (title, y label, [(metric, legend label)])
    ("Reward", "mean reward", [("train/reward_mean", "train/reward_mean")]),
    ("Entropy", "entropy (nats)", [("train/entropy", "train/entropy")]),
    ("Divergence", "divergence", [("train/divergence", "train/divergence")]),
    ("Loss", "loss", [("train/loss", "total"), ("train/pg_loss", "policy gradient"),
                      ("train/div_loss", "divergence term (before the weight)")]),
)


def _number(value: Any) -> Any:
    """``"NaN"``/``"Infinity"``/``"-Infinity"`` (how metrics.jsonl stores non-finite floats) as floats."""
    return NON_FINITE.get(value, value) if isinstance(value, str) else value


def load_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl``, non-finite floats restored; a torn last line is skipped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    records = []
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if index == len(lines) - 1:  # a write cut short by a killed process
                _log.warning("%s: skipping an incomplete last line", path)
                continue
            raise
        records.append({key: _number(value) for key, value in record.items()})
    return records


def _series(records: Iterable[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of every record holding ``key``, in file order."""
    steps, values = [], []
    for record in records:
        if key in record and STEP_KEY in record:
            value = _number(record[key])
            if isinstance(value, (int, float)):
                steps.append(record[STEP_KEY])
                values.append(float(value))
    return steps, values


def _eval_splits(records: Iterable[dict]) -> dict[str, list[int]]:
    """Eval split -> sorted k values that have a ``eval/<split>/pass@<k>`` metric."""
    splits: dict[str, set[int]] = {}
    for record in records:
        for key in record:
            match = PASSK_KEY.match(key)
            if match:
                splits.setdefault(match["split"], set()).add(int(match["k"]))
    return {split: sorted(ks) for split, ks in splits.items()}


def _new_figure(panels: int, width: float = 5.0, height: float = 3.8) -> tuple[Figure, list]:
    columns = 2 if panels == 4 else min(panels, 3)
    rows = math.ceil(panels / columns)
    figure = Figure(figsize=(width * columns, height * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).ravel().tolist()
    for extra in axes[panels:]:
        extra.set_visible(False)
    for ax in axes[:panels]:
        ax.grid(alpha=0.3)
    return figure, axes[:panels]


def save_figure(figure: Figure, path: Path, dpi: int = 110) -> Path:
    """Write ``figure`` as PNG to ``path`` atomically (temporary file + ``os.replace``)."""
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    try:
        figure.savefig(tmp, format="png", dpi=dpi)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _plot_passk_over_steps(records: list[dict], splits: dict[str, list[int]], path: Path) -> Path:
    figure, axes = _new_figure(len(splits))
    for ax, (split, ks) in zip(axes, splits.items()):
        shown = sorted({k for k in SHOWN_KS if k in ks} | {ks[-1]})
        lines = []
        for index, k in enumerate(shown):
            steps, values = _series(records, f"eval/{split}/pass@{k}")
            lines += ax.plot(steps, values, marker="o", markersize=3, color=f"C{index}", label=f"pass@{k}")
        ax.set(title=f"{split}: Pass@k over training", xlabel="step", ylabel="Pass@k", ylim=(-0.02, 1.02))
        steps, entropy = _series(records, f"eval/{split}/entropy")
        if entropy:
            twin = ax.twinx()
            lines += twin.plot(steps, entropy, linestyle="--", color="0.35", label="entropy (right)")
            twin.set_ylabel("eval entropy (nats)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
        ax.legend(handles=lines, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=3, fontsize="small")
    figure.suptitle("Pass@k during training (solid) and eval entropy (dashed)")
    return save_figure(figure, path)


def plot_passk_curves(curves: dict[str, dict[str, list[tuple[int, float]]]], path: Path, title: str) -> Path:
    """Pass@k versus k (log2 axis), one panel per split and one line per label:
    curves = {split: {label: [(k, pass@k), ...]}}."""
    figure, axes = _new_figure(len(curves))
    for ax, (split, by_label) in zip(axes, curves.items()):
        ks = sorted({k for points in by_label.values() for k, _ in points})
        for index, (label, points) in enumerate(by_label.items()):
            ax.plot([k for k, _ in points], [v for _, v in points], marker="o", color=f"C{index}", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set(title=f"{split}: Pass@k vs k", xlabel="k (samples per prompt)", ylabel="Pass@k", ylim=(-0.02, 1.02))
        ax.legend(loc="lower right", fontsize="small")
    figure.suptitle(title)
    return save_figure(figure, path)


def _plot_passk_vs_k(records: list[dict], splits: dict[str, list[int]], path: Path) -> Path:
    curves: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for split, ks in splits.items():
        evals = [r for r in records if any(f"eval/{split}/pass@{k}" in r for k in ks) and STEP_KEY in r]
        chosen = [(evals[0], "initial policy")] + ([(evals[-1], "trained")] if len(evals) > 1 else [])
        curves[split] = {f"step {record[STEP_KEY]} ({label})": [(k, float(_number(record[f"eval/{split}/pass@{k}"])))
                                                               for k in ks if f"eval/{split}/pass@{k}" in record]
                         for record, label in chosen}
    return plot_passk_curves(curves, path, "Pass@k versus k: initial policy vs trained policy")


def _plot_train_curves(records: list[dict], path: Path) -> Path | None:
    panels = []
    for title, ylabel, metrics in TRAIN_PANELS:
        curves = [(label, *_series(records, key)) for key, label in metrics]
        curves = [curve for curve in curves if curve[1]]
        if curves:
            panels.append((title, ylabel, curves))
    if not panels:
        return None
    figure, axes = _new_figure(len(panels), width=4.5, height=3.4)
    for ax, (title, ylabel, curves) in zip(axes, panels):
        for index, (label, steps, values) in enumerate(curves):
            ax.plot(steps, values, color=f"C{index}", label=label)
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
        if len(curves) > 1:
            ax.legend(fontsize="small")
    figure.suptitle("Training curves")
    return save_figure(figure, path)


def plot_run(records: list[dict], out_dir: str | Path) -> list[Path]:
    """Write the run's PNGs into ``out_dir``; returns the paths written (figures without data are skipped)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    splits = _eval_splits(records)
    if splits:
        written.append(_plot_passk_over_steps(records, splits, out_dir / "passk_over_steps.png"))
        written.append(_plot_passk_vs_k(records, splits, out_dir / "passk_vs_k.png"))
    train = _plot_train_curves(records, out_dir / "train_curves.png")
    if train is not None:
        written.append(train)
    return written
