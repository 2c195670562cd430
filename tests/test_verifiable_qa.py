"""VerifiableQADataModule: GSM8K and QA forms, chat-template prompts, held-out synthetic splits, clear errors."""

import json

import pytest

from datamodules.jsonl_records import DataError
from datamodules.rewards import GSM8KReward, QAExactMatch
from datamodules.verifiable_qa import VerifiableQADataModule
from datamodules.verifiable_records import read_verifiable_file


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_gsm8k_form_batches_and_reward(tmp_path):
    train = write(tmp_path / "t.jsonl", [{"question": f"What is {i}+1?", "answer": f"It is.\n#### {i + 1:,}"}
                                         for i in range(999, 1009)])
    dm = VerifiableQADataModule(train_file=train, batch_size=4, val_fraction=0.2, system_prompt="Be brief.")
    dm.setup()
    assert len(dm.datasets["train"]) == 8 and len(dm.datasets["val"]) == 2
    batch = next(iter(dm.val_dataloader()))
    assert batch["prompts"][0] == "<s><|system|>Be brief.</s><|user|>" + batch["prompts"][0].split("<|user|>")[1]
    assert batch["prompts"][0].endswith("</s><|assistant|>")
    assert batch["prompt_input_ids"][:, -1].tolist() == [dm.tokenizer.convert_tokens_to_ids("<|assistant|>")] * 2
    assert all("," not in a and int(a) > 999 for a in batch["answer"])  # normalized at load: "1,005" -> "1005"
    fn = dm.reward_fn()
    assert isinstance(fn, GSM8KReward) and fn.mode == "strict"
    assert fn(batch["prompts"], [f"#### {a.replace(',', '')}" for a in batch["answer"]], **{"answer":
              batch["answer"]}) == [1.0, 1.0]


def test_qa_form(tmp_path):
    train = write(tmp_path / "qa.jsonl", [{"question": "Capital of France?", "answers": ["Paris", "paris, france"]}])
    val = write(tmp_path / "v.jsonl", [{"question": "Capital of Italy?", "answers": ["Rome"]}])
    dm = VerifiableQADataModule(train_file=train, val_file=val)
    dm.setup()
    assert dm.form == "qa" and isinstance(dm.reward_fn(), QAExactMatch)
    assert next(iter(dm.val_dataloader()))["answers"] == [["Rome"]]


@pytest.mark.parametrize("records,match", [
    ([{"question": "q", "answer": "42"}], r"x.jsonl:1: 'answer' must end with '#### <number>'"),
    ([{"question": "q", "answers": []}], "x.jsonl:1: 'answers' must be a non-empty list of strings"),
    ([{"question": "q", "answers": "Paris"}], "x.jsonl:1: 'answers' must be a non-empty list"),
    ([{"prompt": "q", "answer": "#### 1"}], "x.jsonl:1: field 'question' must be a non-empty string"),
    ([{"question": "q"}], "x.jsonl:1: expected 'answer'"),
    ([{"question": "q", "answer": "#### 1"}, {"question": "q", "answers": ["a"]}], "x.jsonl:2: record is in qa form"),
])
def test_bad_records_name_file_and_line(tmp_path, records, match):
    with pytest.raises(DataError, match=match):
        read_verifiable_file(write(tmp_path / "x.jsonl", records))


def test_prompt_too_long_is_an_error(tmp_path):
    train = write(tmp_path / "t.jsonl", [{"question": "x" * 80, "answer": "#### 1"}] * 3)
    dm = VerifiableQADataModule(train_file=train, max_prompt_length=32, val_fraction=0.4)
    with pytest.raises(DataError, match="t.jsonl:[0-9]+: the prompt is [0-9]+ tokens, more than max_prompt_length"):
        dm.setup()


def test_synthetic_splits_are_disjoint(tmp_path):
    dm = VerifiableQADataModule(synthetic_dir=str(tmp_path), synthetic_sft_size=50, synthetic_train_size=30,
                                synthetic_val_size=10)
    dm.prepare_data()
    dm.setup()
    questions = {}
    for split, path in dm.synthetic_paths().items():
        questions[split] = {json.loads(line)["question"] for line in path.read_text().splitlines()}
    assert [len(questions[s]) for s in ("sft", "train", "val")] == [50, 30, 10]
    assert not questions["sft"] & questions["train"] and not questions["val"] & (questions["sft"] | questions["train"])
    batch = next(iter(dm.sft_dataloader()))
    assert {"input_ids", "attention_mask", "labels"} <= batch.keys()
    assert dm.form == "gsm8k" and len(dm.datasets["train"]) == 30


