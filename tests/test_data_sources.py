"""The user's data as the ecosystem stores it: datasets folders, parquet, JSON arrays, CSV, ShareGPT, TRL
prompt/completion, data sets by name from the local cache; errors that name source, row and column; tokenize once."""

import importlib.util
import json
import shutil
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq
import pytest
from datasets.data_files import DataFilesDict
from datasets.packaged_modules.parquet.parquet import Parquet

import datamodules.instruction_records as instruction_records
from datamodules.chat_encoding import IGNORE_INDEX
from datamodules.instruction import InstructionDataModule
from datamodules.jsonl_records import DataError
from datamodules.record_sources import quiet_progress
from datamodules.synthetic_tasks import make_problems
from datamodules.verifiable_qa import VerifiableQADataModule

PROBLEMS = make_problems(40, seed=7)
BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _alpaca(p) -> dict:
    return {"instruction": p.instruction, "input": p.input, "output": p.answer}


def _messages(p) -> list[dict]:
    return [{"role": "user", "content": p.question}, {"role": "assistant", "content": p.answer}]


def _jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def write_save_to_disk(d):
    datasets.Dataset.from_list([{"messages": _messages(p)} for p in PROBLEMS]).save_to_disk(str(d / "disk"))
    return str(d / "disk")


def write_parquet(d):
    pq.write_table(pa.Table.from_pylist([_alpaca(p) for p in PROBLEMS]), d / "alpaca.parquet")
    return str(d / "alpaca.parquet")


def write_json_array(d):
    (d / "alpaca_data.json").write_text(json.dumps([_alpaca(p) for p in PROBLEMS], indent=4))
    return str(d / "alpaca_data.json")


def write_sharegpt(d):
    roles = {"user": "human", "assistant": "gpt"}
    return _jsonl(d / "sharegpt.jsonl", [{"conversations": [{"from": roles[m["role"]], "value": m["content"]}
                                                            for m in _messages(p)]} for p in PROBLEMS])


def write_prompt_completion(d):
    return _jsonl(d / "pc.jsonl", [{"prompt": p.question, "completion": p.answer} for p in PROBLEMS])


def write_conversational_prompt_completion(d):
    return _jsonl(d / "pc_chat.jsonl", [{"prompt": _messages(p)[:1], "completion": _messages(p)[1:]}
                                        for p in PROBLEMS])


def write_csv(d):
    pyarrow.csv.write_csv(pa.Table.from_pylist([{"query": p.question, "solution": p.answer} for p in PROBLEMS]),
                     d / "qa.csv")
    return str(d / "qa.csv")


FORMS = {"save_to_disk_messages": write_save_to_disk, "parquet_alpaca": write_parquet,
         "json_array_alpaca": write_json_array, "sharegpt_jsonl": write_sharegpt,
         "prompt_completion_jsonl": write_prompt_completion,
         "prompt_completion_messages": write_conversational_prompt_completion}


def _trained_texts(dm) -> list[str]:
    return [dm.tokenizer.decode([t for t, lab in zip(e["input_ids"], e["labels"], strict=True) if lab != IGNORE_INDEX])
            for e in dm.datasets["train"]]


@pytest.mark.parametrize("form", sorted(FORMS))
def test_the_same_40_problems_load_from_every_form(tmp_path, form):
    path = FORMS[form](tmp_path)
    dm = InstructionDataModule(train_file=path, val_file=path, max_length=64)
    dm.setup()
    assert len(dm.datasets["train"]) == len(dm.datasets["val"]) == 40
    assert _trained_texts(dm) == [f"{p.answer}</s>" for p in PROBLEMS]
    assert dm.datasets["val"]["answer"] == [p.answer for p in PROBLEMS]
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 32


