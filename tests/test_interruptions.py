"""The interruption contract, as a small matrix: a run interrupted by a signal in the middle of an accumulation
window or during validation, by a crash after a time-triggered save, or stopped at ``max_steps`` and continued,
ends with the same weights, optimizer state, technique choices (the method callback's whole state: LISA/OwLore/BAdam
blocks, layer-drop patterns) and ``metrics.csv`` rows (GRPO's rollouts and rewards among them) as the uninterrupted
run, bitwise on the CPU, for ``accumulate_grad_batches`` 1 and 2, ``32-true`` / ``bf16-true`` and every recipe
kind (LISA, OwLore with GaLore, BAdam, progressive layer drop, MAE, ViT, GRPO). A mid-epoch resume through the Python
API does not warn that the dataloader is not resumable (``datamodules.resumable_loader``)."""

import csv
import os
import signal
from functools import partial

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from callbacks import LISA, BAdam, OwLore, ProgressiveLayerDrop
from callbacks.core.galore import GaLoreAdamW
from callbacks.run.exact_resume import ExactResume
from callbacks.run.periodic_checkpoint import PeriodicLastCheckpoint
from callbacks.run.preemption import Preempted, PreemptionCheckpoint
from datamodules.instruction import InstructionDataModule
from recipes.causal_lm import CausalLMModule
from tests.conftest import TINY_LM_CONFIG, TINY_VAL_AUROC, TINY_VIT_KWARGS, grpo_data, grpo_module

TINY = {**TINY_LM_CONFIG, "attention_dropout": 0.1}  # dropout draws random numbers: resume must restore them
STEPS, CUT = 6, 3  # optimizer steps of the whole run; where it is interrupted


class Interrupt(L.Callback):
    """At training batch ``batch``: send SIGTERM to this process (``signal``), or let an hour pass on the periodic
    checkpoint's clock (``late``); die at batch ``crash_at`` when given."""

    def __init__(self, batch: int, how: str, clock: list[float] | None = None, crash_at: int | None = None) -> None:
        self.batch, self.how, self.clock, self.crash_at, self.seen = batch, how, clock, crash_at, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.seen == self.crash_at:
            raise SystemError("simulated crash")
        if self.seen == self.batch and self.how == "late":
            self.clock[0] += 3600.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.seen == self.batch and self.how == "signal":
            os.kill(os.getpid(), signal.SIGTERM)
        self.seen += 1

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if self.how == "signal_in_validation" and batch_idx == 0:
            self.validation_signalled = True
            os.kill(os.getpid(), signal.SIGTERM)


def _causal_lm(root, method, **module_kwargs):
    data = InstructionDataModule(synthetic_dir=str(root.parent / "syn"), synthetic_train_size=24, batch_size=2,
                                 seed=1)
    # a schedule that does not depend on max_steps, so "stop at 3, continue to 6" is the 6-step run
    module = CausalLMModule(model_config=TINY, warmup_steps=2, min_lr_ratio=1.0, exact_match_batches=0,
                            **module_kwargs)
    return module, data, method


def _mae(root):
    from datamodules import ChestXray14DataModule
    from recipes.mae_pretrain import MAEPretrainModule

    data = ChestXray14DataModule(phantom_dir=str(root.parent / "nih"), phantom_patients=12, phantom_image_size=48,
                                 image_size=32, batch_size=2)
    module = MAEPretrainModule(model_name="vit_tiny_patch16_224", img_size=32, in_chans=1,
                               model_kwargs=TINY_VIT_KWARGS, decoder_dim=16, decoder_depth=1, decoder_heads=2,
                               warmup_steps=2, min_lr_ratio=1.0)
    return module, data, None


def _vit(root):
    from datamodules import ChestXray14DataModule
    from recipes.vit_classifier import ViTClassifierModule

    data = ChestXray14DataModule(phantom_dir=str(root.parent / "nih"), phantom_patients=12, phantom_image_size=48,
                                 image_size=32, batch_size=2)
    module = ViTClassifierModule(model_name="vit_tiny_patch16_224", img_size=32, in_chans=1,
                                 model_kwargs=TINY_VIT_KWARGS, warmup_steps=2, min_lr_ratio=1.0)  # drop path draws
    return module, data, None


