"""Validation loss after the same wall-clock budget, with and without ProgressiveLayerDrop (the paper's claim:
the same quality sooner).

Two copies of the same random-init 12-block Llama train on the built-in synthetic tasks (same batch order), taking
turns in short time slices within one process so both see the same machine load, until each has used the budget.
Both are then evaluated on the same validation split with every block running.

    python benchmarks/layer_drop_quality.py --quick
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from callbacks.layer_drop import ProgressiveLayerDrop  # noqa: E402
from datamodules.instruction import InstructionDataModule  # noqa: E402


def build(vocab: int, args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                                   num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                                   max_position_embeddings=128)
    return transformers.LlamaForCausalLM(cfg).train()


class Run:
    """One model training on its own copy of the batch stream, for as long as it is given time."""

    def __init__(self, model, loader, pld: ProgressiveLayerDrop | None, lr: float) -> None:
        self.model, self.pld, self.steps, self.seconds = model, pld, 0, 0.0
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98))
        self.batches = itertools.chain.from_iterable(itertools.repeat(loader))
        self.fraction_sum = 0.0

    def train_for(self, seconds: float) -> None:
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            batch = next(self.batches)
            if self.pld is not None:
                keep = self.pld.sample(self.steps, len(self.pld.blocks))
                self.fraction_sum += sum(keep) / len(keep)
            loss = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              labels=batch["labels"], use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.steps += 1
        self.seconds += time.perf_counter() - start

    @torch.no_grad()
    def val_loss(self, loader) -> float:
        """Token-weighted loss on the response tokens, every block running (eval mode)."""
        self.model.eval()
        total, tokens = 0.0, 0
        for batch in loader:
            out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             labels=batch["labels"], use_cache=False)
            n = int((batch["labels"][:, 1:] != -100).sum())
            total, tokens = total + float(out.loss) * n, tokens + n
        self.model.train()
        return total / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 90-second budget per model")
    parser.add_argument("--budget-s", type=float, default=600.0, help="training seconds per model")
    parser.add_argument("--slice-s", type=float, default=5.0, help="seconds per turn")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--theta-bar", type=float, default=0.5)
    parser.add_argument("--gamma", type=float, default=0.01, help="faster than the paper's 0.001 for short budgets")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.quick:
        args.budget_s = 90.0
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        data = InstructionDataModule(batch_size=args.batch_size, max_length=48, synthetic_dir=tmp,
                                     synthetic_train_size=4000)
        data.prepare_data()
        data.setup("fit")
    vocab = len(data.tokenizer)
    train = data.train_dataloader()

    def loader() -> DataLoader:  # the same shuffled batch order for both runs
        return DataLoader(train.dataset, batch_size=args.batch_size, shuffle=True, collate_fn=train.collate_fn,
                          generator=torch.Generator().manual_seed(0))

    baseline = Run(build(vocab, args), loader(), None, args.lr)
    pld = ProgressiveLayerDrop(theta_bar=args.theta_bar, gamma=args.gamma, seed=0)
    model = build(vocab, args)
    pld.install(model)
    dropping = Run(model, loader(), pld, args.lr)
    while baseline.seconds < args.budget_s or dropping.seconds < args.budget_s:
        for run in (baseline, dropping):
            if run.seconds < args.budget_s:
                run.train_for(min(args.slice_s, args.budget_s - run.seconds))

    val = data.val_dataloader()
    loss_base, loss_pld = baseline.val_loss(val), dropping.val_loss(val)
    print(json.dumps({
        "benchmark": "layer_drop_quality", "budget_s": args.budget_s, "layers": args.layers, "hidden": args.hidden,
        "theta_bar": args.theta_bar, "gamma": args.gamma,
        "steps_baseline": baseline.steps, "steps_pld": dropping.steps,
        "steps_ratio": round(dropping.steps / baseline.steps, 4),
        "final_theta": round(pld.theta(dropping.steps), 4),
        "mean_fraction_computed": round(dropping.fraction_sum / dropping.steps, 4),
        "val_loss_baseline": round(loss_base, 4), "val_loss_pld": round(loss_pld, 4),
        "val_loss_diff": round(loss_pld - loss_base, 4),
    }))


if __name__ == "__main__":
    main()