def test_csv_with_a_columns_mapping(tmp_path):
    path = write_csv(tmp_path)
    dm = InstructionDataModule(train_file=path, val_file=path, columns={"query": "instruction", "solution": "output"})
    dm.setup()
    assert _trained_texts(dm) == [f"{p.answer}</s>" for p in PROBLEMS]
    with pytest.raises(DataError, match=r"qa\.csv row 0: record has none of the expected fields.*'query'"):
        InstructionDataModule(train_file=path, val_file=path).setup()


def test_csv_cells_are_text_exactly_as_written_and_must_be_utf8(tmp_path):
    (tmp_path / "d.csv").write_text("instruction,input,output\nAdd,0,3\nAdd,,3.50\n")
    dm = InstructionDataModule(train_file=str(tmp_path / "d.csv"), val_file=str(tmp_path / "d.csv"))
    dm.setup()
    assert dm.datasets["val"]["answer"] == ["3", "3.50"]
    assert dm.tokenizer.decode(dm.datasets["val"][0]["prompt_ids"]).endswith("<|user|>Add\n0</s><|assistant|>")
    (tmp_path / "bad.csv").write_bytes(b"instruction,output\nAdd,3\ncaf\xe9,4\n")
    with pytest.raises(DataError, match=r"bad\.csv:3: not valid UTF-8 \(byte 0xe9 at column 4\)"):
        InstructionDataModule(train_file=str(tmp_path / "bad.csv")).setup()


def test_given_data_format_overrides_detection(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"question": "q", "instruction": "i", "answer": "a"}] * 3)
    with pytest.raises(DataError, match=r"d\.jsonl:1: field 'output' must be a string"):
        InstructionDataModule(train_file=path, val_file=path).setup()  # detected as Alpaca
    dm = InstructionDataModule(train_file=path, val_file=path, data_format="gsm8k")
    dm.setup()
    assert dm.datasets["val"]["answer"] == ["a"] * 3
    with pytest.raises(ValueError, match="data_format must be one of"):
        InstructionDataModule(data_format="chatml")


def _parquet_with_a_null(d):
    rows = [{"instruction": "a", "output": "1"}, {"instruction": "b", "output": None}]
    pq.write_table(pa.Table.from_pylist(rows), d / "p.parquet")
    return d / "p.parquet"


BAD_SOURCES = {
    "parquet_null_field": (_parquet_with_a_null, r"p\.parquet row 1: field 'output' must be a string"),
    "sharegpt_unknown_speaker": (lambda d: _jsonl(d / "s.jsonl", [{"conversations": [
        {"from": "human", "value": "x"}, {"from": "bot", "value": "y"}]}]),
        r"s\.jsonl:1: conversations\[1\] has from 'bot'; expected human, user, gpt, assistant, system"),
    "json_array_malformed": (lambda d: (d / "a.json").write_text('[\n{"instruction": "a",}\n]') and d / "a.json",
                             r"a\.json:2: malformed JSON"),
    "json_array_not_objects": (lambda d: (d / "a.json").write_text('[1, 2]') and d / "a.json",
                               r"a\.json row 0: expected a JSON object, got int"),
    "unknown_format": (lambda d: (d / "d.dat").write_text("hello") and d / "d.dat",
                       r"d\.dat: cannot tell the data format from the name \(suffix '\.dat'\) or the contents"),
    "parquet_named_wrong": (lambda d: (d / "x.parquet").write_text("{}") and d / "x.parquet",
                            r"x\.parquet: named \.parquet but its contents are not parquet"),
    "prompt_completion_bad_role": (lambda d: _jsonl(d / "pc.jsonl", [{"prompt": [{"role": "bot", "content": "x"}],
                                                                     "completion": "y"}]),
                                   r"pc\.jsonl:1: prompt\[0\] has role 'bot'"),
}


@pytest.mark.parametrize("case", sorted(BAD_SOURCES))
def test_bad_sources_name_the_file_row_and_column(tmp_path, case):
    write, pattern = BAD_SOURCES[case]
    path = str(write(tmp_path))
    with pytest.raises(DataError, match=pattern):
        InstructionDataModule(train_file=path, val_file=path).setup()


