"""Completion tokens per second of our GRPO step vs TRL's ``GRPOTrainer``, alternating in one process.

Same random-init Llama weights, tokenizer, prompts, G, completion length, sampling settings, mu and loss
(``sequence_mean`` = TRL ``loss_type="grpo"``, group std scaling, no KL); a step is timed from the start of the
rollout to the end of its last optimizer step, on both sides. TRL is the optional extra ``bench``
(``pip install -e ".[bench]"``). Prints one JSON line.

    python benchmarks/grpo_throughput.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from datamodules.rewards import GSM8KReward  # noqa: E402
from datamodules.synthetic_tasks import make_problems  # noqa: E402
from datamodules.tokenizer import build_char_tokenizer  # noqa: E402
from datamodules.verifiable_qa import VerifiableQADataModule  # noqa: E402
from recipes.grpo import GRPOModule  # noqa: E402
from recipes.parts.hf_model import DEFAULT_MODEL_CONFIG  # noqa: E402


class StepTimer(L.Callback):
    """Wall time of each training step and the completion tokens it generated."""

    def __init__(self, completions_per_step: int) -> None:
        self.n, self.seconds, self.tokens, self._t0 = completions_per_step, 0.0, 0.0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seconds += time.perf_counter() - self._t0
        self.tokens += float(trainer.callback_metrics["grpo/completion_length"]) * self.n


def run_ours(args, state: dict, data_dir: str) -> tuple[float, float]:
    dm = VerifiableQADataModule(train_file=f"{data_dir}/train.jsonl", val_file=f"{data_dir}/train.jsonl",
                                batch_size=args.prompts)
    module = GRPOModule(model_config=DEFAULT_MODEL_CONFIG, num_generations=args.G, max_new_tokens=args.max_new_tokens,
                        mu=args.mu, temperature=1.0, top_p=1.0, loss_aggregation="sequence_mean",
                        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-5))
    module.tokenizer = dm.tokenizer
    module.configure_model()
    module.model.load_state_dict(state)
    timer = StepTimer(args.prompts * args.G)
    trainer = L.Trainer(max_steps=args.rollouts * args.mu, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[timer])
    trainer.fit(module, datamodule=dm)
    return timer.tokens, timer.seconds


def run_trl(args, state: dict, data: list[dict]) -> tuple[float, float]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = build_char_tokenizer()
    cfg = dict(DEFAULT_MODEL_CONFIG)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg,
                                                                  vocab_size=len(tokenizer)))
    model.load_state_dict(state)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    counted = {"tokens": 0.0}
    gsm8k = GSM8KReward("strict")

    def reward(prompts, completions, completion_ids, answer, **kwargs):
        counted["tokens"] += sum(len(ids) for ids in completion_ids)
        return gsm8k(prompts, completions, answer=answer)

    class Timer(TrainerCallback):
        seconds, t0 = 0.0, 0.0

        def on_step_begin(self, a, s, c, **kw):
            Timer.t0 = time.perf_counter()

        def on_step_end(self, a, s, c, **kw):
            Timer.seconds += time.perf_counter() - Timer.t0

    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(output_dir=out, per_device_train_batch_size=args.prompts * args.G,
                            gradient_accumulation_steps=1, num_generations=args.G, num_iterations=args.mu,
                            max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, beta=0.0,
                            loss_type="grpo", scale_rewards="group", learning_rate=1e-5, max_steps=args.rollouts *
                            args.mu, use_cpu=True, report_to=[], save_strategy="no", logging_steps=10_000,
                            bf16=False, seed=0, dataloader_num_workers=0, lr_scheduler_type="constant",
                            warmup_steps=0, max_grad_norm=1.0)
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=Dataset.from_list(data),
                              processing_class=tokenizer, callbacks=[Timer()])
        trainer.train()
    return counted["tokens"], Timer.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a few minutes on 2 CPU cores)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--G", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=16)
    parser.add_argument("--mu", type=int, default=2)
    parser.add_argument("--rollouts", type=int, default=4, help="rollout batches per timed run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (ours, TRL)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.rollouts = 2, 3
    L.seed_everything(0, verbose=False)
    tokenizer = build_char_tokenizer()
    cfg = dict(DEFAULT_MODEL_CONFIG)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg,
                                                                  vocab_size=len(tokenizer)))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    problems = make_problems(args.prompts * args.rollouts * 4, seed=123)
    result = {"benchmark": "grpo_throughput", "prompts": args.prompts, "G": args.G,
              "max_new_tokens": args.max_new_tokens, "mu": args.mu, "rollouts_per_run": args.rollouts,
              "rounds": args.rounds, "torch_threads": torch.get_num_threads()}
    try:
        import trl

        result["trl_version"] = trl.__version__
    except ImportError as err:
        result["error"] = f"TRL is not installed ({err}); pip install -e '.[bench]'"
        print(json.dumps(result))
        return
    totals = {"ours": [0.0, 0.0], "trl": [0.0, 0.0]}
    with tempfile.TemporaryDirectory() as data_dir:
        with open(f"{data_dir}/train.jsonl", "w") as f:
            for p in problems:
                f.write(json.dumps({"question": p.question, "answer": f"#### {p.answer}"}) + "\n")
        messages = [[{"role": "user", "content": p.question}] for p in problems]
        data = [{"prompt": tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True),
                 "answer": p.answer} for m, p in zip(messages, problems, strict=True)]
        for r in range(args.rounds):
            for name in (("ours", "trl") if r % 2 == 0 else ("trl", "ours")):
                torch.manual_seed(r)
                tokens, seconds = run_ours(args, state, data_dir) if name == "ours" else run_trl(args, state, data)
                totals[name][0] += tokens
                totals[name][1] += seconds
    for name, (tokens, seconds) in totals.items():
        result[f"{name}_completion_tokens"] = int(tokens)
        result[f"{name}_seconds"] = round(seconds, 3)
        result[f"{name}_tokens_per_s"] = round(tokens / seconds, 1)
    result["ratio_ours_over_trl"] = round(result["ours_tokens_per_s"] / result["trl_tokens_per_s"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
