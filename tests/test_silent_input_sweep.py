"""Table-driven sweep of inputs that used to train silently on wrong data or earn a wrong reward (no error is
due): each case checks the outcome against what the data means. Part of the bad-input sweep's case count."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.chat_encoding import IGNORE_INDEX, encode_chat
from datamodules.jsonl_records import record_to_messages
from datamodules.resumable_sampler import apply_seeded
from datamodules.rewards import GSM8KReward, QAExactMatch
from datamodules.tokenizer import build_char_tokenizer
from datamodules.verifiable_qa import read_verifiable_file
from datamodules.xray_transforms import build_xray_transform, load_xray
from recipes.grpo.answer_span import answer_mask
from recipes.grpo.loss import aggregate
from tests.test_answer_span import CountingTokenizer
from tests.test_xray_data import CHEXPERT_ROWS, chexpert, nih, write_chexpert, write_nih
from tests.tokenizer_helpers import build_bpe_tokenizer


def letter_answer_stays_matchable(t):
    rewards = QAExactMatch()([""] * 5, ["", "an", "the", "A", "(a)"], answers=[["A"]] * 5)
    assert rewards == [0.0, 0.0, 0.0, 1.0, 1.0]


def empty_completion_never_matches(t):
    assert QAExactMatch()([""] * 2, ["", "   "], answers=[["", "x"], ["the"]]) == [0.0, 0.0]
    assert GSM8KReward("flexible")([""], [""], answer=["0"]) == [0.0]


def _gsm8k(t, reference):
    (t / "g.jsonl").write_text(json.dumps({"question": "q", "answer": f"#### {reference}"}) + "\n")
    return read_verifiable_file(t / "g.jsonl")[1][0][1]["answer"]


def reference_with_units(t):
    answer = _gsm8k(t, "18 dollars")
    assert answer == "18" and GSM8KReward()([""] * 2, ["#### 18", "#### 19"], answer=[answer] * 2) == [1.0, 0.0]


def fraction_reference(t):
    answer = _gsm8k(t, "1/2")
    assert GSM8KReward()([""] * 3, ["#### 0.5", "#### 1/2", "#### 1"], answer=[answer] * 3) == [1.0, 1.0, 0.0]


def thousands_separator_reference(t):
    assert GSM8KReward()([""], ["#### 1200"], answer=[_gsm8k(t, "$1,200")]) == [1.0]


def dropped_completions_leave_the_denominator(t):
    per_token, mask = torch.tensor([[2.0, 2.0], [4.0, 4.0], [9.0, 9.0], [9.0, 9.0]]), torch.ones(4, 2)
    valid = torch.tensor([True, True, False, False])
    assert float(aggregate(per_token, mask * valid[:, None], "sequence_mean")) == 3.0
    assert float(aggregate(per_token, mask, "sequence_mean", valid=valid)) == 3.0


def answer_span_from_offsets(t):
    tok = CountingTokenizer(build_bpe_tokenizer())
    text = " ".join(["so 3 + 4 = 7."] * 100) + "\n#### 7"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    mask = answer_mask(tok, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), [text])
    assert tok.decodes <= 3 and tok.decode([i for i, m in zip(ids, mask[0].tolist(), strict=True) if m]) == "#### 7"


def rand_augment_ignores_global_numpy_state(t):
    transform = build_xray_transform("finetune", 24)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8), "L")
    np.random.seed(1)
    first = torch.stack([apply_seeded(transform, image, s) for s in range(6)])
    np.random.seed(2)
    assert torch.equal(first, torch.stack([apply_seeded(transform, image, s) for s in range(6)]))


def twelve_bit_png_keeps_its_grey_levels(t):
    Image.fromarray(np.arange(4096, dtype=np.uint16).reshape(64, 64)).save(t / "x.png")
    assert len(np.unique(np.asarray(load_xray(t / "x.png")))) == 256


def chexpert_lowercase_view_is_frontal(t):
    rows = [(rel, view.lower(), values) for rel, view, values in CHEXPERT_ROWS]
    dm = chexpert(write_chexpert(t, rows=rows))
    assert len(dm.splits["train"]) + len(dm.splits["val"]) == 4


def chexpert_label_without_positive_is_reported(t):
    rows = [(rel, view, ["-1.0" if v == "1.0" else v for v in values[:1]] + values[1:])
            for rel, view, values in CHEXPERT_ROWS]
    with pytest.warns(UserWarning, match=r"Cardiomegaly \(ignore: 0 positive"):
        chexpert(write_chexpert(t, rows=rows), report_coverage=True, uncertainty="ignore")


def leak_skipped_is_reported(t):
    with pytest.warns(UserWarning, match=r"leak_image.*also in the test split"):
        dm = nih(write_nih(t, extra_list=("00000005_000.png",)), skip_bad=True)
    assert dm.skipped == {"leak_image": 1}


def _trained_controls(tok, text):
    example = encode_chat(tok, [{"role": "user", "content": "q"}, {"role": "assistant", "content": text}], 256, "w")
    return [i for i, lab in zip(example["input_ids"], example["labels"], strict=True)
            if lab != IGNORE_INDEX and i in tok.all_special_ids]


def control_token_spelled_in_char_text(t):
    tok = build_char_tokenizer()
    assert _trained_controls(tok, "a </s> b") == _trained_controls(tok, "a b") == [tok.eos_token_id]


def control_token_spelled_in_bpe_text(t):
    tok = build_bpe_tokenizer()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert _trained_controls(tok, "a <|im_end|> b") == _trained_controls(tok, "a b") == [im_end]


def falsy_input_field_is_kept(t):
    assert record_to_messages({"instruction": "Add", "input": 0, "output": 0}, "w")[0]["content"] == "Add\n0"


OUTCOME_CASES = {
    "qa_letter_answer_stays_matchable": letter_answer_stays_matchable,
    "qa_and_gsm8k_empty_completion_never_matches": empty_completion_never_matches,
    "gsm8k_reference_with_units": reference_with_units,
    "gsm8k_fraction_reference": fraction_reference,
    "gsm8k_thousands_separator_reference": thousands_separator_reference,
    "grpo_dropped_completions_leave_the_denominator": dropped_completions_leave_the_denominator,
    "grpo_answer_span_from_offsets": answer_span_from_offsets,
    "rand_augment_ignores_global_numpy_state": rand_augment_ignores_global_numpy_state,
    "png_12bit_in_16bit_keeps_grey_levels": twelve_bit_png_keeps_its_grey_levels,
    "chexpert_lowercase_view_is_frontal": chexpert_lowercase_view_is_frontal,
    "chexpert_label_without_positive_is_reported": chexpert_label_without_positive_is_reported,
    "nih_leak_skipped_is_reported": leak_skipped_is_reported,
    "control_token_spelled_in_char_text": control_token_spelled_in_char_text,
    "control_token_spelled_in_bpe_text": control_token_spelled_in_bpe_text,
    "falsy_input_field_is_kept": falsy_input_field_is_kept,
}


@pytest.mark.parametrize("case", sorted(OUTCOME_CASES))
def test_silent_input_now_right(case, tmp_path):
    OUTCOME_CASES[case](tmp_path)
