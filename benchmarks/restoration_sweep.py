"""Selective Layer Restoration at small scale: diversity vs validity / reward for every restored block range.

Per seed, the documented command sequence (docs/layer_restoration.md) runs in one process:

1. data: the synthetic tasks (reversal, sorting) plus Constrained Random Character (CRC) prompts, whose SFT answers
   are uniformly random over the allowed digits except for a share drawn from all digits (a base model that
   follows the constraint only partly);
2. ``sft.yaml``: a small random-init Llama fine-tuned on that data -> the base (SFT) model;
3. ``grpo_crc.yaml``: GRPO from the SFT checkpoint, reward = CRC validity (other prompts: answer match);
4. every contiguous range of blocks restored from the SFT weights into the GRPO model (``restore_blocks``);
5. the diversity evaluation (``evaluate_crc`` / ``evaluate_prompts``) of SFT, GRPO and each restored model.

Prints one JSON line per (seed, model) and, last, a summary line (mean and std over seeds per model); writes the
per-seed rows to ``benchmarks/results/restoration_sweep_rows.json`` and draws
``benchmarks/results/restoration_sweep.png``. ``benchmarks/results.py run`` records the summary line.

    flock /work/heavy.lock python benchmarks/results.py run restoration_sweep   # 3 seeds
    python benchmarks/restoration_sweep.py --quick                            # seconds-scale smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datamodules.diversity import write_crc_mix  # noqa: E402
from recipes.cli import CONFIG_DIR, RecipesCLI  # noqa: E402
from recipes.commands.diversity import evaluate_crc, evaluate_prompts  # noqa: E402
from recipes.commands.restore import load_causal_lm, restore_blocks  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
METRICS = ("crc/validity", "crc/entropy", "crc/distinct", "crc/valid_distinct", "task/reward", "task/unique",
           "task/distinct_1", "task/distinct_2")


def settings(quick: bool) -> dict:
    if quick:
        return {"layers": 2, "hidden": 32, "sft_steps": 4, "grpo_steps": 2, "n_sft": 64, "n_train": 32, "n_val": 8,
                "crc_prompts": 4, "task_prompts": 4, "samples": 4, "log_every": 1}
    return {"layers": 4, "hidden": 64, "sft_steps": 600, "grpo_steps": 60, "n_sft": 4000, "n_train": 1000,
            "n_val": 64, "crc_prompts": 24, "task_prompts": 32, "samples": 12}


def model_args(cfg: dict) -> list[str]:
    h = cfg["hidden"]
    config = {"model_type": "llama", "hidden_size": h, "intermediate_size": 3 * h, "num_hidden_layers": cfg["layers"],
              "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 64,
              "tie_word_embeddings": False}
    return [f"--model.init_args.model_config={json.dumps(config)}"]


def fit(config: str, args: list[str], root: Path, name: str, seed: int, log_every: int | None) -> str:
    """Run ``python -m recipes fit --config <config> <args>`` in process; returns the last checkpoint's path."""
    if log_every is not None:  # the quick run's epochs are shorter than the recipes' logging interval
        args = [*args, f"--trainer.log_every_n_steps={log_every}"]
    argv, sys.argv = sys.argv, sys.argv[:1]  # the recipe's arguments are all in args
    try:
        cli = RecipesCLI(args=["fit", "--config", str(CONFIG_DIR / config), f"--seed_everything={seed}",
                               "--wandb=disabled", f"--run_name={name}", f"--trainer.default_root_dir={root}",
                               "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
                               "--trainer.enable_model_summary=false", *args])
    finally:
        sys.argv = argv
    return cli.trainer.checkpoint_callback.last_model_path or cli.trainer.checkpoint_callback.best_model_path


def ranges(num_blocks: int) -> list[tuple[int, int]]:
    """Every contiguous block range, shortest first."""
    return [(s, s + n) for n in range(1, num_blocks + 1) for s in range(num_blocks - n + 1)]


def evaluate(model, tokenizer, cfg: dict, val_file: Path, seed: int) -> dict[str, float]:
    torch.manual_seed(seed)
    out = evaluate_crc(model, tokenizer, cfg["crc_prompts"], cfg["samples"], seed=1000 + seed, max_new_tokens=10)
    out.update(evaluate_prompts(model, tokenizer, str(val_file), cfg["samples"], cfg["task_prompts"],
                                max_new_tokens=10))
    return out


