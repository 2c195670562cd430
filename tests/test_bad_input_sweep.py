"""Table-driven sweep: corrupt or mistaken input to every data module and to the CLI gives a clear error naming
what is wrong; nothing trains silently on wrong data. (Per-module tests cover the skip-and-count options.)"""

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules.chestxray14 import ChestXray14DataModule
from datamodules.instruction import InstructionDataModule
from datamodules.jsonl_records import DataError
from datamodules.tokenizer import build_char_tokenizer
from recipes.cli import CONFIG_DIR, main
from tests.test_xray_data import CHEXPERT_HEADER, chexpert, write_chexpert, write_nih

IMAGE = "00000002_000.png"


def _nih_image(root: Path) -> Path:
    return next(root.rglob(IMAGE))


def _truncate(root):
    path = _nih_image(root)
    path.write_bytes(path.read_bytes()[:-40])


def _float_mode(root):
    """The name the CSV expects, with 32-bit float pixels (TIFF content behind the .png name)."""
    Image.fromarray(np.full((40, 40), 0.5, dtype=np.float32), "F").save(_nih_image(root), format="TIFF")


def _rewrite_csv(root, transform):
    path = root / "Data_Entry_2017.csv"
    rows = list(csv.reader(path.open()))
    path.write_text("".join(line + "\n" for line in transform(rows)))


NIH_CASES = {
    "truncated_png": (_truncate, rf"{IMAGE} is unreadable"),
    "float_image_mode": (_float_mode, rf"{IMAGE} is unreadable \(mode 'F'"),
    "missing_image": (lambda r: _nih_image(r).unlink(), rf"{IMAGE} is missing"),
    "csv_missing_column": (lambda r: _rewrite_csv(r, lambda rows: [",".join(x[:1] + x[2:]) for x in rows]),
                           r"Data_Entry_2017.csv.*Finding Labels"),
    "csv_bad_delimiter": (lambda r: _rewrite_csv(r, lambda rows: [";".join(x) for x in rows]),
                          r"Data_Entry_2017.csv.*(column|Image Index)"),
    "unknown_label": (lambda r: _rewrite_csv(r, lambda rows: [",".join(x).replace("Hernia", "Hernia|Covid")
                                                              for x in rows]), r"unknown label 'Covid'"),
    "listed_not_in_csv": (lambda r: (r / "train_val_list.txt").write_text(
        (r / "train_val_list.txt").read_text() + "00000099_000.png\n"), r"'00000099_000.png' is listed"),
    "empty_test_split": (lambda r: (r / "test_list.txt").write_text("\n"), r"test_list.txt.*(empty|no )"),
    "missing_split_file": (lambda r: (r / "test_list.txt").unlink(), r"test_list.txt"),
}


@pytest.mark.parametrize("case", sorted(NIH_CASES))
def test_nih_bad_input(case, tmp_path):
    corrupt, pattern = NIH_CASES[case]
    root = write_nih(tmp_path / "nih")
    corrupt(root)
    with pytest.raises((DataError, FileNotFoundError), match=pattern):
        ChestXray14DataModule(root=str(root), image_size=32, batch_size=2, val_fraction=0.3).setup()


CHEXPERT_CASES = {
    "missing_path_column": ({"header": [c for c in CHEXPERT_HEADER if c != "Path"]}, r"train.csv.*'Path'"),
    "missing_label_column": ({"header": [c for c in CHEXPERT_HEADER if c != "Edema"]}, r"\['Edema'\]"),
}


@pytest.mark.parametrize("case", sorted(CHEXPERT_CASES))
def test_chexpert_bad_input(case, tmp_path):
    kwargs, pattern = CHEXPERT_CASES[case]
    with pytest.raises(DataError, match=pattern):
        chexpert(write_chexpert(tmp_path / "cx", **kwargs))


def _jsonl(path: Path, lines) -> str:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


def _plain_tokenizer(tmp_path) -> str:
    tok = build_char_tokenizer()
    tok.chat_template = None
    tok.save_pretrained(tmp_path / "tok")
    return str(tmp_path / "tok")


GOOD = {"instruction": "Add", "input": "1+2", "output": "3"}
TEXT_CASES = {
    "malformed_json": (lambda t: {"train_file": _jsonl(t / "d.jsonl", [GOOD, '{"instruction": '])},
                       r"d.jsonl:2: malformed JSON"),
    "record_without_fields": (lambda t: {"train_file": _jsonl(t / "d.jsonl", [GOOD, {"text": "x"}])},
                              r"d.jsonl:2: record has none of the expected fields"),
    "empty_split": (lambda t: {"train_file": _jsonl(t / "d.jsonl", [])}, r"d.jsonl: the file has no records"),
    "empty_val_file": (lambda t: {"train_file": _jsonl(t / "d.jsonl", [GOOD] * 4),
                                  "val_file": _jsonl(t / "v.jsonl", [])}, r"v.jsonl: the file has no records"),
    "missing_file": (lambda t: {"train_file": str(t / "nope.jsonl")}, r"nope.jsonl does not exist"),
    "tokenizer_without_chat_template": (lambda t: {"tokenizer": _plain_tokenizer(t)}, r"has no chat template"),
    "max_length_shorter_than_prompt": (lambda t: {"train_file": _jsonl(t / "d.jsonl", [GOOD] * 4), "max_length": 8},
                                       r"d.jsonl:\d: the prompt is \d+ tokens, not shorter than max_length=8"),
    "assistant_not_last": (lambda t: {"train_file": _jsonl(t / "d.jsonl", [
        {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}] * 3)},
        r"d.jsonl:\d: the last message must be the assistant's response"),
}


@pytest.mark.parametrize("case", sorted(TEXT_CASES))
def test_instruction_bad_input(case, tmp_path):
    make, pattern = TEXT_CASES[case]
    with pytest.raises((DataError, ValueError, FileNotFoundError), match=pattern):
        dm = InstructionDataModule(**make(tmp_path))
        dm.setup()


CONFIG_CASES = {
    "misspelled_trainer_key": (["--trainer.max_step=3"], r"max_step"),
    "misspelled_model_key": (["--model.init_args.warmup_step=3"], r"warmup_step"),
    "unknown_class_path": (["--model.class_path=recipes.CausalLMModul"], r"CausalLMModul"),
    "wrong_value_type": (["--data.init_args.batch_size=many"], r"batch_size"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_mistakes(case, tmp_path, capsys, monkeypatch, cli_argv):
    monkeypatch.chdir(tmp_path)
    args, pattern = CONFIG_CASES[case]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIG_DIR / "sft.yaml"), "--wandb=disabled", *args])
    assert exit_info.value.code != 0
    assert re.search(pattern, capsys.readouterr().err)
    assert not (tmp_path / "runs").exists(), "nothing may be trained or logged"


def test_yaml_file_with_misspelled_key(tmp_path, capsys, monkeypatch, cli_argv):
    monkeypatch.chdir(tmp_path)
    text = (CONFIG_DIR / "sft.yaml").read_text().replace("  max_steps:", "  max_stepz:")
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(tmp_path / "bad.yaml"), "--wandb=disabled"])
    assert "max_stepz" in capsys.readouterr().err


def count_cases() -> int:
    """The number of bad inputs this sweep tries (for the closing note)."""
    return len(NIH_CASES) + len(CHEXPERT_CASES) + len(TEXT_CASES) + len(CONFIG_CASES) + 1

