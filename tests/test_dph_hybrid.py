"""The DPH-RL hybrid end to end: RL on D_exp, the divergence on pre-sampled D_pef data, no reference model.

Runs use conftest.DPH: countdown shrunk so that the quickly warmed-up tiny model solves some prompts.
"""

from __future__ import annotations

import gc
import json
import math
import re
from pathlib import Path

import pytest
import torch

from conftest import DPH, compose_config, read_jsonl, run_cli, with_overrides
from dph.loggers import NullLogger
from dph.losses import rehearsal_loss

EXPERIMENTS = {"forward_kl": "dph_fkl", "js": "dph_js", "alpha": "dph_alpha"}
DIV_METRICS = ("train/div_value", "train/rehearsal_logprob", "train/div_loss")
BUILD_LINE, REUSE_LINE = "Pre-sampling ", "Using the pre-sampling cache"


def dph_config(cache_dir: Path, *extra: str):
    return compose_config(with_overrides(DPH, f"paths.cache_dir={cache_dir}", *extra))


def make_trainer(cfg, run_dir: Path):
    from dph.builders import setup
    from dph.trainer import Trainer

    task, eval_sets = setup(cfg)
    return Trainer(cfg, task, eval_sets, run_dir, NullLogger())


def live_models() -> list:
    """Every whole model alive (a PreTrainedModel that is not a submodule of another, e.g. not the
    LlamaModel inside a LlamaForCausalLM)."""
    from transformers import PreTrainedModel

    gc.collect()
    models = [o for o in gc.get_objects() if issubclass(type(o), PreTrainedModel)]
    inner = {id(sub) for m in models for sub in m.modules() if sub is not m}
    return [m for m in models if id(m) not in inner]


def textbook_f(name: str, u: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """The generators of dph.divergences written directly in u (normalised: f(1) = f'(1) = 0)."""
    if name == "forward_kl":
        return u - 1 - torch.log(u)
    if name == "js":
        return u * torch.log(u) - (1 + u) * torch.log((1 + u) / 2)
    return (u**alpha - 1 - alpha * (u - 1)) / (alpha * (alpha - 1))


# ---------------------------------------------------------------------------------- in-process


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_dph_trains_on_d_exp_with_no_reference_model(name, cache_dir, tmp_path):
    cfg = dph_config(cache_dir, f"experiment={EXPERIMENTS[name]}")
    assert cfg.divergence.name == name and cfg.divergence.source == "reference"
    before = {id(m) for m in live_models()}
    trainer = make_trainer(cfg, tmp_path)

    assert trainer.reference is None and trainer.rehearsal is not None
    manifest = trainer.rehearsal.data.manifest
    train_ids = [p.id for p in trainer.task.problems("train")]
    assert manifest["d_pef"] and manifest["d_exp"], "the test model must put prompts on both sides"
    assert sorted(manifest["d_pef"] + manifest["d_exp"]) == sorted(train_ids)
    assert [p.id for p in trainer.prompts.problems] == manifest["d_exp"]

    sampled, alive = [], []
    sample = trainer.experience.sample

    def watched_sample(problems, n, seed):
        sampled.extend(p.id for p in problems)
        alive.append([m for m in live_models() if id(m) not in before])
        return sample(problems, n, seed)

    trainer.experience.sample = watched_sample
    for step in (1, 2):
        metrics = trainer.train_step(step)
        for key in DIV_METRICS:
            assert math.isfinite(metrics[key]), (key, metrics[key])
        assert metrics["train/rehearsal_logprob"] < 0
        assert metrics["train/div_value"] >= -1e-6  # f >= 0 (up to rounding near u = 1)

    assert sampled and set(sampled) <= set(manifest["d_exp"])  # RL never sees a D_pef prompt
    assert alive and all(models == [trainer.learner.unwrapped_policy] for models in alive), (
        "exactly one model (the policy) may be alive while DPH trains"
    )


def test_online_reverse_kl_holds_a_second_model(cache_dir, tmp_path):
    """The contrast (and a check that the model count above can see a reference model)."""
    cfg = dph_config(cache_dir, "experiment=grpo_kl")
    before = {id(m) for m in live_models()}
    trainer = make_trainer(cfg, tmp_path)
    assert trainer.reference is not None and trainer.rehearsal is None
    assert len([m for m in live_models() if id(m) not in before]) == 2
    assert len(trainer.prompts.problems) == len(trainer.task.problems("train"))  # RL on every prompt
    metrics = trainer.train_step(1)
    assert "train/div_value" not in metrics and math.isfinite(metrics["train/divergence"])


def test_rehearsal_batch_smaller_than_minibatches(cache_dir, tmp_path):
    cfg = dph_config(cache_dir, "experiment=dph_fkl", "algorithm.minibatches=4", "divergence.rehearsal_batch_size=2")
    metrics = make_trainer(cfg, tmp_path).train_step(1)
    assert math.isfinite(metrics["train/div_value"])


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_rehearsal_gradient_is_weight_times_divergence_gradient(name, cache_dir, tmp_path):
    """dph.losses.rehearsal_loss backpropagates exactly w * grad of the token-mean D_f estimate on the stored
    samples, with the log-probs and f written out by hand here."""
    weight = 0.3
    cfg = dph_config(cache_dir, f"experiment={EXPERIMENTS[name]}", f"divergence.weight={weight}")
    trainer = make_trainer(cfg, tmp_path)
    policy = trainer.learner.unwrapped_policy
    params = [p for p in policy.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move away from the initial policy: at u = 1 every gradient is zero
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    batch, ref_logp = trainer.rehearsal.draw(8, torch.Generator().manual_seed(1), "cpu")
    mask = batch.response_mask.float()

    policy.zero_grad(set_to_none=True)
    objective = trainer.learner.objective
    loss, metrics = rehearsal_loss(objective, trainer.learner.policy, batch, ref_logp, objective.denominator(mask))
    loss.backward()
    got = [p.grad.clone() for p in params]

    policy.zero_grad(set_to_none=True)
    width = mask.shape[1]
    logits = policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    position_ids=(batch.attention_mask.cumsum(-1) - 1).clamp(min=0)).logits
    logits = logits[:, -width - 1 : -1] / cfg.generation.temperature  # position t predicts response token t
    logp = torch.log_softmax(logits, -1).gather(-1, batch.input_ids[:, -width:, None]).squeeze(-1) * mask
    u = torch.exp(logp - ref_logp)
    estimate = (textbook_f(name, u, cfg.divergence.get("alpha", 0.5)) * mask).sum() / mask.sum()
    estimate.backward()
    want = [p.grad.clone() for p in params]

    value = float(estimate.detach())
    assert value > 1e-4
    assert float(loss.detach()) == pytest.approx(weight * value, rel=1e-4)
    assert metrics["train/div_loss"][0] == pytest.approx(value, rel=1e-4)
    assert metrics["train/divergence"][0] == pytest.approx(value, rel=1e-4)
    scale = max(float(w.abs().max()) for w in want)
    assert scale > 0
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, weight * b, rtol=1e-3, atol=1e-5 * scale)


