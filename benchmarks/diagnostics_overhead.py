"""Training-time overhead of LayerDiagnostics at its default interval, against the same run without it.

    python benchmarks/diagnostics_overhead.py [--quick]

Model: a random-init Llama (8 blocks, hidden 256, MLP 688, vocab 4000), batch 8 x 128 tokens, AdamW; ``--steps``
optimizer steps per run. After one untimed warm-up run, runs alternate (plain, diagnostics, plain, ...) in one
process, ``--repeats`` each, and the median wall time of ``trainer.fit`` is compared. The diagnostics run measures
every default interval (block influence, contribution, grad norm, update ratio, trained/ran shares; the logit
lens with ``--logit_lens``); the heatmaps, drawn once at the end of training, are timed separately
(``draw_seconds``). Prints one JSON line with the overhead ratio (goal: at most 1.03) and the raw times.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import lightning as L  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from callbacks.layer_diagnostics import LayerDiagnostics  # noqa: E402

DEFAULT_INTERVAL = inspect.signature(LayerDiagnostics).parameters["interval"].default


class Bench(L.LightningModule):
    def __init__(self, args: argparse.Namespace):
        super().__init__()
        cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.mlp,
                                       num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                                       num_key_value_heads=args.hidden // 64, max_position_embeddings=args.seq,
                                       tie_word_embeddings=False)
        torch.manual_seed(0)
        self.model = transformers.AutoModelForCausalLM.from_config(cfg)

    def forward(self, input_ids, attention_mask=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch[0], labels=batch[0], use_cache=False).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


def run(args: argparse.Namespace, diagnostics: bool, root: Path) -> tuple[float, LayerDiagnostics | None, float]:
    """Seconds of ``trainer.fit``, the callback, and the seconds its heatmaps take to draw afterwards."""
    L.seed_everything(0, verbose=False)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.steps * args.batch, args.seq), generator=gen)
    diag = LayerDiagnostics(logit_lens=args.logit_lens, heatmaps=False) if diagnostics else None
    trainer = L.Trainer(max_steps=args.steps, accelerator="cpu", devices=1, logger=False, default_root_dir=root,
                        callbacks=[diag] if diag else [], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    module = Bench(args)
    start = time.perf_counter()
    trainer.fit(module, DataLoader(TensorDataset(ids), batch_size=args.batch))
    seconds = time.perf_counter() - start
    draw_seconds = 0.0
    if diag is not None:
        draw_start = time.perf_counter()
        diag.draw(trainer, root / "layer_diagnostics")
        draw_seconds = time.perf_counter() - draw_start
    return seconds, diag, draw_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--mlp", type=int, default=688)
    parser.add_argument("--vocab", type=int, default=4000)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--logit_lens", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats = 2 * DEFAULT_INTERVAL, 1
    plain, watched, measurements, draw_seconds = [], [], 0, 0.0
    with tempfile.TemporaryDirectory() as tmp:
        run(args, True, Path(tmp))  # warm-up: first-call costs (lazy imports, allocator) fall on neither side
        for _ in range(args.repeats):
            plain.append(run(args, False, Path(tmp))[0])
            seconds, diag, draw_seconds = run(args, True, Path(tmp))
            watched.append(seconds)
            measurements = len(diag.steps)
    ratio = statistics.median(watched) / statistics.median(plain)
    print(json.dumps({
        "benchmark": "diagnostics_overhead", "device": "cpu", "torch_threads": torch.get_num_threads(),
        "model": f"llama L{args.layers} h{args.hidden} mlp{args.mlp} v{args.vocab}",
        "tokens_per_step": args.batch * args.seq, "steps": args.steps, "interval": DEFAULT_INTERVAL,
        "logit_lens": args.logit_lens, "measurements": measurements,
        "overhead_ratio": round(ratio, 4), "goal_max_ratio": 1.03, "meets_goal": ratio <= 1.03,
        "plain_seconds": [round(s, 2) for s in plain], "diagnostics_seconds": [round(s, 2) for s in watched],
        "draw_seconds": round(draw_seconds, 2),
    }))


if __name__ == "__main__":
    main()
