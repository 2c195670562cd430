"""Every recipe and callback on the local model zoo (tests/zoo.py), loaded from ``model_path`` as a user's own saved
model: every trainable module in train mode at every step, gradient checkpointing really used (checkpointed block
calls counted), the recipe's loss equal to the model's own ``forward(labels=...)`` loss.

Every family goes through full SFT, LoRA and LISA; the other recipes and callbacks each run on two or three
families in rotation, so every family and every recipe is covered within a few seconds per fit.
"""

import warnings
from functools import partial

import lightning as L
import pytest
import torch
import transformers
from lightning.pytorch.callbacks import Callback

from callbacks import LISA, LLDS, BAdam, LayerDiagnostics, OwLore, ProgressiveLayerDrop
from callbacks.core.galore import GaLoreAdamW
from callbacks.core.modes import trainable_in_eval
from callbacks.run.train_mode import TrainModeCheck
from datamodules import InstructionDataModule, VerifiableQADataModule
from recipes import CausalLMModule
from recipes.grpo import GRPOModule
from tests.conftest import MetricLog
from tests.zoo import FAMILIES, CheckpointCounter

LAYERS = 3  # blocks of every zoo model


class ModeProbe(Callback):
    """Counts checkpointed block calls per training step and records trainable modules found in eval mode."""

    def on_train_start(self, trainer, pl_module):
        self.counter = CheckpointCounter(pl_module)
        self.in_eval: list[str] = []
        self.calls: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.in_eval += trainable_in_eval(pl_module)
        self._before = self.counter.calls

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.calls.append(self.counter.calls - self._before)


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo_synthetic")


_SFT_DATA: dict[str, InstructionDataModule] = {}


def sft_data(folder, synthetic_dir) -> InstructionDataModule:
    """The synthetic instruction data in the family's tokenizer, set up once per session (tokenizing is the cost)."""
    if str(folder) not in _SFT_DATA:
        data = InstructionDataModule(tokenizer=str(folder), synthetic_dir=str(synthetic_dir),
                                     synthetic_train_size=48, max_length=48, batch_size=4, val_fraction=0.2)
        data.prepare_data()
        data.setup("fit")
        _SFT_DATA[str(folder)] = data
    return _SFT_DATA[str(folder)]


def fit(module, data, tmp_path, callbacks=(), steps=2, val_batches=0, **kwargs) -> ModeProbe:
    probe = ModeProbe()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=val_batches,
                        num_sanity_val_steps=0, callbacks=[TrainModeCheck(), *callbacks, probe],
                        default_root_dir=tmp_path, **kwargs)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == steps
    return probe


def assert_trained_as_configured(probe: ModeProbe, steps: int = 2) -> None:
    assert probe.in_eval == [], f"trainable modules in eval mode during training: {probe.in_eval[:5]}"
    assert probe.counter.wrapped >= LAYERS, "gradient checkpointing was not enabled on the blocks"
    assert len(probe.calls) == steps and all(c >= LAYERS for c in probe.calls), \
        f"checkpointed block calls per step {probe.calls}: expected at least {LAYERS} (one per block)"


def test_the_zoo_is_saved_as_a_user_would_save_it(model_zoo):
    """Eight families or more, each loading offline with its tokenizer, chat template and special tokens; loaded,
    each comes in eval mode (the premise of the train-mode fix)."""
    assert len(model_zoo) >= 8
    for name, folder in model_zoo.items():
        tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
        assert not model.training, name
        text = tok.apply_chat_template([{"role": "user", "content": "1 + 2?"}, {"role": "assistant", "content": "3"}],
                                       tokenize=False)
        assert tok.eos_token in text, name
        assert tok.eos_token_id is not None and tok.eos_token_id < model.config.vocab_size, name
        assert model.generation_config.eos_token_id == tok.eos_token_id, name


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sft_lora_and_lisa_train_in_train_mode_with_checkpointed_blocks(family, model_zoo, synthetic_dir, tmp_path):
    data = sft_data(model_zoo[family], synthetic_dir)
    for variant in ("full", "lora", "lisa"):
        module = CausalLMModule(model_path=str(model_zoo[family]), gradient_checkpointing=True, warmup_steps=0,
                                lora={"r": 4, "alpha": 8, "dropout": 0.1} if variant == "lora" else None,
                                exact_match_batches=1, max_new_tokens=2)
        callbacks = [LISA(n_layers=1, interval=1)] if variant == "lisa" else []
        steps = 1 if variant == "lora" else 2
        probe = fit(module, data, tmp_path / variant, callbacks, steps, val_batches=1 if variant == "full" else 0)
        assert_trained_as_configured(probe, steps)


