"""What the divergence term costs per RL step: DPH (pre-sampled reference data) vs an online reference model.

The paper's efficiency claim, measured side by side on ONE config: DPH-RL estimates its divergence
on responses pre-sampled once from the initial policy, with their log-probs stored, so training
holds no reference model; the usual KL penalty keeps a frozen copy of the initial policy and runs
it on every rollout batch. Four runs of `dph-train` that differ only in the divergence:

    dph_fkl      experiment=dph_fkl    forward KL on the D_pef cache (source=reference), RL on D_exp
    dph_js       experiment=dph_js     Jensen-Shannon on the D_pef cache (source=reference), RL on D_exp
    reverse_kl   divergence=reverse_kl reverse KL (k3 value) on the rollouts vs a frozen reference copy
    none         divergence=none       no divergence term (GRPO / DAPO-style baseline)

Everything else is shared: a `model=tiny` Llama widened to about 5 M parameters (hidden 256, 6
layers) so that one more copy of the weights shows in the memory figures, a countdown variant
small models can solve (two numbers up to 9, so that D_pef is not empty), 16 prompts x 8
responses of up to 16 tokens per step, one optimizer step per rollout batch, fp32 on CPU.

How it is measured:
  * every run is its own `dph-train` process, so its peak RSS (`os.wait4`'s `ru_maxrss`) covers
    that run alone; the processes run one at a time, interleaved A B C D, A B C D, ... so that
    load from other programs on the machine hits every config alike;
  * step time = `time/rollout_s + time/update_s` from metrics.jsonl (sampling, scoring, the
    reference forward when there is one, the rehearsal draw, all forward/backward passes and the
    optimizer step; evaluation excluded), median over the steps of all rounds after the first
    `--warmup` steps of each run;
  * the base model is built (or found in `--model-cache`) before anything is timed; the
    pre-sampling stage is timed on its own with `dph-presample` (a fresh cache), then run again to
    show that a second run with the same key does no sampling; the DPH training runs then find the
    cache ready, as runs and sweep trials that share a cache key do.

    python tests/benchmarks/bench_divergence_cost.py --rounds 2 --steps 8 --out /tmp/divergence_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from dph.plots import load_metrics

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {  # name -> the overrides that differ
    "dph_fkl": ["experiment=dph_fkl"],
    "dph_js": ["experiment=dph_js"],
    "reverse_kl": ["divergence=reverse_kl"],
    "none": ["divergence=none"],
}
BASELINE = "none"
EASY_COUNTDOWN = [
    "task.min_solutions=1",
    "task.warmup_splits=[train]",
    "~task.splits.ood",
    *(f"task.splits.{split}.{key}" for split in ("train", "test")
      for key in ("numbers_per_problem=2", "max_number=9", "target_min=1")),
    "task.splits.train.size=64",
    "task.splits.test.size=16",
]
BUILD_LINE, WROTE_LINE, REUSE_LINE = "Pre-sampling ", "Wrote the pre-sampling cache", "Using the pre-sampling cache"
LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")


def shared_overrides(args, cache_dir: Path) -> list[str]:
    """The config every run shares (all but the divergence)."""
    return [
        "model=tiny",
        f"model.architecture.hidden_size={args.hidden}",
        f"model.architecture.num_layers={args.layers}",
        f"model.architecture.intermediate_size={3 * args.hidden}",
        "model.architecture.num_heads=4",
        "model.warmup.problems=100",
        "model.warmup.steps=60",
        "model.warmup.batch_size=64",
        "model.warmup.lr=2e-3",
        *EASY_COUNTDOWN,
        "device=cpu",
        "precision=no",
        "logger=none",
        f"seed={args.seed}",
        f"trainer.steps={args.warmup + args.steps}",
        "trainer.prompts_per_step=16",
        "trainer.micro_batch_size=64",
        "algorithm.group_size=8",
        "algorithm.epochs=1",
        "algorithm.minibatches=1",
        "generation.max_new_tokens=16",
        "generation.batch_size=128",
        "presample.n=8",
        f"presample.threshold={args.threshold}",
        "eval.every=0",
        "eval.n=4",
        "eval.max_prompts=4",
        "eval.splits=[test]",
        "optimized_metric=eval/test/pass@4",
        f"paths.cache_dir={cache_dir}",
    ]


def divergence_overrides(name: str, args) -> list[str]:
    """The overrides of one config (the rehearsal batch size exists for the DPH ones only)."""
    rehearsal = [f"divergence.rehearsal_batch_size={args.rehearsal_batch}"] if name.startswith("dph_") else []
    return [*CONFIGS[name], *rehearsal]


def run(executable: str, overrides: list[str], run_dir: Path, threads: int) -> dict:
    """Run a console script of the project to completion; its wall time and its own peak RSS."""
    run_dir.mkdir(parents=True, exist_ok=True)
    exe = Path(sys.executable).parent / executable
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    with open(run_dir / "stdout.txt", "w") as out, open(run_dir / "stderr.txt", "w") as err:
        start = time.perf_counter()
        proc = subprocess.Popen([str(exe), *overrides, f"hydra.run.dir={run_dir}"], stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = (run_dir / "stderr.txt").read_text()[-3000:]
        raise RuntimeError(f"{executable} {' '.join(overrides)} failed ({proc.returncode}):\n{tail}")
    return {"wall_s": wall, "max_rss_mib": usage.ru_maxrss / 1024, "run_dir": str(run_dir)}  # ru_maxrss: KiB


def step_times(run_dir: Path, skip: int) -> list[float]:
    train = sorted((r for r in load_metrics(run_dir / "metrics.jsonl") if "time/update_s" in r), key=lambda r: r["train/step"])
    return [r["time/rollout_s"] + r["time/update_s"] for r in train[skip:]]


def log_seconds(log_text: str, first: str, last: str) -> float:
    """Seconds between the log lines containing `first` and `last` (Hydra's timestamp format)."""

    def stamp(needle: str) -> datetime:
        line = next(line for line in log_text.splitlines() if needle in line)
        return datetime.strptime(LOG_TIME.match(line)[1], "%Y-%m-%d %H:%M:%S,%f")

    return (stamp(last) - stamp(first)).total_seconds()


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (each runs every config once)")
    parser.add_argument("--steps", type=int, default=6, help="measured RL steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured RL steps at the start of each run")
    parser.add_argument("--hidden", type=int, default=256, help="model.architecture.hidden_size")
    parser.add_argument("--layers", type=int, default=6, help="model.architecture.num_layers")
    parser.add_argument("--threshold", type=float, default=0.5, help="presample.threshold (D_pef: pass rate >= it)")
    parser.add_argument("--rehearsal-batch", type=int, default=64, help="divergence.rehearsal_batch_size (DPH)")
    parser.add_argument("--threads", type=int, default=1, help="OMP/MKL threads of each run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-cache", type=Path, default=ROOT / "outputs" / "cache",
                        help="where the base model is built once and reused (its models/ folder)")
    parser.add_argument("--work-dir", type=Path, default=None, help="runs and the fresh pre-sampling cache (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-divergence-"))
    cache_dir = work / "cache"  # fresh pre-sampling cache; the base model comes from --model-cache
    (args.model_cache / "models").mkdir(parents=True, exist_ok=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    if not (cache_dir / "models").exists():
        (cache_dir / "models").symlink_to((args.model_cache / "models").resolve(), target_is_directory=True)
    if (cache_dir / "presample").exists():
        shutil.rmtree(cache_dir / "presample")
    shared = shared_overrides(args, cache_dir)
    load_start = load_average()
    print(f"work dir {work}; load average at start {load_start}", flush=True)

    # 1. The base model (built once, not timed as part of anything else).
    prep = run("dph-train", [*shared, "divergence=none", "trainer.steps=0"], work / "prepare", args.threads)
    model_build = json.loads(next((work / "prepare").glob("summary.json")).read_text())
    build_info = json.loads((Path(model_build["model_dir"]) / "dph_build.json").read_text())
    print(f"base model ready ({build_info['stats']['parameters'] / 1e6:.2f} M parameters, {prep['wall_s']:.1f} s)", flush=True)

    # 2. The pre-sampling stage, paid once per cache key; then the same key again.
    first = run("dph-presample", [*shared, *divergence_overrides("dph_fkl", args)], work / "presample-1", args.threads)
    first_log = (work / "presample-1" / "train.log").read_text()
    second = run("dph-presample", [*shared, *divergence_overrides("dph_js", args)], work / "presample-2", args.threads)
    second_log = (work / "presample-2" / "train.log").read_text()
    if BUILD_LINE not in first_log or WROTE_LINE not in first_log:
        raise RuntimeError("the first dph-presample did not build the cache:\n" + first_log)
    if REUSE_LINE not in second_log or BUILD_LINE in second_log:
        raise RuntimeError("the second dph-presample (same key) sampled again:\n" + second_log)
    cache = next(p for p in (cache_dir / "presample").iterdir() if p.is_dir())
    manifest = json.loads((cache / "manifest.json").read_text())
    presample = {
        "first_wall_s": first["wall_s"],
        "first_stage_s": log_seconds(first_log, BUILD_LINE, WROTE_LINE),
        "first_max_rss_mib": first["max_rss_mib"],
        "second_wall_s": second["wall_s"],
        "second_sampled": BUILD_LINE in second_log,
        "second_log": next(line for line in second_log.splitlines() if REUSE_LINE in line),
        "cache": str(cache),
        "counts": manifest["counts"],
        "pass_rate_histogram": manifest["pass_rate_histogram"],
    }
    print(f"pre-sampling: {presample['first_stage_s']:.1f} s in a {first['wall_s']:.1f} s dph-presample run; "
          f"same key again: {second['wall_s']:.1f} s, no sampling; split {manifest['counts']}", flush=True)

    # 3. The training runs, interleaved.
    runs: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    for r in range(args.rounds):
        for name in CONFIGS:
            result = run("dph-train", [*shared, *divergence_overrides(name, args)], work / f"round{r}" / name, args.threads)
            log_text = (work / f"round{r}" / name / "train.log").read_text()
            result["step_s"] = step_times(work / f"round{r}" / name, args.warmup)
            result["reference_model"] = name == "reverse_kl"
            result["presampled"] = BUILD_LINE in log_text
            result["used_cache"] = REUSE_LINE in log_text
            runs[name].append(result)
            print(f"round {r + 1}/{args.rounds} {name:>10}: median step {statistics.median(result['step_s']):.3f} s, "
                  f"peak RSS {result['max_rss_mib']:.0f} MiB", flush=True)

    summary = {}
    for name, results in runs.items():
        steps = [s for res in results for s in res["step_s"]]
        rss = [res["max_rss_mib"] for res in results]
        summary[name] = {
            "median_step_s": statistics.median(steps),
            "round_median_step_s": [statistics.median(res["step_s"]) for res in results],
            "peak_rss_mib": statistics.median(rss),
            "round_peak_rss_mib": rss,
            "presampled_during_training": any(res["presampled"] for res in results),
        }
    base = summary[BASELINE]
    for row in summary.values():
        row["step_ratio"] = row["median_step_s"] / base["median_step_s"]
        row["rss_ratio"] = row["peak_rss_mib"] / base["peak_rss_mib"]
        row["rss_delta_mib"] = row["peak_rss_mib"] - base["peak_rss_mib"]
    load_end = load_average()

    print()
    print(f"{'config':>10} | {'median step s':>13} | {'x none':>6} | {'peak RSS MiB':>12} | {'x none':>6} | "
          f"{'+MiB':>6} | per-round step s / RSS MiB")
    print("-" * 104)
    for name, row in summary.items():
        rounds = ", ".join(f"{s:.2f}/{m:.0f}" for s, m in zip(row["round_median_step_s"], row["round_peak_rss_mib"], strict=True))
        print(f"{name:>10} | {row['median_step_s']:>13.3f} | {row['step_ratio']:>6.2f} | {row['peak_rss_mib']:>12.0f} | "
              f"{row['rss_ratio']:>6.3f} | {row['rss_delta_mib']:>+6.0f} | {rounds}")
    print()
    print(f"pre-sampling (once per cache key): {presample['first_stage_s']:.1f} s of sampling + scoring + log-probs "
          f"({presample['first_wall_s']:.1f} s for the whole dph-presample process); a second dph-presample with the "
          f"same key: {presample['second_wall_s']:.1f} s, no sampling")
    print(f"model: {build_info['stats']['parameters'] / 1e6:.2f} M parameters (one fp32 copy "
          f"{build_info['stats']['parameters'] * 4 / 2**20:.1f} MiB); split: {manifest['counts']}")
    print(f"load average at start {load_start}, at end {load_end} ({os.cpu_count()} CPUs)")

    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "configs": {name: divergence_overrides(name, args) for name in CONFIGS},
            "shared_overrides": shared,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "model": {"parameters": build_info["stats"]["parameters"], "architecture": build_info["spec"]["architecture"],
                      "warmup": build_info["spec"]["warmup"], "dir": model_build["model_dir"]},
            "presample": presample,
            "summary": summary,
            "runs": runs,
            "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                        "load_average_start": load_start, "load_average_end": load_end},
        }, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
