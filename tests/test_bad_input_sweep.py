"""Table-driven sweep: corrupt or mistaken input to every data module and to the CLI gives a clear error naming
what is wrong; nothing trains silently on wrong data. (Per-module tests cover the skip-and-count options.)"""

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from callbacks.lisa import LISA
from callbacks.owlore import OwLore
from datamodules.chestxray14 import ChestXray14DataModule
from datamodules.instruction import InstructionDataModule
from datamodules.jsonl_records import DataError
from datamodules.tokenizer import build_char_tokenizer
from datamodules.verifiable_qa import VerifiableQADataModule, read_verifiable_file
from recipes.__main__ import main
from recipes.causal_lm import CausalLMModule
from recipes.cli import CONFIG_DIR
from recipes.grpo import GRPOModule
from recipes.mae_pretrain import MAEPretrainModule
from tests.conftest import tiny_loader
from tests.sampling_helpers import trainer
from tests.test_argument_checks import TINY, TinyGPT2, fit_one_step
from tests.test_xray_data import CHEXPERT_HEADER, CHEXPERT_ROWS, chexpert, write_chexpert, write_nih, write_png

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


def _set_cell(root, image, column, value):
    def change(rows):
        col = rows[0].index(column)
        return [",".join(value if r[0] == image and i == col else c for i, c in enumerate(r)) for r in rows]
    _rewrite_csv(root, change)


def _append(path: Path, line: str) -> None:
    path.write_text(path.read_text() + line + "\n")


def _replace_bytes(path: Path, old: bytes, new: bytes) -> None:
    path.write_bytes(path.read_bytes().replace(old, new))


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
    "image_in_both_split_lists": (lambda r: _append(r / "train_val_list.txt", "00000005_000.png"),
                                  r"train_val_list.txt:6: image 00000005_000.png is also in the test split"),
    "patient_on_both_sides": (lambda r: _set_cell(r, "00000004_000.png", "Patient ID", "5"),
                              r"image 00000004_000.png belongs to patient '5', who has test images too"),
    "duplicate_row_other_labels": (lambda r: _append(r / "Data_Entry_2017.csv", ",".join(
        ["00000002_000.png", "No Finding", "0", "2"] + ["0"] * 8)), r"Data_Entry_2017.csv:8: image 00000002_000.png "
                                                                   r"is listed again with other labels"),
    "row_without_patient_id": (lambda r: _set_cell(r, "00000003_000.png", "Patient ID", ""),
                               r"Data_Entry_2017.csv:5: image 00000003_000.png has no Patient ID"),
    "non_utf8_csv": (lambda r: _replace_bytes(r / "Data_Entry_2017.csv", b"Hernia", b"Hern\xefa"),
                     r"Data_Entry_2017.csv:4: not valid UTF-8"),
    "image_listed_twice_in_split": (lambda r: _append(r / "train_val_list.txt", "00000002_000.png"),
                                    r"train_val_list.txt:6: image '00000002_000.png' is listed again"),
}


@pytest.mark.parametrize("case", sorted(NIH_CASES))
def test_nih_bad_input(case, tmp_path):
    corrupt, pattern = NIH_CASES[case]
    root = write_nih(tmp_path / "nih")
    corrupt(root)
    with pytest.raises((DataError, FileNotFoundError), match=pattern):
        ChestXray14DataModule(root=str(root), image_size=32, batch_size=2, val_fraction=0.3).setup()


def _cx_rows(index, rel=None, view=None, values=None):
    rows = list(CHEXPERT_ROWS)
    old = rows[index] if index < len(rows) else rows[2]
    row = (rel or old[0], view or old[1], values or old[2])
    return {"rows": rows[:index] + [row] + rows[index + 1:]}


def _valid_patient_in_train(root):
    _replace_bytes(root / "valid.csv", b"valid/patient90003", b"valid/patient00003")
    write_png(root / "valid" / CHEXPERT_ROWS[3][0])


