"""The pre-sampling stage of DPH-RL: sample the initial policy once, split the prompts, store references.

For every training prompt, `presample.n` responses are sampled from the initial policy at
`presample.temperature` and scored by the task's verifier. Prompts whose pass rate reaches
`presample.threshold` form D_pef (already solved: rehearse them); the rest form D_exp (explore
them with RL). For D_pef prompts the correct responses are kept with their per-token log-probs
under the initial policy, from a forward pass at `generation.temperature` (the distribution the
trainer scores tokens under), so they are exact for the stored tokens and no reference model is
needed during training.

Cache layout, `<cache_dir>/presample/<key>/`:
    reference.safetensors  input_ids, attention_mask, response_mask, ref_logprobs, problem_index
    manifest.json          key, spec, counts, pass-rate histogram, D_pef / D_exp ids, file sha256,
                           creation time
The key hashes everything that determines the result (the model's content fingerprint, task
fingerprint, presample settings and seed, generation length and temperature, rollout engine; not the
run's seed). The directory is written to a
temporary name and renamed into place under a file lock, so runs and sweep trials in parallel
build it once; a cache whose manifest or tensors do not match is rebuilt, with a warning.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dph.fileio import building, new_dir, sha256_file
from dph.models import fingerprint_hash
from dph.rollout import SequenceBatch, token_logprobs
from dph.scoring import score_responses
from dph.seeding import stage_seed
from dph.tasks import Problem, Task

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
TENSOR_FILE, MANIFEST_FILE = "reference.safetensors", "manifest.json"
TENSOR_KEYS = ("input_ids", "attention_mask", "response_mask", "ref_logprobs", "problem_index")


@dataclass
class ReferenceData:
    """Pre-sampled D_pef responses of the initial policy with their per-token log-probs."""

    batch: SequenceBatch
    ref_logprobs: torch.Tensor  # [N, T], zeros on padding
    problem_index: torch.Tensor  # [N], index into the task's train split
    manifest: dict[str, Any]

    def __len__(self) -> int:
        return len(self.batch)

    def exploration_problems(self, task: Task) -> list[Problem]:
        """D_exp: the train prompts the initial policy does not solve reliably."""
        keep = set(self.manifest["d_exp"])
        return [p for p in task.problems("train") if p.id in keep]

    def draw(self, n: int, generator: torch.Generator) -> tuple[SequenceBatch, torch.Tensor]:
        """A random rehearsal batch of n reference responses (with replacement across steps)."""
        rows = torch.randperm(len(self), generator=generator)[:n]
        return self.batch.select(rows), self.ref_logprobs[rows]


def presample_spec(model_fp: dict, task: Task, cfg, encode) -> dict[str, Any]:
    """Everything that determines the pre-sampling result; its hash is the cache key."""
    return {
        "format": FORMAT_VERSION,
        "model": model_fp,
        **encode.spec(),  # how prompts become tokens (chat template, system prompt, prefill)
        "task": {"name": task.name, **task.fingerprint()},
        "presample": {k: cfg.presample[k] for k in ("n", "temperature", "threshold")},
        "max_new_tokens": cfg.generation.max_new_tokens,
        "engine": cfg.rollout.engine,  # the engines draw different samples for one seed
        "logprob_temperature": cfg.generation.temperature,
        "seed": cfg.presample.seed,
    }


def load_or_build(engine, policy, encode, task: Task, model_fp: dict, cfg, cache_dir: str | Path) -> ReferenceData:
    """Reuse the cache for this key when it is valid; otherwise pre-sample it (prompts encoded by
    `encode`, a dph.builders.PromptEncoder; responses drawn by the rollout `engine`; log-probs computed
    with `policy`, the initial policy) and write it."""
    spec = presample_spec(model_fp, task, cfg, encode)
    key = fingerprint_hash(spec)
    target = Path(cache_dir) / "presample" / key
    with building(target, "the pre-sampling cache"):
        if target.exists():
            try:
                data = _load(target, key)
                log.info("Using the pre-sampling cache %s (no sampling needed)", target)
                return data
            except CacheMismatch as e:
                log.warning("Pre-sampling cache %s is not valid (%s): rebuilding it", target, e)
        with new_dir(target) as tmp:
            _build(engine, policy, encode, task, spec, key, cfg, tmp)
        log.info("Wrote the pre-sampling cache %s", target)
    return _load(target, key)


class CacheMismatch(ValueError):
    pass


def _load(directory: Path, key: str) -> ReferenceData:
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CacheMismatch(f"unreadable {MANIFEST_FILE}: {e}") from e
    if manifest.get("key") != key or manifest.get("format") != FORMAT_VERSION:
        raise CacheMismatch(f"manifest key {manifest.get('key')!r} does not match {key!r}")
    tensor_path = directory / TENSOR_FILE
    if not tensor_path.exists() or sha256_file(tensor_path) != manifest.get("sha256"):
        raise CacheMismatch(f"{TENSOR_FILE} is missing or its sha256 differs from the manifest")
    t = load_file(tensor_path)
    if set(t) != set(TENSOR_KEYS) or len(t["input_ids"]) != manifest["counts"]["reference_samples"]:
        raise CacheMismatch(f"{TENSOR_FILE} holds {sorted(t)} with an unexpected shape")
    batch = SequenceBatch(t["input_ids"], t["attention_mask"], t["response_mask"], [""] * len(t["input_ids"]))
    return ReferenceData(batch, t["ref_logprobs"], t["problem_index"], manifest)


@torch.no_grad()
def _build(engine, policy, encode, task: Task, spec: dict, key: str, cfg, out_dir: Path) -> None:
    from tqdm.auto import tqdm

    p = cfg.presample
    problems = task.problems("train")
    log.info("Pre-sampling %d responses for each of %d training prompts (once per cache key)", p.n, len(problems))
    chunk = max(1, cfg.generation.batch_size // p.n)
    pass_counts: list[int] = []
    kept: list[SequenceBatch] = []
    kept_index: list[int] = []
    for index, start in enumerate(tqdm(range(0, len(problems), chunk), desc="pre-sampling", unit="batch")):
        part = problems[start : start + chunk]
        batch = engine.generate(encode([q.prompt for q in part]), n=p.n, max_new_tokens=cfg.generation.max_new_tokens,
                                temperature=p.temperature, top_p=1.0, seed=stage_seed(p.seed, "presample", index))
        correct = torch.tensor([s.status == "correct" for s in score_responses(task, part, batch)])
        for j in range(len(part)):
            c = int(correct[j * p.n : (j + 1) * p.n].sum())
            pass_counts.append(c)
            if c / p.n >= p.threshold:
                rows = torch.nonzero(correct[j * p.n : (j + 1) * p.n]).flatten() + j * p.n
                kept.append(batch.select(rows.to(batch.input_ids.device)))
                kept_index += [start + j] * len(rows)
    pef = [q.id for q, c in zip(problems, pass_counts, strict=True) if c / p.n >= p.threshold]
    exp = [q.id for q, c in zip(problems, pass_counts, strict=True) if c / p.n < p.threshold]

    tensors = _stack(kept, encode.pad_id)
    if tensors is not None:
        logps = [token_logprobs(policy, tensors.select(slice(i, i + 256)), cfg.generation.temperature)[0]
                 for i in range(0, len(tensors), 256)]
        ref_logprobs = torch.cat(logps).float()
    else:
        tensors = SequenceBatch(torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, 1, dtype=torch.long),
                                torch.zeros(0, 1, dtype=torch.long), [])
        ref_logprobs = torch.zeros(0, 1)
    save_file(
        {
            "input_ids": tensors.input_ids.cpu().contiguous(),
            "attention_mask": tensors.attention_mask.cpu().contiguous(),
            "response_mask": tensors.response_mask.cpu().contiguous(),
            "ref_logprobs": ref_logprobs.cpu().contiguous(),
            "problem_index": torch.tensor(kept_index, dtype=torch.long),
        },
        str(out_dir / TENSOR_FILE),
    )
    histogram = Counter(pass_counts)
    manifest = {
        "format": FORMAT_VERSION,
        "key": key,
        "spec": spec,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "counts": {
            "prompts": len(problems),
            "d_pef": len(pef),
            "d_exp": len(exp),
            "reference_samples": len(kept_index),
        },
        "pass_rate_histogram": {f"{c}/{p.n}": histogram.get(c, 0) for c in range(p.n + 1)},
        "d_pef": pef,
        "d_exp": exp,
        "sha256": sha256_file(out_dir / TENSOR_FILE),
    }
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))


def _stack(batches: list[SequenceBatch], pad_id: int) -> SequenceBatch | None:
    """Concatenate batches of different widths into one (prompt left-, response right-padded)."""
    if not batches:
        return None
    width_p = max(b.prompt_width for b in batches)
    width_r = max(b.response_mask.shape[1] for b in batches)
    ids, attn, resp = [], [], []
    for b in batches:
        dp, dr = width_p - b.prompt_width, width_r - b.response_mask.shape[1]
        ids.append(torch.nn.functional.pad(b.input_ids, (dp, dr), value=pad_id))
        attn.append(torch.nn.functional.pad(b.attention_mask, (dp, dr), value=0))
        resp.append(torch.nn.functional.pad(b.response_mask, (0, dr), value=0))
    return SequenceBatch(torch.cat(ids), torch.cat(attn), torch.cat(resp), [t for b in batches for t in b.texts])


def split_metrics(manifest: dict[str, Any]) -> dict[str, Any]:
    """The split as run-summary values: sizes of D_pef / D_exp, reference samples, histogram."""
    counts = manifest["counts"]
    return {
        "presample/d_pef": counts["d_pef"],
        "presample/d_exp": counts["d_exp"],
        "presample/d_pef_fraction": counts["d_pef"] / max(1, counts["prompts"]),
        "presample/reference_samples": counts["reference_samples"],
        "presample/pass_rate_histogram": manifest["pass_rate_histogram"],
    }
