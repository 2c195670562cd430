"""Diversity metrics, the CRC proxy task and its reward against hand computations on fixed completions."""

import math

import pytest

from datamodules.diversity import (
    CRCPrompt,
    CRCValidityReward,
    crc_pattern,
    crc_prompts,
    crc_scores,
    crc_valid,
    distinct_n,
    normalized_entropy,
    unique_rate,
    write_crc_mix,
)
from datamodules.instruction_records import read_instruction_file
from datamodules.verifiable_records import read_verifiable_file


def test_distinct_n_by_hand():
    completions = ["abab", "abc"]
    # unigrams: a b a b a b c -> 7, distinct {a, b, c} = 3
    assert distinct_n(completions, 1) == pytest.approx(3 / 7)
    # bigrams: ab ba ab | ab bc -> 5, distinct {ab, ba, bc} = 3
    assert distinct_n(completions, 2) == pytest.approx(3 / 5)
    # trigrams: aba bab | abc -> 3, all distinct
    assert distinct_n(completions, 3) == 1.0
    assert distinct_n([[1, 2], [1, 2]], 2) == 0.5  # token ids work the same way
    assert distinct_n(["a"], 2) == 0.0  # no bigram at all
    with pytest.raises(ValueError, match="n must be >= 1"):
        distinct_n(completions, 0)


def test_unique_rate_and_entropy_by_hand():
    assert unique_rate(["x", "y", "x", "x"]) == 0.5
    with pytest.raises(ValueError, match="at least one"):
        unique_rate([])
    assert normalized_entropy("aaaa", 3) == 0.0
    assert normalized_entropy("abcabc", 3) == pytest.approx(1.0)
    # p = (3/4, 1/4) over an alphabet of 2
    expected = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(2)
    assert normalized_entropy("aaab", 2) == pytest.approx(expected)
    assert normalized_entropy("", 2) == 0.0
    with pytest.raises(ValueError, match="alphabet_size"):
        normalized_entropy("a", 1)


def test_crc_validity_and_scores_by_hand():
    assert crc_valid("#### 1313", "13") and crc_valid(" 31 ", "13")
    assert not crc_valid("#### 1323", "13") and not crc_valid("####", "13") and not crc_valid("", "13")
    completions = ["#### 1133", "#### 1133", "1111", "#### 1x3", ""]
    scores = crc_scores(completions, "13")
    assert scores["validity"] == pytest.approx(3 / 5)
    assert scores["distinct"] == pytest.approx(4 / 5)  # 1133, 1111, 1x3, ""
    assert scores["valid_distinct"] == pytest.approx(2 / 5)  # 1133, 1111
    ones, threes = 2 + 2 + 4, 2 + 2  # characters of the valid answers 1133, 1133, 1111
    p = ones / (ones + threes)
    assert scores["entropy"] == pytest.approx(-(p * math.log(p) + (1 - p) * math.log(1 - p)) / math.log(2))


def test_crc_prompts_are_seeded_and_checked():
    a, b = crc_prompts(6, seed=3), crc_prompts(6, seed=3)
    assert a == b and [len(p.allowed) for p in a] == [2, 3, 4, 2, 3, 4]
    assert all(set(p.allowed) <= set("123456789") and p.length == 6 for p in a)
    assert CRCPrompt("ab", 5).text("Pick {length} of {allowed_list}") == "Pick 5 of a, b"
    with pytest.raises(ValueError, match="set_sizes"):
        crc_prompts(2, 0, pool="abc", set_sizes=(3,))
    with pytest.raises(ValueError, match="pool"):
        crc_prompts(2, 0, pool="aab")
    with pytest.raises(ValueError, match="must contain"):
        crc_pattern("no placeholders")


def test_crc_reward_scores_crc_prompts_by_validity_and_others_by_answer():
    reward = CRCValidityReward()
    prompts = ["<s><|user|>Random 6 from 13</s><|assistant|>", "<s><|user|>Random 6 from 13</s><|assistant|>",
               "<s><|user|>Reverse: 12</s><|assistant|>", "<s><|user|>Reverse: 12</s><|assistant|>"]
    got = reward(prompts, ["#### 113311", "#### 1234", "#### 21", "#### 12"], answer=["0", "0", "21", "21"])
    assert got == [1.0, 0.0, 1.0, 0.0]
    listed = CRCValidityReward("Use {allowed_list} x{length}")
    assert listed(["Use a, b x4"], ["abba"]) == [1.0]
    with pytest.raises(ValueError, match="not a CRC prompt"):
        reward(["Reverse: 12"], ["21"])


def test_write_crc_mix_splits(tmp_path):
    paths = write_crc_mix(tmp_path, seed=1, n_sft=200, n_train=100, n_val=20, off_set_share=0.0)
    sft = read_instruction_file(paths["sft"])
    form, train = read_verifiable_file(paths["train"])
    _, val = read_verifiable_file(paths["val"])
    assert form == "gsm8k" and len(sft) == 200 and len(train) == 100 and len(val) == 20
    pattern = crc_pattern()
    crc_sft = [(m[0]["content"], m[1]["content"]) for _, m in sft if pattern.fullmatch(m[0]["content"])]
    assert len(crc_sft) == 100  # crc_share 0.5
    assert all(crc_valid(answer, pattern.fullmatch(q)["allowed"]) for q, answer in crc_sft)  # off_set_share 0
    assert not any(pattern.fullmatch(row["question"]) for _, row in val)
    assert sum(bool(pattern.fullmatch(row["question"])) for _, row in train) == 50
    noisy = write_crc_mix(tmp_path / "noisy", seed=1, n_sft=400, n_train=10, n_val=10, off_set_share=1.0)
    answers = [(m[0]["content"], m[1]["content"]) for _, m in read_instruction_file(noisy["sft"])
               if pattern.fullmatch(m[0]["content"])]
    invalid = sum(not crc_valid(a, pattern.fullmatch(q)["allowed"]) for q, a in answers)
    assert invalid > 0.8 * len(answers)  # drawn from all nine digits: mostly outside a 2-4 digit set
