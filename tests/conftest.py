"""The tests' tiny models and configs, in one place, and the environment every test runs in (offline, no W&B).

- ``TINY_LM_CONFIG``: the ``model_config`` of a recipe's tiny Llama (``CausalLMModule``, ``GRPOModule``).
- ``TINY_VIT_KWARGS``: the ``model_kwargs`` of a recipe's tiny timm ViT (MAE pre-training, ViT classifier).
- ``ARCHITECTURES``: tiny Hugging Face configs of every architecture family the block finder knows, plus ``vit``;
  ``tiny_model(arch)`` builds one (seeded), ``TinyModule(arch)`` trains one, ``tiny_loader(arch)`` feeds it.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

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


@pytest.fixture
def cli_argv(monkeypatch):
    """An in-process CLI call passes its own arguments: the test runner's command line is hidden from it."""
    monkeypatch.setattr(sys, "argv", ["recipes"])
