"""Checkpoint writes never destroy the previous good file: across filesystems, on a full disk, when killed."""

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

from callbacks.run import atomic_checkpoint
from callbacks.run.atomic_checkpoint import AtomicCheckpointIO, atomic_torch_save, remove_stale_temp_files

REPO = Path(__file__).resolve().parents[1]


def _mount_tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return result.returncode == 0


@pytest.fixture
def tmpfs(tmp_path):
    """A tmpfs of 4 MB mounted for the test (we run as root in CI); ``None`` where mounting is not allowed."""
    mount = tmp_path / "tmpfs"
    if not _mount_tmpfs(mount, "4m"):
        yield None
        return
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _state(value: float, n: int = 1000) -> dict:
    return {"value": value, "w": torch.full((n,), value)}


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "last.ckpt")


def test_cross_device_rename_failure_keeps_previous_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    atomic_torch_save(_state(1.0), target)

    def exdev(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(atomic_checkpoint.os, "replace", exdev)
    with pytest.raises(OSError, match=r"cross-device rename.*previous file \(if any\) is intact"):
        atomic_torch_save(_state(2.0), target)
    assert torch.load(target, weights_only=True)["value"] == 1.0
    assert _leftovers(tmp_path) == []


def test_disk_full_mid_write_keeps_previous_checkpoint_and_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    atomic_torch_save(_state(1.0), target)
    real_save = torch.save

    def half_then_enospc(obj, f):
        real_save(obj, f)
        f.truncate(f.tell() // 2)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic_checkpoint.torch, "save", half_then_enospc)
    with pytest.raises(OSError, match=r"No space left on device while writing checkpoint .*last.ckpt"):
        atomic_torch_save(_state(2.0), target)
    assert torch.load(target, weights_only=True)["value"] == 1.0
    assert _leftovers(tmp_path) == []


class WideBoringModel(BoringModel):
    """About 0.5 MB of weights (plain SGD, no optimizer state), so a 4 MB disk fills after a few checkpoints."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(32, 4000)


def test_real_full_tmpfs_leaves_no_partial_epoch_checkpoint(tmpfs, tmp_path):
    """ModelCheckpoint writing onto a 4 MB tmpfs: the first checkpoints fit, then the disk fills up; no partial
    ``epoch=...ckpt`` remains and the last complete ones still load."""
    if tmpfs is None:
        pytest.skip("cannot mount a tmpfs here; the simulated ENOSPC test above covers the logic")
    model = WideBoringModel()
    ckpt = ModelCheckpoint(dirpath=tmpfs, every_n_train_steps=1, save_top_k=-1, save_last=False)
    trainer = L.Trainer(max_steps=40, accelerator="cpu", logger=False, callbacks=[ckpt], enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, plugins=[AtomicCheckpointIO()],
                        default_root_dir=tmp_path)
    with pytest.raises(OSError, match="No space left on device while writing checkpoint"):
        trainer.fit(model)
    files = sorted(tmpfs.iterdir())
    assert files and all(p.name.startswith("epoch=") and p.suffix == ".ckpt" for p in files), files
    for path in files:
        assert torch.load(path, weights_only=True)["global_step"] >= 1


_WRITER = """
import sys, torch
from callbacks.run.atomic_checkpoint import atomic_torch_save
i = 0
while True:
    i += 1
    atomic_torch_save({"i": i, "w": torch.full((300_000,), float(i))}, sys.argv[1])
    print(i, flush=True)
"""


@pytest.mark.slow
def test_kill_mid_write_on_another_filesystem_than_tmpdir(tmpfs, tmp_path):
    """Target on a tmpfs, $TMPDIR on the main disk: SIGKILL at varying points of a write never leaves a partial
    ``last.ckpt``; the temporary file a kill leaves is hidden, and the next write removes it."""
    folder = tmpfs if tmpfs is not None else tmp_path / "run"
    folder.mkdir(exist_ok=True)
    target = folder / "last.ckpt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path)}
    for attempt in range(2):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(target)], stdout=subprocess.PIPE, text=True,
                                env=env)
        proc.stdout.readline()
        time.sleep(0.01 + 0.02 * attempt)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = torch.load(target, weights_only=True)
        assert torch.all(state["w"] == float(state["i"]))
        assert [p.name for p in folder.iterdir() if not p.name.startswith(".")] == ["last.ckpt"]
    atomic_torch_save({"i": 0}, target)
    assert _leftovers(folder) == []
    assert [p for p in tmp_path.iterdir() if p.is_file()] == []  # nothing staged in $TMPDIR either


def test_stale_temp_files_of_live_processes_are_kept(tmp_path):
    host = os.uname().nodename
    alive = tmp_path / f".last.ckpt.tmp.{host}.{os.getppid()}.abcd1234"
    dead = tmp_path / f".last.ckpt.tmp.{host}.999999999.abcd1234"
    other_host = tmp_path / ".last.ckpt.tmp.elsewhere.999999999.abcd1234"
    for p in (alive, dead, other_host):
        p.write_bytes(b"x")
    assert remove_stale_temp_files(tmp_path) == [dead]
    assert alive.exists() and other_host.exists()
