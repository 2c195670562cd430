"""Generated default data: keyed by what generated it, written atomically, shared safely, usable read-only."""

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from datamodules import generated, synthetic_tasks
from datamodules.generated import MARKER, generate_once, keyed_dir
from datamodules.instruction import InstructionDataModule
from datamodules.verifiable_qa import VerifiableQADataModule


def test_two_runs_generating_at_once_read_the_same_complete_data(tmp_path, monkeypatch):
    real = synthetic_tasks.write_jsonl

    def slow(path, problems, fmt):  # widen the window in which the two writers overlap
        time.sleep(0.2)
        return real(path, problems, fmt)

    monkeypatch.setattr(synthetic_tasks, "write_jsonl", slow)
    start, results = threading.Barrier(2), []

    def run():
        dm = InstructionDataModule(synthetic_dir=str(tmp_path / "syn"), synthetic_train_size=400)
        start.wait()
        dm.prepare_data()
        dm.setup("fit")
        results.append((len(dm.datasets["train"]), dm.synthetic_paths()["train"].parent.name))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 2 and results[0] == results[1] and results[0][0] > 300
    assert [p.name for p in (tmp_path / "syn").iterdir()] == [results[0][1]]  # one folder, no staging leftovers


def test_folder_is_keyed_by_what_generated_it(tmp_path):
    base = tmp_path / "syn"
    a = InstructionDataModule(synthetic_dir=str(base), synthetic_train_size=50, seed=0)
    b = InstructionDataModule(synthetic_dir=str(base), synthetic_train_size=50, seed=1)
    c = InstructionDataModule(synthetic_dir=str(base), synthetic_train_size=60, seed=0)
    d = VerifiableQADataModule(synthetic_dir=str(base), synthetic_sft_size=20, synthetic_train_size=20,
                               synthetic_val_size=4)
    for dm in (a, b, c, d):
        dm.prepare_data()
    folders = {dm.synthetic_paths()["train"].parent for dm in (a, b, c, d)}
    assert len(folders) == 4 and all((f / MARKER).is_file() for f in folders)
    assert a.synthetic_paths()["train"].read_text() != b.synthetic_paths()["train"].read_text()


def _remount_read_only(path: Path) -> bool:
    ok = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True).returncode == 0
    return ok and subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], capture_output=True).returncode == 0


def test_read_only_folder_with_the_right_files_is_used_as_is(tmp_path, monkeypatch):
    base = tmp_path / "shared"
    writes = []
    folder = generate_once(base, "demo", {"seed": 3}, lambda d: writes.append((d / "x.txt").write_text("3")))
    mounted = _remount_read_only(base)
    try:
        if not mounted:  # no bind mounts here: make any write attempt fail loudly instead
            monkeypatch.setattr(generated.tempfile, "mkdtemp", lambda **kw: pytest.fail("tried to write"))
        assert generate_once(base, "demo", {"seed": 3}, lambda d: pytest.fail("regenerated")) == folder
        assert (folder / "x.txt").read_text() == "3" and len(writes) == 1
        if mounted:
            with pytest.raises(OSError, match=r"Cannot write the generated demo data into .*shared"):
                generate_once(base, "demo", {"seed": 4}, lambda d: None)
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(base)], check=False)


def test_a_failed_generation_leaves_nothing_behind(tmp_path):
    def crash(folder):
        (folder / "half.jsonl").write_text("{")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        generate_once(tmp_path, "demo", {"seed": 1}, crash)
    assert list(tmp_path.iterdir()) == [] and not keyed_dir(tmp_path, "demo", {"seed": 1}).exists()


def test_staging_folders_of_killed_writers_are_removed_after_an_hour(tmp_path):
    target = keyed_dir(tmp_path, "demo", {"seed": 2})
    old, fresh = tmp_path / f".{target.name}.tmp-old", tmp_path / f".{target.name}.tmp-fresh"
    for folder in (old, fresh):
        folder.mkdir()
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    generate_once(tmp_path, "demo", {"seed": 2}, lambda d: (d / "x").write_text("1"))
    assert not old.exists() and fresh.exists()  # a fresh one may belong to a writer still running
