"""The step-0 evaluation, cached: one initial policy evaluated once for every run that shares it.

Every run of a grid evaluates its initial policy at step 0; for one initial policy, evaluation
config and eval seed that evaluation is the same whatever the method (the policy has not been
updated yet). `load_or_run` keeps it under `<cache_dir>/eval0/<key>/`:

    evaluation.json  the Evaluation (metrics, per-prompt results, sample rows), floats exact
    manifest.json    key, spec, the sha256 of evaluation.json, creation time

The key hashes everything that determines the result: the model's content fingerprint and how it
is loaded and trained (model.*, precision; a LoRA adapter starts as the identity but is keyed
anyway), how prompts are encoded, the eval sets (task fingerprints, splits), eval.* and
generation.*, the rollout engine and its settings, the seed and the number of processes. As the
pre-sampling cache: written to a temporary directory and renamed into place under a file lock; a
damaged entry is rebuilt with a warning. A run with a warm cache logs exactly the rows a cold one
logs (only time/eval_s differs).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from dph.evaluation import Evaluation, PromptResult
from dph.fileio import building, new_dir, sha256_file
from dph.models import fingerprint_hash

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
RESULT_FILE, MANIFEST_FILE = "evaluation.json", "manifest.json"


def eval_spec(cfg, model_fp: dict, encoding: dict, eval_sets, world_size: int) -> dict[str, Any]:
    """Everything that determines the step-0 evaluation; its hash is the cache key."""
    plain = lambda node: OmegaConf.to_container(node, resolve=True)  # noqa: E731
    return {
        "format": FORMAT_VERSION,
        "model": model_fp,
        "model_config": plain(cfg.model),
        "precision": cfg.precision,
        "encoding": encoding,
        "eval_sets": [{"label": es.label, "task": es.task.name, "data": es.task.fingerprint(), "split": es.split}
                      for es in eval_sets],
        "eval": {k: v for k, v in plain(cfg.eval).items() if k != "every"},
        "generation": plain(cfg.generation),
        "micro_batch_size": cfg.trainer.micro_batch_size,  # the entropy's forward passes
        "rollout": plain(cfg.rollout),
        "seed": cfg.seed,
        "world_size": world_size,
    }


def load_or_run(spec: dict[str, Any], cache_dir: str | Path, evaluate: Callable[[], Evaluation]) -> Evaluation:
    """The cached evaluation for `spec`, or `evaluate()` run now and stored."""
    key = fingerprint_hash(spec)
    target = Path(cache_dir) / "eval0" / key
    with building(target, "the step-0 evaluation"):
        if target.exists():
            try:
                result = _load(target, key)
                log.info("Using the step-0 evaluation cache %s (no sampling needed)", target)
                return result
            except CacheMismatch as e:
                log.warning("Step-0 evaluation cache %s is not valid (%s): evaluating again", target, e)
        result = evaluate()
        with new_dir(target) as tmp:
            (tmp / RESULT_FILE).write_text(json.dumps(_to_json(result)))
            manifest = {"format": FORMAT_VERSION, "key": key, "spec": spec, "sha256": sha256_file(tmp / RESULT_FILE),
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, default=str))
        log.info("Wrote the step-0 evaluation cache %s", target)
    return result


class CacheMismatch(ValueError):
    pass


def _load(directory: Path, key: str) -> Evaluation:
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CacheMismatch(f"unreadable {MANIFEST_FILE}: {e}") from e
    if manifest.get("key") != key or manifest.get("format") != FORMAT_VERSION:
        raise CacheMismatch(f"manifest key {manifest.get('key')!r} does not match {key!r}")
    path = directory / RESULT_FILE
    if not path.exists() or sha256_file(path) != manifest.get("sha256"):
        raise CacheMismatch(f"{RESULT_FILE} is missing or its sha256 differs from the manifest")
    data = json.loads(path.read_text())
    results = {label: [PromptResult(r["id"], r["correct"], tuple(r["answers"])) for r in rows]
               for label, rows in data["results"].items()}
    return Evaluation(data["step"], data["metrics"], results, data["samples"])


def _to_json(result: Evaluation) -> dict[str, Any]:
    return {"step": result.step, "metrics": result.metrics, "samples": result.samples,
            "results": {label: [{"id": r.id, "correct": r.correct, "answers": list(r.answers)} for r in rows]
                        for label, rows in result.results.items()}}