CHEXPERT_CASES = {  # write_chexpert arguments, expected error, optional change to the written folder
    "missing_path_column": ({"header": [c for c in CHEXPERT_HEADER if c != "Path"]}, r"train.csv.*'Path'"),
    "missing_label_column": ({"header": [c for c in CHEXPERT_HEADER if c != "Edema"]}, r"\['Edema'\]"),
    "unknown_view_value": (_cx_rows(0, view="AP"), r"train.csv:2: Frontal/Lateral is 'AP'; expected Frontal or"),
    "path_without_patient": (_cx_rows(4, rel="nobody/study1/view1_frontal.jpg"), r"train.csv:6: .*no patient folder"),
    "duplicate_path_other_labels": (_cx_rows(5, values=["1.0", "1.0", "", "", "1.0"]),
                                    r"train.csv:7: .*view1_frontal.jpg is listed again with other labels"),
    "patient_in_train_and_valid": ({}, r"train.csv:5: image view1_frontal.jpg belongs to patient 'patient00003'",
                                   _valid_patient_in_train),
}


@pytest.mark.parametrize("case", sorted(CHEXPERT_CASES))
def test_chexpert_bad_input(case, tmp_path):
    kwargs, pattern, *change = CHEXPERT_CASES[case]
    root = write_chexpert(tmp_path / "cx", **kwargs)
    for fn in change:
        fn(root)
    with pytest.raises(DataError, match=pattern):
        chexpert(root)


def _jsonl(path: Path, lines) -> str:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


def _latin1(path: Path, records) -> str:
    path.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("latin-1"))
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
    "non_utf8_file": (lambda t: {"train_file": _latin1(t / "d.jsonl", [GOOD, {**GOOD, "output": "caf\u00e9"}])},
                      r"d.jsonl:2: not valid UTF-8 \(byte 0xe9"),
    "characters_the_tokenizer_lacks": (lambda t: {"train_file": _jsonl(t / "d.jsonl", [GOOD] * 3 + [
        {**GOOD, "output": "caf\u00e9"}])}, r"d.jsonl:4: the tokenizer cannot encode the character\(s\) \['\u00e9'\]"),
    "batch_size_zero": (lambda t: {"batch_size": 0}, r"batch_size must be >= 1 .* got batch_size=0"),
}


@pytest.mark.parametrize("case", sorted(TEXT_CASES))
def test_instruction_bad_input(case, tmp_path):
    make, pattern = TEXT_CASES[case]
    with pytest.raises((DataError, ValueError, FileNotFoundError), match=pattern):
        dm = InstructionDataModule(**make(tmp_path))
        dm.setup()


REWARD_CASES = {  # GSM8K / QA references no completion could ever match
    "reference_not_one_number": ({"question": "q", "answer": "#### 3 or 4"}, r"r.jsonl:2: 'answer': the reference "
                                                                               r"'3 or 4' is not one number"),
    "reference_time_of_day": ({"question": "q", "answer": "#### 2:30"}, r"r.jsonl:2: .*'2:30' is not one number"),
    "reference_ambiguous_comma": ({"question": "q", "answer": "#### 3,5"}, r"r.jsonl:2: .*'3,5' is not one number"),
    "reference_divides_by_zero": ({"question": "q", "answer": "#### 1/0"}, r"r.jsonl:2: .*'1/0' divides by zero"),
    "blank_accepted_answer": ({"question": "q", "answers": ["Paris", " "]}, r"r.jsonl:2: 'answers' must be a "
                                                                              r"non-empty list of strings, none blank"),
}


@pytest.mark.parametrize("case", sorted(REWARD_CASES))
def test_unmatchable_reference(case, tmp_path):
    record, pattern = REWARD_CASES[case]
    first = {"question": "q", "answer": "#### 1"} if "answer" in record else {"question": "q", "answers": ["a"]}
    with pytest.raises(DataError, match=pattern):
        read_verifiable_file(_jsonl(tmp_path / "r.jsonl", [first, record]))


def _scores_file(t: Path, scores) -> str:
    (t / "scores.json").write_text(json.dumps({"scores": scores}))
    return str(t / "scores.json")


