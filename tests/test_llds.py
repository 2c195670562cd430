"""LLDS penalty, gates and preserving set against hand computations on crafted log-probs."""

import pytest
import torch

from callbacks.core.policy_tokens import PolicyTokens
from callbacks.llds import LLDS, llds_penalty, segment_ids

MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
# delta = old - logp: response 0 sums to -0.3, response 1 to 0.4, response 2 (A < 0) is large but never regularized
DELTA = torch.tensor([[0.5, -1.0, 0.2, 9.0], [0.1, -0.3, 0.2, 0.4], [1.0, 1.0, 9.0, 9.0]])
ACTION = torch.tensor([[1, 0, 1, 0], [1, 1, 0, 1], [1, 1, 0, 0]])  # segments: {0}, {2} | {0, 1}, {3} | {0, 1}


def tokens(action_mask=MASK, answer_mask=None, advantages=(1.0, 0.0, -1.0)):
    old = torch.full((3, 4), -1.0)
    return PolicyTokens(logp=old - DELTA, old_logp=old, ref_logp=None, advantages=torch.tensor(advantages),
                        mask=MASK, action_mask=action_mask, answer_mask=answer_mask)


@pytest.mark.parametrize("gate,total,gated", [
    ("token", 0.5 + 0.2 + 0.1 + 0.2 + 0.4, 5 / 7),  # every positive delta of responses 0 and 1
    ("response", 0.1 + 0.2 + 0.4, 1 / 2),  # response 0's sum is negative: gated off
    ("action", 0.5 + 0.2 + 0.4, 3 / 4),  # response 1's first segment sums to -0.2: off; token 2 is no action
])
def test_llds_value_and_gate_by_hand(gate, total, gated):
    penalty, stats = llds_penalty(tokens(ACTION if gate == "action" else MASK), gate)
    assert float(penalty) == pytest.approx(total / 7)  # 7 tokens in the preserved responses (A >= 0)
    assert float(stats["gated_fraction"]) == pytest.approx(gated)
    assert float(stats["preserved_fraction"]) == pytest.approx(2 / 3)
    all_tokens, _ = llds_penalty(tokens(ACTION if gate == "action" else MASK), gate, normalization="all_tokens")
    assert float(all_tokens) == pytest.approx(total / 9)


def test_action_gate_with_whole_response_action_equals_response_gate():
    a, _ = llds_penalty(tokens(MASK), "action")
    r, _ = llds_penalty(tokens(MASK), "response")
    assert float(a) == pytest.approx(float(r))


def test_preserving_set_is_nonnegative_advantage():
    everything_negative, _ = llds_penalty(tokens(advantages=(-1.0, -0.1, -1.0)), "token")
    assert float(everything_negative) == 0.0
    only_third, _ = llds_penalty(tokens(advantages=(-1.0, -1.0, 0.0)), "token")
    assert float(only_third) == pytest.approx(2.0 / 2)


def test_answer_span_weight_beta():
    answer = torch.zeros(3, 4, dtype=torch.bool)
    answer[1, 3] = True
    penalty, _ = llds_penalty(tokens(answer_mask=answer), "response", beta=2.0)
    assert float(penalty) == pytest.approx((0.1 + 0.2 + 2 * 0.4) / 7)
    with pytest.raises(ValueError, match="answer"):
        llds_penalty(tokens(), "response", beta=2.0)


def test_zero_when_policy_unchanged_and_gradient_only_on_displaced_tokens():
    old = torch.randn(3, 4)
    t = PolicyTokens(logp=old.clone(), old_logp=old, ref_logp=None, advantages=torch.tensor([1.0, 0.0, 1.0]),
                     mask=MASK, action_mask=MASK)
    for gate in ("token", "response", "action"):
        assert float(llds_penalty(t, gate)[0]) == 0.0
    logp = (torch.full((3, 4), -1.0) - DELTA).requires_grad_(True)
    t = PolicyTokens(logp=logp, old_logp=torch.full((3, 4), -1.0), ref_logp=None,
                     advantages=torch.tensor([1.0, 0.0, -1.0]), mask=MASK, action_mask=MASK)
    llds_penalty(t, "token")[0].backward()
    want = -((DELTA > 0) & (MASK == 1) & torch.tensor([[True], [True], [False]])).float() / 7
    torch.testing.assert_close(logp.grad, want)


def test_segment_ids():
    assert segment_ids(torch.tensor([[1, 1, 0, 1, 0, 1, 1]])).tolist() == [[1, 1, 0, 2, 0, 3, 3]]


def test_arguments_checked():
    with pytest.raises(ValueError, match="gate"):
        LLDS(gate="turn")
    with pytest.raises(ValueError, match="coef"):
        LLDS(coef=-1)
    with pytest.raises(ValueError, match="normalization"):
        LLDS(normalization="mean")
