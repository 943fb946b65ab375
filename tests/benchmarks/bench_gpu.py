"""dph-train on one CUDA GPU: the default run, bf16 weights, resume after a kill, and a 0.4 B model.

Four checks, each a `dph-train` subprocess (W&B off; metrics.jsonl read back), reported as JSON:

- ``default``: the default run (DPH-JS, tiny model, countdown) on the GPU, fp32, ``--steps`` steps;
  its final test Pass@1/Pass@64, distinct answers, and seconds per step;
- ``bf16``: the same run with ``model.dtype=bfloat16`` (log-probs and divergences stay fp32);
- ``resume``: GRPO, checkpoints every 4 steps, SIGKILLed in the 7th optimizer step and resumed;
  the resumed run's metrics rows and final weights against the uninterrupted run's (on CUDA the
  kernels are not bitwise deterministic across processes, so the differences are reported, not
  asserted);
- ``scale``: a randomly initialised 0.4 B-parameter Qwen2 (built from a config, character
  tokenizer; ``model=hf``, bf16 weights), GRPO, 16 prompts x 8 responses of 64 tokens per step,
  full fine-tuning and LoRA r=16 with gradient checkpointing: seconds per rollout and per update,
  peak GPU memory per step (``time/gpu_peak_memory_gib``).

    python tests/benchmarks/bench_gpu.py --out /tmp/gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from dph.plots import load_metrics

ROOT = Path(__file__).resolve().parents[2]


def rows(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl records (none before its first row; a killed run's torn line skipped)."""
    path = run_dir / "metrics.jsonl"
    return load_metrics(path) if path.exists() else []


def train(name: str, run_dir: Path, overrides: list[str], *, kill: tuple[str, int] | None = None,
          timeout: int = 300) -> dict:
    """One dph-train run (or tests/kill_at.py for a killed one); its wall time and last lines."""
    entry = [sys.executable, str(ROOT / "tests" / "kill_at.py"), kill[0], str(kill[1])] if kill else \
        [sys.executable, "-m", "dph.train"]
    started = time.perf_counter()
    proc = subprocess.run([*entry, f"hydra.run.dir={run_dir}", *overrides], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    wall = time.perf_counter() - started
    print(f"[{name}] exit {proc.returncode} after {wall:.1f} s", flush=True)
    if proc.returncode != 0 and not kill:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", flush=True)
    return {"exit": proc.returncode, "wall_s": round(wall, 1)}


def step_summary(run_dir: Path) -> dict:
    steps = [r for r in rows(run_dir) if "time/rollout_s" in r][1:]  # the first step warms up kernels
    out = {}
    for key in ("time/rollout_s", "time/update_s", "time/gpu_peak_memory_gib"):
        values = [r[key] for r in steps if key in r]
        if values:
            out[key] = round(statistics.median(values), 3)
    return out


def final_eval(run_dir: Path) -> dict:
    evals = [r for r in rows(run_dir) if "eval/test/pass@1" in r]
    if not evals:
        return {}
    keep = ("eval/test/pass@1", "eval/test/pass@64", "eval/test/distinct_correct", "eval/test/forgotten")
    return {"step": evals[-1].get("train/step"), **{k: round(evals[-1][k], 4) for k in keep if k in evals[-1]}}


def build_qwen2(directory: Path) -> int:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dph.models import char_tokenizer

    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                         num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model.num_parameters()


def weights_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model" / "model.safetensors")), load_file(str(b / "model" / "model.safetensors"))
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu.json")
    parser.add_argument("--work", default="/tmp/dph-gpu")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--only", nargs="*", default=["default", "bf16", "resume", "scale"])
    parser.add_argument("--device", default="cuda", help="cpu: try the script out on a machine without a GPU")
    args = parser.parse_args()
    work = Path(args.work)
    common = [f"paths.cache_dir={work / 'cache'}", "logger=none", f"device={args.device}"]
    report: dict = {}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    def save():
        Path(args.out).write_text(json.dumps(report, indent=2))

    if "default" in args.only:
        d = work / "default"
        report["default"] = {**train("default", d, [*common, f"trainer.steps={args.steps}"]),
                             **step_summary(d), **final_eval(d)}
        save()
    if "bf16" in args.only:
        d = work / "bf16"
        report["bf16"] = {**train("bf16", d, [*common, f"trainer.steps={args.steps}", "model.dtype=bfloat16"]),
                          **step_summary(d), **final_eval(d)}
        save()
    if "resume" in args.only:
        grpo = [*common, "experiment=grpo", "trainer.steps=12", "trainer.checkpoint_every=4", "eval.every=6",
                "eval.max_prompts=32", "eval.n=16"]
        full, killed = work / "resume_full", work / "resume_killed"
        report["resume"] = {"uninterrupted": train("resume/uninterrupted", full, grpo),
                            "killed": train("resume/killed", killed, grpo, kill=("update", 7)),
                            "resumed": train("resume/resumed", killed, grpo)}
        a = [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows(full)]
        b = [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows(killed)]
        report["resume"]["same_steps"] = [r.get("train/step") for r in a] == [r.get("train/step") for r in b]
        report["resume"]["max_metric_diff"] = max(
            (abs(x[k] - y[k]) for x, y in zip(a, b) for k in x if isinstance(x[k], (int, float)) and k in y),
            default=None)
        report["resume"]["max_weight_diff"] = weights_diff(full, killed)
        save()
    if "scale" in args.only:
        model_dir = work / "qwen2-0.4b"
        report["scale"] = {"parameters": build_qwen2(model_dir)}
        base = [*common, "model=hf", f"model.path={model_dir}", "model.dtype=bfloat16", "experiment=grpo",
                "trainer.steps=4", "trainer.prompts_per_step=16", "algorithm.group_size=8",
                "trainer.micro_batch_size=32", "generation.max_new_tokens=64", "eval.every=0", "eval.n=8",
                "eval.max_prompts=16", "eval.splits=[test]", "optimized_metric=eval/test/pass@8",
                "trainer.checkpoint_every=0", "trainer.save_model=false"]
        for name, extra in (("full", []), ("lora_r16_gc", ["model.lora.r=16", "model.gradient_checkpointing=true"])):
            d = work / f"scale_{name}"
            report["scale"][name] = {**train(f"scale/{name}", d, [*base, *extra], timeout=400), **step_summary(d)}
            save()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