RECIPES = {  # recipe kind -> (module, data module, the method callback or None)
    "lisa": lambda root: _causal_lm(root, LISA(n_layers=1, interval=2)),
    "owlore": lambda root: _causal_lm(root, OwLore(n_layers=1, interval=2, calibration_batches=1),
                                      optimizer=partial(GaLoreAdamW, lr=1e-3, rank=4)),
    "badam": lambda root: _causal_lm(root, BAdam(interval=2, order="random", seed=1)),
    "pld": lambda root: _causal_lm(root, ProgressiveLayerDrop(theta_bar=0.5, gamma=0.2)),
    "mae": _mae,
    "vit": _vit,
    "grpo": lambda root: (grpo_module(num_generations=2, max_new_tokens=3), grpo_data(root.parent), None),
}


def _fit(root, max_steps, acc, precision, ckpt_path=None, interrupt=None, every_n_minutes=None, recipe="lisa"):
    L.seed_everything(3)
    module, data, method = RECIPES[recipe](root)
    periodic = PeriodicLastCheckpoint(every_n_minutes=every_n_minutes, every_n_steps=1000)
    callbacks = ([interrupt] if interrupt else []) + [ExactResume(), periodic, PreemptionCheckpoint()]
    callbacks += [method] if method else []
    logger = CSVLogger(root, name="csv", version=0)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=logger, enable_checkpointing=False,
                        callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
                        accumulate_grad_batches=acc, precision=precision, limit_val_batches=2,
                        val_check_interval=CUT * acc, num_sanity_val_steps=0, default_root_dir=root,
                        log_every_n_steps=1)
    try:
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    finally:
        logger.finalize("done")
    with open(root / "csv" / "version_0" / "metrics.csv") as f:
        # the rows of the steps after the resume, as the values they hold (the columns depend on the whole run)
        rows = [{k: v for k, v in row.items() if v} for row in csv.DictReader(f) if int(row["step"]) > CUT]
    return {"weights": {k: v.clone() for k, v in module.state_dict().items()},
            "optimizer": trainer.optimizers[0].state_dict()["state"],
            "method": method.state_dict() if method else {}, "rows": rows}


def _assert_equal_tree(a, b, where):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_equal_tree(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_equal_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _assert_same(a, b):
    for name, value in a["weights"].items():
        assert torch.equal(value, b["weights"][name]), name
    _assert_equal_tree(a["optimizer"], b["optimizer"], "optimizer")
    _assert_equal_tree(a["method"], b["method"], "method")  # blocks, generators, drop patterns
    assert a["rows"] and a["rows"] == b["rows"]  # metrics.csv after the resume (GRPO: rewards, lengths)


_FULL: dict = {}


def _full(tmp_path_factory, acc, precision, recipe):
    if (acc, precision, recipe) not in _FULL:
        _FULL[acc, precision, recipe] = _fit(tmp_path_factory.mktemp("full"), STEPS, acc, precision, recipe=recipe)
    return _FULL[acc, precision, recipe]


# every dimension is covered (accumulation 1 and 2, both precisions, each interruption) without the full product
# and every recipe kind with at least one interruption
@pytest.mark.filterwarnings("error:You're resuming from a checkpoint that ended before the epoch")
@pytest.mark.parametrize("recipe,acc,precision,kind", [
    ("lisa", 1, "32-true", "end_of_fit"), ("lisa", 2, "bf16-true", "end_of_fit"),
    ("lisa", 2, "32-true", "signal_mid_window"), ("lisa", 2, "bf16-true", "signal_mid_window"),
    ("lisa", 2, "32-true", "periodic_then_crash"), ("lisa", 1, "32-true", "signal_in_validation"),
    ("lisa", 2, "bf16-true", "signal_in_validation"),
    ("owlore", 2, "bf16-true", "signal_mid_window"), ("badam", 1, "32-true", "periodic_then_crash"),
    ("pld", 2, "32-true", "signal_in_validation"), ("mae", 1, "32-true", "signal_mid_window"),
    ("grpo", 1, "32-true", "signal_in_validation"),
    pytest.param("vit", 2, "32-true", "periodic_then_crash", marks=TINY_VAL_AUROC),
])
def test_interrupted_run_continues_exactly(tmp_path, tmp_path_factory, monkeypatch, recipe, acc, precision, kind):
    fit = partial(_fit, recipe=recipe)
    full = _full(tmp_path_factory, acc, precision, recipe)
    root = tmp_path / "cut"
    window = CUT * acc - acc  # the first batch of the window that makes step CUT
    if kind == "end_of_fit":  # stopped by max_steps, continued with a larger one
        fit(root, CUT, acc, precision)
    elif kind == "signal_mid_window":  # SIGTERM after the window's first micro-batch: the window is finished first
        with pytest.raises(Preempted):
            fit(root, STEPS, acc, precision, interrupt=Interrupt(window, "signal"))
    elif kind == "signal_in_validation":  # validation after step CUT stops after its first batch
        stop = Interrupt(0, "signal_in_validation")
        with pytest.raises(Preempted):
            fit(root, STEPS, acc, precision, interrupt=stop)
        assert stop.validation_signalled
    else:  # the save interval passes in the middle of a window, then the process dies in the next window
        clock = [0.0]
        monkeypatch.setattr("callbacks.run.periodic_checkpoint.monotonic", lambda: clock[0])
        with pytest.raises(SystemError, match="simulated crash"):
            fit(root, STEPS, acc, precision, every_n_minutes=1.0,
                 interrupt=Interrupt(window, "late", clock, crash_at=CUT * acc + 1))
    last = root / "csv" / "version_0" / "checkpoints" / "last.ckpt"  # the logger's run folder
    saved = torch.load(last, weights_only=False)
    assert saved["global_step"] == CUT and saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"][
        "processed"] == CUT * acc  # a whole number of windows
    _assert_same(full, fit(tmp_path / "resumed", STEPS, acc, precision, ckpt_path=last))


