"""Does LLDS prevent lazy likelihood displacement? Plain GRPO vs GRPO + LLDS with mu > 1, several seeds.

One SFT warm-up of the small Llama on the synthetic ``sft`` split, then, for each seed (rollout sampling and
mini-batch order), GRPO with and without LLDS from those same weights on held-out prompts. Every
``--probe_every`` rollouts the mean per-token log-likelihood of the *reference (correct) answers* of fixed probe
prompts is measured under the current policy; the logged
``grpo/logp_correct`` (correct sampled completions) and the reward are recorded too. Prints one JSON line.

    python benchmarks/llds_displacement.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from callbacks.llds import LLDS  # noqa: E402
from datamodules.verifiable_qa import VerifiableQADataModule  # noqa: E402
from recipes.grpo import GRPOModule  # noqa: E402
from recipes.grpo.loss import token_logprobs  # noqa: E402


class Probe(L.Callback):
    """Log-likelihood of the reference answers of fixed prompts, and the per-rollout reward and logp_correct."""

    def __init__(self, batch: dict, every: int) -> None:
        self.batch, self.every = batch, every
        self.likelihood: list[float] = []
        self.reward: list[float] = []
        self.logp_correct: list[float] = []

    @torch.no_grad()
    def measure(self, module: GRPOModule) -> None:
        b = self.batch
        logits = module.policy_logits(module.model, b["prompt_ids"], b["prompt_mask"], b["answer_ids"],
                                      b["answer_mask"])
        lp = token_logprobs(logits, b["answer_ids"])
        mask = b["answer_mask"].float()
        self.likelihood.append(round(float(((lp * mask).sum(1) / mask.sum(1)).mean()), 4))

    def on_train_start(self, trainer, pl_module) -> None:
        self.measure(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        m = trainer.callback_metrics
        self.reward.append(float(m["grpo/reward_mean"]))
        self.logp_correct.append(float(m.get("grpo/logp_correct", float("nan"))))
        if (batch_idx + 1) % self.every == 0:
            self.measure(pl_module)


def probe_batch(dm: VerifiableQADataModule, n: int) -> dict:
    from datamodules.chat_encoding import pad

    rows = dm.datasets["train"][:n]
    tok = dm.tokenizer
    answers = [tok(f"#### {r['answer']}", add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in rows]
    return {"prompt_ids": pad([r["prompt_ids"] for r in rows], tok.pad_token_id, left=True),
            "prompt_mask": pad([[1] * len(r["prompt_ids"]) for r in rows], 0, left=True),
            "answer_ids": pad(answers, tok.pad_token_id), "answer_mask": pad([[1] * len(a) for a in answers], 0)}


def sft_state(dm: VerifiableQADataModule, steps: int, lr: float, seed: int) -> dict:
    torch.manual_seed(seed)
    module = GRPOModule(num_generations=2)
    module.tokenizer = dm.tokenizer
    module.configure_model()
    model = module.model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98))
    step = 0
    while step < steps:
        for batch in dm.sft_dataloader():
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                         use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step >= steps:
                break
    return {k: v.clone() for k, v in model.state_dict().items()}


def run(args, dm, state: dict, seed: int, llds: bool) -> dict:
    L.seed_everything(seed, verbose=False)
    module = GRPOModule(num_generations=args.G, max_new_tokens=12, mu=args.mu, num_mini_batches=args.mini_batches,
                        optimizer=lambda p: torch.optim.AdamW(p, lr=args.lr, betas=(0.9, 0.99)))
    module.tokenizer = dm.tokenizer
    module.configure_model()
    module.model.load_state_dict(state)
    probe = Probe(probe_batch(dm, 32), args.probe_every)
    callbacks = [probe] + ([LLDS(coef=args.coef)] if llds else [])
    trainer = L.Trainer(max_steps=args.rollouts * args.mu * args.mini_batches, accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=callbacks)
    trainer.fit(module, datamodule=dm)
    half = len(probe.reward) // 2
    return {"likelihood_correct": probe.likelihood, "reward_first_half": round(sum(probe.reward[:half]) / half, 4),
            "reward_second_half": round(sum(probe.reward[half:]) / (len(probe.reward) - half), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rollouts and prompts (minutes on 2 CPU cores)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rollouts", type=int, default=80)
    parser.add_argument("--probe_every", type=int, default=10)
    parser.add_argument("--sft_steps", type=int, default=300)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per rollout batch")
    parser.add_argument("--G", type=int, default=8)
    parser.add_argument("--mu", type=int, default=4)
    parser.add_argument("--mini_batches", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--coef", type=float, default=0.2)
    args = parser.parse_args()
    if args.quick:
        args.rollouts, args.probe_every, args.sft_steps, args.prompts, args.mini_batches = 16, 4, 120, 4, 1
    result = {"benchmark": "llds_displacement", **{k: v for k, v in vars(args).items() if k != "quick"}, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        dm = VerifiableQADataModule(synthetic_dir=tmp, batch_size=args.prompts, sft_batch_size=32,
                                    synthetic_tasks=("reversal", "sorting"), synthetic_train_size=1000)
        dm.prepare_data()
        dm.setup()
        state = sft_state(dm, args.sft_steps, 3e-3, seed=0)
        for seed in args.seeds:
            for name, llds in (("grpo", False), ("grpo_llds", True)):
                result["runs"][f"{name}_seed{seed}"] = run(args, dm, state, seed, llds)
    summary = {}
    for name in ("grpo", "grpo_llds"):
        runs = [result["runs"][f"{name}_seed{s}"] for s in args.seeds]
        change = [r["likelihood_correct"][-1] - r["likelihood_correct"][0] for r in runs]
        drop = [min(r["likelihood_correct"]) - r["likelihood_correct"][0] for r in runs]
        summary[name] = {"likelihood_change_mean": round(sum(change) / len(change), 4),
                         "worst_dip_mean": round(sum(drop) / len(drop), 4),
                         "seeds_with_decline": sum(c < 0 for c in change),
                         "reward_second_half_mean": round(sum(r["reward_second_half"] for r in runs) / len(runs), 4)}
    g, r = summary["grpo"], summary["grpo_llds"]
    summary["grpo_declines"] = g["likelihood_change_mean"] < 0
    # None: plain GRPO showed no decline here, so there was nothing to prevent
    summary["llds_prevents_decline"] = (r["likelihood_change_mean"] > g["likelihood_change_mean"]
                                        and r["seeds_with_decline"] <= g["seeds_with_decline"]
                                        if summary["grpo_declines"] else None)
    result["summary"] = summary
    print(json.dumps(result))


if __name__ == "__main__":
    main()
