"""The compile switch (``compile=True``): per-block torch.compile equals eager, and layer-wise training (LISA
switches, progressive layer drop patterns) stops compiling once every block state has been seen.

The first compile of a tiny block costs seconds on a CPU: the tests share compiled modules (module-scoped) and
count graphs with ``torch._dynamo.utils.counters["stats"]["unique_graphs"]``, which grows by one per graph
compiled. Compiled blocks of one class share their graphs, so the counts do not grow with the depth.
"""

from __future__ import annotations

import logging
from functools import partial

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch._dynamo.utils import counters
from torch.utils.data import DataLoader

from callbacks.badam import BAdam
from callbacks.core.blocks import find_blocks
from callbacks.core.compiled_blocks import CompiledForward, compile_blocks, quiet_compile_notices
from callbacks.core.galore import GaLoreAdamW
from callbacks.layer_drop import ProgressiveLayerDrop
from callbacks.lisa import LISA
from callbacks.owlore import OwLore
from callbacks.run.exact_resume import ExactResume
from datamodules.instruction import InstructionDataModule
from recipes.causal_lm import CausalLMModule
from recipes.mae_pretrain import MAEPretrainModule
from recipes.resume import check_resume
from recipes.vit_classifier import ViTClassifierModule
from tests.conftest import TINY_LM_CONFIG, TINY_VIT_KWARGS, tiny_model, trainer
from tests.probe_callbacks import CrashAtStep
from tests.zoo import CheckpointCounter

LM = {**TINY_LM_CONFIG, "num_hidden_layers": 4}
VIT = {"model_name": "vit_tiny_patch16_224", "img_size": 32, "in_chans": 1, "model_kwargs": TINY_VIT_KWARGS}
ROWS, LENGTH = 4, 16


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def lm(compile: bool, gradient_checkpointing: bool = False) -> CausalLMModule:
    torch.manual_seed(0)
    module = CausalLMModule(model_config=LM, tokenizer_name="char", compile=compile,
                            gradient_checkpointing=gradient_checkpointing)
    module.configure_model()
    return module


def lm_batches(n: int, vocab: int) -> list[dict[str, torch.Tensor]]:
    """Fixed-length batches (one shape, so the counts below are about block states, not sequence lengths)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (ROWS, LENGTH), generator=gen)
        labels = ids.clone()
        labels[:, : LENGTH // 2] = -100  # the prompt half
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def train_steps(module, losses_of, batches, steps: int = 3) -> tuple[list[float], dict[str, torch.Tensor]]:
    """``steps`` SGD steps in a plain loop; the losses and the gradients of the last step. (SGD, not Adam: Adam
    divides by the gradient's size, so float rounding in a near-zero gradient would move a weight by a whole lr.)"""
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    losses = []
    for batch in batches[:steps]:
        loss = losses_of(module, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def assert_trains_alike(compiled: torch.nn.Module, eager: torch.nn.Module, losses_of, batches) -> None:
    """Same losses, last gradients and weights (1e-5) after a few optimizer steps."""
    (loss_c, grad_c), (loss_e, grad_e) = (train_steps(m, losses_of, batches) for m in (compiled, eager))
    torch.testing.assert_close(loss_c, loss_e, atol=1e-5, rtol=1e-5)
    assert loss_c[0] != loss_c[-1]  # it trained
    assert sorted(grad_c) == sorted(grad_e) and grad_c
    for name in grad_c:
        torch.testing.assert_close(grad_c[name], grad_e[name], atol=1e-5, rtol=1e-5, msg=name)
    assert_same_weights(compiled, eager)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], atol=1e-5, rtol=1e-5, msg=name)


# ------------------------------------------------------------------------------------------- equal to eager
@pytest.fixture(scope="module")
def compiled_lm() -> CausalLMModule:
    return lm(compile=True)


