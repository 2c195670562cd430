"""The tests' tiny models and configs, in one place, and the environment every test runs in (offline, no W&B).

- ``TINY_LM_CONFIG``: the ``model_config`` of a recipe's tiny Llama (``CausalLMModule``, ``GRPOModule``).
- ``TINY_VIT_KWARGS``: the ``model_kwargs`` of a recipe's tiny timm ViT (MAE pre-training, ViT classifier).
- ``ARCHITECTURES``: tiny Hugging Face configs of every architecture family the block finder knows, plus ``vit``;
  ``tiny_model(arch)`` builds one (seeded), ``TinyModule(arch)`` trains one, ``tiny_loader(arch)`` feeds it.
- ``trainer(callbacks, max_steps, root)``: a quiet CPU Lightning trainer; ``snapshot``, ``moved_blocks`` and
  ``IntervalProbe`` tell which blocks a layer-wise method moved and what the optimizer holds.
- ``grpo_module()``, ``grpo_data(tmp_path)``, ``fit_grpo(...)``: a tiny GRPO run and its logged metrics.
- ``build_bpe_tokenizer()``: a real byte-level BPE tokenizer with a ChatML template, built locally.
- ``write_nih`` / ``write_chexpert`` and ``nih`` / ``chexpert``: chest X-ray folders from hand-written rows, loaded.
- ``cli_argv``: a fixture hiding the test runner's command line from an in-process CLI call.
- ``model_zoo``: the local model zoo of ``tests/zoo.py`` (tiny models of the families users bring, each saved with
  ``save_pretrained`` with a tokenizer of its kind), built once per session.
"""

import atexit
import csv
import logging
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if "HF_DATASETS_CACHE" not in os.environ:  # the data modules' converted and tokenized data, removed at exit
    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="hf-datasets-tests-")
    atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], True)
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from callbacks.core.blocks import block_parameter_names, find_blocks  # noqa: E402
from callbacks.lisa import LISA, optimizer_state_bytes  # noqa: E402
from datamodules.chestxray14 import ChestXray14DataModule  # noqa: E402
from datamodules.chexpert import CheXpertDataModule  # noqa: E402
from datamodules.phantom_cxr import NIH_COLUMNS  # noqa: E402
from datamodules.verifiable_qa import VerifiableQADataModule  # noqa: E402
from recipes.cli import CONFIG_DIR  # noqa: E402

TINY_LM_CONFIG = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                  "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64,
                  "tie_word_embeddings": False}
TINY_VIT_NAME = "vit_tiny_patch16_224"
TINY_VIT_KWARGS = {"patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2}

VOCAB, SEQ, IMAGE, CLASSES = 48, 12, 32, 3
_HF = {"vocab_size": VOCAB, "hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
       "max_position_embeddings": SEQ}
ARCHITECTURES = {
    "llama": lambda n: transformers.LlamaConfig(num_hidden_layers=n, num_key_value_heads=2, **_HF,
                                                tie_word_embeddings=False),
    "qwen2": lambda n: transformers.Qwen2Config(num_hidden_layers=n, num_key_value_heads=1, **_HF),
    "mistral": lambda n: transformers.MistralConfig(num_hidden_layers=n, num_key_value_heads=1, **_HF),
    "gemma": lambda n: transformers.GemmaConfig(num_hidden_layers=n, num_key_value_heads=1, head_dim=8, **_HF),
    "gpt2": lambda n: transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=n, n_head=2, n_positions=SEQ,
                                              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "gpt_neox": lambda n: transformers.GPTNeoXConfig(num_hidden_layers=n, **_HF),
    "opt": lambda n: transformers.OPTConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=n, ffn_dim=32,
                                            num_attention_heads=2, word_embed_proj_dim=16, max_position_embeddings=SEQ,
                                            dropout=0.0),
    "vit": None,
}
# the five families the layer-wise behaviour tests run on
LAYERWISE_ARCHS = ["llama", "qwen2", "gpt2", "gpt_neox", "vit"]


def tiny_model(arch: str = "llama", layers: int = 4, seed: int = 0) -> nn.Module:
    """A random-init causal LM of ``arch`` (or a timm ViT for ``"vit"``) with ``layers`` blocks, seeded."""
    torch.manual_seed(seed)
    if arch == "vit":
        return timm.create_model(TINY_VIT_NAME, pretrained=False, num_classes=CLASSES, img_size=IMAGE,
                                 patch_size=8, embed_dim=16, num_heads=2, depth=layers)
    return transformers.AutoModelForCausalLM.from_config(ARCHITECTURES[arch](layers))


