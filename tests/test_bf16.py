"""Every recipe trains a few steps in ``bf16-true`` (weights and optimizer state in bf16) and ``bf16-mixed``
(fp32 weights, bf16 autocast), with finite losses and moving weights."""

import math
from pathlib import Path

import lightning as L
import pytest
import torch

from recipes.cli import RecipesCLI
from tests.conftest import CONFIGS, EXTRA_SMOKE_ARGS, SMOKE_ARGS, TINY_VAL_AUROC

PRECISIONS = {"bf16-true": torch.bfloat16, "bf16-mixed": torch.float32}


class PrecisionProbe(L.Callback):
    """Parameter dtypes and values at the start of training, the losses seen, and which parameters moved."""

    def __init__(self) -> None:
        self.dtypes: set[torch.dtype] = set()
        self.start: dict[str, torch.Tensor] = {}
        self.losses: list[float] = []
        self.moved: list[str] = []
        self.state_dtypes: set[torch.dtype] = set()

    def on_fit_start(self, trainer, pl_module) -> None:  # before GRPO's supervised warm-up
        self.dtypes = {p.dtype for p in pl_module.parameters()}
        self.start = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses += [float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train/loss", "loss/"))]
        for opt in trainer.optimizers:
            self.state_dtypes |= {v.dtype for s in opt.state.values() for v in s.values()
                                  if isinstance(v, torch.Tensor) and v.ndim > 0}

    def on_train_end(self, trainer, pl_module) -> None:
        self.moved = [n for n, p in pl_module.named_parameters() if not torch.equal(p.detach(), self.start[n])]


# two vision recipes in the quick suite (language models: the GRPO and LISA tests below); the rest are slow
FAST = {("mae_pretrain_cxr", "bf16-true"), ("vit_finetune_cxr", "bf16-mixed")}
CASES = [pytest.param(path, precision, id=f"{path.stem}-{precision}",
                      marks=() if (path.stem, precision) in FAST else pytest.mark.slow)
         for path in CONFIGS for precision in PRECISIONS]


@TINY_VAL_AUROC
@pytest.mark.parametrize(("path", "precision"), CASES)
def test_recipe_trains_in_bf16(path: Path, precision: str, tmp_path, monkeypatch, cli_argv):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["recipes"])
    args = ["--config", str(path), f"--trainer.default_root_dir={tmp_path / 'runs'}", *SMOKE_ARGS,
            *EXTRA_SMOKE_ARGS.get(path.stem, []), f"--trainer.precision={precision}", "--trainer.logger=false",
            "--trainer.enable_model_summary=false", "--trainer.enable_progress_bar=false"]
    if precision == "bf16-mixed":  # evaluation in bf16 is covered by the bf16-true runs
        args += ["--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0"]
    cli = RecipesCLI(args=args, run=False)
    probe = PrecisionProbe()
    cli.trainer.callbacks.append(probe)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert probe.dtypes == {PRECISIONS[precision]}, probe.dtypes
    # optimizer moments live in the weights' dtype (GaLore's projected moments are fp32 by design)
    assert PRECISIONS[precision] in probe.state_dtypes or not probe.state_dtypes
    assert probe.losses and all(math.isfinite(v) for v in probe.losses), probe.losses
    assert probe.moved, "no parameter changed"


@pytest.mark.parametrize("precision", PRECISIONS)
def test_grpo_update_moves_weights_in_bf16(precision, tmp_path):
    from tests.conftest import grpo_data, grpo_module

    torch.manual_seed(0)
    m = grpo_module(mu=2, num_mini_batches=2, kl_coef=0.1, logprob_chunk_size=7)
    m.reward_funcs = [lambda prompts, completions, **c: [float(i % 2) for i in range(len(completions))]]
    probe = PrecisionProbe()
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False, precision=precision,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[probe], default_root_dir=tmp_path)
    trainer.fit(m, datamodule=grpo_data(tmp_path))
    assert probe.dtypes == {PRECISIONS[precision]} and probe.state_dtypes == {PRECISIONS[precision]}
    assert probe.losses and all(math.isfinite(v) for v in probe.losses)
    assert any(".layers.0." in n for n in probe.moved) and "model.lm_head.weight" in probe.moved


def test_lisa_optimizer_state_in_bf16_true_is_trainable_now_times_moment_bytes(tmp_path):
    """AdamW in bf16-true keeps two bf16 moments (2 x 2 bytes) per trainable-now parameter, plus a 4-byte step."""
    from callbacks.lisa import LISA
    from tests.conftest import IntervalProbe, TinyModule, tiny_loader, trainer

    lisa = LISA(n_layers=1, interval=2, seed=0)
    probe = IntervalProbe(lisa)
    trainer([lisa, probe], 6, tmp_path, precision="bf16-true").fit(TinyModule(layers=4), tiny_loader(batches=6))
    assert len(probe.rows) == 6
    for row in probe.rows:
        assert row["state_ids"] == row["trainable_ids"]
        assert row["state_bytes"] == 2 * 2 * row["trainable_numel"] + 4 * row["n_tensors"]
        assert row["moved"] == set(row["active"])


@pytest.mark.parametrize(("precision", "dtype"), [("bf16-true", torch.bfloat16), ("bf16-mixed", torch.float32),
                                                  ("32-true", torch.float32)])
def test_model_path_loads_in_the_training_precision(precision, dtype, tmp_path):
    """A bf16 checkpoint is created directly in the dtype the trainer trains in (Lightning's init context)."""
    import transformers

    from datamodules.tokenizer import build_char_tokenizer
    from recipes.causal_lm import CausalLMModule

    tok = build_char_tokenizer()
    cfg = transformers.AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(tmp_path / "m")
    module = CausalLMModule(model_path=str(tmp_path / "m"), tokenizer_name="char")
    with L.Trainer(precision=precision, accelerator="cpu", logger=False).precision_plugin.module_init_context():
        module.configure_model()
    assert {p.dtype for p in module.parameters()} == {dtype}
