"""GRPO's checks: sequences that would not fit the model's positions, and what keeps a run from training on nothing
(an SFT start whose answers the verifier cannot read, rollout batches whose rewards are all zero)."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_warn

from datamodules.rewards import GSM8KReward, RewardFn
from recipes.parts.hf_model import check_sequence_lengths


def check_sequence_budget(model: torch.nn.Module, datasets: dict, budget: int, sft_steps: int) -> None:
    """The longest prompt of ``datasets`` (train and val) plus the completion ``budget``, and with a warm-up
    (``sft_steps > 0``) the longest SFT example, must fit the model's positions."""
    prompts = [len(r["prompt_ids"]) for split in ("train", "val") for r in datasets.get(split, [])]
    lengths = {}
    if prompts:
        lengths[f"longest prompt ({max(prompts)}) + max_new_tokens ({budget})"] = max(prompts) + budget
    if sft_steps > 0 and datasets.get("sft"):
        lengths["longest SFT warm-up example (data.sft_max_length)"] = max(len(e["input_ids"]) for e in datasets["sft"])
    check_sequence_lengths(model, lengths)


def sft_answers_have_marker(data_hparams: dict) -> bool | None:
    """Whether the SFT data a checkpoint was trained on ends its answers with ``#### <number>``.

    ``data_hparams`` are the checkpoint's ``datamodule_hyper_parameters`` (an ``InstructionDataModule``'s).
    ``None`` when it cannot be told (another data module, or the training file is gone).
    """
    if "synthetic_format" not in data_hparams:
        return None
    if data_hparams.get("train_file") is None:
        return data_hparams["synthetic_format"] == "gsm8k"
    path = Path(data_hparams["train_file"])
    if not path.is_file():
        return None
    # datasets is imported only here: training GRPO on its own prompts needs no data-set library
    from datamodules.instruction_records import read_instruction_file

    records = read_instruction_file(path, data_hparams.get("data_format", "auto"), data_hparams.get("columns"))[:200]
    return any("####" in messages[-1]["content"] for _, messages in records)


def check_sft_fits_verifier(data_hparams: dict | None, verifier: RewardFn, checkpoint: str) -> None:
    """Raise when the SFT checkpoint learned bare answers but the verifier only accepts ``#### <number>``."""
    if not (isinstance(verifier, GSM8KReward) and verifier.mode == "strict") or not data_hparams:
        return
    if sft_answers_have_marker(data_hparams) is False:
        source = data_hparams.get("train_file") or f"synthetic {data_hparams['synthetic_format']!r} data"
        raise ValueError(
            f"sft_checkpoint {checkpoint} was trained on {source}, whose answers do not end with '#### <number>', "
            "but the verifier (gsm8k_strict) only rewards that form: every reward would be 0. Train the SFT "
            "checkpoint on GSM8K-form answers (sft.yaml: --data.init_args.synthetic_format gsm8k), or set "
            "--data.init_args.reward gsm8k_flexible (the last number of a completion counts)")


class ZeroRewardStreak:
    """Warns once per streak when every reward of the last ``patience`` rollout batches was 0."""

    def __init__(self, patience: int) -> None:
        if patience < 1:
            raise ValueError(f"zero_reward_patience must be >= 1, got {patience}")
        self.patience = patience
        self.streak = 0

    def update(self, all_zero: bool) -> bool:
        """Record one rollout batch; returns True when this batch triggers the warning."""
        self.streak = self.streak + 1 if all_zero else 0
        if self.streak != self.patience:
            return False
        rank_zero_warn(f"Every reward of the last {self.patience} rollout batches was 0: GRPO has nothing to learn "
                       "from (all advantages are 0). Check that completions can reach the verifier's answer format "
                       "(an SFT warm-up in that format, max_new_tokens long enough) and that the task is not too "
                       "hard for the model")
        return True
