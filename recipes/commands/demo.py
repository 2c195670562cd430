"""``make demo``: fine-tune the small Llama on the synthetic tasks, then summarize what it learned.

It runs the ``sft`` recipe through the same CLI as ``python -m recipes fit``, measures held-out exact match of
the untrained model first, trains, and measures it again on the same held-out test problems.
"""

from __future__ import annotations

import time

from recipes.cli import CONFIG_DIR, RecipesCLI


def run_demo(argv: list[str] | None = None) -> dict[str, float]:
    """Train the embedded default and print a summary; ``argv`` (the arguments after ``demo``) overrides the
    recipe."""
    cli = RecipesCLI(args=["--config", str(CONFIG_DIR / "sft.yaml"), *(argv or [])], run=False)
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    model.hparams.exact_match_batches = 10**6  # answer every held-out problem
    before = trainer.test(model, datamodule=data, verbose=False)[0]
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    train_seconds = time.perf_counter() - start
    final_val_loss = float(trainer.callback_metrics.get("val/loss", float("nan")))
    after = trainer.test(model, datamodule=data, verbose=False)[0]
    summary = {
        "train_seconds": round(train_seconds, 1),
        "steps": trainer.global_step,
        "final_val_loss": final_val_loss,
        "test_exact_match_before": before["test/exact_match"],
        "test_exact_match_after": after["test/exact_match"],
        "test_loss_after": after["test/loss"],
    }
    print("\n=== Layerwise Recipes demo: small Llama fine-tuned on the synthetic tasks ===")
    print(f"logs:                 {trainer.log_dir}  (metrics.csv, config.yaml; W&B offline files in wandb/)")
    print(f"training:             {summary['steps']} steps in {summary['train_seconds']} s")
    print(f"final val loss:       {summary['final_val_loss']:.4f}")
    print(f"held-out exact match: {summary['test_exact_match_before']:.1%} untrained -> "
          f"{summary['test_exact_match_after']:.1%} trained ({len(data.datasets['test'])} problems)")
    return summary