# ------------------------------------------------------------------------------------------ CLI

CLI = with_overrides(DPH, "presample.n=6")  # a cache key of its own, shared by every run below


def train_log(run_dir: Path) -> str:
    return (run_dir / "train.log").read_text()


def cache_used(log_text: str) -> str:
    """The pre-sampling cache directory a run's log names (written or reused)."""
    found = set(re.findall(r"(\S+/presample/[0-9a-f]{16})", log_text))
    assert len(found) == 1, log_text
    return found.pop()


@pytest.fixture(scope="module")
def dph_runs(cache_dir, tmp_path_factory) -> dict[str, Path]:
    """`dph-presample`, then dph-train with each DPH preset on the same config: name -> run dir.
    The cache key does not depend on the divergence, so the pre-sampling is paid once, up front."""
    runs = {}
    for name, executable, experiment in [("presample", "dph-presample", "dph_fkl"),
                                         *(("train-" + n, "dph-train", e) for n, e in EXPERIMENTS.items())]:
        run_dir = tmp_path_factory.mktemp(name)
        proc = run_cli([*CLI, f"experiment={experiment}", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}"],
                       executable=executable)
        assert proc.returncode == 0, f"{executable} {experiment} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        runs[name] = run_dir
        if name == "presample":  # what the cache holds right after it was written
            cache = Path(cache_used(train_log(run_dir)))
            runs["cache-stamp"] = [(p.name, p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(cache.iterdir())]
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_cli_dph_run_logs_the_divergence_and_the_split(name, dph_runs):
    run_dir = dph_runs["train-" + name]
    manifest = json.loads((Path(cache_used(train_log(run_dir))) / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["d_pef"] > 0 and counts["d_exp"] > 0

    rows = read_jsonl(run_dir / "metrics.jsonl")
    split = [r for r in rows if "presample/d_pef" in r]
    assert len(split) == 1 and split[0]["train/step"] == 0
    assert (split[0]["presample/d_pef"], split[0]["presample/d_exp"]) == (counts["d_pef"], counts["d_exp"])
    assert split[0]["presample/reference_samples"] == counts["reference_samples"]
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["train/step"] for r in train_rows] == [1, 2]
    for row in train_rows:
        for key in DIV_METRICS:
            assert isinstance(row[key], float) and math.isfinite(row[key]), (key, row)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["presample/d_pef"] == counts["d_pef"] and summary["presample/d_exp"] == counts["d_exp"]
    assert summary["presample/pass_rate_histogram"] == manifest["pass_rate_histogram"]
    assert f"DPH split: {counts['d_exp']} prompts in D_exp (RL), {counts['d_pef']} in D_pef" in train_log(run_dir)


@pytest.mark.slow
def test_cli_dph_presample_builds_the_cache_every_divergence_reuses(dph_runs):
    presample_log = train_log(dph_runs["presample"])
    assert BUILD_LINE in presample_log and "Wrote the pre-sampling cache" in presample_log
    assert "presample/d_pef:" in presample_log and "presample/d_exp:" in presample_log
    cache = cache_used(presample_log)
    for name in EXPERIMENTS:
        text = train_log(dph_runs["train-" + name])
        assert REUSE_LINE in text and BUILD_LINE not in text, text
        assert cache_used(text) == cache
    stamp = [(p.name, p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(Path(cache).iterdir())]
    assert stamp == dph_runs["cache-stamp"]  # nothing rewritten
