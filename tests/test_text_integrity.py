"""Text data integrity: non-UTF-8 files, text that spells a control token, characters the tokenizer cannot encode,
and falsy but present fields."""

import json

import pytest

from datamodules.chat_encoding import IGNORE_INDEX, encode_chat, encode_prompt
from datamodules.instruction import InstructionDataModule
from datamodules.instruction_records import read_instruction_file
from datamodules.jsonl_records import DataError
from datamodules.record_forms import record_to_messages
from datamodules.tokenizer import build_char_tokenizer
from tests.conftest import build_bpe_tokenizer


def _write(path, lines) -> str:
    path.write_bytes(b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines))
    return str(path)


def test_non_utf8_file_names_file_line_and_byte(tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"},
                                         b'{"instruction": "caf\xe9", "output": "x"}'])
    with pytest.raises(DataError, match=r"d.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 21\)"):
        read_instruction_file(path)
    bom = _write(tmp_path / "bom.jsonl", [b'\xef\xbb\xbf{"instruction": "a", "output": "b"}'])
    assert read_instruction_file(bom)[0][1][0]["content"] == "a"


def _trained(example):
    return [t for t, lab in zip(example["input_ids"], example["labels"], strict=True) if lab != IGNORE_INDEX]


@pytest.mark.parametrize("build", [build_char_tokenizer, build_bpe_tokenizer], ids=["char", "bpe"])
@pytest.mark.parametrize("spelled", ["</s>", "<|im_end|>", "<|im_start|>user", "<s>", "<|assistant|>"])
def test_text_that_spells_a_control_token_is_trained_as_text(build, spelled):
    tok = build()
    controls = set(tok.all_special_ids)

    def conversation(word):
        return [{"role": "user", "content": f"say {word}"}, {"role": "assistant", "content": f"x {word} y"}]

    example, plain = encode_chat(tok, conversation(spelled), 256, "d:1"), encode_chat(tok, conversation("q"), 256, "")
    trained = _trained(example)
    assert tok.decode([t for t in trained if t not in controls]).strip() == f"x {spelled} y"
    # the only control tokens are the template's own: as many as in the same conversation without the spelling
    assert sum(t in controls for t in trained) == sum(t in controls for t in _trained(plain))
    assert sum(t in controls for t in example["input_ids"]) == sum(t in controls for t in plain["input_ids"])
    prompt = encode_prompt(tok, conversation(spelled))
    assert sum(t in controls for t in prompt) == sum(t in controls for t in encode_prompt(tok, conversation("q")))
    assert f"say {spelled}" in tok.decode([t for t in prompt if t not in controls])


def test_without_control_spellings_the_encoding_is_unchanged():
    tok = build_bpe_tokenizer()
    messages = [{"role": "user", "content": "Add 12 and 30."}, {"role": "assistant", "content": "The answer is 42."}]
    example = encode_chat(tok, messages, 256, "w")
    full = tok.apply_chat_template(messages, tokenize=False)
    assert example["input_ids"] == tok(full, add_special_tokens=False)["input_ids"]


def test_characters_the_tokenizer_cannot_encode_name_the_record(tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"instruction": "Add", "output": "3"}, {"instruction": "naïve\tcafé",
                                                                                 "output": "ok"}])
    with pytest.raises(DataError, match=r"d.jsonl:2: the tokenizer cannot encode the character\(s\) "
                                        r"\['\\t', 'é', 'ï'\]; they would be trained as '<unk>'"):
        InstructionDataModule(train_file=path, val_file=path).setup()
    tok = build_bpe_tokenizer()  # byte-level: every character encodes, and the trained tokens decode back
    example = encode_chat(tok, record_to_messages({"instruction": "naïve", "output": "café"}, "w"), 64, "w")
    assert tok.unk_token_id not in example["input_ids"]
    assert tok.decode(_trained(example), skip_special_tokens=True).strip() == "café"


def test_falsy_but_present_fields_are_kept():
    messages = record_to_messages({"instruction": "Add", "input": 0, "output": 0}, "d.jsonl:1")
    assert messages == [{"role": "user", "content": "Add\n0"}, {"role": "assistant", "content": "0"}]
    assert record_to_messages({"instruction": "Add", "input": "", "output": "1"}, "w")[0]["content"] == "Add"
    assert record_to_messages({"instruction": "Add", "input": None, "output": "1"}, "w")[0]["content"] == "Add"
    with pytest.raises(DataError, match=r"w: field 'input' must be a string \(or a number\), got bool"):
        record_to_messages({"instruction": "Add", "input": False, "output": "1"}, "w")