def test_a_failed_fit_leaves_nothing_on_the_model(tmp_path):
    """Lightning calls no ``teardown``/``on_fit_end`` when a fit raises: the callbacks that change the model undo
    it in ``on_exception``, so a retry, a sweep or the next notebook cell trains the plain model."""
    from callbacks import LayerDiagnostics, ProgressiveLayerDrop
    from tests.conftest import TinyModule, tiny_loader, trainer

    module = TinyModule(layers=4)
    callbacks = [LISA(n_layers=1, interval=2), ProgressiveLayerDrop(theta_bar=0.5, gamma=1.0),
                 LayerDiagnostics(interval=1, heatmaps=False), Interrupt(0, "none", crash_at=2)]
    with pytest.raises(SystemError, match="simulated crash"):
        trainer(callbacks, 4, tmp_path).fit(module, tiny_loader(batches=4))
    assert [n for n, p in module.named_parameters() if not p.requires_grad] == []  # LISA's frozen blocks
    assert [n for n, m in module.named_modules() if "forward" in m.__dict__] == []  # layer-drop wrappers
    assert [n for n, m in module.named_modules() if m._forward_hooks or m._forward_pre_hooks] == []  # diagnostics


@pytest.mark.parametrize("fast", [False, True], ids=["eager", "compiled_packed"])
def test_users_own_model_and_parquet_data_resume_exactly_after_a_signal(fast, tmp_path, tmp_path_factory,
                                                                       monkeypatch, model_zoo):
    """The way a user runs it: a Qwen2-type model saved with ``save_pretrained`` (its own tokenizer and chat
    template) loaded through ``model_path`` with gradient checkpointing, Alpaca records in a parquet file, LISA,
    ``accumulate_grad_batches=2`` and ``bf16-true``; SIGTERM in the middle of a window, then resume. ``fast``: the
    same with the throughput settings on, ``compile: true`` and ``data.packing: true``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from datamodules.synthetic_tasks import make_problems

    folder = model_zoo["qwen2"]
    records = [{"instruction": p.question, "input": "", "output": p.answer} for p in make_problems(40, seed=7)]
    parquet = tmp_path_factory.mktemp("users_data") / "alpaca.parquet"
    pq.write_table(pa.Table.from_pylist(records), parquet)

    def users_own(root):
        data = InstructionDataModule(train_file=str(parquet), tokenizer=str(folder), batch_size=2, max_length=64,
                                     val_fraction=0.2, seed=1, packing=fast)
        module = CausalLMModule(model_path=str(folder), gradient_checkpointing=True, warmup_steps=2,
                                min_lr_ratio=1.0, exact_match_batches=0, compile=fast)
        return module, data, LISA(n_layers=1, interval=2)

    monkeypatch.setitem(RECIPES, "users_own", users_own)
    acc, precision = 2, "bf16-true"
    full = _fit(tmp_path / "full", STEPS, acc, precision, recipe="users_own")
    assert full["rows"] and not any(w.dtype == torch.float32 for w in full["weights"].values())
    with pytest.raises(Preempted):
        _fit(tmp_path / "cut", STEPS, acc, precision, recipe="users_own",
             interrupt=Interrupt(CUT * acc - acc, "signal"))  # after the first micro-batch of step CUT's window
    last = tmp_path / "cut" / "csv" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == CUT
    _assert_same(full, _fit(tmp_path / "resumed", STEPS, acc, precision, ckpt_path=last, recipe="users_own"))