def test_gsm8k_references_checked_at_load_with_the_rewards_parser(tmp_path):
    path = write(tmp_path / "r.jsonl", [{"question": "q1", "answer": "So\n#### 18 dollars"},
                                        {"question": "q2", "answer": "#### 1/2"},
                                        {"question": "q3", "answer": "#### $1,200."}])
    form, rows = read_verifiable_file(path)
    answers = [row["answer"] for _, row in rows]
    assert form == "gsm8k" and answers == ["18", "1/2", "1200"]
    rewards = GSM8KReward()([""] * 3, ["#### 18", "#### 0.5", "#### 1,200"], answer=answers)
    assert rewards == [1.0, 1.0, 1.0]
    bad = write(tmp_path / "b.jsonl", [{"question": "q1", "answer": "#### 4"},
                                       {"question": "q2", "answer": "#### 3 or 4"}])
    with pytest.raises(DataError, match=r"b.jsonl:2: 'answer': the reference '3 or 4' is not one number"):
        read_verifiable_file(bad)


def test_qa_answers_must_be_non_blank(tmp_path):
    with pytest.raises(DataError, match=r"q.jsonl:1: 'answers' must be a non-empty list of strings, none blank"):
        read_verifiable_file(write(tmp_path / "q.jsonl", [{"question": "q", "answers": ["Paris", " "]}]))


@pytest.mark.parametrize("reference,match", [
    ("2:30", r"'2:30' is not one number"), ("3,5", r"'3,5' is not one number"), ("1/0", r"'1/0' divides by zero"),
], ids=["time_of_day", "ambiguous_comma", "divides_by_zero"])
def test_unmatchable_reference_names_file_and_line(tmp_path, reference, match):
    path = write(tmp_path / "r.jsonl", [{"question": "q", "answer": "#### 1"},
                                        {"question": "q", "answer": f"#### {reference}"}])
    with pytest.raises(DataError, match=r"r.jsonl:2: .*" + match):
        read_verifiable_file(path)


def test_prompts_are_tokenized_once_memory_mapped_and_reused(tmp_path, monkeypatch):
    from datamodules import instruction_records, verifiable_records

    train = write(tmp_path / "t.jsonl", [{"question": f"What is {i}+1?", "answer": f"#### {i + 1}"} for i in range(20)])
    sft = write(tmp_path / "sft.jsonl", [{"instruction": f"Add {i}", "output": str(i)} for i in range(8)])
    settings = {"train_file": train, "sft_file": sft, "batch_size": 4, "cache_dir": str(tmp_path / "cache")}
    first = VerifiableQADataModule(**settings)
    first.setup()
    assert all(first.datasets[split].cache_files for split in ("train", "val", "sft"))  # arrow files, not lists
    first_batch = first.collate([first.datasets["train"][i] for i in range(3)])

    def fail(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(verifiable_records, "_encode_rows", fail)
    monkeypatch.setattr(instruction_records, "_encode_rows", fail)
    again = VerifiableQADataModule(**settings)
    again.setup()
    assert again.form == "gsm8k"
    for split in ("train", "val", "sft"):
        assert again.datasets[split][:] == first.datasets[split][:], split
    batch = again.collate([again.datasets["train"][i] for i in range(3)])
    assert batch["prompts"] == first_batch["prompts"] and batch["answer"] == first_batch["answer"]
    assert batch["prompt_input_ids"].equal(first_batch["prompt_input_ids"])
    for changed in ({"system_prompt": "Be brief."}, {"max_prompt_length": 63}):
        with pytest.raises(AssertionError, match="tokenized again"):
            VerifiableQADataModule(**settings, **changed).setup()


def test_a_row_in_another_form_is_an_error_naming_its_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"question": "q1", "answer": "#### 1", "answers": None}, {"question": "q2", "answer": None,
                                                                      "answers": ["a"]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "mixed.parquet")
    with pytest.raises(DataError, match=r"mixed\.parquet row 1: record is in qa form but the file started in gsm8k"):
        VerifiableQADataModule(train_file=str(tmp_path / "mixed.parquet"), cache_dir=str(tmp_path / "c")).setup()
