"""GRPO's start from an SFT checkpoint, and the checks that keep a run from training on nothing: an SFT start whose
answers the verifier cannot read, and rollout batches whose rewards are all zero."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_warn

from datamodules.jsonl_records import read_instruction_file
from datamodules.rewards import GSM8KReward, RewardFn


def read_sft_checkpoint(path: str | Path) -> dict:
    """A ``CausalLMModule`` checkpoint (``state_dict``, ``hyper_parameters``, ``datamodule_hyper_parameters``)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"sft_checkpoint {path} does not exist (a CausalLMModule checkpoint)")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)  # a local file the user names
    ckpt.setdefault("hyper_parameters", {})
    return ckpt


def load_sft_state(model: torch.nn.Module, path: str | Path) -> dict:
    """Load the SFT checkpoint's weights into ``model``; returns the data hyper-parameters it was trained with."""
    ckpt = read_sft_checkpoint(path)
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not match the model (a LoRA checkpoint must be exported merged first: "
                         f"python -m recipes export): missing {missing[:3]}, unexpected {unexpected[:3]}")
    return dict(ckpt.get("datamodule_hyper_parameters") or {})


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
    records = read_instruction_file(path)[:200]
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