def test_causal_lm_compiled_equals_eager(compiled_lm):
    eager = lm(compile=False)
    assert_same_weights(compiled_lm, eager)  # same init, same names (no _orig_mod.)
    batches = lm_batches(3, compiled_lm.model.config.vocab_size)
    assert_trains_alike(compiled_lm, eager, lambda m, b: m.lm_loss(b), batches)
    assert all(isinstance(b.__dict__["forward"], CompiledForward) for b in find_blocks(compiled_lm).blocks)


def test_checkpointed_blocks_are_compiled_and_checkpointed():
    """With gradient checkpointing the blocks still compile (no graph break: the checkpoint stays outside the
    compiled code) and are still checkpointed (one call per block and step), training as the eager model does."""
    torch._dynamo.reset()
    counters.clear()
    module, eager = lm(compile=True, gradient_checkpointing=True), lm(compile=False, gradient_checkpointing=True)
    counter = CheckpointCounter(module)
    batches = lm_batches(3, module.model.config.vocab_size)
    assert_trains_alike(module, eager, lambda m, b: m.lm_loss(b), batches)
    assert counter.calls == 3 * 4  # 3 steps x 4 blocks
    assert graphs() >= 1 and not counters["graph_break"], dict(counters["graph_break"])


def test_mae_and_vit_compiled_equal_eager():
    images = torch.randn(3, 4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    noise = torch.rand(3, 4, 16, generator=torch.Generator().manual_seed(1))  # the same masks for both

    def mae(compile):
        torch.manual_seed(0)
        return MAEPretrainModule(decoder_dim=16, decoder_depth=1, decoder_heads=2, compile=compile, **VIT)

    def vit(compile):
        torch.manual_seed(0)
        return ViTClassifierModule(label_names=["a", "b"], drop_path_rate=0.0, compile=compile, **VIT)

    mae_loss = lambda m, i: m(images[i], noise=noise[i])[0]  # noqa: E731
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, -1.0]])
    vit_loss = lambda m, i: m.loss(m(images[i]), labels)  # noqa: E731
    for build, loss_of in ((mae, mae_loss), (vit, vit_loss)):
        compiled, eager = build(True), build(False)
        assert any(isinstance(b.__dict__.get("forward"), CompiledForward) for b in compiled.modules())
        assert_trains_alike(compiled, eager, loss_of, list(range(3)))


