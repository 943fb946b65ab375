"""dph.rollout: the padded layout, and log-probs that match the distribution HF generate sampled from."""

from __future__ import annotations

import pytest
import torch

from dph.models import char_tokenizer, encode_prompts
from dph.engines.hf import sample
from dph.rollout import SequenceBatch, chunked_logprobs_entropy, collate, rows_per_chunk, token_logprobs

PROMPTS = ["3 5 7 -> 22: ", "1 2 -> 3: ", "10 4 9 13 -> 250: ", "8 -> "]  # different lengths: left padding
TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request, tokenizer):
    """A random tiny Llama (rotary positions: only relative offsets matter, so it checks masking) and
    a random tiny GPT-2 (absolute positions: a left-padding offset would change every log-prob)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    if request.param == "llama":
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **ids)
        return LlamaForCausalLM(config).eval()
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=128, **ids)
    return GPT2LMHeadModel(config).eval()


def test_collate_layout():
    batch = collate([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], ["ab", "cde"], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 5, 6, 0], [0, 0, 4, 7, 8, 9]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert batch.response_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert batch.prompt_width == 3 and len(batch) == 2 and batch.texts == ["ab", "cde"]
    part = batch.select(torch.tensor([1]))
    assert part.input_ids.tolist() == [[0, 0, 4, 7, 8, 9]] and part.texts == ["cde"]
    assert batch.select(slice(0, 1)).texts == ["ab"]
    empty = collate([[1]], [[]], [""], pad_id=0)  # an empty response still has a (masked) column
    assert empty.response_mask.tolist() == [[0]] and empty.input_ids.tolist() == [[1, 0]]


def _sampled(model, tokenizer, n=8, max_new_tokens=20, seed=0) -> SequenceBatch:
    torch.manual_seed(seed)
    prompts = encode_prompts(tokenizer, PROMPTS, chat_template=False)
    return sample(model, tokenizer, prompts, n=n, max_new_tokens=max_new_tokens, temperature=TEMPERATURE,
                  top_p=1.0, batch_size=64)


def test_response_masks_end_at_eos(model, tokenizer):
    batch = _sampled(model, tokenizer)
    eos, width = tokenizer.eos_token_id, batch.prompt_width
    assert len(batch) == len(PROMPTS) * 8
    assert batch.response_mask.shape[1] <= 20
    ended = 0
    for row in range(len(batch)):
        length = int(batch.response_mask[row].sum())
        assert batch.response_mask[row, :length].all() and not batch.response_mask[row, length:].any()
        response = batch.input_ids[row, width : width + length].tolist()
        assert batch.attention_mask[row, width : width + length].all()
        assert not batch.attention_mask[row, width + length :].any()
        if eos in response:
            assert response.index(eos) == length - 1  # cut right after the first eos
            ended += 1
        else:
            assert length == 20  # no eos: cut at max_new_tokens
        assert batch.texts[row] == tokenizer.decode(response, skip_special_tokens=True)
    assert 0 < ended < len(batch), "the seeded sample should hold responses with and without eos"
    # rows are prompt-major: row i belongs to prompt i // n
    prompt_ids = encode_prompts(tokenizer, PROMPTS, chat_template=False)
    for row in range(len(batch)):
        p = prompt_ids[row // 8]
        assert batch.input_ids[row, width - len(p) : width].tolist() == p
        assert not batch.attention_mask[row, : width - len(p)].any()


def test_token_logprobs_match_the_sampling_distribution_of_generate(model, tokenizer):
    """Log-probs of the sampled tokens equal log_softmax(logits / T) of the logits generate used."""
    n, max_new = 4, 12
    batch = _sampled(model, tokenizer, n=n, max_new_tokens=max_new, seed=1)

    # The same draw again, straight from generate, with the logits of every step.
    torch.manual_seed(1)
    rows = [p for p in encode_prompts(tokenizer, PROMPTS, chat_template=False) for _ in range(n)]
    width = max(len(p) for p in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(rows):
        ids[i, width - len(p) :] = torch.tensor(p)
        attn[i, width - len(p) :] = 1
    out = model.generate(
        input_ids=ids, attention_mask=attn, do_sample=True, temperature=TEMPERATURE, top_p=1.0, top_k=0,
        repetition_penalty=1.0, max_new_tokens=max_new, min_new_tokens=0, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, use_cache=True, return_dict_in_generate=True,
        output_logits=True, output_scores=True,
    )
    generated = out.sequences[:, width:]
    t = batch.response_mask.shape[1]
    mask = batch.response_mask.bool()
    assert torch.equal(batch.input_ids[:, width:][mask], generated[:, :t][mask]), "sample() drew other tokens"

    logits = torch.stack(out.logits, dim=1)[:, :t].float()  # raw logits [B, T, V]
    scores = torch.stack(out.scores, dim=1)[:, :t].float()  # after the temperature warper
    expected = torch.log_softmax(logits / TEMPERATURE, -1).gather(-1, generated[:, :t, None]).squeeze(-1)
    from_scores = torch.log_softmax(scores, -1).gather(-1, generated[:, :t, None]).squeeze(-1)

    with torch.no_grad():
        logp, entropy = token_logprobs(model, batch, TEMPERATURE)
    assert logp.shape == entropy.shape == batch.response_mask.shape
    assert torch.allclose(logp[mask], expected[mask], atol=1e-4), (logp[mask] - expected[mask]).abs().max()
    assert torch.allclose(logp[mask], from_scores[mask], atol=1e-4)
    assert (logp[~mask] == 0).all() and (entropy[~mask] == 0).all()
    probs = torch.softmax(logits / TEMPERATURE, -1)
    want_entropy = -(probs * probs.log()).sum(-1)
    assert torch.allclose(entropy[mask], want_entropy[mask], atol=1e-4)


def test_token_logprobs_do_not_depend_on_padding(model, tokenizer):
    """A row scored alone (no padding) and inside a padded batch gets the same log-probs."""
    batch = _sampled(model, tokenizer, n=2, max_new_tokens=10, seed=2)
    with torch.no_grad():
        together, _ = token_logprobs(model, batch, TEMPERATURE)
        for row in range(len(batch)):
            p_len = int(batch.attention_mask[row, : batch.prompt_width].sum())
            r_len = int(batch.response_mask[row].sum())
            ids = batch.input_ids[row, batch.prompt_width - p_len : batch.prompt_width + r_len]
            alone = collate([ids[:p_len].tolist()], [ids[p_len:].tolist()], [""], tokenizer.pad_token_id)
            logp, _ = token_logprobs(model, alone, TEMPERATURE)
            assert torch.allclose(logp[0, :r_len], together[row, :r_len], atol=1e-5)


def test_token_logprobs_gradient_flows(model, tokenizer):
    batch = _sampled(model, tokenizer, n=1, max_new_tokens=6, seed=3)
    model.zero_grad()
    logp, entropy = token_logprobs(model, batch, TEMPERATURE)
    assert logp.requires_grad and not entropy.requires_grad
    logp.sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    model.zero_grad()


def test_shared_prompt_scoring_gives_the_same_values_and_gradients(model, tokenizer):
    """group > 1 runs each prompt once and shares its cache with the group's responses: log-probs,
    entropies and parameter gradients equal the plain path's; a batch whose groups do not share a
    prompt falls back to the plain path."""
    torch.manual_seed(1)
    batch = sample(model, tokenizer, encode_prompts(tokenizer, PROMPTS, False), n=3, max_new_tokens=10,
                   temperature=TEMPERATURE, top_p=1.0, batch_size=64)
    results = {}
    for group in (1, 3):
        model.zero_grad(set_to_none=True)
        logp, entropy = token_logprobs(model, batch, TEMPERATURE, group=group)  # eval mode: no dropout
        (logp * torch.linspace(-1, 1, logp.shape[1])).sum().backward()
        results[group] = (logp.detach(), entropy, [p.grad.clone() for p in model.parameters() if p.grad is not None])
    torch.testing.assert_close(results[3][0], results[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[3][1], results[1][1], rtol=1e-5, atol=1e-5)
    assert len(results[3][2]) == len(results[1][2])
    for shared, plain in zip(results[3][2], results[1][2], strict=True):
        torch.testing.assert_close(shared, plain, rtol=1e-4, atol=1e-6)

    from dph.rollout import shares_prompts

    assert shares_prompts(batch, 3) and not shares_prompts(batch, 2) and not shares_prompts(batch, 5)
    mixed = batch.select(torch.tensor([0, 3, 6, 9, 1, 4]))  # two groups of 3, each with different prompts
    assert not shares_prompts(mixed, 3)
    torch.testing.assert_close(token_logprobs(model, mixed, TEMPERATURE, group=3)[0],
                               token_logprobs(model, mixed, TEMPERATURE)[0])


# ---------------------------------------------------------------- chunked log-probs at a big vocabulary
def _full_logprobs_entropy(inputs, targets, temperature, head=None):
    """The reference: the whole [N, V] float32 logits, their log_softmax and entropy at once."""
    logits = (inputs if head is None else head(inputs)).float() / temperature
    log_p = torch.log_softmax(logits, dim=-1)
    return log_p.gather(-1, targets[:, None])[:, 0], -(torch.softmax(logits, -1) * log_p).sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("from_hidden", [True, False], ids=["hidden", "logits"])
@pytest.mark.parametrize("entropy_grad", [False, True])
def test_chunked_logprobs_and_entropy_equal_the_full_computation(dtype, from_hidden, entropy_grad):
    """Every chunk size (1, ones that do not divide the 13 rows, one chunk, more than the rows) gives the
    full computation's log-probs, entropies and gradients (inputs and head weight), at T != 1."""
    N, H, V, temperature = 13, 6, 11, 0.7
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(H, V, bias=False, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g))
    raw = torch.randn(N, H if from_hidden else V, generator=g) * (1.0 if from_hidden else 3.0)
    targets = torch.randint(0, V, (N,), generator=g)
    w_logp, w_entropy = torch.randn(N, generator=g), torch.randn(N, generator=g)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-2)

    def run(fn):
        x = raw.to(dtype).requires_grad_()
        head.zero_grad(set_to_none=True)
        logp, entropy = fn(x)
        loss = (w_logp * logp).sum() + ((w_entropy * entropy).sum() if entropy.requires_grad else 0.0)
        loss.backward()
        grads = [x.grad] + ([head.weight.grad] if from_hidden else [])
        return logp.detach(), entropy.detach(), entropy.requires_grad, grads

    def full(x):
        logp, entropy = _full_logprobs_entropy(x, targets, temperature, head if from_hidden else None)
        return logp, entropy if entropy_grad else entropy.detach()

    want = run(full)
    for rows in (1, 2, 5, 13, 64):
        got = run(lambda x: chunked_logprobs_entropy(x, targets, temperature, chunk_rows=rows,
                                                     head=head if from_hidden else None,
                                                     entropy_grad=entropy_grad))
        assert got[0].dtype == got[1].dtype == torch.float32
        torch.testing.assert_close(got[0], want[0], **tol)
        torch.testing.assert_close(got[1], want[1], **tol)
        assert got[2] == entropy_grad
        for a, b in zip(got[3], want[3], strict=True):
            torch.testing.assert_close(a, b, **tol)
    with torch.no_grad():
        logp, entropy = chunked_logprobs_entropy(raw.to(dtype), targets, temperature, chunk_rows=5,
                                                 head=head if from_hidden else None, entropy_grad=entropy_grad)
    assert not logp.requires_grad and not entropy.requires_grad
    torch.testing.assert_close(logp, want[0], **tol)