def test_a_parquet_file_named_jsonl_loads_as_parquet(tmp_path):
    pq.write_table(pa.Table.from_pylist([_alpaca(p) for p in PROBLEMS]), tmp_path / "data.jsonl")
    dm = InstructionDataModule(train_file=str(tmp_path / "data.jsonl"), val_fraction=0.25)
    dm.setup()
    assert (len(dm.datasets["train"]), len(dm.datasets["val"])) == (30, 10)


def cache_named_dataset(cache_dir, name: str, splits: dict[str, list[dict]], work) -> None:
    """What ``load_dataset(name)`` leaves in the ``datasets`` cache after a download, made from local tables."""
    files = {}
    for split, rows in splits.items():
        files[split] = [str(work / f"{split}.parquet")]
        pq.write_table(pa.Table.from_pylist(rows), files[split][0])
    short = name.split("/")[-1]
    builder = Parquet(cache_dir=str(work / "build"), dataset_name=short, config_name="default", hash="0123abcd",
                      data_files=DataFilesDict.from_patterns(files))
    with quiet_progress():
        builder.download_and_prepare()
    built = next((work / "build" / short).iterdir())
    shutil.copytree(built, cache_dir / name.replace("/", "___") / "default")


def test_a_data_set_by_name_loads_offline_from_the_cache(tmp_path):
    cache = tmp_path / "cache"
    cache_named_dataset(cache, "acme/problems", {"train": [_alpaca(p) for p in PROBLEMS[:30]],
                                                 "validation": [_alpaca(p) for p in PROBLEMS[30:]]}, tmp_path)
    dm = InstructionDataModule(dataset="acme/problems", split="train", val_split="validation", cache_dir=str(cache))
    dm.setup()
    assert (len(dm.datasets["train"]), len(dm.datasets["val"])) == (30, 10)
    assert _trained_texts(dm) == [f"{p.answer}</s>" for p in PROBLEMS[:30]]
    with pytest.raises(DataError, match=r"acme/problems split 'test'.*found splits \['train', 'validation'\]"):
        InstructionDataModule(dataset="acme/problems", test_split="test", cache_dir=str(cache)).setup()
    with pytest.raises(FileNotFoundError, match="acme/missing.*not found locally or in the Hugging Face cache"):
        InstructionDataModule(dataset="acme/missing", cache_dir=str(cache)).setup()
    with pytest.raises(ValueError, match="give either dataset"):
        InstructionDataModule(dataset="acme/problems", train_file="x.jsonl")


