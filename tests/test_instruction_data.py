"""Instruction data: the three JSONL forms, label masking, splits and every bad-input case."""

import json

import pytest

from datamodules.chat_encoding import IGNORE_INDEX, encode_chat
from datamodules.instruction import InstructionDataModule
from datamodules.instruction_records import read_instruction_file
from datamodules.jsonl_records import DataError
from datamodules.synthetic_tasks import make_problems, write_jsonl, write_synthetic_splits
from datamodules.tokenizer import build_char_tokenizer, load_tokenizer


def _write(path, lines):
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines))
    return path


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def test_three_forms_give_the_same_conversation(tmp_path):
    p = make_problems(1, seed=3)[0]
    msgs = {fmt: read_instruction_file(write_jsonl(tmp_path / f"{fmt}.jsonl", [p], fmt))[0][1]
            for fmt in ("alpaca", "chat", "gsm8k")}
    assert msgs["chat"] == [{"role": "user", "content": p.question}, {"role": "assistant", "content": p.answer}]
    assert msgs["alpaca"][0]["content"] == f"{p.instruction}\n{p.input}"
    assert msgs["gsm8k"][1]["content"].endswith(f"#### {p.answer}")


def test_synthetic_answers_are_correct_and_splits_disjoint(tmp_path):
    for p in make_problems(300, seed=1):
        if p.task == "addition":
            a, b = p.input.split("+")
            assert int(a) + int(b) == int(p.answer)
        elif p.task == "reversal":
            assert p.answer == p.input[::-1]
        else:
            assert p.answer == "".join(sorted(p.input))
    paths = write_synthetic_splits(tmp_path, "chat", n_train=300, n_val=50, n_test=50, seed=0)
    splits = {k: {m[0]["content"] for _, m in read_instruction_file(v)} for k, v in paths.items()}
    assert len(splits["train"]) == 300 and len(splits["val"]) == len(splits["test"]) == 50
    assert not splits["train"] & splits["test"] and not splits["train"] & splits["val"]


def test_labels_cover_only_assistant_turns(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add: 1+2"},
                {"role": "assistant", "content": "3"}, {"role": "user", "content": "Reverse: 12"},
                {"role": "assistant", "content": "21"}]
    ex = encode_chat(tok, messages, max_length=200, where="x")
    full = tok.apply_chat_template(messages, tokenize=False)
    assert tok.decode(ex["input_ids"]) == full
    trained = [i for i, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != IGNORE_INDEX]
    assert tok.decode(trained) == "3</s>21</s>"
    masked = [lab for lab in ex["labels"] if lab == IGNORE_INDEX]
    assert len(masked) == len(ex["input_ids"]) - len("3</s>21</s>".replace("</s>", "#"))


def test_datamodule_collates_and_splits_with_seed(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", make_problems(100, seed=0), "alpaca")
    a = InstructionDataModule(train_file=str(path), val_fraction=0.1, seed=5, batch_size=8)
    a.setup()
    b = InstructionDataModule(train_file=str(path), val_fraction=0.1, seed=5, batch_size=8)
    b.setup()
    assert len(a.datasets["val"]) == 10 and len(a.datasets["train"]) == 90
    assert [e["input_ids"] for e in a.datasets["val"]] == [e["input_ids"] for e in b.datasets["val"]]
    batch = next(iter(a.val_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    pad = a.tokenizer.pad_token_id
    assert ((batch["input_ids"] == pad) == (batch["attention_mask"] == 0)).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    # prompts are left-padded for generation and end with the assistant marker
    assert (batch["prompt_attention_mask"][:, -1] == 1).all()
    assert a.tokenizer.decode(batch["prompt_input_ids"][0, -1:]) == "<|assistant|>"


def test_local_tokenizer_directory(tmp_path, tok):
    tok.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(str(tmp_path / "tok"))
    assert loaded("Add: 1+2")["input_ids"] == tok("Add: 1+2")["input_ids"]
    assert loaded.chat_template == tok.chat_template


BAD_CASES = {
    "malformed_json": (['{"instruction": "a", "output": "b"}', '{"instruction": '], r"bad\.jsonl:2: malformed JSON"),
    "missing_fields": ([{"instruction": "a", "output": "b"}, {"prompt": "x"}], r"bad\.jsonl:2: .*none of the expected"),
    "wrong_type": ([{"instruction": "a", "output": ["b"]}], r"bad\.jsonl:1: field 'output' must be a string"),
    "bad_role": ([{"messages": [{"role": "bot", "content": "x"}]}], r"bad\.jsonl:1: messages\[0\] has role 'bot'"),
    "no_response": ([{"messages": [{"role": "user", "content": "x"}]}], r"bad\.jsonl:1: the last message must"),
    "empty_split": ([], r"bad\.jsonl: the file has no records"),
    "not_an_object": (["[1, 2]"], r"bad\.jsonl:1: expected a JSON object"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_names_file_and_line(tmp_path, case):
    lines, pattern = BAD_CASES[case]
    path = _write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError, match=pattern):
        InstructionDataModule(train_file=str(path)).setup()


def test_missing_file_and_missing_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl does not exist"):
        InstructionDataModule(train_file=str(tmp_path / "nope.jsonl")).setup()
    with pytest.raises(FileNotFoundError, match="Tokenizer directory .*missing_tok"):
        InstructionDataModule(tokenizer=str(tmp_path / "missing_tok"))


def test_prompt_longer_than_max_length(tmp_path):
    path = _write(tmp_path / "long.jsonl", [{"instruction": "x" * 80, "output": "y"}] * 3)
    with pytest.raises(DataError, match=r"long\.jsonl:\d: the prompt is \d+ tokens, not shorter than max_length=32"):
        InstructionDataModule(train_file=str(path), max_length=32).setup()


def test_tokenizer_without_chat_template(tmp_path, tok):
    tok.chat_template = None
    tok.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="has no chat template"):
        InstructionDataModule(tokenizer=str(tmp_path / "plain"))


def test_too_few_records_for_validation(tmp_path):
    path = _write(tmp_path / "one.jsonl", [{"instruction": "a", "output": "b"}])
    with pytest.raises(DataError, match="too few to hold out a validation split"):
        InstructionDataModule(train_file=str(path)).setup()


def test_empty_val_file_is_named(tmp_path):
    train = _write(tmp_path / "d.jsonl", [{"instruction": "Add", "input": "1+2", "output": "3"}] * 4)
    val = _write(tmp_path / "v.jsonl", [])
    with pytest.raises(DataError, match=r"v.jsonl: the file has no records"):
        InstructionDataModule(train_file=str(train), val_file=str(val)).setup()


def test_assistant_reply_before_the_last_message_is_named(tmp_path):
    conversation = [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]
    path = _write(tmp_path / "d.jsonl", [{"messages": conversation}] * 3)
    with pytest.raises(DataError, match=r"d.jsonl:\d: the last message must be the assistant's response"):
        InstructionDataModule(train_file=str(path)).setup()