def run_seed(seed: int, cfg: dict, work: Path) -> list[dict]:
    data = write_crc_mix(work / f"data{seed}", seed=seed, n_sft=cfg["n_sft"], n_train=cfg["n_train"],
                         n_val=cfg["n_val"])
    start = time.perf_counter()
    sft_ckpt = fit("sft.yaml", [f"--data.train_file={data['sft']}", f"--data.val_file={data['val']}",
                                f"--trainer.max_steps={cfg['sft_steps']}",
                                f"--trainer.val_check_interval={cfg['sft_steps']}",
                                "--model.init_args.exact_match_batches=1", "--model.init_args.max_new_tokens=12",
                                *model_args(cfg)], work, f"sft{seed}", seed, cfg.get("log_every"))
    sft_seconds = time.perf_counter() - start
    grpo_args = [f"--data.init_args.train_file={data['train']}", f"--data.init_args.val_file={data['val']}",
                 f"--model.init_args.sft_checkpoint={sft_ckpt}", "--model.init_args.model_config=null",
                 "--model.init_args.sft_steps=0", f"--trainer.max_steps={cfg['grpo_steps']}",
                 f"--trainer.val_check_interval={cfg['grpo_steps']}"]
    grpo_ckpt = fit("grpo_crc.yaml", grpo_args, work, f"grpo{seed}", seed, cfg.get("log_every"))
    grpo_seconds = time.perf_counter() - start - sft_seconds
    base, tokenizer = load_causal_lm(sft_ckpt, what="sft checkpoint")
    post, _ = load_causal_lm(grpo_ckpt, what="grpo checkpoint")
    models = {"sft": base, "grpo": post}
    models.update({f"{s}:{e}": restore_blocks(base, copy.deepcopy(post), s, e) for s, e in ranges(cfg["layers"])})
    rows = []
    for name, model in models.items():
        row = {"benchmark": "restoration_sweep", "seed": seed, "model": name,
               **{k: round(v, 4) for k, v in evaluate(model, tokenizer, cfg, data["val"], seed).items()}}
        if name in ("sft", "grpo"):
            row["train_seconds"] = round(sft_seconds if name == "sft" else grpo_seconds, 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


SHOWN = {"crc/validity": "validity", "crc/valid_distinct": "valid_distinct", "crc/entropy": "entropy",
         "task/reward": "task_reward", "task/unique": "task_unique"}


def mean_std(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per model and metric: mean and sample std over seeds."""
    table = {}
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        table[name] = {}
        for m in METRICS:
            values = [r[m] for r in mine]
            table[name][m] = statistics.fmean(values)
            table[name][m + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return table


def summarize(table: dict, seeds: list[int], cfg: dict, seconds: float) -> dict:
    """The benchmark's last JSON line: one compact ``mean±std`` string per model (RESULTS.md shows one row each)."""
    models = {name: ", ".join(f"{label} {row[m]:.3f}±{row[m + '_std']:.3f}" for m, label in SHOWN.items())
              for name, row in table.items()}
    return {"benchmark": "restoration_sweep", "seeds": seeds, "seconds": round(seconds, 1),
            "settings": ", ".join(f"{k} {v}" for k, v in cfg.items()), "models": models}


def plot(table: dict, seeds: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("crc/valid_distinct", "crc/validity", "CRC: distinct valid answers / K", "CRC validity"),
              ("crc/entropy", "crc/validity", "CRC: character entropy (normalized)", "CRC validity"),
              ("task/unique", "task/reward", "tasks: unique completions / K", "tasks: sampled reward"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5))
    for ax, (x, y, xlabel, ylabel) in zip(axes, panels, strict=True):
        for name, row in table.items():
            color = {"sft": "tab:green", "grpo": "tab:red"}.get(name, "tab:blue")
            ax.errorbar(row[x], row[y], xerr=row[x + "_std"], yerr=row[y + "_std"], fmt="o", color=color,
                        alpha=0.8, capsize=2)
            ax.annotate(name, (row[x], row[y]), textcoords="offset points", xytext=(4, 3), fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Restoring blocks start:stop from SFT into GRPO (mean ± std, seeds {seeds})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings, one seed, nothing saved by default")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (quick: 0)")
    parser.add_argument("--out_dir", default=None,
                        help="per-seed rows and plot (default benchmarks/results; quick: none)")
    args = parser.parse_args(argv)
    cfg = settings(args.quick)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    torch.set_num_threads(1)  # a shared 2-core machine: one thread avoids oversubscription stalls
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            rows += run_seed(seed, cfg, Path(tmp))
    table = mean_std(rows)
    summary = summarize(table, seeds, cfg, time.perf_counter() - start)
    print(json.dumps(summary), flush=True)
    out_dir = Path(args.out_dir) if args.out_dir else (None if args.quick else RESULTS)
    if out_dir is not None:  # the summary line is recorded by `python benchmarks/results.py run restoration_sweep`
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "restoration_sweep_rows.json").write_text(json.dumps(rows, indent=0) + "\n")
        plot(table, seeds, out_dir / "restoration_sweep.png")
    return summary


if __name__ == "__main__":
    main()
