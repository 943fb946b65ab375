"""One GRPO training step of dph-train against TRL's GRPOTrainer, side by side, on the same model.

Both sides train the same saved model (a LlamaForCausalLM with the `model=tiny` architecture of
conf/model/tiny.yaml and dph's character tokenizer) on the countdown task's training prompts, with
the countdown verifier as the only reward, and the same step:

  * 16 prompts x group 8 = 128 completions per step, every completion exactly 32 new tokens;
  * temperature 1, top_p 1, top_k off, fp32 on CPU, no mixed precision;
  * no reference model (dph: divergence=none; TRL: beta=0), one pass and one optimizer step per
    generation batch, gradients accumulated over micro-batches of 64 sequences;
  * PPO clip 0.2 / 0.28, token-mean loss, std-normalised group advantages, AdamW with the same lr,
    betas, eps, weight decay, warm-up and gradient clipping.

Equal lengths without touching either library: the tokenizer gets an extra special token as its
eos whose id lies outside the model's vocabulary (the model has `vocab_size` logits, the eos id is
`vocab_size`), so it can never be sampled and both `generate` calls run the full 32 tokens. The
script checks the mean completion length on both sides and fails if it is not 32.

Each side runs in its own process (no shared accelerate state, global RNG or thread pool), and the
two processes take turns in lock-step: one step of one side, then one step of the other, with the
order alternated every round (A B B A A B ...), so that load from other programs on the machine
hits both sides alike. A step's time is wall-clock:

  * dph: one `Trainer.train_step(step)` call (rollout + scoring + update + metrics);
  * TRL: from the callback's `on_step_begin` to `on_step_end` of one optimizer step (generation,
    scoring, advantages, forward/backward of both micro-batches, clipping, optimizer step); the
    time from the go signal to `on_step_end` (which also covers the Trainer loop's batch fetch and
    per-step bookkeeping) is reported too.

Run it from the benchmark virtual environment (see tests/benchmarks/README.md):

    python tests/benchmarks/bench_grpo_step.py --steps 20 --out /tmp/bench.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

PROMPTS_PER_STEP = 16
GROUP_SIZE = 8
NEW_TOKENS = 32
MICRO_BATCH = 64
NEVER_EOS = "<never-eos>"


# --------------------------------------------------------------------------- shared set-up
def compose_dph_config(model_dir: Path | None, run_root: Path, args):
    """The real dph-train config (Hydra compose API) with the benchmark's overrides; with no
    `model_dir`, the config of dph's own `model=tiny` base model."""
    from hydra import compose, initialize_config_dir

    from dph.config import package_root

    model = ["model=hf", f"model.path={model_dir}", "model.dtype=float32"] if model_dir else ["model=tiny"]
    overrides = [
        *model,
        "divergence=none",
        "logger=none",
        "device=cpu",
        "precision=no",
        f"seed={args.seed}",
        f"trainer.steps={args.warmup + args.steps + 1}",
        f"trainer.prompts_per_step={args.prompts}",
        f"trainer.micro_batch_size={args.micro_batch}",
        f"algorithm.group_size={args.group}",
        "algorithm.epochs=1",
        "algorithm.minibatches=1",
        "algorithm.loss_agg=token-mean",
        "algorithm.advantage=grpo",
        f"generation.max_new_tokens={args.tokens}",
        "generation.temperature=1.0",
        "generation.top_p=1.0",
        f"generation.batch_size={args.prompts * args.group}",
        f"paths.output_root={run_root}",
    ]
    with initialize_config_dir(config_dir=str(package_root() / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def build_model(out_dir: Path, args) -> dict:
    """Save the benchmark's model and tokenizer to `out_dir`; return a description of them."""
    import torch
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from dph.models import char_tokenizer

    tiny_cfg = compose_dph_config(None, out_dir.parent / "outputs", args)
    arch = OmegaConf.to_container(tiny_cfg.model.architecture, resolve=True)
    tok = char_tokenizer()
    vocab = len(tok)
    if args.base == "tiny":
        # dph's own tiny base model (built with its supervised warm-up, cached in the temporary dir).
        from dph.models import resolve_model_dir
        from dph.builders import setup

        task, _ = setup(tiny_cfg)
        src = resolve_model_dir(tiny_cfg.model, [task], tiny_cfg.paths.cache_dir)
        model = AutoModelForCausalLM.from_pretrained(src, local_files_only=True, dtype=torch.float32)
        assert model.config.vocab_size == vocab
    else:
        torch.manual_seed(args.seed)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab,
            hidden_size=arch["hidden_size"],
            intermediate_size=arch["intermediate_size"],
            num_hidden_layers=arch["num_layers"],
            num_attention_heads=arch["num_heads"],
            num_key_value_heads=arch["num_heads"],
            max_position_embeddings=arch["max_positions"],
            tie_word_embeddings=True,
        ))
    # The eos that is never sampled: a new special token whose id (== vocab) has no logit.
    tok.add_special_tokens({"eos_token": NEVER_EOS})
    assert tok.eos_token_id == vocab == model.config.vocab_size
    model.config.bos_token_id = tok.bos_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.config.eos_token_id = None
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = None
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return {"base": args.base, "parameters": model.num_parameters(), "vocab_size": vocab,
            "architecture": arch, "eos_token_id": tok.eos_token_id}


