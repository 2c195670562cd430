"""GRPO math against hand computations: advantages, clipped surrogate, aggregations, k3 KL, completion masks."""

import math

import pytest
import torch

from recipes.grpo.loss import (
    aggregate,
    clipped_surrogate,
    completion_mask,
    group_advantages,
    k3_kl,
    token_entropy,
    token_logprobs,
)


def test_group_advantages_group_batch_none():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])  # two groups of 3
    # group 1: mean 1/3, unbiased std sqrt(((2/3)^2 + 2 (1/3)^2) / 2) = sqrt(1/3)
    s = math.sqrt(1 / 3)
    want = [(2 / 3) / s, (-1 / 3) / s, (-1 / 3) / s, (-2 / 3) / s, (1 / 3) / s, (1 / 3) / s]
    torch.testing.assert_close(group_advantages(r, 3, "group", eps=0.0), torch.tensor(want))
    batch_std = r.std()  # unbiased over all 6: mean 0.5 -> sqrt(6 * 0.25 / 5)
    assert math.isclose(float(batch_std), math.sqrt(0.3), rel_tol=1e-6)
    centred = torch.tensor([2 / 3, -1 / 3, -1 / 3, -2 / 3, 1 / 3, 1 / 3])
    torch.testing.assert_close(group_advantages(r, 3, "batch", eps=0.0), centred / math.sqrt(0.3))
    torch.testing.assert_close(group_advantages(r, 3, "none"), centred)


def test_group_advantages_ignore_invalid_and_constant_groups():
    r = torch.tensor([1.0, 0.0, 5.0, 2.0, 2.0, 2.0])
    valid = torch.tensor([True, True, False, True, True, True])
    adv = group_advantages(r, 3, "group", valid, eps=1e-4)
    s = math.sqrt(0.5) + 1e-4  # valid rewards 1, 0: mean 0.5, unbiased std sqrt(0.5); a constant group gets 0
    torch.testing.assert_close(adv, torch.tensor([0.5 / s, -0.5 / s, 0.0, 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(r, 4)


def test_clipped_surrogate_hand_values():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.0, 1.5, 0.5, 1.1]]))  # ratios 1, 1.5, 0.5, 1.1
    loss_pos, clip_pos = clipped_surrogate(logp, old, torch.tensor([2.0]), eps_low=0.2, eps_high=0.28)
    # A > 0: -min(rho A, clip(rho) A): 1 -> -2; 1.5 -> clip 1.28 -> -2.56; 0.5 -> -1 (unclipped is min); 1.1 -> -2.2
    torch.testing.assert_close(loss_pos, torch.tensor([[-2.0, -2.56, -1.0, -2.2]]))
    assert clip_pos.tolist() == [[False, True, False, False]]
    loss_neg, clip_neg = clipped_surrogate(logp, old, torch.tensor([-1.0]), eps_low=0.2, eps_high=0.28)
    # A < 0: 1.5 -> max(1.5, 1.28) = 1.5 -> loss 1.5; 0.5 -> clip 0.8 -> loss 0.8; 1.1 -> 1.1
    torch.testing.assert_close(loss_neg, torch.tensor([[1.0, 1.5, 0.8, 1.1]]))
    assert clip_neg.tolist() == [[False, False, True, False]]


def test_aggregations_hand_values():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert float(aggregate(per_token, mask, "sequence_mean")) == pytest.approx((2.0 + 4.0) / 2)
    assert float(aggregate(per_token, mask, "token_mean")) == pytest.approx(10.0 / 4)
    assert float(aggregate(per_token, mask, "max_length", max_length=5)) == pytest.approx(10.0 / (2 * 5))
    with pytest.raises(ValueError, match="max_length"):
        aggregate(per_token, mask, "max_length")
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(per_token, mask, "mean")


@pytest.mark.parametrize("mode", ["sequence_mean", "token_mean", "max_length"])
def test_loss_gradient_matches_hand_policy_gradient(mode):
    """At ratio 1 the gradient of the clipped loss w.r.t. logp is -A * (aggregation weight) per token."""
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = torch.tensor([1.5, -0.5])
    per_token, _ = clipped_surrogate(logp, logp.detach(), adv)
    aggregate(per_token, mask, mode, max_length=4).backward()
    weights = {"sequence_mean": torch.tensor([[1 / 2, 1 / 2, 0], [1 / 3, 1 / 3, 1 / 3]]) / 2,
               "token_mean": mask / 5.0, "max_length": mask / 8.0}[mode]
    torch.testing.assert_close(logp.grad, -adv.unsqueeze(1) * weights)


def test_k3_kl_formula_and_nonnegative():
    logp = torch.tensor([-1.0, -2.0, -0.1])
    ref = torch.tensor([-1.5, -1.0, -0.1])
    want = [math.exp(r - p) - (r - p) - 1 for p, r in zip(logp.tolist(), ref.tolist(), strict=True)]
    torch.testing.assert_close(k3_kl(logp, ref), torch.tensor(want))
    assert float(k3_kl(logp, ref)[2]) == 0.0 and bool((k3_kl(logp, ref) >= 0).all())


def test_token_logprobs_and_entropy_match_softmax():
    logits = torch.tensor([[[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]]])
    targets = torch.tensor([[2, 0]])
    lp = token_logprobs(logits, targets, temperature=2.0)
    want = torch.log_softmax(logits / 2.0, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(lp, want)
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(token_entropy(logits), -(p * p.log()).sum(-1))


def test_completion_mask_stops_after_first_eos():
    ids = torch.tensor([[5, 6, 2, 0, 2], [2, 7, 7, 7, 7], [5, 5, 5, 5, 5]])
    assert completion_mask(ids, eos_token_id=2).tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]


@pytest.mark.parametrize("mode", ["sequence_mean", "token_mean", "max_length"])
def test_dropped_completions_are_left_out_of_the_denominator(mode):
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 9.0], [7.0, 7.0, 7.0], [8.0, 8.0, 8.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]])
    valid = torch.tensor([True, True, False, False])
    kept = aggregate(per_token[:2], mask[:2], mode, max_length=3)
    explicit = aggregate(per_token, mask, mode, max_length=3, valid=valid)
    zeroed = aggregate(per_token, mask * valid.unsqueeze(1), mode, max_length=3)  # as the GRPO module passes it
    expected = {"sequence_mean": (2.0 + 4.5) / 2, "token_mean": 15.0 / 5, "max_length": 15.0 / (2 * 3)}[mode]
    assert float(kept) == float(explicit) == float(zeroed) == pytest.approx(expected)
    assert float(aggregate(per_token, mask * 0, mode, max_length=3)) == 0.0  # everything dropped: no loss, no NaN


def test_token_logprobs_match_float64_at_qwen_vocabulary():
    """At 151,936 classes the fp32 log-probs stay within 5e-6 of float64 (a strided reduction missed by 2e-5)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 64, 151_936, generator=gen) * 1.5
    targets = torch.randint(0, 151_936, (2, 64), generator=gen)
    want = torch.log_softmax(logits.double(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    assert float((token_logprobs(logits, targets).double() - want).abs().max()) < 5e-6
