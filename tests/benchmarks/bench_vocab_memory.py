"""Peak memory of dph training steps at a real vocabulary (151,936, Qwen2.5's) against a tiny one, and
against the former whole-logits log-probs; and of HF generation at that vocabulary.

The model: a Qwen2 architecture with random weights (hidden 64, 2 layers, tied embeddings) and dph's
character tokenizer, saved once per vocabulary size. Configurations, each a process of its own
(peak RSS is that process's `ru_maxrss`, from `os.wait4`), rounds interleaved:

  * `step tiny vocab`, `step 151,936`, `step 151,936 full logits`: a real `dph-train` run of 2 steps
    (16 prompts x 8 responses, micro-batch 64, 96 new tokens, `divergence=none`, a small evaluation
    at steps 0 and 2): rollouts, old log-probs, the update. `full logits` is the former computation:
    `dph.rollout.token_logprobs` with a chunk bound that holds every micro-batch's logits, which takes
    the whole-logits path (float32 [B, T, V] logits, their log_softmax and entropy, kept for the
    backward), op for op the code before chunking. With random weights at 151,936 tokens almost no
    response ends before 96 tokens; at the tiny vocabulary many do, but every micro-batch's padded
    width is still 96.
  * `generate 151,936 x N`: HF `generate` (dph.engines.hf.sample) of N sequences in one call
    (generation.batch_size=N), which computes [N, V] float32 logits and sampling temporaries at
    every new token. 16 new tokens: the peak is reached at the first ones (this model's KV cache is
    ~30 MiB at N=512 and 96 tokens), and generating is slow at this vocabulary on a CPU.

Reported: peak RSS per configuration (median over rounds) and the ratios between them.

    python tests/benchmarks/bench_vocab_memory.py --rounds 1 --out /tmp/vocab_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REAL_VOCAB = 151_936
NEW_TOKENS = 96
GENERATE_TOKENS = 16
WHOLE = 1 << 62  # a logits chunk bound that every micro-batch fits in: the whole-logits path
STEP_OVERRIDES = [  # the 2-step run
    "divergence=none", "trainer.steps=2", "trainer.prompts_per_step=16", "algorithm.group_size=8",
    "trainer.micro_batch_size=64", f"generation.max_new_tokens={NEW_TOKENS}", "eval.every=0", "eval.n=4",
    "eval.max_prompts=8", "optimized_metric=eval/test/pass@4", "logger=none", "trainer.checkpoint_every=0",
    "trainer.save_model=false",
]


def build_model(directory: Path, vocab: int | None) -> Path:
    """A random Qwen2 model (hidden 64, 2 layers) with dph's character tokenizer; vocab None: the
    tokenizer's size. Built once per directory."""
    if (directory / "config.json").exists():
        return directory
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dph.models import char_tokenizer

    tok = char_tokenizer()
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=vocab or len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    Qwen2ForCausalLM(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def child_train(model_dir: str, chunk_bytes: int, run_dir: str) -> None:
    """One dph-train run in this process, with token_logprobs' chunk bound set to `chunk_bytes` (0: its default)."""
    import dph.rollout
    import dph.train

    if chunk_bytes:
        for fn in (dph.rollout.token_logprobs, dph.rollout.logprobs_no_grad):  # every caller uses the default
            getattr(fn, "__wrapped__", fn).__kwdefaults__["logits_chunk_bytes"] = chunk_bytes  # under torch.no_grad
    sys.argv = ["dph-train", "model=hf", f"model.path={model_dir}", *STEP_OVERRIDES, f"hydra.run.dir={run_dir}"]
    dph.train.main()


def child_generate(model_dir: str, sequences: int) -> None:
    """HF generate of `sequences` sequences (8 per prompt) of GENERATE_TOKENS tokens in one call."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dph.engines.hf import sample
    from dph.models import encode_prompts

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    prompts = encode_prompts(tok, [f"{i % 9 + 1} {i % 7 + 2} {i % 5 + 3} -> {i % 40 + 10}: "
                                   for i in range(sequences // 8)], False)
    torch.manual_seed(0)
    batch = sample(model, tok, prompts, n=8, max_new_tokens=GENERATE_TOKENS, temperature=1.0, top_p=1.0,
                   batch_size=sequences)
    print(json.dumps({"response_tokens": int(batch.response_mask.sum())}))


def measure(command: list[str], log: Path) -> dict:
    """Run `command` as a process of its own (one thread); its peak RSS and exit status."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... failed; see {log}")
    return {"peak_rss_mib": usage.ru_maxrss / 1024}  # ru_maxrss: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--generate", type=int, nargs="*", default=[128, 512],
                        help="generation batch sizes to measure at vocabulary 151,936")
    parser.add_argument("--chunk-mib", type=int, nargs="*", default=[],
                        help="more step configurations at 151,936 with these logits chunk bounds (MiB)")
    parser.add_argument("--work", help="directory for the models and runs (default: a temporary one)")
    parser.add_argument("--out")
    parser.add_argument("--child-train", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--child-generate", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_train:
        return child_train(args.child_train[0], int(args.child_train[1]), args.child_train[2])
    if args.child_generate:
        return child_generate(args.child_generate[0], int(args.child_generate[1]))

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_vocab_"))
    models = {"tiny": build_model(work / "model_tiny", None), "real": build_model(work / "model_151936", REAL_VOCAB)}
    configs = {  # name -> command
        "step tiny vocab": ["--child-train", models["tiny"], 0],
        "step 151,936": ["--child-train", models["real"], 0],
        "step 151,936 full logits": ["--child-train", models["real"], WHOLE],
        **{f"step 151,936 chunks of {m} MiB": ["--child-train", models["real"], m << 20] for m in args.chunk_mib},
        **{f"generate 151,936 x {n}": ["--child-generate", models["real"], n] for n in args.generate},
    }
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    for r in range(args.rounds):
        for name, (flag, model_dir, value) in configs.items():
            slug = name.replace(" ", "_").replace(",", "")
            command = [sys.executable, __file__, flag, str(model_dir), str(value)]
            if flag == "--child-train":
                command.append(str(work / f"run_{slug}_{r}"))
            runs[name].append(measure(command, work / f"{slug}_{r}.log"))
    peak = {name: statistics.median(x["peak_rss_mib"] for x in results) for name, results in runs.items()}
    tiny, full = peak["step tiny vocab"], peak["step 151,936 full logits"]
    print(f"{'config':<34}{'peak RSS MiB':>13}{'x tiny vocab':>14}{'x full logits':>15}")
    for name, mib in peak.items():
        print(f"{name:<34}{mib:>13.0f}{mib / tiny:>14.2f}{mib / full:>15.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rounds": args.rounds, "peak_rss_mib": peak, "runs": runs, "work": str(work)}, f, indent=2)


if __name__ == "__main__":
    main()
