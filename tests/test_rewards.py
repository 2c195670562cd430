"""Reward parsing (GSM8K numeric match, QA exact match) and every bad-reward-function case."""

import math

import pytest
import torch

from datamodules.rewards import (
    GSM8KReward,
    QAExactMatch,
    RewardError,
    compute_rewards,
    extract_gsm8k_answer,
    normalize_answer,
    normalize_reference,
    reference_value,
)


@pytest.mark.parametrize("text,strict,flexible", [
    ("so #### 1,234", 1234.0, 1234.0),
    ("#### -5", -5.0, -5.0),
    ("#### 3.50.", 3.5, 3.5),
    ("The answer is 12, not 13.", None, 13.0),
    ("#### 7 then 8", 7.0, 8.0),
    ("#### 1\n#### 2", 2.0, 2.0),
    ("no number here", None, None),
    ("####", None, None),
])
def test_extract_gsm8k_answer(text, strict, flexible):
    assert extract_gsm8k_answer(text, "strict") == strict
    assert extract_gsm8k_answer(text, "flexible") == flexible


def test_gsm8k_reward_strict_vs_flexible():
    completions = ["#### 1,000", "The answer is 1000", "#### -3", "#### 3", "#### 12.0"]
    refs = ["1000", "1000", "-3", "-3", "12"]
    assert GSM8KReward("strict")([""] * 5, completions, answer=refs) == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert GSM8KReward("flexible")([""] * 5, completions, answer=refs) == [1.0, 1.0, 1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="strict"):
        GSM8KReward("loose")


def test_qa_exact_match_normalization():
    assert normalize_answer("  The  Eiffel-Tower! ") == "eiffeltower"
    assert normalize_answer("An apple, a day") == "apple day"
    fn = QAExactMatch()
    out = fn(["q"] * 4, ["the Paris.", "PARIS", "Paris, France", "London"],
             answers=[["Paris"], ["paris"], ["Paris", "paris france"], ["Paris"]])
    assert out == [1.0, 1.0, 1.0, 0.0]


def _raises(prompts, completions, **columns):
    raise KeyError("answer_col")


def _short(prompts, completions, **columns):
    return [1.0] * (len(completions) - 1)


def _nan_on_b(prompts, completions, **columns):
    return [math.nan if c == "b" else 1.0 for c in completions]


def _raises_on_b(prompts, completions, **columns):
    if "b" in completions:
        raise ValueError("cannot score b")
    return [2.0] * len(completions)


def _not_numbers(prompts, completions, **columns):
    return ["yes"] * len(completions)


@pytest.mark.parametrize("fn,match", [
    (_raises, "'_raises' raised KeyError"),
    (_short, "'_short' returned 2 rewards for 3 completions"),
    (_nan_on_b, "'_nan_on_b' returned non-finite rewards at positions \\[1\\]"),
    (_not_numbers, "'_not_numbers' returned something that is not a list of numbers"),
])
def test_bad_reward_stops_with_its_name(fn, match):
    with pytest.raises(RewardError, match=match):
        compute_rewards(fn, ["p"] * 3, ["a", "b", "c"], {"answer": ["1", "2", "3"]})


@pytest.mark.parametrize("fn,rewards,valid", [
    (_raises, [0.0, 0.0, 0.0], [False, False, False]),
    (_nan_on_b, [1.0, 0.0, 1.0], [True, False, True]),
    (_raises_on_b, [2.0, 0.0, 2.0], [True, False, True]),
    (_short, [0.0, 0.0, 0.0], [False, False, False]),  # alone, each call returns 0 values for 1 completion
])
def test_bad_reward_drops_only_failing_samples_when_allowed(fn, rewards, valid):
    r, ok = compute_rewards(fn, ["p"] * 3, ["a", "b", "c"], {"answer": ["1", "2", "3"]}, drop_bad=True)
    assert r.tolist() == rewards and ok.tolist() == valid


def test_good_reward_passes_columns_through():
    r, ok = compute_rewards(GSM8KReward("strict"), ["p", "p"], ["#### 4", "#### 5"], {"answer": ["4", "4"]})
    assert torch.equal(r, torch.tensor([1.0, 0.0])) and bool(ok.all())


@pytest.mark.parametrize("completion,reward", [
    ("", 0.0), ("   ", 0.0), ("an", 0.0), ("the", 0.0), ("a", 1.0), ("A", 1.0), ("(A).", 1.0), ("B", 0.0),
])
def test_multiple_choice_letter_stays_matchable_and_articles_earn_nothing(completion, reward):
    assert normalize_answer("A") == "a" and normalize_answer("The") == "the"
    assert QAExactMatch()([""], [completion], answers=[["A"]]) == [reward]


def test_exact_match_keeps_squad_rules_and_never_matches_blank():
    fn = QAExactMatch()
    assert fn([""] * 4, ["The Eiffel Tower!", "eiffel tower", "the the", ""], answers=[
        ["Eiffel Tower"], ["The Eiffel Tower"], ["The The"], ["", "  "]]) == [1.0, 1.0, 1.0, 0.0]
    assert normalize_answer("?!") == "?!" and normalize_answer("") == ""


@pytest.mark.parametrize("reference,value", [
    ("18 dollars", 18.0), ("1/2", 0.5), ("$1,200", 1200.0), ("45%", 45.0), ("1,234.5", 1234.5), ("-7", -7.0),
    (" 5 km.", 5.0), (".5", 0.5), ("72", 72.0),
])
def test_references_normalize_to_what_the_reward_parses(reference, value):
    assert reference_value(reference) == value
    number = normalize_reference(reference)
    assert extract_gsm8k_answer(f"#### {number}") == value
    assert GSM8KReward()([""], [f"#### {number}"], answer=[reference]) == [1.0]


@pytest.mark.parametrize("reference", ["3 or 4", "2:30", "3,5", "1/0", "", "many", "1 1/2"])
def test_unmatchable_references_are_errors(reference):
    with pytest.raises(ValueError, match="reference"):
        normalize_reference(reference)
    with pytest.raises(RewardError, match="gsm8k_strict"):
        compute_rewards(GSM8KReward(), [""], ["#### 3"], {"answer": [reference]})


def test_fraction_completion_matches_fraction_reference():
    assert GSM8KReward()([""] * 3, ["#### 1/2", "#### 0.5", "#### 1"], answer=["1/2"] * 3) == [1.0, 1.0, 0.0]


def test_empty_completion_never_matches():
    assert QAExactMatch()([""] * 2, ["", "   "], answers=[["", "x"], ["the"]]) == [0.0, 0.0]
    assert GSM8KReward("flexible")([""], [""], answer=["0"]) == [0.0]
