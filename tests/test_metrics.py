"""pass@k against brute force, entropy against hand computation, and the metric names."""

import itertools
import math

import pytest
import torch

from dph.metrics import (
    METRICS,
    describe_metric,
    forgetting,
    distinct_correct,
    entropy_from_logits,
    eval_metric_names,
    ks_up_to,
    pass_at_k,
    pass_at_k_mean,
    token_entropy,
)


def brute_force_pass_at_k(n, c, k):
    """Fraction of the k-subsets of n samples (the first c correct) holding a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_brute_force():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                expected = brute_force_pass_at_k(n, c, k)
                assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_edge_cases_and_large_n():
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 6, 5) == 1.0  # n - c < k: every k-subset has a correct one
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    n = 1024
    for c in (0, 1, 7, 512, 1000, 1024):
        for k in ks_up_to(n):
            value = pass_at_k(n, c, k)
            assert math.isfinite(value) and 0.0 <= value <= 1.0
            exact = 1 - math.comb(n - c, k) / math.comb(n, k)  # exact big-integer ratio
            assert value == pytest.approx(exact, abs=1e-9)
    assert pass_at_k(1024, 1, 1) == pytest.approx(1 / 1024)
    for bad in [(4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_pass_at_k_mean():
    out = pass_at_k_mean([0, 4, 2], 4, [1, 2, 4])
    assert out == pytest.approx({1: (0 + 1 + 0.5) / 3, 2: (0 + 1 + 5 / 6) / 3, 4: 2 / 3})
    with pytest.raises(ValueError):
        pass_at_k_mean([], 4, [1])


@pytest.mark.parametrize(
    "n,ks",
    [(1, [1]), (2, [1, 2]), (3, [1, 2, 3]), (8, [1, 2, 4, 8]), (10, [1, 2, 4, 8, 10]),
     (64, [1, 2, 4, 8, 16, 32, 64])],
)
def test_ks_up_to(n, ks):
    assert ks_up_to(n) == ks


def test_ks_up_to_rejects_zero():
    with pytest.raises(ValueError):
        ks_up_to(0)


def test_entropy_by_hand():
    V = 7
    uniform = torch.zeros(V)
    one_hot = torch.tensor([0.0] + [-math.inf] * (V - 1))
    nearly_one_hot = torch.tensor([30.0] + [-30.0] * (V - 1))
    logits = torch.stack([uniform, one_hot, nearly_one_hot])[None]  # [1, 3, V]
    h = entropy_from_logits(logits)
    assert h.shape == (1, 3)
    assert h[0, 0].item() == pytest.approx(math.log(V))
    assert h[0, 1].item() == 0.0
    assert h[0, 2].item() == pytest.approx(0.0, abs=1e-20)
    p = torch.softmax(torch.tensor([1.0, 2.0, 3.0]), -1)
    by_hand = -(p * p.log()).sum()
    h3 = entropy_from_logits(torch.tensor([1.0, 2.0, 3.0]))
    assert h3.item() == pytest.approx(by_hand.item())


def test_token_entropy_respects_mask_and_chunks():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g) * 3
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    per_token = entropy_from_logits(logits)
    expected = per_token[mask.bool()].mean()
    torch.testing.assert_close(token_entropy(logits, mask), expected)
    torch.testing.assert_close(token_entropy(logits, mask, chunk_rows=2), expected)
    logits[mask == 0] = float("nan")  # garbage on padding must not leak
    torch.testing.assert_close(token_entropy(logits, mask), expected)
    assert token_entropy(logits, torch.zeros_like(mask)).item() == 0.0
    bf16 = entropy_from_logits(torch.zeros(2, 4, dtype=torch.bfloat16))
    assert bf16.dtype == torch.float32 and bf16[0].item() == pytest.approx(math.log(4))


def test_distinct_correct():
    answers = ["1+2", "2+1", "1+2", None, "3", "x"]
    rewards = [1.0, 1.0, 1.0, 1.0, 0.0, 1.0]
    assert distinct_correct(answers, rewards) == 3
    assert distinct_correct([], []) == 0
    with pytest.raises(ValueError):
        distinct_correct(["a"], [])


def test_metric_names():
    required = """train/reward_mean train/entropy train/divergence train/loss train/pg_loss
    train/div_loss train/div_value train/rehearsal_logprob train/clip_frac train/response_length
    train/lr time/rollout_s time/update_s""".split()
    for name in required:
        assert describe_metric(name) == METRICS[name]
    for description in METRICS.values():
        assert description and "\n" not in description
    assert eval_metric_names("test", 10) == [
        "eval/test/pass@1", "eval/test/pass@2", "eval/test/pass@4", "eval/test/pass@8",
        "eval/test/pass@10", "eval/test/entropy", "eval/test/reward_mean",
        "eval/test/distinct_correct", "eval/test/truncated_frac", "eval/test/forgotten", "eval/test/newly_solved",
        "eval/test/solution_coverage",
    ]
    for name in eval_metric_names("sql/ood", 64):  # "<task>/<split>" splits
        describe_metric(name)
    assert describe_metric("eval/test/pass@8") == METRICS["eval/<split>/pass@<k>"]
    bad_names = ["train/kl", "eval/test/pass@0", "eval/test/pass@k", "eval/test/accuracy"]
    for bad in bad_names + ["eval//entropy"]:
        with pytest.raises(KeyError, match="train/entropy"):
            describe_metric(bad)


def test_forgetting_by_hand():
    initial = {"a": (3, ["1+2", "2+1"]), "b": (1, ["x"]), "c": (0, []), "d": (0, []), "e": (2, ["p", "q", "r"])}
    current = {"a": (5, ["1+2"]), "b": (0, []), "c": (1, ["y"]), "d": (0, []), "e": (1, ["q", "s"]), "f": (4, ["z"])}
    out = forgetting(initial, current)
    assert out["forgotten"] == pytest.approx(1 / 3)  # of a, b, e (solved at step 0), b is lost
    assert out["newly_solved"] == pytest.approx(1 / 2)  # of c, d, c is solved now; f was never evaluated at step 0
    assert out["solution_coverage"] == pytest.approx((1 / 2 + 0 / 1 + 1 / 3) / 3)
    same = forgetting(initial, initial)
    assert same == {"forgotten": 0.0, "newly_solved": 0.0, "solution_coverage": 1.0}
    assert forgetting({}, current) == {"forgotten": 0.0, "newly_solved": 0.0, "solution_coverage": 1.0}
