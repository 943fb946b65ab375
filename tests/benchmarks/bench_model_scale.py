"""Memory and time of one dph update step on bigger models, with and without LoRA / gradient checkpointing.

Qwen2-architecture models built from a config (no download) at about 25 M and 100 M parameters
(a 32k vocabulary, as real tokenizers have). One step is what dph-train's update does: a forward over
the rollout batch (prompts shared per group), the PPO-clipped loss, the backward and an AdamW step.
Each configuration runs in a process of its own (peak RSS is that process's), rounds interleaved so
that load from other programs hits them alike; reported: median seconds per step and peak RSS, and
both relative to full fine-tuning of the same model.

    python tests/benchmarks/bench_model_scale.py --rounds 2 --steps 3 --out /tmp/model_scale.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

MODELS = {  # name -> Qwen2Config keyword arguments
    "25M": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=6,
                num_key_value_heads=2),
    "100M": dict(hidden_size=640, intermediate_size=1792, num_hidden_layers=18, num_attention_heads=10,
                 num_key_value_heads=2),
}
VARIANTS = {  # name -> (lora rank, gradient checkpointing)
    "full": (0, False),
    "full+gc": (0, True),
    "lora": (16, False),
    "lora+gc": (16, True),
}


def child(model_name: str, variant: str, steps: int, batch: int, group: int, prompt_len: int, response_len: int,
          threads: int) -> dict:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dph.policy_losses import ppo_clip_loss
    from dph.models import prepare_for_training
    from dph.rollout import collate, token_logprobs

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=32000, max_position_embeddings=512, tie_word_embeddings=True,
                         **MODELS[model_name])
    model = Qwen2ForCausalLM(config)
    params = model.num_parameters()
    rank, checkpointing = VARIANTS[variant]
    model = prepare_for_training(model, {"gradient_checkpointing": checkpointing,
                                         "lora": {"r": rank, "alpha": 32, "dropout": 0.0,
                                                  "target_modules": "all-linear"}})
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 32000, (prompt_len,), generator=g).tolist() for _ in range(batch // group)]
    rows = [p for p in prompts for _ in range(group)]
    responses = [torch.randint(0, 32000, (response_len,), generator=g).tolist() for _ in rows]
    data = collate(rows, responses, [""] * len(rows), pad_id=0)
    advantages = torch.randn(len(rows), generator=g)
    times = []
    for _ in range(steps + 1):  # the first step is a warm-up
        t = time.perf_counter()
        logp, _ = token_logprobs(model, data, 1.0, group)
        loss, _ = ppo_clip_loss(logp, logp.detach(), advantages, data.response_mask, clip_low=0.2, clip_high=0.28)
        (loss.sum() / data.response_mask.sum()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return {"parameters": params, "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "step_s": statistics.median(times[1:]),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32, help="sequences per step")
    parser.add_argument("--group", type=int, default=8, help="responses per prompt")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--response-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = [args.steps, args.batch, args.group, args.prompt_len, args.response_len, args.threads]
    if args.child:
        print(json.dumps(child(*args.child, *shape)))
        return
    runs: dict[str, list[dict]] = {}
    for _ in range(args.rounds):
        for model in args.models:
            for variant in VARIANTS:
                command = [sys.executable, __file__, "--child", model, variant, "--steps", str(args.steps),
                           "--batch", str(args.batch), "--group", str(args.group), "--prompt-len",
                           str(args.prompt_len), "--response-len", str(args.response_len), "--threads", str(args.threads)]
                out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
                runs.setdefault(f"{model} {variant}", []).append(json.loads(out.strip().splitlines()[-1]))
    table = {}
    for key, results in runs.items():
        model = key.split()[0]
        full = runs[f"{model} full"]
        step = statistics.median(r["step_s"] for r in results)
        rss = statistics.median(r["peak_rss_mib"] for r in results)
        table[key] = {"parameters": results[0]["parameters"], "trainable": results[0]["trainable"],
                      "step_s": step, "peak_rss_mib": rss,
                      "step_vs_full": step / statistics.median(r["step_s"] for r in full),
                      "rss_vs_full": rss / statistics.median(r["peak_rss_mib"] for r in full)}
    print(f"{'config':<16}{'params':>10}{'trainable':>11}{'s/step':>9}{'x full':>8}{'peak MiB':>10}{'x full':>8}")
    for key, row in table.items():
        print(f"{key:<16}{row['parameters'] / 1e6:>9.1f}M{row['trainable'] / 1e6:>10.2f}M{row['step_s']:>9.2f}"
              f"{row['step_vs_full']:>8.2f}{row['peak_rss_mib']:>10.0f}{row['rss_vs_full']:>8.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"shape": dict(zip(["steps", "batch", "group", "prompt_len", "response_len", "threads"], shape)),
                       "results": table}, f, indent=2)


if __name__ == "__main__":
    main()