def test_verifiable_data_from_parquet_with_renamed_columns(tmp_path):
    rows = [{"problem": f"What is {i}+1?", "solution": f"#### {i + 1}"} for i in range(12)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rl.parquet")
    dm = VerifiableQADataModule(train_file=str(tmp_path / "rl.parquet"), batch_size=4,
                                columns={"problem": "question", "solution": "answer"})
    dm.setup()
    assert dm.form == "gsm8k" and len(dm.datasets["train"]) + len(dm.datasets["val"]) == 12
    with pytest.raises(DataError, match=r"rl\.parquet row 0: data_format='qa' needs column 'answers'"):
        VerifiableQADataModule(train_file=str(tmp_path / "rl.parquet"), data_format="qa",
                               columns={"problem": "question", "solution": "answer"}).setup()


def test_tokenized_once_and_reused_while_nothing_changes(tmp_path, monkeypatch):
    path = write_parquet(tmp_path)
    first = InstructionDataModule(train_file=path, val_file=path, cache_dir=str(tmp_path / "c"))
    first.setup()
    assert first.datasets["val"].cache_files  # memory-mapped from the cache, not held in Python lists

    def fail(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(instruction_records, "_encode_rows", fail)
    again = InstructionDataModule(train_file=path, val_file=path, cache_dir=str(tmp_path / "c"))
    again.setup()
    assert again.datasets["val"]["input_ids"] == first.datasets["val"]["input_ids"]
    for changed in ({"max_length": 40}, {"tokenizer": _saved_tokenizer(first, tmp_path)}):
        with pytest.raises(AssertionError, match="tokenized again"):
            InstructionDataModule(train_file=path, val_file=path, cache_dir=str(tmp_path / "c"), **changed).setup()
    pq.write_table(pa.Table.from_pylist([_alpaca(p) for p in PROBLEMS[:20]]), path)  # the data changed
    with pytest.raises(AssertionError, match="tokenized again"):
        InstructionDataModule(train_file=path, val_file=path, cache_dir=str(tmp_path / "c")).setup()


def _saved_tokenizer(dm, tmp_path) -> str:
    dm.tokenizer.chat_template = dm.tokenizer.chat_template.replace("<|assistant|>", "<|assistant|> ")
    dm.tokenizer.save_pretrained(tmp_path / "tok")
    return str(tmp_path / "tok")


def test_tokenizing_with_worker_processes_gives_the_same_data(tmp_path):
    path = write_sharegpt(tmp_path)
    one = InstructionDataModule(train_file=path, val_file=path, cache_dir=str(tmp_path / "a"))
    two = InstructionDataModule(train_file=path, val_file=path, cache_dir=str(tmp_path / "b"), num_proc=2)
    one.setup()
    two.setup()
    assert two.datasets["train"]["labels"] == one.datasets["train"]["labels"]


def test_tokenize_once_benchmark_measures_a_first_and_a_second_start(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("tokenize_once", BENCH / "tokenize_once.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.write_records(tmp_path / "d.jsonl", 40)
    runs, written = [], []
    for _ in range(2):  # what each child process of the benchmark does: set up, print one JSON line
        bench.main(["--child", str(tmp_path / "d.jsonl"), "--cache", str(tmp_path / "cache")])
        runs.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
        written.append({p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.arrow")})
    assert [r["records"] for r in runs] == [40, 40]
    assert {"seconds", "phase_peak_mb", "anon_growth_mb"} <= runs[1].keys()
    assert len(written[0]) >= 4 and written[1] == written[0]  # the second start wrote nothing


def test_an_error_in_a_tokenizing_worker_names_the_record(tmp_path):
    rows = [{"instruction": "a", "output": "1"}] * 5 + [{"instruction": "b", "output": ["x"]}]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=r"d\.jsonl:6: field 'output' must be a string"):
        InstructionDataModule(train_file=path, val_file=path, num_proc=2).setup()


def test_verifiable_data_by_name(tmp_path):
    cache = tmp_path / "cache"
    rows = [{"question": f"What is {i}+1?", "answers": [str(i + 1)]} for i in range(10)]
    cache_named_dataset(cache, "acme/qa", {"train": rows[:8], "test": rows[8:]}, tmp_path)
    dm = VerifiableQADataModule(dataset="acme/qa", split="train", val_split="test", batch_size=4,
                                cache_dir=str(cache))
    dm.setup()
    assert dm.form == "qa" and (len(dm.datasets["train"]), len(dm.datasets["val"])) == (8, 2)


def test_a_local_data_set_folder_by_name(tmp_path):
    (tmp_path / "repo").mkdir()
    pq.write_table(pa.Table.from_pylist([_alpaca(p) for p in PROBLEMS[:30]]), tmp_path / "repo" / "train.parquet")
    pq.write_table(pa.Table.from_pylist([_alpaca(p) for p in PROBLEMS[30:]]), tmp_path / "repo" / "test.parquet")
    dm = InstructionDataModule(dataset=str(tmp_path / "repo"), test_split="test", val_fraction=0.1,
                               cache_dir=str(tmp_path / "cache"))
    dm.setup()
    assert (len(dm.datasets["train"]), len(dm.datasets["val"]), len(dm.datasets["test"])) == (27, 3, 10)