# ------------------------------------------------------------------------------------------ recompiles
def fit_counting(module: CausalLMModule, callbacks: list, steps: int, tmp_path) -> tuple[list[int], list]:
    """From a clean compile cache, fit ``steps`` steps of one batch shape; the graphs compiled so far after each
    step, and what each step trained or ran (the active LISA blocks or the layer-drop draw)."""
    torch._dynamo.reset()
    counters.clear()
    seen, states = [], []

    class Count(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # after the callbacks' draws
            states.append(tuple(getattr(callbacks[0], "active", None) or callbacks[0].keep))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(graphs())

    loader = DataLoader(lm_batches(steps, module.model.config.vocab_size), batch_size=None)
    module.hparams.warmup_steps = 0
    trainer(callbacks + [Count()], steps, tmp_path, limit_val_batches=0).fit(module, loader, val_dataloaders=loader)
    return seen, states


def test_lisa_switches_stop_compiling(compiled_lm, tmp_path):
    """A block is trainable or frozen (its input always needs a gradient: the embedding trains): two graphs,
    both compiled at the first step (1 of 4 blocks trains), then none over 7 switches between 4 subsets."""
    seen, active = fit_counting(compiled_lm, [LISA(n_layers=1, interval=1, seed=3)], 8, tmp_path)
    assert len(set(active)) == 4 and sum(a != b for a, b in zip(active, active[1:], strict=False)) >= 6
    assert seen == [2] * 8


COMBINATIONS = {  # module settings, the layer-wise callback, the precision
    "lora_checkpointing": ({"lora": {"r": 4}, "gradient_checkpointing": True}, None, "32-true"),
    "badam_bf16_true": ({}, lambda: BAdam(interval=1, seed=0), "bf16-true"),
    "owlore_galore": ({"optimizer": partial(GaLoreAdamW, rank=4, update_proj_gap=1)},
                      lambda: OwLore(n_layers=1, interval=1, calibration_batches=1, seed=0), "32-true"),
    "lisa_checkpointing_bf16_mixed": ({"gradient_checkpointing": True}, lambda: LISA(n_layers=1, interval=1, seed=0),
                                      "bf16-mixed"),
}


@pytest.mark.parametrize("name", sorted(COMBINATIONS))
def test_compiled_blocks_under_the_other_methods_and_precisions(name, tmp_path):
    """LoRA, BAdam, OwLore with GaLore and LISA under gradient checkpointing, in the precisions they run in, with
    ``compile=True``: no graph break, and at most one graph per block state over 6 steps of switching: {parameters
    trainable, frozen} x {input needs a gradient, does not} (BAdam freezes the embedding, so the blocks before the
    trained one see inputs without a gradient)."""
    settings, callback, precision = COMBINATIONS[name]
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    module = CausalLMModule(model_config=LM, tokenizer_name="char", compile=True, warmup_steps=0, **settings)
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    loader = DataLoader(lm_batches(6, module.model.config.vocab_size), batch_size=None)
    fit = trainer([callback()] if callback else [], 6, tmp_path, precision=precision, limit_val_batches=0)
    fit.fit(module, loader, val_dataloaders=loader)
    assert fit.global_step == 6
    assert any(not torch.equal(before[n], p) for n, p in module.named_parameters() if n in before)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert 1 <= graphs() <= 4


def test_layer_drop_patterns_stop_compiling(compiled_lm, tmp_path):
    """Layer drop decides outside the compiled code: the first step runs every block (theta(0) = 1), one graph;
    the drop patterns after it compile nothing."""
    drop = ProgressiveLayerDrop(theta_bar=0.3, gamma=1.0, seed=1)
    seen, keeps = fit_counting(compiled_lm, [drop], 8, tmp_path)
    assert keeps[0] == (True,) * 4 and len(set(keeps[1:])) >= 3  # several patterns, some blocks skipped
    assert seen == [1] * 8
    assert all(isinstance(b.__dict__["forward"], CompiledForward) for b in find_blocks(compiled_lm).blocks)


# ------------------------------------------------------------------------------------------ checkpoints
def test_state_dict_moves_between_compiled_and_eager(compiled_lm):
    eager = lm(compile=False)
    with torch.no_grad():
        for p in compiled_lm.parameters():
            p.add_(0.5)  # weights the eager module does not have yet
    eager.load_state_dict(compiled_lm.state_dict())  # strict: the same keys
    assert_same_weights(eager, compiled_lm)
    assert not any("_orig_mod" in k for k in compiled_lm.state_dict())
    fresh = lm(compile=True)
    fresh.load_state_dict(eager.state_dict())
    assert_same_weights(fresh, eager)


def _fit(root, compile: bool, ckpt_path=None, crash_at=None):
    """``test_exact_resume``'s run (dropout on: resume must restore the random state) with ``compile``; the first
    two batches of packed rows per epoch, all of one shape, so one graph serves the three runs."""
    L.seed_everything(3)
    data = InstructionDataModule(synthetic_dir=str(root.parent / "syn"), synthetic_train_size=24, batch_size=4,
                                 seed=1, packing=True)
    module = CausalLMModule(model_config={**TINY_LM_CONFIG, "attention_dropout": 0.1}, warmup_steps=2,
                            exact_match_batches=0, compile=compile)
    callbacks = [ExactResume()]
    if crash_at:
        callbacks += [CrashAtStep(crash_at), ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=3)]
    fit = trainer(callbacks, 6, root, enable_checkpointing=bool(crash_at), limit_train_batches=2, limit_val_batches=0)
    fit.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")  # the resumed run saves nothing
