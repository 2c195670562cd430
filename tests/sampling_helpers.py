"""A tiny Llama LightningModule and data for the LISA / OwLore tests (also run as a two-rank DDP script)."""

from __future__ import annotations

import sys

import lightning as L
import torch
import transformers
from torch.utils.data import DataLoader, TensorDataset

VOCAB, SEQ = 48, 12


def tiny_llama(layers: int = 4, hidden: int = 16) -> transformers.PreTrainedModel:
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                                   max_position_embeddings=SEQ, tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg)


class TinyLM(L.LightningModule):
    """Next-token loss on random tokens; AdamW (or ``optimizer_cls``) over all parameters, like CausalLMModule."""

    def __init__(self, layers: int = 4, hidden: int = 16, lr: float = 1e-2, optimizer_cls=torch.optim.AdamW,
                 checkpointing: str | None = None, **optimizer_kwargs) -> None:
        super().__init__()
        self.model = tiny_llama(layers, hidden)
        if checkpointing:
            self.model.gradient_checkpointing_enable({"use_reentrant": checkpointing == "reentrant"})
        self.lr, self.optimizer_cls, self.optimizer_kwargs = lr, optimizer_cls, optimizer_kwargs

    def forward(self, ids):
        return self.model(input_ids=ids, use_cache=False).logits

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        loss = self.model(input_ids=ids, labels=ids, use_cache=False).loss
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return self.optimizer_cls(self.parameters(), lr=self.lr, **self.optimizer_kwargs)


def token_loader(batches: int = 4, batch_size: int = 4, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batches * batch_size, SEQ), generator=gen)
    return DataLoader(TensorDataset(ids), batch_size=batch_size, shuffle=False)


def trainer(callbacks: list, max_steps: int, root, **kwargs) -> L.Trainer:
    kwargs.setdefault("accelerator", "cpu")
    kwargs.setdefault("devices", 1)
    kwargs.setdefault("enable_checkpointing", False)
    return L.Trainer(max_steps=max_steps, callbacks=callbacks, default_root_dir=root, logger=False,
                     enable_progress_bar=False, enable_model_summary=False,
                     log_every_n_steps=1, **kwargs)


def _ddp_main(out_dir: str) -> None:
    """Two CPU ranks with different data: after training, every rank saves its weights and active history."""
    from callbacks.lisa import LISA

    torch.set_num_threads(1)

    class Recorder(L.Callback):
        def __init__(self):
            self.history = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.history.append(list(lisa.active))

    lisa, rec = LISA(n_layers=1, interval=2, seed=3), Recorder()
    module = TinyLM()
    tr = trainer([lisa, rec], 6, out_dir, strategy="ddp_find_unused_parameters_true", devices=2)

    class RankData(L.LightningDataModule):
        def train_dataloader(self):
            return token_loader(batches=6, seed=10 + self.trainer.global_rank)

    tr.fit(module, datamodule=RankData())
    state = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    torch.save({"weights": state, "history": rec.history}, f"{out_dir}/rank{tr.global_rank}.pt")


if __name__ == "__main__":
    _ddp_main(sys.argv[1])