@pytest.mark.filterwarnings(r"ignore:Found \d+ module\(s\) in eval mode")  # Lightning's own notice, then ours
def test_a_loaded_model_left_in_eval_mode_is_stopped(model_zoo, synthetic_dir, tmp_path):
    """The check at fit start: a model put back into eval mode after loading stops the run, naming modules."""
    from callbacks.run.train_mode import TrainModeError

    class EvalAfterLoad(CausalLMModule):
        def configure_model(self):
            super().configure_model()
            self.model.eval()

    module = EvalAfterLoad(model_path=str(model_zoo["qwen2"]), warmup_steps=0)
    with pytest.raises(TrainModeError, match=r"trainable module\(s\) are in eval mode .*model\.model"):
        fit(module, sft_data(model_zoo["qwen2"], synthetic_dir), tmp_path)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_chunked_loss_equals_the_models_own_loss(family, model_zoo, synthetic_dir):
    """Granite (logits_scaling) and Gemma 2 (soft-capping) included: the head probe sends them to the plain path."""
    data = sft_data(model_zoo[family], synthetic_dir)
    batch = next(iter(data.train_dataloader()))
    module = CausalLMModule(model_path=str(model_zoo[family]), loss_chunk_size=5, tokenizer_name=str(model_zoo[family]))
    module.configure_model()
    module.eval()
    with torch.no_grad():
        own = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           labels=batch["labels"], use_cache=False).loss
        with warnings.catch_warnings():  # a fallback to the plain path says so once
            warnings.simplefilter("ignore")
            chunked = module.lm_loss(batch)
    torch.testing.assert_close(chunked, own, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ the other callbacks, in rotation over families
ROTATION = {
    "owlore": ["llama3", "gemma2"],
    "badam": ["qwen3", "phi3"],
    "layer_drop": ["mistral", "gpt2"],
    "diagnostics": ["granite", "qwen2"],
}


def _callback(name: str) -> Callback:
    return {"owlore": lambda: OwLore(n_layers=1, interval=1, calibration_batches=1),
            "badam": lambda: BAdam(interval=1),
            "layer_drop": lambda: ProgressiveLayerDrop(gamma=0.5),
            "diagnostics": lambda: LayerDiagnostics(interval=1, probe_size=2, logit_lens=True, heatmaps=False)}[name]()


@pytest.mark.parametrize(("name", "family"), [(n, f) for n, fams in ROTATION.items() for f in fams])
def test_layerwise_callbacks_on_loaded_models(name, family, model_zoo, synthetic_dir, tmp_path):
    optimizer = partial(GaLoreAdamW, rank=4, update_proj_gap=1) if name == "owlore" else torch.optim.AdamW
    module = CausalLMModule(model_path=str(model_zoo[family]), gradient_checkpointing=True, warmup_steps=0,
                            optimizer=optimizer)
    probe = fit(module, sft_data(model_zoo[family], synthetic_dir), tmp_path, [_callback(name)])
    assert probe.in_eval == []
    if name == "layer_drop":  # skipped blocks are not called: some calls, never more than one per block
        assert all(0 < c <= LAYERS for c in probe.calls), probe.calls
    else:
        assert_trained_as_configured(probe)


# ------------------------------------------------------------------------------------------------- GRPO + LLDS
def grpo_data(folder, tmp_path, **kwargs) -> VerifiableQADataModule:
    return VerifiableQADataModule(tokenizer=str(folder), synthetic_dir=str(tmp_path / "syn"), synthetic_sft_size=16,
                                  synthetic_train_size=8, synthetic_val_size=4, batch_size=2, sft_batch_size=4,
                                  val_batch_size=4, **kwargs)


@pytest.mark.parametrize(("family", "engine"), [("qwen2", "generate"), ("phi3", "paged"), ("llama3", "paged")])
def test_grpo_with_llds_from_model_path(family, engine, model_zoo, tmp_path):
    module = GRPOModule(model_path=str(model_zoo[family]), gradient_checkpointing=True, num_generations=2,
                        max_new_tokens=4, mu=2, sft_steps=1, logprob_chunk_size=8, rollout_engine=engine)
    probe = fit(module, grpo_data(model_zoo[family], tmp_path), tmp_path, [LLDS()], steps=2)
    assert probe.in_eval == []
    assert any(c >= LAYERS for c in probe.calls), f"no checkpointed block call in {probe.calls}"


def test_grpo_logprob_passes_run_without_dropout_unless_asked(model_zoo, tmp_path):
    """The old-policy (no grad) and update (with grad, checkpointed) passes agree exactly on an unchanged policy,
    although the model's config has dropout; with ``logprob_dropout`` they differ."""
    from callbacks.core.modes import dropout_off

    folder = model_zoo["llama3"]
    data = grpo_data(folder, tmp_path)
    data.prepare_data()
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    module = GRPOModule(model_path=str(folder), tokenizer_name=str(folder), gradient_checkpointing=True,
                        num_generations=2, max_new_tokens=4)
    module.configure_model()
    module.model.config.attention_dropout = 0.5
    for block in module.model.model.layers:
        block.self_attn.attention_dropout = 0.5
    assert module.model.training
    torch.manual_seed(0)
    completion, cmask = module.generate(batch["prompt_input_ids"], batch["prompt_attention_mask"], 2)
    assert module.model.training and all(m.training for m in module.model.modules()), "generation changed modes"
    inputs = (batch["prompt_input_ids"].repeat_interleave(2, 0), batch["prompt_attention_mask"].repeat_interleave(2, 0),
              completion, cmask)
    with dropout_off(module.model):
        with torch.no_grad():
            old, _ = module.completion_logprobs(module.model, *inputs)
        new, _ = module.completion_logprobs(module.model, *inputs)
        new.sum().backward()
    assert torch.equal(new.detach(), old), "an unchanged policy's ratio must be exactly 1"
    assert all(m.training for m in module.model.modules()), "dropout_off did not give the modes back"
    with torch.no_grad():
        noisy, _ = module.completion_logprobs(module.model, *inputs)
    assert not torch.equal(noisy, old), "with dropout on (logprob_dropout) the passes differ"


# ------------------------------------------------------------------------------------------------ export, restore
@pytest.mark.parametrize("family", ["gpt2", "mistral", "gemma2"])
def test_export_and_restore_from_a_trained_zoo_model(family, model_zoo, synthetic_dir, tmp_path):
    from recipes.commands import restore
    from recipes.commands.export import export_checkpoint

    module = CausalLMModule(model_path=str(model_zoo[family]), warmup_steps=0)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path)
    trainer.fit(module, datamodule=sft_data(model_zoo[family], synthetic_dir))
    trainer.save_checkpoint(tmp_path / "sft.ckpt")
    out = export_checkpoint(tmp_path / "sft.ckpt", tmp_path / "export")
    exported = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert type(exported) is type(module.model)
    for name, value in module.model.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[name], value, msg=name)
    restored = restore.main(["--base", str(model_zoo[family]), "--post", str(out), "--blocks", "0:1",
                             "--output", str(tmp_path / "restored")])
    model = transformers.AutoModelForCausalLM.from_pretrained(restored, local_files_only=True)
    base = transformers.AutoModelForCausalLM.from_pretrained(model_zoo[family], local_files_only=True)
    first = {k: v for k, v in model.state_dict().items() if ".0." in k and "layer" in k or ".h.0." in k}
    assert first, "no block-0 tensor found"
    for name in first:
        torch.testing.assert_close(first[name], base.state_dict()[name], msg=name)