# --------------------------------------------------------------------------- dph worker
def _set_threads(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)


def dph_worker(conn, model_dir: str, run_root: str, args) -> None:
    import torch

    _set_threads(args)

    from dph.loggers import NullLogger
    from dph.builders import setup
    from dph.trainer import Trainer

    cfg = compose_dph_config(Path(model_dir), Path(run_root), args)
    task, eval_sets = setup(cfg)
    run_dir = Path(run_root) / "dph-run"
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, task, eval_sets, run_dir, NullLogger())
    conn.send({"ready": True, "threads": torch.get_num_threads()})
    step = 0
    while conn.recv() == "step":
        step += 1
        t0 = time.perf_counter()
        metrics = trainer.train_step(step)
        wall = time.perf_counter() - t0
        conn.send({
            "wall_s": wall,
            "rollout_s": metrics["time/rollout_s"],
            "update_s": metrics["time/update_s"],
            "completion_length": metrics["train/response_length"],
            "reward_mean": metrics["train/reward_mean"],
        })
    conn.close()


# --------------------------------------------------------------------------- TRL worker
def trl_worker(conn, model_dir: str, run_root: str, args) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    _set_threads(args)

    cfg = compose_dph_config(Path(model_dir), Path(run_root), args)
    from dph.builders import setup

    task, _ = setup(cfg)
    problems = task.problems("train")
    dataset = Dataset.from_dict({"prompt": [p.prompt for p in problems], "problem_index": list(range(len(problems)))})

    def countdown_reward(prompts, completions, problem_index, **kwargs):
        return [task.score(problems[i], text).reward for i, text in zip(problem_index, completions, strict=True)]

    opt = cfg.optimizer
    n = args.prompts * args.group
    grpo_args = GRPOConfig(
        output_dir=str(Path(run_root) / "trl-run"),
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=args.seed,
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=n // args.micro_batch,
        generation_batch_size=n,  # one generation batch = one optimizer step
        num_generations=args.group,
        max_completion_length=args.tokens,
        temperature=cfg.generation.temperature,
        top_p=cfg.generation.top_p,
        top_k=0,
        num_iterations=1,
        beta=0.0,
        epsilon=cfg.algorithm.clip_low,
        epsilon_high=cfg.algorithm.clip_high,
        loss_type="dapo",  # token-mean over the generation batch, as dph's loss_agg=token-mean
        scale_rewards="group",
        mask_truncated_completions=False,
        learning_rate=opt.lr,
        adam_beta1=opt.betas[0],
        adam_beta2=opt.betas[1],
        adam_epsilon=opt.eps,
        weight_decay=opt.weight_decay,
        max_grad_norm=opt.max_grad_norm,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=opt.warmup_steps,
        max_steps=args.warmup + args.steps + 1,
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        log_completions=False,
        dataloader_num_workers=0,
        gradient_checkpointing=False,
    )
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)

    class LockStep(TrainerCallback):
        """Runs one optimizer step per "step" command from the parent and reports its times."""

        def __init__(self):
            self.t_go = self.t_begin = 0.0
            self.gen_s = 0.0

        def _wait(self, control):
            if conn.recv() != "step":
                control.should_training_stop = True
            self.t_go = time.perf_counter()
            self.gen_s = 0.0

        def on_train_begin(self, args_, state, control, **kw):
            conn.send({"ready": True, "threads": torch.get_num_threads()})
            self._wait(control)

        def on_step_begin(self, args_, state, control, **kw):
            self.t_begin = time.perf_counter()

        def on_step_end(self, args_, state, control, **kw):
            t = time.perf_counter()
            m = trainer._metrics["train"]
            conn.send({
                "wall_s": t - self.t_begin,
                "loop_s": t - self.t_go,
                "rollout_s": self.gen_s,
                "update_s": (t - self.t_begin) - self.gen_s,
                "completion_length": m["completions/mean_length"][-1],
                "reward_mean": m["reward"][-1],
            })
            self._wait(control)

    lockstep = LockStep()
    trainer = GRPOTrainer(model=model, reward_funcs=[countdown_reward], args=grpo_args,
                          train_dataset=dataset, processing_class=tok, callbacks=[lockstep])
    # Time the rollout part (generation + scoring + advantages) on this instance only.
    generate_and_score = trainer._generate_and_score_completions

    def timed_generate_and_score(*a, **kw):
        t = time.perf_counter()
        out = generate_and_score(*a, **kw)
        lockstep.gen_s += time.perf_counter() - t
        return out

    trainer._generate_and_score_completions = timed_generate_and_score
    trainer.train()
    conn.close()