_MAE = {"model_name": "vit_tiny_patch16_224", "img_size": 32, "decoder_dim": 16, "decoder_depth": 1,
        "decoder_heads": 2, "model_kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}}
_GPT2 = {"model_type": "gpt2", "n_embd": 16, "n_layer": 1, "n_head": 2, "n_positions": 24}
ARGUMENT_CASES = {  # arguments that used to reach a library (or train wrongly) before failing
    "lisa_weights_fewer_positive_than_n_layers": (lambda t: LISA(n_layers=2, weights=[1, 0, 0, 0]),
                                                  r"weights has 1 positive entries .* n_layers=2"),
    "lisa_weights_not_finite": (lambda t: LISA(n_layers=1, weights=[1, math.nan]), r"weights must be finite"),
    "mae_mask_ratio_zero": (lambda t: MAEPretrainModule(mask_ratio=0.0, **_MAE), r"mask_ratio must be in \(0, 1\)"),
    "mae_mask_ratio_masks_no_patch": (lambda t: MAEPretrainModule(mask_ratio=1e-17, **_MAE),
                                      r"mask_ratio=1e-17 removes 0 of the 16 patches"),
    "owlore_scores_negative": (lambda t: OwLore(scores=[1, -1, 1, 1]), r"scores: .*finite and non-negative.*-1"),
    "owlore_scores_file_not_finite": (lambda t: OwLore(scores_file=_scores_file(t, [1, math.nan]))
                                      ._load_or_compute_scores(None, None), r"scores_file .*scores.json: .*nan"),
    "owlore_blocks_without_linear": (lambda t: trainer([OwLore(n_layers=1, galore=False)], 1, t).fit(
        TinyGPT2(), tiny_loader(batches=1)), r"block 0 \(model.transformer.h.0, GPT2Block\) has none: .*Conv1D"),
    "max_length_beyond_positions": (lambda t: fit_one_step(t, CausalLMModule(model_config=TINY, exact_match_batches=0),
                                                           InstructionDataModule(synthetic_dir=str(t / "s"),
                                                                                 synthetic_train_size=16,
                                                                                 max_length=128)),
                                    r"data.max_length = 128: longer than the model's max_position_embeddings=64"),
    "grpo_prompt_and_budget_beyond_positions": (lambda t: fit_one_step(t, GRPOModule(
        model_config=_GPT2, num_generations=2, max_new_tokens=16), VerifiableQADataModule(
        synthetic_dir=str(t / "s"), synthetic_sft_size=8, synthetic_train_size=8, synthetic_val_size=4, batch_size=2,
        sft_batch_size=4)),
        r"longest prompt \(\d+\) \+ max_new_tokens \(16\) = \d+: longer than the model's max_position_embeddings=24"),
    "verifiable_batch_size_zero": (lambda t: VerifiableQADataModule(batch_size=0), r"\{'batch_size': 0\}"),
}


@pytest.mark.parametrize("case", sorted(ARGUMENT_CASES))
def test_argument_checked_before_the_library(case, tmp_path):
    make, pattern = ARGUMENT_CASES[case]
    with pytest.raises(ValueError, match=pattern):
        make(tmp_path)


CLI_ARGUMENT_CASES = {  # a class's own __init__ error reaches the user first, not inside the parser's dump
    "lisa_weights_in_cli": ("lisa_sft", ["--trainer.callbacks.init_args.weights=[1,0,0,0]"], r"weights has 1 positive"),
    "grpo_generations_in_cli": ("grpo_llds", ["--model.init_args.num_generations=1"], r"num_generations \(G\) must"),
}


@pytest.mark.parametrize("case", sorted(CLI_ARGUMENT_CASES))
def test_class_errors_in_the_cli(case, tmp_path, capsys, monkeypatch, cli_argv):
    monkeypatch.chdir(tmp_path)
    config, args, pattern = CLI_ARGUMENT_CASES[case]
    with pytest.raises(ValueError, match=pattern):
        main(["fit", "--config", str(CONFIG_DIR / f"{config}.yaml"), "--wandb=disabled", *args])
    err = capsys.readouterr().err
    assert re.search("Error in the run's configuration: ValueError: " + pattern, err)
    assert "Union subtypes" not in err and not (tmp_path / "runs").exists()


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
    """The number of bad inputs this sweep tries (for the closing note), silent-data outcomes included."""
    from tests.test_silent_input_sweep import OUTCOME_CASES

    tables = (NIH_CASES, CHEXPERT_CASES, TEXT_CASES, REWARD_CASES, ARGUMENT_CASES, CLI_ARGUMENT_CASES, CONFIG_CASES,
              OUTCOME_CASES)
    return sum(map(len, tables)) + 1