@pytest.mark.parametrize("logprob_dropout", [False, True])
def test_grpo_ratio_of_an_unchanged_policy_is_exactly_one(logprob_dropout, model_zoo, tmp_path):
    """A GRPO fit at learning rate 0 with two passes per rollout on a model whose config has dropout: the update
    passes see the rollout policy's own log-probs (ratio exactly 1) unless ``logprob_dropout`` turns dropout on."""
    folder = tmp_path / "dropout_model"
    model = transformers.AutoModelForCausalLM.from_pretrained(model_zoo["llama3"], local_files_only=True)
    model.config.attention_dropout = 0.5
    model.save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(model_zoo["llama3"]).save_pretrained(folder)
    module = GRPOModule(model_path=str(folder), gradient_checkpointing=True, num_generations=2, max_new_tokens=4,
                        mu=2, optimizer=partial(torch.optim.AdamW, lr=0.0), logprob_dropout=logprob_dropout,
                        logprob_chunk_size=None)
    log = MetricLog()
    fit(module, grpo_data(folder, tmp_path), tmp_path, [log], steps=2)
    ratio = log.steps[-1]["grpo/ratio"]
    assert (ratio == 1.0) != logprob_dropout, ratio


# ------------------------------------------------------------------------- the packaged YAMLs on a user's model
@pytest.mark.parametrize(("config", "family"), [("sft", "qwen2"), ("lisa_sft", "gpt2")])
def test_packaged_yaml_on_a_saved_model_trains_in_train_mode_with_checkpointing(config, family, model_zoo, tmp_path,
                                                                                 cli_argv, monkeypatch):
    """``sft.yaml`` / ``lisa_sft.yaml`` as the README says to point them at a user's saved model, with
    ``gradient_checkpointing: true``: every trainable module trains in train mode and every block is checkpointed."""
    from recipes.cli import CONFIG_DIR, RecipesCLI

    monkeypatch.chdir(tmp_path)
    folder = str(model_zoo[family])
    cli = RecipesCLI(args=["--config", str(CONFIG_DIR / f"{config}.yaml"), f"--model.init_args.model_path={folder}",
                           "--model.init_args.model_config=null", "--model.init_args.gradient_checkpointing=true",
                           f"--data.init_args.tokenizer={folder}", f"--data.init_args.synthetic_dir={tmp_path}",
                           "--data.init_args.synthetic_train_size=32", "--data.init_args.batch_size=4",
                           "--trainer.max_steps=2", "--trainer.limit_val_batches=0", "--trainer.accelerator=cpu",
                           "--trainer.enable_checkpointing=false", "--trainer.logger=false", "--wandb=disabled",
                           "--trainer.enable_progress_bar=false",
                           "--trainer.callbacks+=tests.test_model_zoo.ModeProbe"],
                     run=False)
    probe = next(cb for cb in cli.trainer.callbacks if isinstance(cb, ModeProbe))
    assert any(isinstance(cb, TrainModeCheck) for cb in cli.trainer.callbacks), "the CLI installs TrainModeCheck"
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert_trained_as_configured(probe)


