"""GRPO (group relative policy optimization, arXiv 2402.03300) for any Hugging Face causal LM, with verifiable rewards.

One training step = one rollout batch: G completions per prompt from a single batched ``generate`` (KV cache),
rewards, group-normalized advantages, the rollout policy's log-probs cached, then ``mu`` passes over
``num_mini_batches`` mini-batches, one optimizer step each (manual optimization). ``trainer.max_steps`` counts
optimizer steps, i.e. ``mu * num_mini_batches`` per rollout batch.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from transformers import PreTrainedTokenizerBase

from callbacks.core.policy_tokens import PolicyTokens
from datamodules.rewards import RewardFn, compute_rewards
from datamodules.tokenizer import load_tokenizer
from recipes.grpo import answer_span
from recipes.grpo.checks import ZeroRewardStreak, check_sft_fits_verifier, load_sft_state, read_sft_checkpoint
from recipes.grpo.logprobs import completion_logits, completion_logprobs
from recipes.grpo.loss import (
    AGGREGATIONS,
    SCALES,
    aggregate,
    clipped_surrogate,
    completion_mask,
    group_advantages,
    k3_kl,
)
from recipes.grpo.rollout import Rollout
from recipes.grpo.sft_warmup import sft_warmup
from recipes.parts.hf_model import build_causal_lm, check_sequence_lengths, module_tokenizer
from recipes.parts.optim import decay_groups, warmup_cosine_scheduler

LossTerm = Callable[[PolicyTokens], "torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]"]


class GRPOModule(L.LightningModule):
    """GRPO with the clipped surrogate, optional k3 KL to a frozen reference, and pluggable loss terms.

    Args:
        model_path: a local ``from_pretrained`` directory; ``None`` builds ``model_config`` (random init) or
            takes the architecture from ``sft_checkpoint``.
        model_config: ``AutoConfig.for_model`` arguments (``model_type`` plus fields); vocab from the tokenizer.
        sft_checkpoint: a ``recipes.CausalLMModule`` checkpoint (e.g. the output of ``sft.yaml``) to start from.
        sft_steps: optimizer steps of a supervised warm-up on the data module's ``sft`` split at fit start
            (the same response-only loss as ``CausalLMModule``), so a random-init model can produce answers.
        sft_lr: learning rate of that warm-up (AdamW).
        optimizer: the GRPO optimizer (AdamW by default) over the named groups ``decay`` / ``no_decay``.
        warmup_steps: linear learning-rate warm-up in optimizer steps, then constant.
        num_generations: G, completions per prompt.
        temperature / top_p / max_new_tokens: sampling settings of the rollouts.
        mu: optimizer passes over each rollout batch (1 = on-policy, the ratio is exactly 1).
        num_mini_batches: mini-batches per pass (one optimizer step each).
        eps_low / eps_high: clip range [1 - eps_low, 1 + eps_high] (DAPO's clip-higher: eps_high 0.28).
        kl_coef: weight of the k3 KL to the frozen initial policy (0 = no reference model is kept).
        scale_rewards: advantage std scaling: ``group`` (GRPO), ``batch`` or ``none`` (Dr. GRPO).
        loss_aggregation: ``sequence_mean`` (GRPO paper, default), ``token_mean`` (DAPO) or ``max_length``
            (Dr. GRPO: sum / (completions * max_new_tokens)).
        reward_funcs: reward callables ``(prompts, completions, **columns) -> list[float]``, summed;
            ``None`` uses the data module's verifier (``reward_fn()``), which also defines ``grpo/accuracy``.
        drop_bad_rewards: drop (and count in ``grpo/dropped``) completions a reward function fails on instead
            of stopping the run.
        max_grad_norm: gradient clipping (manual optimization: ``trainer.gradient_clip_val`` must stay unset).
        val_max_new_tokens: greedy answer budget in validation (``val/accuracy``).
        logprob_chunk_size: completion positions projected through the output head at a time when computing
            log-probs and entropies (fp32 full-vocabulary logits exist for one chunk only, in forward and
            backward; see ``recipes.parts.chunked_head``); ``None`` projects all positions of a pass at once.
        logprob_batch_size: completions per forward of the no-grad old-policy and reference log-prob passes;
            ``None`` uses the update mini-batch size (completions / ``num_mini_batches``).
        zero_reward_patience: warn when every reward of this many consecutive rollout batches is 0.
    """

    def __init__(
        self,
        model_path: str | None = None,
        model_config: dict | None = None,
        tokenizer_name: str | None = None,
        sft_checkpoint: str | None = None,
        sft_steps: int = 0,
        sft_lr: float = 3e-3,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        warmup_steps: int = 0,
        num_generations: int = 8,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 16,
        mu: int = 1,
        num_mini_batches: int = 1,
        eps_low: float = 0.2,
        eps_high: float = 0.2,
        kl_coef: float = 0.0,
        scale_rewards: str = "group",
        loss_aggregation: str = "sequence_mean",
        reward_funcs: list[Callable] | None = None,
        drop_bad_rewards: bool = False,
        max_grad_norm: float | None = 1.0,
        val_max_new_tokens: int | None = None,
        logprob_chunk_size: int | None = 512,
        logprob_batch_size: int | None = None,
        zero_reward_patience: int = 10,
    ) -> None:
        super().__init__()
        if num_generations < 2:
            raise ValueError(f"num_generations (G) must be at least 2 for group advantages, got {num_generations}")
        if mu < 1 or num_mini_batches < 1:
            raise ValueError(f"mu and num_mini_batches must be >= 1, got mu={mu}, num_mini_batches={num_mini_batches}")
        if scale_rewards not in SCALES:
            raise ValueError(f"scale_rewards must be one of {SCALES}, got {scale_rewards!r}")
        if loss_aggregation not in AGGREGATIONS:
            raise ValueError(f"loss_aggregation must be one of {AGGREGATIONS}, got {loss_aggregation!r}")
        if not (temperature > 0 and 0 < top_p <= 1):
            raise ValueError(f"need temperature > 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        for name, value in (("logprob_chunk_size", logprob_chunk_size), ("logprob_batch_size", logprob_batch_size)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive integer or None, got {value}")
        if sum(x is not None for x in (model_path, model_config)) > 1:
            raise ValueError("Give at most one of model_path and model_config")
        self.save_hyperparameters(ignore=["optimizer", "reward_funcs"])
        self.automatic_optimization = False
        self.optimizer_factory = optimizer
        self.reward_funcs = list(reward_funcs) if reward_funcs else None
        self.model: torch.nn.Module | None = None
        self.tokenizer: PreTrainedTokenizerBase | None = load_tokenizer(tokenizer_name) if tokenizer_name else None
        self.loss_terms: dict[str, LossTerm] = {}
        self._answer_mask_terms: set[str] = set()
        self._reference: list[torch.nn.Module] = []  # a list keeps the frozen copy out of state_dict and optimizer
        self._sft_done = False
        self._sft_loaded = False
        self._verifier: RewardFn | None = None
        self._sft_data_hparams: dict | None = None  # what the sft_checkpoint was trained on
        self._zero_rewards = ZeroRewardStreak(zero_reward_patience)

    # --------------------------------------------------------------------------------------------- model
    @property
    def updates_per_rollout(self) -> int:
        return self.hparams.mu * self.hparams.num_mini_batches

    def configure_model(self) -> None:
        """Build the policy. Under a trainer the ``sft_checkpoint`` weights are loaded at fit start (unless a GRPO
        checkpoint is restored), so validating or resuming a GRPO checkpoint never needs the SFT file."""
        if self.model is not None or (self.tokenizer is None and self._trainer is None):
            return  # without a tokenizer yet (load_from_checkpoint), on_load_checkpoint builds it
        hp = self.hparams
        if hp.sft_checkpoint is not None and hp.model_path is None and hp.model_config is None:
            if not Path(hp.sft_checkpoint).is_file() and self._trainer is not None:
                return  # built in on_load_checkpoint from the GRPO checkpoint's own hyper-parameters
            sft_hp = read_sft_checkpoint(hp.sft_checkpoint)["hyper_parameters"]
            hp.model_config = sft_hp.get("model_config")  # saved with this module's checkpoints
            hp.model_path = sft_hp.get("model_path")
        self.model = build_causal_lm(hp.model_path, hp.model_config, module_tokenizer(self))
        if self._trainer is None:
            self._load_sft_state()

    def _load_sft_state(self) -> None:
        if self.hparams.sft_checkpoint is not None and not self._sft_loaded:
            self._sft_data_hparams = load_sft_state(self.model, self.hparams.sft_checkpoint)
        self._sft_loaded = True

    def register_loss_term(self, name: str, fn: LossTerm, needs_answer_mask: bool = False) -> None:
        """Add ``fn(PolicyTokens) -> loss`` (or ``(loss, {metric: value})``) to every mini-batch's loss.

        The term's value is logged as ``loss/<name>`` and its metrics under their own names. Callbacks call this
        from ``on_fit_start``; registering the same name again replaces the term.
        """
        self.loss_terms[name] = fn
        if needs_answer_mask:
            self._answer_mask_terms.add(name)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["grpo_sft_done"] = self._sft_done

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._sft_done = checkpoint.get("grpo_sft_done", False)
        self._sft_loaded = True  # the checkpoint holds the weights
        if self.tokenizer is None and self._trainer is None:  # load_from_checkpoint
            self.tokenizer = load_tokenizer(checkpoint.get("datamodule_hyper_parameters", {}).get("tokenizer", "char"))
        if self.model is None:
            saved = checkpoint.get("hyper_parameters", {})
            self.hparams.model_config = self.hparams.model_config or saved.get("model_config")
            self.hparams.model_path = self.hparams.model_path or saved.get("model_path")
        self.configure_model()

    def on_fit_start(self) -> None:
        self._load_sft_state()
        self._check_sequence_lengths()
        if self.hparams.sft_steps > 0 and not self._sft_done:
            self._sft_warmup()
        self._sft_done = True
        if self.hparams.kl_coef > 0 and not self._reference:
            reference = copy.deepcopy(self.model).eval().requires_grad_(False)
            self._reference.append(reference)
        self._verifier = self.trainer.datamodule.reward_fn()
        if self.hparams.sft_checkpoint and self.reward_funcs is None:
            check_sft_fits_verifier(self._sft_data_hparams, self._verifier, self.hparams.sft_checkpoint)

    def _check_sequence_lengths(self) -> None:
        """The longest prompt plus the completion budget, and the warm-up examples, must fit the model's positions."""
        hp, data = self.hparams, getattr(self.trainer.datamodule, "datasets", {})
        budget = max(hp.max_new_tokens, hp.val_max_new_tokens or 0)
        prompts = [len(r["prompt_ids"]) for split in ("train", "val") for r in data.get(split, [])]
        lengths = {}
        if prompts:
            lengths[f"longest prompt ({max(prompts)}) + max_new_tokens ({budget})"] = max(prompts) + budget
        if hp.sft_steps > 0 and data.get("sft"):
            lengths["longest SFT warm-up example (data.sft_max_length)"] = max(len(e["input_ids"]) for e in data["sft"])
        check_sequence_lengths(self.model, lengths)

    def _sft_warmup(self) -> None:
        hp = self.hparams
        sft_warmup(self.model, self.trainer.datamodule.sft_dataloader(), hp.sft_steps, hp.sft_lr, self.device)

    # ------------------------------------------------------------------------------------------ rollouts
    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, num: int, greedy: bool = False,
                 max_new_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``num`` completions per prompt in one batched ``generate`` call with the KV cache.

        Returns completion ids [P * num, T] (prompt-major: the ``num`` samples of a prompt are consecutive) and
        their mask (1 up to and including the first EOS).
        """
        tokenizer = module_tokenizer(self)
        hp = self.hparams
        ids, mask = prompt_ids.repeat_interleave(num, 0), prompt_mask.repeat_interleave(num, 0)
        was_training = self.model.training
        self.model.eval()
        sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": hp.temperature,
                                                        "top_p": hp.top_p, "top_k": 0}
        out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens or
                                  hp.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=tokenizer.eos_token_id, use_cache=True, **sampling)
        self.model.train(was_training)
        completion = out[:, ids.shape[1]:]
        cmask = completion_mask(completion, tokenizer.eos_token_id)
        return completion.masked_fill(cmask == 0, tokenizer.pad_token_id), cmask

    def policy_logits(self, model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                      completion: torch.Tensor, cmask: torch.Tensor) -> torch.Tensor:
        """Logits predicting each completion token [N, T, V] (only completion positions are projected)."""
        return completion_logits(model, prompt_ids, prompt_mask, completion, cmask)

    def completion_logprobs(self, model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                            completion: torch.Tensor, cmask: torch.Tensor, entropy: bool = False
                            ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """log pi(completion token | prefix) [N, T] at the sampling temperature, and (detached) entropies;
        ``logprob_chunk_size`` positions through the head at a time."""
        hp = self.hparams
        return completion_logprobs(model, prompt_ids, prompt_mask, completion, cmask, hp.temperature,
                                   hp.logprob_chunk_size, entropy)

    @torch.no_grad()
    def batched_logprobs(self, model: torch.nn.Module, rollout: Rollout) -> torch.Tensor:
        """Log-probs of a whole rollout batch under ``model`` (old policy or reference), ``logprob_batch_size``
        completions per forward (default: a mini-batch's worth)."""
        n = rollout.n
        size = self.hparams.logprob_batch_size or -(-n // self.hparams.num_mini_batches)
        return torch.cat([self.completion_logprobs(model, *rollout.inputs(slice(i, i + size)))[0]
                          for i in range(0, n, size)])

    def _rewards(self, prompts: list[str], texts: list[str], columns: dict[str, list]):
        drop = self.hparams.drop_bad_rewards
        verifier_rewards, valid = compute_rewards(self._verifier or self.trainer.datamodule.reward_fn(), prompts,
                                                  texts, columns, drop)
        if self.reward_funcs is None:
            return verifier_rewards, verifier_rewards > 0.5, valid
        total = torch.zeros(len(texts))
        for fn in self.reward_funcs:
            r, ok = compute_rewards(fn, prompts, texts, columns, drop)
            total, valid = total + r, valid & ok
        return total, verifier_rewards > 0.5, valid

    def answer_mask(self, completion: torch.Tensor, cmask: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Tokens of the final answer: from the last ``####`` (or the last line) to the end of the completion."""
        return answer_span.answer_mask(module_tokenizer(self), completion, cmask, texts)

    # ------------------------------------------------------------------------------------------- training
    def training_step(self, batch: dict, batch_idx: int) -> None:
        """One rollout batch: sample and score completions, then ``mu`` passes of mini-batch updates."""
        rollout = self.rollout(batch)
        self.rollout_logprobs(rollout)
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        stats: dict[str, list[torch.Tensor]] = {}
        for idx in self.mini_batches(rollout.n):
            loss = self.mini_batch_loss(rollout, idx.to(self.device), stats)
            optimizer.zero_grad()
            self.manual_backward(loss)
            if self.hparams.max_grad_norm is not None:
                self.clip_gradients(optimizer, gradient_clip_val=self.hparams.max_grad_norm,
                                    gradient_clip_algorithm="norm")
            optimizer.step()
            scheduler.step()
            _add(stats, "train/loss", loss.detach())
        self._log_rollout(rollout)
        self.log_dict({k: torch.stack(v).float().mean() for k, v in stats.items()}, batch_size=rollout.n)

    def rollout(self, batch: dict) -> Rollout:
        """G completions per prompt, their rewards and group-normalized advantages."""
        hp = self.hparams
        g = hp.num_generations
        completion, cmask = self.generate(batch["prompt_input_ids"], batch["prompt_attention_mask"], g)
        texts = module_tokenizer(self).batch_decode(completion, skip_special_tokens=True)
        columns = {k: [v for v in vals for _ in range(g)] for k, vals in batch.items()
                   if isinstance(vals, list) and k != "prompts"}
        prompts = [p for p in batch["prompts"] for _ in range(g)]
        rewards, correct, valid = (t.to(self.device) for t in self._rewards(prompts, texts, columns))
        return Rollout(prompt_ids=batch["prompt_input_ids"].repeat_interleave(g, 0),
                       prompt_mask=batch["prompt_attention_mask"].repeat_interleave(g, 0),
                       completion=completion, cmask=cmask, rewards=rewards, correct=correct, valid=valid,
                       advantages=group_advantages(rewards, g, hp.scale_rewards, valid),
                       loss_mask=cmask * valid.unsqueeze(1).long(),
                       answer_mask=self.answer_mask(completion, cmask, texts) if self._answer_mask_terms else None)

    @torch.no_grad()
    def rollout_logprobs(self, rollout: Rollout) -> None:
        """Per-token log-probs of the rollout policy (``old_logp``) and of the frozen reference (``ref_logp``).

        With one update per rollout the old policy is the current one, so ``old_logp`` is left to the first
        mini-batch forward (the ratio is then exactly 1) instead of costing a forward here.
        """
        if self.updates_per_rollout > 1:
            rollout.old_logp = self.batched_logprobs(self.model, rollout)
        if self._reference:
            rollout.ref_logp = self.batched_logprobs(self._reference[0], rollout)

    def mini_batches(self, n: int) -> Iterator[torch.Tensor]:
        """Completion indices of each optimizer step: ``mu`` shuffled passes of ``num_mini_batches`` chunks."""
        hp = self.hparams
        generator = torch.Generator().manual_seed(int(self.global_step) + 1_000_003 * int(self.current_epoch))
        for _ in range(hp.mu):
            order = torch.randperm(n, generator=generator) if hp.num_mini_batches > 1 else torch.arange(n)
            yield from order.chunk(hp.num_mini_batches)

    def mini_batch_loss(self, rollout: Rollout, idx: torch.Tensor,
                        stats: dict[str, list[torch.Tensor]]) -> torch.Tensor:
        """Clipped surrogate (+ k3 KL, + registered terms) on the completions ``idx``; metrics added to ``stats``."""
        hp = self.hparams
        logp, entropy = self.completion_logprobs(self.model, *rollout.inputs(idx), entropy=True)
        if rollout.old_logp is None:  # one update per rollout: idx is every completion in order, old == current
            rollout.old_logp = logp.detach()
        old, m, advantages = rollout.old_logp[idx], rollout.loss_mask[idx], rollout.advantages[idx]
        valid = rollout.valid[idx]  # dropped completions count in no denominator
        per_token, clipped = clipped_surrogate(logp, old, advantages, hp.eps_low, hp.eps_high)
        ref = rollout.ref_logp[idx] if rollout.ref_logp is not None else None
        if ref is not None:
            kl = k3_kl(logp, ref)
            per_token = per_token + hp.kl_coef * kl
            _add(stats, "grpo/kl", aggregate(kl.detach(), m, hp.loss_aggregation, hp.max_new_tokens, valid))
        loss = aggregate(per_token, m, hp.loss_aggregation, hp.max_new_tokens, valid)
        _add(stats, "loss/grpo", loss.detach())
        tokens = PolicyTokens(logp=logp, old_logp=old, ref_logp=ref, advantages=advantages, mask=m, action_mask=m,
                              answer_mask=None if rollout.answer_mask is None else rollout.answer_mask[idx],
                              valid=valid)
        for name, fn in self.loss_terms.items():
            out = fn(tokens)
            value, extra = out if isinstance(out, tuple) else (out, {})
            loss = loss + value
            _add(stats, f"loss/{name}", value.detach())
            for key, v in extra.items():
                _add(stats, key, torch.as_tensor(v, dtype=torch.float32))
        with torch.no_grad():
            mf = m.float()
            tokens_n = mf.sum().clamp(min=1)
            _add(stats, "grpo/clip_fraction", (clipped.float() * mf).sum() / tokens_n)
            _add(stats, "grpo/ratio", (torch.exp(logp - old) * mf).sum() / tokens_n)
            _add(stats, "grpo/entropy", (entropy * mf).sum() / tokens_n)
        return loss

    def _log_rollout(self, rollout: Rollout) -> None:
        """Rollout statistics; ``logp_correct``/``logp_incorrect``: mean per-token log-likelihood (rollout policy)."""
        rewards, correct, ok, n = rollout.rewards, rollout.correct, rollout.valid, rollout.n
        cmf = rollout.cmask.float()
        seq_logp = (rollout.old_logp * cmf).sum(1) / cmf.sum(1).clamp(min=1)
        self._zero_rewards.update(bool((rewards[ok] == 0).all()))
        metrics = {
            "grpo/reward_mean": rewards[ok].mean() if ok.any() else torch.zeros(()),
            "grpo/reward_std": rewards[ok].std() if ok.sum() > 1 else torch.zeros(()),
            "grpo/accuracy": correct[ok].float().mean() if ok.any() else torch.zeros(()),
            "grpo/completion_length": cmf.sum(1).mean(),
            "grpo/dropped": (~ok).float().sum(),
        }
        for name, sel in (("grpo/logp_correct", correct & ok), ("grpo/logp_incorrect", ~correct & ok)):
            if sel.any():
                metrics[name] = seq_logp[sel].mean()
        self.log_dict({k: v.float() for k, v in metrics.items()}, prog_bar=False, batch_size=n)
        self.log("grpo/reward", metrics["grpo/reward_mean"].float(), prog_bar=True, batch_size=n, logger=False)

    # ----------------------------------------------------------------------------------------- validation
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        tokenizer = module_tokenizer(self)
        completion, _ = self.generate(batch["prompt_input_ids"], batch["prompt_attention_mask"], 1, greedy=True,
                                      max_new_tokens=self.hparams.val_max_new_tokens)
        texts = tokenizer.batch_decode(completion, skip_special_tokens=True)
        columns = {k: v for k, v in batch.items() if isinstance(v, list) and k != "prompts"}
        rewards, _ = compute_rewards(self._verifier or self.trainer.datamodule.reward_fn(), batch["prompts"], texts,
                                     columns, drop_bad=self.hparams.drop_bad_rewards)
        self.log("val/accuracy", rewards.mean().to(self.device), prog_bar=True, batch_size=len(texts))

    # ------------------------------------------------------------------------------------------ optimizer
    def configure_optimizers(self):
        optimizer = self.optimizer_factory(decay_groups(self.model))
        warmup = self.hparams.warmup_steps  # then constant (min_ratio 1)
        return {"optimizer": optimizer, "lr_scheduler": warmup_cosine_scheduler(optimizer, warmup, warmup, 1.0)}


def _add(stats: dict[str, list[torch.Tensor]], key: str, value: torch.Tensor) -> None:
    stats.setdefault(key, []).append(value)


# Its public home: checkpoints, ``python -m recipes export`` and the YAMLs name it ``recipes.grpo.GRPOModule``.
GRPOModule.__module__ = "recipes.grpo"
