"""Parallel sweep trials on a small machine: 2 joblib workers against 1, and what oversubscription costs.

Three runs of the same 4-trial optuna sweep of tiny `dph-train` jobs (the learning rate sampled by
a seeded random sampler, so every sweep trains the same four configs):

    sequential      hydra/launcher=joblib hydra.launcher.n_jobs=1, hydra.sweeper.n_jobs=1
    parallel        hydra/launcher=joblib hydra.launcher.n_jobs=2, hydra.sweeper.n_jobs=2
    oversubscribed  as parallel, but OMP_NUM_THREADS / MKL_NUM_THREADS = all cores in every worker
                    (what each trial would take without dph.threads and joblib's limit)

In `sequential` and `parallel` no thread variable is set, so each job's threads come from
dph.threads (cores // workers; joblib's loky workers also get OMP_NUM_THREADS = cores // n_jobs).
Reported: the wall time of each whole sweep command (process start, imports, the 4 trials, the
report) and the median trial duration from the study; speed-up = sequential / parallel wall time
(the target on 2 cores: >= 1.6x). Rounds are interleaved so that load from other programs hits
every configuration alike. The base model is built (or found in --model-cache) before timing.

    python tests/benchmarks/bench_parallel_trials.py --rounds 1 --steps 40 --out /tmp/parallel_trials.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
CONFIGS = {  # name -> (launcher overrides, threads forced on every worker or None)
    "sequential": (["hydra/launcher=joblib", "hydra.launcher.n_jobs=1", "hydra.sweeper.n_jobs=1"], None),
    "parallel": (["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_jobs=2"], None),
    "oversubscribed": (["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_jobs=2"], "all"),
}


def cores() -> int:
    return len(os.sched_getaffinity(0))


def trial_overrides(args, cache_dir: Path) -> list[str]:
    """One tiny training run: the default tiny model, countdown, no divergence term."""
    return [
        "model=tiny", "model.warmup.steps=40", "model.warmup.problems=400",
        "divergence=none", "device=cpu", "precision=no", "logger=none",
        f"trainer.steps={args.steps}", "trainer.prompts_per_step=16", "algorithm.group_size=8",
        "generation.max_new_tokens=16", "eval.every=0", "eval.n=16", "eval.max_prompts=16", "eval.splits=[test]",
        "optimized_metric=eval/test/pass@16", f"paths.cache_dir={cache_dir}",
    ]


def environment(threads: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"})
    if threads == "all":
        env.update({name: str(cores()) for name in THREAD_VARIABLES})
    return env


def run(command: list[str], env: dict[str, str], log_dir: Path) -> float:
    """Run a command to completion; its wall time."""
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "stdout.txt", "w") as out, open(log_dir / "stderr.txt", "w") as err:
        start = time.perf_counter()
        proc = subprocess.run(command, stdout=out, stderr=err, env=env, cwd=log_dir)
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = (log_dir / "stderr.txt").read_text()[-3000:]
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{tail}")
    return wall


def trial_durations(sweep_dir: Path) -> list[float]:
    rows = list(csv.DictReader((sweep_dir / "trials.csv").open()))
    if [r["state"] for r in rows] != ["COMPLETE"] * len(rows):
        raise RuntimeError(f"not every trial of {sweep_dir} completed: {[r['state'] for r in rows]}")
    return [float(r["duration_s"]) for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds (each runs every config once)")
    parser.add_argument("--trials", type=int, default=4, help="trials per sweep")
    parser.add_argument("--steps", type=int, default=40, help="RL steps per trial")
    parser.add_argument("--model-cache", type=Path, default=ROOT / "outputs" / "cache",
                        help="where the base model is built once and reused")
    parser.add_argument("--work-dir", type=Path, default=None, help="the sweeps (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-parallel-"))
    exe = str(Path(sys.executable).parent / "dph-train")
    trial = trial_overrides(args, args.model_cache)
    load_start = os.getloadavg()
    print(f"work dir {work}; {cores()} cores; load average at start {load_start}", flush=True)
    wall = run([exe, *trial, "trainer.steps=0", f"hydra.run.dir={work / 'prepare'}"], environment(None), work / "prepare")
    print(f"base model ready ({wall:.1f} s)", flush=True)

    results: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    for r in range(args.rounds):
        for name, (launcher, threads) in CONFIGS.items():
            sweep_dir = work / f"round{r}" / name
            command = [exe, "-m", *trial, f"hydra.sweep.dir={sweep_dir}", "hydra/sweeper=optuna",
                       "hydra.sweeper.study_name=bench", f"hydra.sweeper.n_trials={args.trials}",
                       "hydra.sweeper.sampler.name=random", "hydra.sweeper.sampler.seed=0",
                       "optimizer.lr=tag(log, interval(1e-5, 1e-3))", *launcher]
            wall = run(command, environment(threads), sweep_dir.with_name(name + "-logs"))
            durations = trial_durations(sweep_dir)
            results[name].append({"wall_s": wall, "trial_s": durations})
            print(f"round {r + 1}/{args.rounds} {name:>14}: sweep {wall:6.1f} s, median trial "
                  f"{statistics.median(durations):5.1f} s", flush=True)

    summary = {name: {"wall_s": statistics.median(x["wall_s"] for x in rows),
                      "median_trial_s": statistics.median(d for x in rows for d in x["trial_s"])}
               for name, rows in results.items()}
    speedup = summary["sequential"]["wall_s"] / summary["parallel"]["wall_s"]
    oversubscribed = summary["oversubscribed"]["wall_s"] / summary["parallel"]["wall_s"]
    load_end = os.getloadavg()
    print()
    print(f"{'config':>14} | {'sweep wall s':>12} | {'median trial s':>14}")
    print("-" * 48)
    for name, row in summary.items():
        print(f"{name:>14} | {row['wall_s']:>12.1f} | {row['median_trial_s']:>14.1f}")
    print()
    print(f"speed-up of 2 parallel workers over 1: {speedup:.2f}x (sequential / parallel wall time; target >= 1.6x)")
    print(f"oversubscribed (every worker with {cores()} threads) / parallel: {oversubscribed:.2f}x wall time")
    print(f"load average at start {load_start}, at end {load_end}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "configs": {name: {"launcher": launcher, "threads": threads} for name, (launcher, threads) in CONFIGS.items()},
            "trial_overrides": trial, "summary": summary, "speedup": speedup,
            "oversubscribed_over_parallel": oversubscribed, "runs": results,
            "machine": {"platform": platform.platform(), "python": platform.python_version(), "cores": cores(),
                        "load_average_start": load_start, "load_average_end": load_end},
        }, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