def test_grpo_from_an_sft_checkpoint_of_a_saved_model_trains_in_train_mode(model_zoo, synthetic_dir, tmp_path):
    """The ``sft_checkpoint`` loader path: SFT from a saved Mistral-type model, then GRPO from that checkpoint."""
    folder = model_zoo["mistral"]
    sft = CausalLMModule(model_path=str(folder), warmup_steps=0)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path)
    trainer.fit(sft, datamodule=sft_data(folder, synthetic_dir))
    trainer.save_checkpoint(tmp_path / "sft.ckpt")
    module = GRPOModule(sft_checkpoint=str(tmp_path / "sft.ckpt"), gradient_checkpointing=True, num_generations=2,
                        max_new_tokens=4, mu=2)
    probe = fit(module, grpo_data(folder, tmp_path, reward="gsm8k_flexible"), tmp_path, steps=2)
    assert probe.in_eval == []
    assert any(c >= LAYERS for c in probe.calls), f"no checkpointed block call in {probe.calls}"


# ------------------------------------------------------------------------------------------------- compile
class GraphCount(Callback):
    """The number of graphs torch.compile has made, after every training step."""

    def __init__(self):
        self.seen: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        from torch._dynamo.utils import counters

        self.seen.append(counters["stats"]["unique_graphs"])


def test_compiled_lisa_on_packed_rows_of_a_saved_model(model_zoo, tmp_path):
    """A user's saved Llama 3 model with packed rows, gradient checkpointing and LISA switching every step, with
    ``compile=True``: trains in train mode with every block checkpointed, and compiles at most one graph per block
    state, whatever the number of switches: {trainable, frozen} x {rows with an example boundary (a mask built from
    the position ids), rows without (no mask)} x {the first row length, any length (torch makes the length dynamic
    when a second one comes)}. Compiled-equals-eager is tests/test_compile.py's, on models without dropout."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()  # the counts of earlier tests in this process
    folder = model_zoo["llama3"]
    data = InstructionDataModule(tokenizer=str(folder), synthetic_dir=str(tmp_path / "syn"), synthetic_train_size=48,
                                 max_length=48, batch_size=2, packing=True)
    module = CausalLMModule(model_path=str(folder), gradient_checkpointing=True, warmup_steps=0, compile=True)
    graphs, lisa = GraphCount(), LISA(n_layers=1, interval=1, seed=0)
    probe = fit(module, data, tmp_path, [lisa, graphs], steps=12)
    assert_trained_as_configured(probe, steps=12)
    assert 2 <= graphs.seen[0] and graphs.seen[-1] <= 2 * 2 * 2, graphs.seen  # a LISA draw at each of 12 steps
