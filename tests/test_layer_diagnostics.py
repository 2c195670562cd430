"""LayerDiagnostics: values equal a hand computation, are logged and drawn, and do not change training."""

import math
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import timm
import torch
import transformers
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger, WandbLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks import LISA, LayerDiagnostics
from callbacks.core.heatmap import draw_heatmap
from callbacks.core.layer_stats import block_influence, measuring, relative_contribution
from tests.conftest import SEQ, VOCAB, TinyModule, tiny_loader, trainer

torch.set_num_threads(1)


class Recorder(Logger):
    """Keeps every ``log_metrics`` call."""

    def __init__(self):
        super().__init__()
        self.rows = []

    @property
    def name(self):
        return "recorder"

    @property
    def version(self):
        return 0

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def series(self, key: str) -> list[tuple[int, float]]:
        return [(step, m[key]) for step, m in self.rows if key in m]


class Residual(nn.Module):
    """y = x + W x."""

    def __init__(self, dim: int):
        super().__init__()
        self.lin = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        return x + self.lin(x)


class ToyNet(L.LightningModule):
    """Embedding, three residual blocks (identity, doubling, random) and a head."""

    def __init__(self, dim: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, dim)
        self.blocks = nn.ModuleList([Residual(dim) for _ in range(3)])
        self.head = nn.Linear(dim, VOCAB)
        with torch.no_grad():
            self.blocks[0].lin.weight.zero_()  # identity
            self.blocks[1].lin.weight.copy_(torch.eye(dim))  # doubles its input

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        return nn.functional.cross_entropy(self(ids).flatten(0, 1), ids.flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)  # weights stay: step-0 and later values agree


def test_values_equal_a_hand_computation(tmp_path):
    module, log = ToyNet(), Recorder()
    diag = LayerDiagnostics(interval=2, probe_size=3)
    L.Trainer(max_steps=4, accelerator="cpu", logger=log, callbacks=[diag], default_root_dir=tmp_path,
              enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False
              ).fit(module, tiny_loader(batches=4))
    ids = tiny_loader(batches=1).dataset.tensors[0][:3]
    with torch.no_grad():
        h0 = module.embed(ids)
        h1 = module.blocks[0](h0)
        h2 = module.blocks[1](h1)
        h3 = module.blocks[2](h2)
    cos = nn.functional.cosine_similarity(h2, h3, dim=-1)
    expected_bi = 1 - cos.mean().item()
    expected_c = ((h3 - h2).norm(dim=-1) / h2.norm(dim=-1)).mean().item()
    assert [s for s, _ in log.series("layers/block_influence/0")] == [0, 2, 4]
    for step, metrics in log.rows:
        assert metrics["layers/block_influence/0"] == pytest.approx(0.0, abs=1e-6)  # identity block
        assert metrics["layers/contribution/0"] == pytest.approx(0.0, abs=1e-6)
        assert metrics["layers/block_influence/1"] == pytest.approx(0.0, abs=1e-6)  # y = 2x: same direction
        assert metrics["layers/contribution/1"] == pytest.approx(1.0, abs=1e-6)  # ||2x - x|| / ||x|| = 1
        assert metrics["layers/block_influence/2"] == pytest.approx(expected_bi, rel=1e-5)
        assert metrics["layers/contribution/2"] == pytest.approx(expected_c, rel=1e-5)
        if step > 0:  # gradient norm of the block at that step, and no update with lr 0
            assert metrics["layers/update_ratio/2"] == 0.0
            assert metrics["layers/grad_norm/1"] > 0 and metrics["layers/trained/1"] == 1.0
    assert "layers/grad_norm/0" not in log.rows[0][1]  # nothing to report before the first step


def test_masked_mean_ignores_padding():
    h_in = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    h_out = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])  # token 1 (padding) turns by 90 degrees
    mask = torch.tensor([[1, 0]])
    assert block_influence(h_in, h_out, mask) == pytest.approx(0.0)
    assert block_influence(h_in, h_out) == pytest.approx(0.5)
    assert relative_contribution(h_in, h_out, mask) == pytest.approx(1.0)


