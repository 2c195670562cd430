"""Pre-training corpus: text, JSONL and parquet shards packed into blocks once, validation split by document,
the packed blocks reused on the next start, and the layer-drop pre-training recipe resumed exactly from shards."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import datamodules.text_corpus as text_corpus
import tests.test_recipe_repeatability as repeatability
from datamodules.jsonl_records import DataError
from datamodules.text_corpus import TextCorpusDataModule
from recipes.cli import CONFIG_DIR

DOCS = [f"doc{i:03d} " + "abcdefghij"[i % 10] * (5 + i % 7) for i in range(60)]


def write_shards(d, kind: str) -> list[str]:
    """The 60 documents in two shards of one kind."""
    halves = (DOCS[:30], DOCS[30:])
    if kind == "txt":
        for k, docs in enumerate(halves):
            (d / f"part{k}.txt").write_text("\n\n".join(docs) + "\n")
        return [str(d / "part*.txt")]
    if kind == "jsonl":
        for k, docs in enumerate(halves):
            (d / f"part{k}.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n"
                                                      for i, t in enumerate(docs)))
        return [str(d / "part0.jsonl"), str(d / "part1.jsonl")]
    for k, docs in enumerate(halves):
        pq.write_table(pa.Table.from_pylist([{"body": t} for t in docs]), d / f"part{k}.parquet")
    return [str(d / "part*.parquet")]


def _documents_in(dm, split) -> set[str]:
    text = "".join(dm.tokenizer.decode(b["input_ids"]) for b in dm.datasets[split])
    return {doc[:6] for doc in DOCS if doc[:6] in text}


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_shards_are_packed_into_blocks_split_by_document(tmp_path, kind):
    column = "body" if kind == "parquet" else "text"
    dm = TextCorpusDataModule(files=write_shards(tmp_path, kind), text_column=column, max_length=16,
                              val_fraction=0.1, cache_dir=str(tmp_path / "cache"))
    dm.setup()
    assert all(len(b["input_ids"]) == 16 for b in dm.datasets["train"])
    train, val = _documents_in(dm, "train"), _documents_in(dm, "val")
    assert len(val) >= 5 and not train & val  # no document is split between training and validation
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (min(32, len(dm.datasets["train"])), 16)
    assert (batch["labels"] == batch["input_ids"]).all()
    eos = dm.tokenizer.eos_token_id
    stream = [t for b in dm.datasets["val"] for t in b["input_ids"]]
    assert eos in stream  # documents are separated by the end-of-text token


def test_packed_blocks_are_reused_on_the_next_start(tmp_path, monkeypatch):
    files = write_shards(tmp_path, "txt")
    first = TextCorpusDataModule(files=files, max_length=16, cache_dir=str(tmp_path / "cache"))
    first.setup()

    def fail(*args, **kwargs):
        raise AssertionError("packed again")

    monkeypatch.setattr(text_corpus, "_pack", fail)
    again = TextCorpusDataModule(files=files, max_length=16, cache_dir=str(tmp_path / "cache"))
    again.setup()
    assert again.datasets["train"]["input_ids"] == first.datasets["train"]["input_ids"]
    with pytest.raises(AssertionError, match="packed again"):
        TextCorpusDataModule(files=files, max_length=8, cache_dir=str(tmp_path / "cache")).setup()


def test_bad_corpus_input_is_named(tmp_path):
    files = write_shards(tmp_path, "jsonl")
    with pytest.raises(DataError, match=r"part0\.jsonl: no column 'content' in the corpus \(found \['text', 'id'\]\)"):
        TextCorpusDataModule(files=files, text_column="content").setup()
    with pytest.raises(FileNotFoundError, match=r"Corpus shard '.*nothing\*\.txt' does not exist"):
        TextCorpusDataModule(files=[str(tmp_path / "nothing*.txt")]).setup()
    (tmp_path / "x.csv").write_text("text\na\n")
    with pytest.raises(DataError, match=r"corpus shards must all be plain text"):
        TextCorpusDataModule(files=[str(tmp_path / "x.csv")]).setup()
    with pytest.raises(DataError, match=r"make no block; add text or lower max_length"):
        TextCorpusDataModule(files=files, max_length=4096).setup()
    with pytest.raises(ValueError, match="files is a non-empty list"):
        TextCorpusDataModule(files="corpus.txt")


@pytest.mark.slow
def test_layer_drop_pretraining_from_text_shards_resumes_exactly(tmp_path, monkeypatch, cli_argv):
    shards = write_shards(tmp_path, "txt")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(repeatability.RESUME_ARGS, "pld_pretrain",
                        [*repeatability.RESUME_ARGS["pld_pretrain"], f"--data.init_args.files=[{shards[0]}]",
                         "--data.init_args.max_length=16", "--data.init_args.batch_size=4"])
    path = CONFIG_DIR / "pld_pretrain.yaml"
    first = repeatability._run(path, tmp_path / "first")
    with pytest.raises(SystemError, match="simulated crash"):
        repeatability._run(path, tmp_path / "crashed", crash=True)
    ckpt = next((tmp_path / "crashed" / "ckpt").glob(f"*step={repeatability.CRASH}.ckpt"))
    resumed = repeatability._run(path, tmp_path / "crashed", ckpt=str(ckpt))
    assert resumed["state"] == first["state"], "resumed run ended with other weights or callback state"
    assert (repeatability._rows_from(resumed["metrics"], repeatability.CRASH)
            == repeatability._rows_from(first["metrics"], repeatability.CRASH))