def model_inputs(arch: str, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Keyword inputs of one forward of ``tiny_model(arch)``: token ids, or images for the ViT."""
    gen = torch.Generator().manual_seed(seed)
    if arch == "vit":
        return {"x": torch.randn(batch, 3, IMAGE, IMAGE, generator=gen)}
    return {"input_ids": torch.randint(0, VOCAB, (batch, SEQ), generator=gen), "use_cache": False}


def model_loss(model: nn.Module, arch: str, batch) -> torch.Tensor:
    """Next-token loss of a causal LM on token ids, cross-entropy of a ViT on (images, labels)."""
    if arch == "vit":
        images, labels = batch
        return nn.functional.cross_entropy(model(images), labels)
    (ids,) = batch
    return model(input_ids=ids, labels=ids, use_cache=False).loss


class TinyModule(L.LightningModule):
    """Trains ``tiny_model(arch, layers)``; AdamW (or ``optimizer_cls``) over all parameters, like the recipes."""

    def __init__(self, arch: str = "llama", layers: int = 4, lr: float = 1e-2, optimizer_cls=torch.optim.AdamW,
                 checkpointing: str | None = None, **optimizer_kwargs) -> None:
        super().__init__()
        self.arch = arch
        self.model = tiny_model(arch, layers)
        if checkpointing:
            from recipes.parts.hf_model import enable_activation_checkpointing

            enable_activation_checkpointing(self.model, use_reentrant=checkpointing == "reentrant")
        self.lr, self.optimizer_cls, self.optimizer_kwargs = lr, optimizer_cls, optimizer_kwargs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of token ids (or of images for the ViT)."""
        return self.model(x) if self.arch == "vit" else self.model(input_ids=x, use_cache=False).logits

    def training_step(self, batch, batch_idx):
        loss = model_loss(self.model, self.arch, batch)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return self.optimizer_cls(self.parameters(), lr=self.lr, **self.optimizer_kwargs)


def tiny_loader(arch: str = "llama", batches: int = 4, batch_size: int = 4, seed: int = 0) -> DataLoader:
    """Random token ids (or images and labels for the ViT), in a fixed order."""
    gen = torch.Generator().manual_seed(seed)
    n = batches * batch_size
    if arch == "vit":
        data = TensorDataset(torch.randn(n, 3, IMAGE, IMAGE, generator=gen),
                             torch.randint(0, CLASSES, (n,), generator=gen))
    else:
        data = TensorDataset(torch.randint(0, VOCAB, (n, SEQ), generator=gen))
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def trainer(callbacks: list, max_steps: int, root, **kwargs) -> L.Trainer:
    """A quiet single-CPU trainer of ``max_steps`` steps with ``callbacks`` (no logger, no checkpoints by default)."""
    kwargs.setdefault("accelerator", "cpu")
    kwargs.setdefault("devices", 1)
    kwargs.setdefault("enable_checkpointing", False)
    return L.Trainer(max_steps=max_steps, callbacks=callbacks, default_root_dir=root, logger=False,
                     enable_progress_bar=False, enable_model_summary=False,
                     log_every_n_steps=1, **kwargs)


# Which blocks a layer-wise method moved, and what the optimizer holds

def snapshot(module: L.LightningModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def moved_blocks(module, before: dict) -> set[int]:
    parts = find_blocks(module)
    named = dict(module.named_parameters())
    return {i for i in range(len(parts)) if any(not torch.equal(named[n], before[n])
                                                for n in block_parameter_names(module, parts, i))}


class IntervalProbe(L.Callback):
    """Records, per optimizer step, the active set, which blocks moved, and the optimizer's state."""

    def __init__(self, lisa: LISA):
        self.lisa, self.rows = lisa, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = snapshot(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        opt = trainer.optimizers[0]
        trainable = self.lisa.trainable_parameters()
        parts = find_blocks(pl_module)
        always_on = [*parts.embedding, *parts.head, *parts.final_norm]
        named = dict(pl_module.named_parameters())
        self.rows.append({
            "active": list(self.lisa.active), "moved": moved_blocks(pl_module, self.before),
            "always_on_moved": bool(always_on) and all(not torch.equal(named[n], self.before[n]) for n in always_on),
            "state_ids": {id(p) for p in opt.state}, "trainable_ids": {id(p) for p in trainable},
            "state_bytes": optimizer_state_bytes(opt), "trainable_numel": sum(p.numel() for p in trainable),
            "n_tensors": len(trainable)})


# A tiny GRPO run on the synthetic verifiable data

class MetricLog(L.Callback):
    """Every step's logged metrics."""

    def __init__(self):
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def write_sft_checkpoint(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A seeded random-init ``CausalLMModule`` saved as a Lightning checkpoint (GSM8K-form synthetic data, char
    tokenizer), as GRPO's ``sft_checkpoint`` reads it; returns its path and the model's weights."""
    from recipes.causal_lm import CausalLMModule

    torch.manual_seed(1)
    sft = CausalLMModule(model_config=TINY_LM_CONFIG, tokenizer_name="char")
    sft.configure_model()
    path = tmp_path / "sft.ckpt"
    torch.save({"state_dict": sft.state_dict(), "hyper_parameters": dict(sft.hparams),
                "datamodule_hyper_parameters": {"train_file": None, "synthetic_format": "gsm8k", "tokenizer": "char"}},
               path)
    return path, sft.model.state_dict()


def grpo_data(tmp_path, **kwargs) -> VerifiableQADataModule:
    return VerifiableQADataModule(synthetic_dir=str(tmp_path / "syn"), synthetic_sft_size=32, synthetic_train_size=16,
                                  synthetic_val_size=4, batch_size=2, sft_batch_size=8, **kwargs)


def fit_grpo(tmp_path, module, callbacks=(), steps=2, dm=None):
    """Train ``module`` for ``steps`` steps (on ``grpo_data`` unless ``dm``); returns the trainer and its MetricLog."""
    log = MetricLog()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[log, *callbacks], default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm or grpo_data(tmp_path))
    return trainer, log


def grpo_module(**kwargs):
    """A ``GRPOModule`` on the tiny Llama: 4 generations of 5 new tokens unless ``kwargs`` say otherwise."""
    from recipes.grpo import GRPOModule

    kwargs = {"model_config": TINY_LM_CONFIG, "num_generations": 4, "max_new_tokens": 5, **kwargs}
    return GRPOModule(**kwargs)


# A real byte-level BPE tokenizer with added special tokens and a ChatML template, built locally (no download)

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "</s>"]
CORPUS = ["The answer is 42.", "so 3 + 4 = 7\n#### 7", "Add the numbers: 12 and 30.", "hello world, how are you?",
          "<|im_end|> and </s> are written here as text", "A multiple-choice answer: (B)"] * 20


def build_bpe_tokenizer(vocab_size: int = 300) -> transformers.PreTrainedTokenizerFast:
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.ByteLevel(trim_offsets=True)
    bpe_trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(CORPUS, bpe_trainer)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>",
                                               pad_token="<|endoftext|>",
                                               additional_special_tokens=["<|im_start|>", "</s>"])
    tok.chat_template = CHATML
    return tok


# Chest X-ray folders written from hand-written rows (NIH ChestX-ray14 and CheXpert layouts)

NIH_ROWS = [  # image, Finding Labels, patient
    ("00000001_000.png", "Cardiomegaly|Effusion", "1"), ("00000001_001.png", "No Finding", "1"),
    ("00000002_000.png", "Hernia", "2"), ("00000003_000.png", "Nodule|Mass|Pneumothorax", "3"),
    ("00000004_000.png", "No Finding", "4"), ("00000005_000.png", "Atelectasis", "5"),
]


def write_png(path: Path, value: int = 100, size: int = 40, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size, size), value, dtype=np.uint8)
    arr[: size // 2] = 255 - value
    Image.fromarray(arr).convert(mode).save(path)


def write_nih(root: Path, rows=NIH_ROWS, columns=NIH_COLUMNS, test=("00000005_000.png",), extra_list=()) -> Path:
    for i, (name, _, _) in enumerate(rows):
        write_png(root / f"images_00{1 + i % 2}" / "images" / name)
    with (root / "Data_Entry_2017.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for name, labels, patient in rows:
            full = {"Image Index": name, "Finding Labels": labels, "Patient ID": patient, "View Position": "PA"}
            writer.writerow([full.get(c, "0") for c in columns])
    names = [r[0] for r in rows]
    (root / "train_val_list.txt").write_text("\n".join([n for n in names if n not in test] + list(extra_list)) + "\n")
    (root / "test_list.txt").write_text("\n".join(test) + "\n")
    return root


def nih(root: Path, **kwargs) -> ChestXray14DataModule:
    dm = ChestXray14DataModule(root=str(root), image_size=32, batch_size=2, val_fraction=0.3, **kwargs)
    dm.setup()
    return dm


CHEXPERT_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Cardiomegaly", "Edema",
                   "Consolidation", "Atelectasis", "Pleural Effusion"]
CHEXPERT_ROWS = [  # Cardiomegaly, Edema, Consolidation, Atelectasis, Pleural Effusion
    ("patient00001/study1/view1_frontal.jpg", "Frontal", ["1.0", "-1.0", "", "-1.0", "0.0"]),
    ("patient00001/study1/view2_lateral.jpg", "Lateral", ["1.0", "", "", "", ""]),
    ("patient00002/study1/view1_frontal.jpg", "Frontal", ["-1.0", "1.0", "-1.0", "", "1.0"]),
    ("patient00003/study1/view1_frontal.jpg", "Frontal", ["", "", "", "", ""]),
    ("patient00004/study2/view1_frontal.jpg", "Frontal", ["0.0", "0.0", "1.0", "1.0", "-1.0"]),
]


def write_chexpert(tmp_path: Path, header=CHEXPERT_HEADER, rows=CHEXPERT_ROWS) -> Path:
    base = tmp_path / "CheXpert-v1.0-small"
    for split in ("train", "valid"):
        with (base / f"{split}.csv").open("w", newline="") if base.exists() else _mk(base / f"{split}.csv") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            for rel, view, values in rows:
                if split == "valid":  # the test set's patients are other people (patient0... -> patient9...)
                    rel = rel.replace("patient0", "patient9")
                write_png(base / split / rel)
                full = dict(zip(CHEXPERT_HEADER, ["CheXpert-v1.0-small/" + split + "/" + rel, "Female", "50", view,
                                                  "PA", "", *values], strict=True))
                writer.writerow([full[c] for c in header])
    return base


def _mk(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("w", newline="")


def chexpert(root: Path, report_coverage: bool = False, **kwargs) -> CheXpertDataModule:
    """Set up CheXpert from hand-written rows; these are too few for every label to have positive and negative
    training entries, so the label-coverage report is silenced unless ``report_coverage``."""
    dm = CheXpertDataModule(root=str(root), image_size=32, batch_size=2, val_fraction=0.3, **kwargs)
    with warnings.catch_warnings():
        if not report_coverage:
            warnings.filterwarnings("ignore", r"CheXpert .* label\(s\) with no positive or no negative")
        dm.setup()
    return dm


@pytest.fixture(scope="session")
def model_zoo(tmp_path_factory) -> dict[str, Path]:
    """``{family: folder}``: every family of ``tests.zoo.FAMILIES`` saved (model and tokenizer) once per session."""
    from tests.zoo import build_zoo

    return build_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(autouse=True, scope="session")
def _no_compile_trace_capture():
    """pytest attaches its log capture to every non-propagating logger, torch's structured-trace logger
    (``torch.__trace``, always at DEBUG) among them, and then formats whole graph dumps at every torch.compile (a
    compiling test ran 3x slower). The trace is for TORCH_TRACE only: drop its records unless that is set."""
    trace = logging.getLogger("torch.__trace")
    keep = os.environ.get("TORCH_TRACE")
    drop = logging.Filter("never: not a logger name")  # a Filter naming no logger drops every record
    if not keep:
        trace.addFilter(drop)
    yield
    trace.removeFilter(drop)


def fake_slurm_job(tmp_path: Path, monkeypatch) -> None:
    """SLURM job 4242 with a fake ``scontrol`` first on PATH that writes its arguments to ``scontrol_called``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'scontrol_called'}\n")
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")


@pytest.fixture
def cli_argv(monkeypatch):
    """An in-process CLI call passes its own arguments: the test runner's command line is hidden from it."""
    monkeypatch.setattr(sys, "argv", ["recipes"])


# ---------------------------------------------------------------- recipe smoke runs (every packaged YAML)
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
SMOKE_ARGS = ["--trainer.max_steps=2", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
              "--trainer.check_val_every_n_epoch=1", "--trainer.val_check_interval=1.0", "--trainer.max_epochs=1",
              "--trainer.enable_checkpointing=false", "--trainer.accelerator=cpu", "--wandb=disabled",
              "--trainer.log_every_n_steps=1"]
# Recipe-specific settings that keep a smoke run small (e.g. fewer calibration batches).
_SMALL_PHANTOM = ["--data.phantom_patients=8", "--data.phantom_image_size=64", "--data.batch_size=4"]
EXTRA_SMOKE_ARGS: dict[str, list[str]] = {
    "mae_pretrain_cxr": _SMALL_PHANTOM,
    "vit_finetune_cxr": _SMALL_PHANTOM,
    "vit_finetune_chexpert": _SMALL_PHANTOM,
    "grpo_llds": ["--model.init_args.sft_steps=2", "--model.init_args.num_generations=2",
                  "--model.init_args.max_new_tokens=4", "--data.init_args.synthetic_sft_size=64",
                  "--data.init_args.synthetic_train_size=32", "--data.init_args.synthetic_val_size=8",
                  "--data.init_args.val_batch_size=8"],
    "grpo_crc": ["--model.init_args.sft_steps=2", "--model.init_args.num_generations=2",
                 "--model.init_args.max_new_tokens=4", "--data.init_args.synthetic_sft_size=64",
                 "--data.init_args.synthetic_train_size=32", "--data.init_args.synthetic_val_size=8",
                 "--data.init_args.val_batch_size=8"],
}
# the tiny phantom validation leaves some labels without a positive: AUROC undefined there
TINY_VAL_AUROC = pytest.mark.filterwarnings("ignore:.*AUROC undefined")