def test_grad_norm_and_update_ratio_by_hand(tmp_path):
    torch.manual_seed(0)
    module, log = ToyNet(), Recorder()
    module.configure_optimizers = lambda: torch.optim.SGD(module.parameters(), lr=0.1)
    grads = {}

    class GradProbe(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 2:
                grads["norm"] = pl_module.blocks[2].lin.weight.grad.norm().item()
                grads["before"] = pl_module.blocks[2].lin.weight.detach().clone()

    before = module.blocks[2].lin.weight.detach().clone()
    diag = LayerDiagnostics(interval=3)
    L.Trainer(max_steps=3, accelerator="cpu", logger=log, callbacks=[GradProbe(), diag], default_root_dir=tmp_path,
              enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False
              ).fit(module, tiny_loader(batches=3))
    after = module.blocks[2].lin.weight.detach()
    step, last = log.rows[-1]
    assert step == 3
    assert last["layers/grad_norm/2"] == pytest.approx(grads["norm"], rel=1e-5)
    assert last["layers/update_ratio/2"] == pytest.approx(((after - before).norm() / after.norm()).item(), rel=1e-5)


def lm_module(arch: str) -> TinyModule:
    module = TinyModule(layers=3)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=16, n_layer=3, n_head=2,
                                      resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
        torch.manual_seed(0)
        module.model = transformers.GPT2LMHeadModel(cfg)
    else:
        module.model.config.attention_dropout = 0.1
        for layer in module.model.model.layers:
            layer.self_attn.attention_dropout = 0.1
    return module


class TinyViT(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = timm.models.VisionTransformer(img_size=16, patch_size=8, in_chans=3, num_classes=4, embed_dim=16,
                                                   depth=3, num_heads=2, drop_rate=0.1, proj_drop_rate=0.1)

    def forward(self, images):
        return self.model(images)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return nn.functional.cross_entropy(self(images), labels)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def image_loader(batches: int) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(batches * 4, 3, 16, 16, generator=gen), torch.randint(0, 4, (batches * 4,),
                                                                                            generator=gen))
    return DataLoader(data, batch_size=4)


def _run(arch: str, tmp_path, diagnostics: bool, steps: int = 6):
    L.seed_everything(0, verbose=False)
    module = TinyViT() if arch == "vit" else lm_module(arch)
    loader = image_loader(steps) if arch == "vit" else tiny_loader(batches=steps)
    log = Recorder()
    diag = LayerDiagnostics(interval=2, logit_lens=arch != "vit") if diagnostics else None
    callbacks = [LISA(n_layers=1, interval=2, seed=1)] + ([diag] if diag else [])
    tr = trainer(callbacks, steps, tmp_path)
    tr._loggers = [log]  # noqa: SLF001 - keep logger=False's folder, record what is logged
    tr.fit(module, loader)
    return module, diag, log


@pytest.mark.parametrize("arch", ["llama", "gpt2", "vit"])
def test_does_not_change_training_and_is_logged_and_drawn(arch, tmp_path):
    plain, _, _ = _run(arch, tmp_path / "plain", diagnostics=False)
    watched, diag, log = _run(arch, tmp_path / "watched", diagnostics=True)
    for (name, a), b in zip(plain.named_parameters(), watched.parameters(), strict=True):
        assert torch.equal(a, b), f"{arch}: {name} differs with the diagnostics attached"
    assert diag.steps == [0, 2, 4, 6]
    forward_metrics = ["block_influence", "contribution"] + ([] if arch == "vit" else ["logit_lens_kl"])
    step_metrics = ["grad_norm", "update_ratio", "trained", "ran"]  # need a step since the last measurement
    for metric in forward_metrics + step_metrics:
        for block in range(3):
            series = log.series(f"layers/{metric}/{block}")
            assert [s for s, _ in series] == ([0, 2, 4, 6] if metric in forward_metrics else [2, 4, 6]), metric
            assert all(math.isfinite(v) for _, v in series)
        png = tmp_path / "watched" / "layer_diagnostics" / f"{metric}.png"
        assert png.stat().st_size > 1000, png
    # LISA trains one block per 2-step interval: the "trained" shares say which
    trained = np.array(diag.history["trained"][1:])
    assert np.all(trained.sum(axis=1) == 1.0) and set(np.unique(trained)) == {0.0, 1.0}
    if arch != "vit":  # the last block's output is the final distribution
        assert all(row[-1] == pytest.approx(0.0, abs=1e-6) for row in diag.history["logit_lens_kl"])


def test_skipped_blocks_are_counted_with_layer_drop(tmp_path):
    from callbacks import ProgressiveLayerDrop

    def run(diagnostics: bool):
        L.seed_everything(0, verbose=False)
        module, log = TinyModule(layers=4), Recorder()
        diag = LayerDiagnostics(interval=4) if diagnostics else None
        pld = ProgressiveLayerDrop(theta_bar=0.2, gamma=10.0, keep_first=True, seed=3)
        callbacks = [pld] + ([diag] if diag else [])
        tr = trainer(callbacks, 8, tmp_path)
        tr._loggers = [log]  # noqa: SLF001
        tr.fit(module, tiny_loader(batches=8))
        return module, diag

    plain, _ = run(False)
    watched, diag = run(True)
    for a, b in zip(plain.parameters(), watched.parameters(), strict=True):
        assert torch.equal(a, b)
    ran = np.array(diag.history["ran"][1:])
    trained = np.array(diag.history["trained"][1:])
    assert ran.min() < 1.0 and ran[:, 0].min() == 1.0  # deep blocks skipped, the first one kept
    assert np.array_equal(ran, trained)  # a skipped block gets no gradient
    # every probe forward runs the whole model (eval mode): no NaN from a skipped block
    assert np.isfinite(np.array(diag.history["block_influence"])).all()


class FakeWandb(WandbLogger):
    def __init__(self):
        self.images = []

    def log_image(self, key, images, step=None, **kwargs):
        self.images.append((key, images, step))


def test_heatmaps_go_to_wandb_as_uint8_and_marks_are_drawn(tmp_path):
    diag = LayerDiagnostics()
    diag.steps = [0, 5, 10]
    diag.history = {"block_influence": [[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]],
                    "trained": [[math.nan, math.nan], [1.0, 0.0], [0.0, 1.0]], "ran": [[math.nan] * 2, [1, 1], [1, 1]]}
    wandb = FakeWandb()
    paths = diag.draw(SimpleNamespace(loggers=[wandb], global_step=10), tmp_path)
    assert set(paths) == {"block_influence", "trained", "ran"} and all(p.exists() for p in paths.values())
    keys = [k for k, _, _ in wandb.images]
    assert keys == ["layers/block_influence_heatmap", "layers/trained_heatmap", "layers/ran_heatmap"]
    image = wandb.images[0][1][0]
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    unmarked = draw_heatmap(diag.history["block_influence"], diag.steps, "layers/block_influence")
    assert unmarked.shape == image.shape and not np.array_equal(unmarked, image)  # the trained dots


def test_resume_logs_what_the_uninterrupted_run_logs(tmp_path):
    def run(ckpt=None):
        L.seed_everything(0, verbose=False)
        module, log = TinyModule(layers=3), Recorder()
        diag = LayerDiagnostics(interval=2, logit_lens=True)
        saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
        tr = trainer([LISA(n_layers=1, interval=2, seed=2), diag, saver], 8, tmp_path, enable_checkpointing=True)
        tr._loggers = [log]  # noqa: SLF001
        tr.fit(module, tiny_loader(batches=1), ckpt_path=ckpt)
        return diag, log

    full, full_log = run()
    resumed, resumed_log = run(next(tmp_path.glob("*step=3.ckpt")))  # between two measurements
    assert resumed.steps == full.steps == [0, 2, 4, 6, 8]
    for metric, rows in full.history.items():
        assert np.array_equal(np.array(resumed.history[metric]), np.array(rows), equal_nan=True), metric
    assert [r for r in resumed_log.rows if r[0] >= 4] == [r for r in full_log.rows if r[0] >= 4]


def test_lisa_importance_sampling_draws_by_block_influence(tmp_path):
    module = ToyNet()
    lisa = LISA(n_layers=1, interval=1, sampling="importance", importance_metric="block_influence",
                importance_batches=2)
    drawn = []

    class Active(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            drawn.append(lisa.active[0])

    trainer([lisa, Active()], 6, tmp_path).fit(module, tiny_loader(batches=6))
    ids = tiny_loader(batches=6).dataset.tensors[0][:8]  # the first two batches of 4
    with torch.no_grad():
        h2 = module.blocks[1](module.blocks[0](module.embed(ids)))
        bi = block_influence(h2, module.blocks[2](h2))
    assert lisa.importance[:2] == pytest.approx([0.0, 0.0], abs=1e-6)  # identity and doubling blocks
    assert lisa.importance[2] == pytest.approx(bi, rel=1e-5)
    assert drawn == [2] * 6  # the only block that turns the residual stream
    assert lisa.state_dict()["importance"] == lisa.importance


def test_lisa_importance_argument_checks():
    with pytest.raises(ValueError, match="sampling must be one of"):
        LISA(sampling="greedy")
    with pytest.raises(ValueError, match="importance_metric"):
        LISA(sampling="importance", importance_metric="grad")
    with pytest.raises(ValueError, match="leave weights unset"):
        LISA(sampling="importance", weights=[1.0, 2.0])


def test_measuring_puts_back_every_mode_and_the_random_state():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    model[1].eval()  # a submodule the user keeps in eval mode stays there
    state = torch.random.get_rng_state()
    with measuring(model, seed=3):
        assert not model.training and not model[0].training and not torch.is_grad_enabled()
        first = torch.rand(3)
    with measuring(model, seed=3):
        second = torch.rand(3)
    assert torch.equal(first, second)  # seeded alike at every measurement
    assert model.training and model[0].training and not model[1].training
    assert torch.equal(torch.random.get_rng_state(), state)  # training's random stream is untouched
