"""Training a bigger model on the same code: LoRA (the frozen base as the reverse-KL reference, the
saved adapter merged on load), gradient checkpointing, and fp32 loss math under bf16 weights."""

from __future__ import annotations

import pytest
import torch

from conftest import DPH, compose_config, with_overrides
from dph import divergences
from dph.loggers import NullLogger
from dph.models import char_tokenizer, enable_checkpointing, load_policy
from dph.rollout import collate, logprobs_no_grad, token_logprobs


def make_trainer(cfg, run_dir):
    from dph.builders import setup
    from dph.trainer import Trainer

    task, eval_sets = setup(cfg)
    return Trainer(cfg, task, eval_sets, run_dir, NullLogger())


def test_lora_trains_the_adapter_and_its_base_is_the_reference(cache_dir, tmp_path):
    cfg = compose_config(with_overrides(DPH, f"paths.cache_dir={cache_dir}", "experiment=grpo_kl", "model.lora.r=8",
                                        "optimizer.lr=5e-2", "trainer.checkpoint_every=0"))
    trainer = make_trainer(cfg, tmp_path)
    assert trainer.reference.model is None  # no second copy of the weights: the base with adapters off
    trainable = {n for n, p in trainer.learner.unwrapped_policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in trainer.learner.unwrapped_policy.named_parameters() if not p.requires_grad}
    for step in (1, 2):
        trainer.train_step(step)
    assert all(torch.equal(p, frozen[n]) for n, p in trainer.learner.unwrapped_policy.named_parameters() if n in frozen)

    initial, _ = load_policy(trainer.model_dir, cfg.model)  # a separate frozen copy of the initial policy
    batch = trainer.sample(trainer.task.problems("test")[:4], 4, seed=7)
    with torch.no_grad():
        expected = token_logprobs(initial, batch, cfg.generation.temperature, 4)[0]
        current = logprobs_no_grad(trainer.learner.policy, batch, cfg.generation.temperature, 4, 64)[0]
    reference = trainer.reference.logprobs(trainer.learner.policy, batch, cfg.generation.temperature, 4, 64)
    torch.testing.assert_close(reference, expected, rtol=0, atol=1e-5)
    assert (current - expected).abs().max() > 1e-3  # the adapter did move the policy

    saved = trainer.save_policy()
    assert (saved / "adapter_config.json").is_file() and (saved / "adapter_model.safetensors").is_file()
    merged, _ = load_policy(saved, {"name": "hf", "dtype": "float32"})  # base + adapter, merged into a plain model
    assert not hasattr(merged, "peft_config")
    with torch.no_grad():
        torch.testing.assert_close(token_logprobs(merged, batch, cfg.generation.temperature, 4)[0], current,
                                   rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = char_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(config), tok


def _batch(tok, group=3):
    prompts = [[tok.bos_token_id, *tok.encode(p, add_special_tokens=False)] for p in ("3 5 -> 8: ", "12 -> ")]
    rows = [p for p in prompts for _ in range(group)]
    responses = [tok.encode(r, add_special_tokens=False) + [tok.eos_token_id]
                 for r in ("3+5", "5+3", "8", "12", "6+6", "1*12")]
    return collate(rows, responses, [""] * len(rows), tok.pad_token_id)


def test_gradient_checkpointing_gives_the_same_values_and_gradients(llama):
    model, tok = llama
    batch = _batch(tok)
    model.train()
    results = []
    for enabled in (False, True):
        if enabled:
            enable_checkpointing(model)
        model.zero_grad()
        logp, _ = token_logprobs(model, batch, 0.7, group=3)
        logp.sum().backward()
        results.append((logp.detach(), [p.grad.clone() for p in model.parameters()]))
        with torch.no_grad():  # an evaluation between updates: still training mode, no gradients
            torch.testing.assert_close(token_logprobs(model, batch, 0.7, group=3)[0], logp.detach(), rtol=0, atol=1e-5)
    (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
    # the same up to float rounding (with checkpointing the prompt is recomputed per row, not shared)
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=1e-5)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_log_probs_and_divergences_are_fp32_under_bf16_weights(llama):
    model, tok = llama
    bf16 = type(model)(model.config).to(torch.bfloat16)
    bf16.load_state_dict(model.state_dict())
    batch = _batch(tok)
    logp, entropy = token_logprobs(bf16, batch, 1.0, group=3)
    assert logp.dtype == torch.float32 and entropy.dtype == torch.float32
    surrogate, value = divergences.token_divergence(divergences.get_divergence("js"), logp.to(torch.bfloat16),
                                                    logp.detach(), source="reference")
    assert surrogate.dtype == torch.float32 and value.dtype == torch.float32
    with torch.no_grad():
        fp32 = token_logprobs(model, batch, 1.0, group=3)[0]
    assert (logp.detach() - fp32).abs().max() < 0.1  # bf16 weights: close, not equal