# --------------------------------------------------------------------------- orchestration
def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "mean": statistics.fmean(values), "n": len(values)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="measured steps per side")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps per side first")
    parser.add_argument("--prompts", type=int, default=PROMPTS_PER_STEP)
    parser.add_argument("--group", type=int, default=GROUP_SIZE)
    parser.add_argument("--tokens", type=int, default=NEW_TOKENS)
    parser.add_argument("--micro-batch", type=int, default=MICRO_BATCH)
    parser.add_argument("--base", choices=["random", "tiny"], default="random",
                        help="random: a freshly initialised model; tiny: dph's warmed-up tiny base model (built first)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in each side's process (default: torch's own choice, one per core)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if (args.prompts * args.group) % args.micro_batch:
        parser.error("--micro-batch must divide prompts x group")

    for key, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                       "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(key, value)

    with tempfile.TemporaryDirectory(prefix="dph-bench-") as tmp:
        tmp = Path(tmp)
        model_dir = tmp / "model"
        model_info = build_model(model_dir, args)
        print(f"model: {model_info['parameters']:,} parameters ({args.base}), eos id {model_info['eos_token_id']} "
              f"outside the {model_info['vocab_size']}-token vocabulary", flush=True)

        ctx = mp.get_context("spawn")
        workers = {}
        for name, target in (("dph", dph_worker), ("trl", trl_worker)):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=target, args=(child, str(model_dir), str(tmp / name), args), name=name)
            proc.start()
            child.close()
            workers[name] = (proc, parent)
        threads = {}
        for name, (proc, conn) in workers.items():
            threads[name] = conn.recv()["threads"]  # ready

        results: dict[str, list[dict]] = {"dph": [], "trl": []}
        try:
            for i in range(args.warmup + args.steps):
                order = ("dph", "trl") if i % 2 == 0 else ("trl", "dph")
                for name in order:
                    conn = workers[name][1]
                    conn.send("step")
                    r = conn.recv()
                    if i >= args.warmup:
                        results[name].append(r)
                if i >= args.warmup:
                    d, t = results["dph"][-1], results["trl"][-1]
                    print(f"step {i - args.warmup + 1:3d}: dph {d['wall_s']:.3f} s  trl {t['wall_s']:.3f} s  "
                          f"ratio {t['wall_s'] / d['wall_s']:.2f}", flush=True)
        finally:
            for name, (proc, conn) in workers.items():
                try:
                    conn.send("stop")
                except (BrokenPipeError, OSError):
                    pass
            for name, (proc, conn) in workers.items():
                proc.join(timeout=60)
                if proc.is_alive():
                    proc.terminate()

    for name in ("dph", "trl"):
        lengths = {r["completion_length"] for r in results[name]}
        if lengths != {float(args.tokens)}:
            raise SystemExit(f"{name}: completion lengths {sorted(lengths)} != {args.tokens}: the comparison is void")

    dph_wall = [r["wall_s"] for r in results["dph"]]
    trl_wall = [r["wall_s"] for r in results["trl"]]
    report = {
        "settings": {"prompts": args.prompts, "group_size": args.group, "completions": args.prompts * args.group,
                     "new_tokens": args.tokens, "micro_batch": args.micro_batch, "warmup_steps": args.warmup,
                     "measured_steps": args.steps, "seed": args.seed, "torch_threads": threads},
        "model": model_info,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
                    "versions": _versions()},
        "dph": {k: summary([r[k] for r in results["dph"]]) for k in ("wall_s", "rollout_s", "update_s")},
        "trl": {k: summary([r[k] for r in results["trl"]]) for k in ("wall_s", "loop_s", "rollout_s", "update_s")},
        "ratio_trl_over_dph": {
            "median_of_pairwise": statistics.median(t / d for t, d in zip(trl_wall, dph_wall, strict=True)),
            "of_medians": statistics.median(trl_wall) / statistics.median(dph_wall),
            "loop_median_of_pairwise": statistics.median(
                r["loop_s"] / d for r, d in zip(results["trl"], dph_wall, strict=True)),
        },
        "reward_mean": {name: statistics.fmean(r["reward_mean"] for r in results[name]) for name in results},
        "raw": results,
    }
    _print_table(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"results: {args.out}")
    return report


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {p: version(p) for p in ("torch", "transformers", "accelerate", "trl", "datasets", "dph")}


def _print_table(report: dict) -> None:
    s = report["settings"]
    print(f"\n{s['completions']} completions x {s['new_tokens']} tokens per step "
          f"({s['prompts']} prompts x group {s['group_size']}), {s['measured_steps']} measured steps per side, "
          f"{report['machine']['cpus']} CPU cores")
    print(f"{'side':<22}{'median s':>10}{'min':>8}{'max':>8}{'rollout':>10}{'update':>9}")
    rows = [("dph train_step", report["dph"], "wall_s"), ("TRL step", report["trl"], "wall_s"),
            ("TRL step + loop", report["trl"], "loop_s")]
    for label, side, key in rows:
        w = side[key]
        print(f"{label:<22}{w['median']:>10.3f}{w['min']:>8.3f}{w['max']:>8.3f}"
              f"{side['rollout_s']['median']:>10.3f}{side['update_s']['median']:>9.3f}")
    r = report["ratio_trl_over_dph"]
    print(f"TRL / dph: {r['median_of_pairwise']:.2f}x (median of per-round ratios), "
          f"{r['of_medians']:.2f}x (ratio of medians), {r['loop_median_of_pairwise']:.2f}x (TRL incl. loop)")


if __name__ == "__main__":
    main()