def test_rows_per_chunk():
    assert rows_per_chunk(151_936, 256 << 20) == 441  # 441 x 151,936 x 4 bytes <= 256 MiB < 442 x ...
    assert rows_per_chunk(10, 400) == 10 and rows_per_chunk(10, 399) == 9 and rows_per_chunk(10**9, 1) == 1


def _scored(model, batch, group, entropy_grad, **kwargs):
    """token_logprobs' log-probs, entropies and parameter gradients (of a loss that weighs both), and
    the most rows the output embedding computed logits for in one call."""
    head_rows = []
    handle = model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: head_rows.append(out.shape[:-1].numel()))
    model.zero_grad(set_to_none=True)
    try:
        logp, entropy = token_logprobs(model, batch, TEMPERATURE, group, entropy_grad=entropy_grad, **kwargs)
        weights = torch.linspace(-1, 1, logp.shape[1])
        ((logp * weights).sum() + (entropy.sum() if entropy_grad else 0.0)).backward()
    finally:
        handle.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logp.detach(), entropy.detach(), entropy.requires_grad, grads, max(head_rows)


def _assert_same_scores(chunked, whole):
    torch.testing.assert_close(chunked[0], whole[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked[1], whole[1], rtol=1e-5, atol=1e-5)
    assert chunked[2] == whole[2]
    assert chunked[3].keys() == whole[3].keys() and chunked[3]
    for name, grad in chunked[3].items():  # float rounding, relative to the gradient's scale
        scale = float(whole[3][name].abs().max())
        torch.testing.assert_close(grad, whole[3][name], rtol=1e-4, atol=1e-6 + 1e-5 * scale)


@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("entropy_grad", [False, True])
def test_token_logprobs_in_chunks_equal_one_chunk(model, tokenizer, group, entropy_grad):
    """A chunk bound of 5 positions (the model returns hidden states, the output embedding runs per
    chunk) gives the values and gradients of the default (one chunk: the whole logits), with the
    prompt shared per group or not; the head never computes logits for more than a chunk's rows
    (or the batch's rows at the one position the model keeps)."""
    torch.manual_seed(4)
    batch = sample(model, tokenizer, encode_prompts(tokenizer, PROMPTS, False), n=3, max_new_tokens=10,
                   temperature=TEMPERATURE, top_p=1.0, batch_size=64)
    vocab = model.get_output_embeddings().weight.shape[0]
    whole = _scored(model, batch, group, entropy_grad)
    chunked = _scored(model, batch, group, entropy_grad, logits_chunk_bytes=5 * 4 * vocab)
    _assert_same_scores(chunked, whole)
    assert whole[4] >= batch.response_mask.numel()  # the default: all positions at once
    assert chunked[4] <= max(5, len(batch))
    model.zero_grad(set_to_none=True)


def test_token_logprobs_in_chunks_with_lora_and_gradient_checkpointing(tokenizer):
    """The chunked path through a PEFT model (LoRA) with gradient checkpointing in train mode: the
    adapters' gradients equal those of the whole-logits computation."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dph.models import prepare_for_training

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id)
    base = Qwen2ForCausalLM(config)
    batch = _sampled(base.eval(), tokenizer, n=2, max_new_tokens=8, seed=5)
    policy = prepare_for_training(base, {"gradient_checkpointing": True,
                                         "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}})
    policy.train()
    whole = _scored(policy, batch, 2, True)
    chunked = _scored(policy, batch, 2, True, logits_chunk_bytes=3 * 4 * len(tokenizer))
    _assert_same_scores(chunked, whole)
    assert all("lora_" in name for name in chunked[3]) and chunked[4] <= max(3, len(batch))


def test_token_logprobs_in_chunks_of_soft_capped_logits(tokenizer, monkeypatch):
    """A model that transforms its logits after the output embedding (Gemma 2's soft-cap) is scored
    from its own logits, chunk by chunk: the values and gradients of one chunk. Had its config
    attribute not been known, scoring would fail loudly rather than skip the soft-cap."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                          final_logit_softcapping=2.0, pad_token_id=tokenizer.pad_token_id)
    model = Gemma2ForCausalLM(config).eval()
    batch = _sampled(model, tokenizer, n=2, max_new_tokens=8, seed=6)
    whole = _scored(model, batch, 1, True)
    chunked = _scored(model, batch, 1, True, logits_chunk_bytes=3 * 4 * len(tokenizer))
    _assert_same_scores(chunked, whole)
    monkeypatch.setattr("dph.rollout._LOGIT_TRANSFORMS", ())
    with pytest.raises(RuntimeError, match="transforms its logits"):
        token_logprobs(model, batch, TEMPERATURE, logits_chunk_bytes=3 * 4 * len(tokenizer))


def test_token_logprobs_in_chunks_through_a_ddp_wrapper(tokenizer):
    """Under DistributedDataParallel (one gloo rank) the forward goes through the wrapper, the output
    embedding of the wrapped model runs per chunk, and the gradients equal the unwrapped model's."""
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config).eval()
    batch = _sampled(model, tokenizer, n=2, max_new_tokens=8, seed=7)
    chunk_bytes = 3 * 4 * len(tokenizer)
    plain = _scored(model, batch, 2, False, logits_chunk_bytes=chunk_bytes)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        wrapped.zero_grad(set_to_none=True)
        logp, _ = token_logprobs(wrapped, batch, TEMPERATURE, 2, logits_chunk_bytes=chunk_bytes)
        (logp * torch.linspace(-1, 1, logp.shape[1])).sum().backward()
        torch.testing.assert_close(logp.detach(), plain[0], rtol=1e-5, atol=1e-5)
        for name, param in model.named_parameters():
            torch.testing.assert_close(param.grad, plain[3][name], rtol=1e-4, atol=1e-6)
    finally:
        dist.destroy_process_group()