def test_compiled_run_resumes_exactly_and_its_checkpoint_loads_eagerly(tmp_path):
    full = _fit(tmp_path / "full", compile=True)
    with pytest.raises(SystemError, match="simulated crash"):
        _fit(tmp_path / "cut", compile=True, crash_at=3)
    ckpt = tmp_path / "cut" / "ckpt" / "epoch=1-step=3.ckpt"  # mid-epoch
    resumed = _fit(tmp_path / "resumed", compile=True, ckpt_path=ckpt)
    for name, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    # the compiled run's checkpoint loads into an eager module (strict keys), and compile is no defining setting
    eager = CausalLMModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=False, compile=False)
    assert not any(isinstance(b.__dict__.get("forward"), CompiledForward) for b in find_blocks(eager).blocks)
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert list(saved["state_dict"]) == list(eager.state_dict())
    model = {"class_path": "recipes.causal_lm.CausalLMModule", "init_args": {"compile": False}}
    assert "compile" in " ".join(check_resume(saved, str(ckpt), model, None)[0].splitlines())  # noted, not refused


# ------------------------------------------------------------------------------------------ settings
def test_a_bad_compile_value_is_refused():
    with pytest.raises(TypeError, match="compile must be true or false.*'yes'"):
        CausalLMModule(model_config=LM, tokenizer_name="char", compile="yes")
    with pytest.raises(TypeError, match="compile must be true or false"):
        MAEPretrainModule(compile=1, **VIT)
    with pytest.raises(TypeError, match="compile must be true or false"):
        ViTClassifierModule(label_names=["a"], compile="no", **VIT)


def test_no_cuda_runtime_notice_is_filtered():
    quiet_compile_notices()
    logger = logging.getLogger("torch.utils.cpp_extension")
    record = logger.makeRecord(logger.name, logging.WARNING, __file__, 1, "No CUDA runtime is found, using "
                               "CUDA_HOME='%s'", ("/usr/local",), None)
    assert not logger.filter(record)
    other = logger.makeRecord(logger.name, logging.WARNING, __file__, 1, "something else", (), None)
    assert logger.filter(other)


def test_compile_blocks_refuses_a_wrapped_block():
    module = lm(compile=False)
    drop = ProgressiveLayerDrop()
    drop.install(module)
    with pytest.raises(RuntimeError, match="compile the blocks before installing"):
        compile_blocks(module)
    drop.remove()


def test_generation_runs_eagerly_and_equals_eager(compiled_lm):
    """A KV cache would give every layer its own graph: generation calls run the blocks eagerly."""
    eager = lm(compile=False)
    eager.load_state_dict(compiled_lm.state_dict())
    prompt = torch.randint(3, compiled_lm.model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(2))
    before = graphs()
    out = [m.model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                            max_new_tokens=4, pad_token_id=0) for m in (compiled_lm.eval(), eager.eval())]
    compiled_lm.train()
    assert torch.equal(out[0], out[1]) and out[0].shape[1] == 10
    gpt2, plain = tiny_model("gpt2"), tiny_model("gpt2")  # GPT-2 passes the cache by position
    compile_blocks(gpt2)
    out = [m.eval().generate(input_ids=prompt % 40, attention_mask=torch.ones_like(prompt), do_sample=False,
                             max_new_tokens=3, pad_token_id=0) for m in (gpt2, plain)]
    assert torch.equal(out[0], out[1])
    assert graphs() == before


def test_a_failed_compile_names_the_setting(compiled_lm, monkeypatch):
    forward = find_blocks(compiled_lm).blocks[0].__dict__["forward"]
    failure = torch._dynamo.exc.BackendCompilerFailed.__new__(torch._dynamo.exc.BackendCompilerFailed)
    Exception.__init__(failure, "InvalidCxxCompiler: No working C++ compiler found")

    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(forward, "compiled", fail)
    with pytest.raises(RuntimeError, match="could not compile a LlamaDecoderLayer .*No working C.. compiler.*"
                                           "model.init_args.compile: false"):
        forward(torch.zeros(1, 2, 32))
    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    with pytest.raises(RuntimeError, match="does not support .*set model.init_args.compile: false"):
        lm(compile=True)
