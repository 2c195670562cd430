"""GRPO (group relative policy optimization, arXiv 2402.03300) for any Hugging Face causal LM, with verifiable rewards.

One training step = one rollout batch: G completions per prompt from the rollout engine (``grpo.engines``),
rewards, group-normalized advantages, the rollout policy's log-probs cached, then ``mu`` passes over
``num_mini_batches`` mini-batches, one optimizer step each (manual optimization). ``trainer.max_steps`` and the
checkpoint names count optimizer steps, exactly ``mu * num_mini_batches`` per rollout batch; the logged metrics'
``step`` counts rollout batches (one row each).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from transformers import PreTrainedTokenizerBase

from callbacks.core.modes import dropout_off
from callbacks.core.policy_tokens import PolicyTokens
from callbacks.run.preemption import stop_if_preempted
from datamodules.rewards import RewardFn, compute_rewards
from datamodules.tokenizer import load_tokenizer
from recipes.checkpoints import CheckpointError, record_module_class
from recipes.grpo import answer_span
from recipes.grpo.checks import ZeroRewardStreak, check_sequence_budget, check_sft_fits_verifier
from recipes.grpo.engines import check_engine, sample_completions, sampling_settings
from recipes.grpo.logprobs import completion_logits, completion_logprobs
from recipes.grpo.loss import AGGREGATIONS, SCALES, group_advantages, grpo_objective
from recipes.grpo.reference import frozen_reference
from recipes.grpo.rollout import Rollout, mini_batch_indices, rollout_metrics, score_completions
from recipes.grpo.sft_start import load_sft_weights, read_sft_checkpoint, sft_architecture, sft_data_settings
from recipes.grpo.sft_warmup import sft_warmup
from recipes.parts.hf_model import build_causal_lm, module_tokenizer
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
        rollout_engine / rollout_memory_fraction: how rollouts and validation answers are sampled (``generate``,
            ``generate_static``, ``paged``) and the ``paged`` KV cache's cap (share of free memory): ``grpo.engines``.
        mu: optimizer passes over each rollout batch (1 = on-policy, the ratio is exactly 1).
        num_mini_batches: mini-batches per pass (one optimizer step each).
        eps_low / eps_high: clip range [1 - eps_low, 1 + eps_high] (DAPO's clip-higher: eps_high 0.28).
        kl_coef: weight of the k3 KL to the frozen initial policy (0 = no reference model is kept).
        scale_rewards: advantage std scaling: ``group`` (GRPO), ``batch`` or ``none`` (Dr. GRPO).
        loss_aggregation: ``sequence_mean`` (GRPO), ``token_mean`` (DAPO), ``max_length`` (Dr. GRPO: sum / N*max_new)
        reward_funcs: reward callables ``(prompts, completions, **columns) -> list[float]``, summed;
            ``None`` uses the data module's verifier (``reward_fn()``), which also defines ``grpo/accuracy``.
        drop_bad_rewards: drop (count in ``grpo/dropped``) completions a reward function fails on, not stop.
        max_grad_norm: gradient clipping (manual optimization: ``trainer.gradient_clip_val`` must stay unset).
        val_max_new_tokens: greedy answer budget in validation (``val/accuracy``).
        logprob_chunk_size: completion positions projected through the output head at a time when computing
            log-probs and entropies (fp32 full-vocabulary logits exist for one chunk only, in forward and
            backward; see ``recipes.parts.chunked_head``); ``None`` projects all positions of a pass at once, as
            does a model whose logits are not ``head(hidden)`` (checked once per model, with a warning).
        logprob_batch_size: completions per forward of the no-grad old-policy and reference log-prob passes;
            ``None`` uses the update mini-batch size (completions / ``num_mini_batches``).
        logprob_dropout: keep dropout on in log-prob passes and updates (off: an unchanged policy's ratio is 1).
        gradient_checkpointing: recompute block activations in backward (non-reentrant).
        zero_reward_patience: warn when every reward of this many consecutive rollout batches is 0.
    """

    defining_settings: frozenset[str] = frozenset({"model_path", "model_config", "tokenizer_name", "sft_checkpoint"})

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
        rollout_engine: str = "generate",
        rollout_memory_fraction: float = 0.5,
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
        logprob_dropout: bool = False,
        gradient_checkpointing: bool = False,
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
        check_engine(rollout_engine, rollout_memory_fraction)
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
        self._saved_reference: dict[str, torch.Tensor] | None = None  # the reference restored from a checkpoint
        # what the policy is built from (given, or the sft_checkpoint's): the hparams stay what the user gave
        self.architecture: tuple[str | None, dict | None] = (model_path, model_config)
        self._warmup_done = False  # saved as the checkpoint's ``grpo_sft_done``: the warm-up runs once per run
        self._verifier: RewardFn | None = None
        self._sft_data_hparams: dict | None = None  # what the sft_checkpoint was trained on
        self._zero_rewards = ZeroRewardStreak(zero_reward_patience)

    # --------------------------------------------------------------------------------------------- model
    @property
    def updates_per_rollout(self) -> int:
        return self.hparams.mu * self.hparams.num_mini_batches

    def configure_model(self) -> None:
        """Build the policy once: from ``sft_checkpoint`` when one is given (:meth:`start_from_sft`), else from
        ``model_path`` / ``model_config``. Under a trainer a missing ``sft_checkpoint`` file is left to the GRPO
        checkpoint being restored (:meth:`on_load_checkpoint`), so validating or resuming never needs the SFT file."""
        if self.model is not None or (self.tokenizer is None and self._trainer is None):
            return  # without a tokenizer yet (load_from_checkpoint), on_load_checkpoint builds it
        sft = self.hparams.sft_checkpoint
        if sft is None:
            self.model = self._build_policy()
        elif self._trainer is None or Path(sft).is_file():
            self.start_from_sft()

    def start_from_sft(self) -> None:
        """Start from ``sft_checkpoint``, the one place that reads it: take its architecture (unless ``model_path`` or
        ``model_config`` gives one), build the policy with its weights, and record the data settings it was trained
        on (checked against the verifier at fit start). The architecture is saved in this module's checkpoints
        (``grpo_architecture``), so they never need the SFT file; restoring one overwrites these weights."""
        hp = self.hparams
        ckpt = read_sft_checkpoint(hp.sft_checkpoint)
        if hp.model_path is None and hp.model_config is None:
            self.architecture = sft_architecture(ckpt)
        self.model = self._build_policy()
        load_sft_weights(self.model, ckpt, hp.sft_checkpoint)
        self._sft_data_hparams = sft_data_settings(ckpt)

    def _build_policy(self) -> torch.nn.Module:
        return build_causal_lm(*self.architecture, module_tokenizer(self),
                               gradient_checkpointing=self.hparams.gradient_checkpointing)

    def register_loss_term(self, name: str, fn: LossTerm, needs_answer_mask: bool = False) -> None:
        """Add ``fn(PolicyTokens) -> loss`` (or ``(loss, {metric: value})``) to every mini-batch's loss.

        The term's value is logged as ``loss/<name>`` and its metrics under their own names. Callbacks call this
        from ``on_fit_start``; registering the same name again replaces the term.
        """
        self.loss_terms[name] = fn
        if needs_answer_mask:
            self._answer_mask_terms.add(name)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Save what continuing needs beyond the weights: the warm-up flag, the architecture, the KL reference."""
        checkpoint["grpo_sft_done"] = self._warmup_done
        checkpoint["grpo_architecture"] = {"model_path": self.architecture[0], "model_config": self.architecture[1]}
        if self._reference:
            checkpoint["grpo_reference"] = self._reference[0].state_dict()
        record_module_class(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Restore the warm-up flag and the KL reference; without a policy yet (``load_from_checkpoint``, or
        ``sft_checkpoint`` gone) build it from the checkpoint's architecture: its weights follow from it."""
        self._warmup_done = checkpoint.get("grpo_sft_done", False)
        self._saved_reference = checkpoint.get("grpo_reference")
        if self.model is not None:
            return
        if self.tokenizer is None and self._trainer is None:  # load_from_checkpoint
            self.tokenizer = load_tokenizer(checkpoint.get("datamodule_hyper_parameters", {}).get("tokenizer", "char"))
        saved = checkpoint.get("grpo_architecture") or checkpoint.get("hyper_parameters", {})
        if self.architecture == (None, None):
            self.architecture = (saved.get("model_path"), saved.get("model_config"))
        self.model = self._build_policy()

    def on_fit_start(self) -> None:
        """Check the sequence budget, run the SFT warm-up once, freeze the KL reference, check the SFT start."""
        hp, data = self.hparams, self.trainer.datamodule
        check_sequence_budget(self.model, getattr(data, "datasets", {}),
                              max(hp.max_new_tokens, hp.val_max_new_tokens or 0), hp.sft_steps)
        if hp.sft_steps > 0 and not self._warmup_done:
            sft_warmup(self.model, data.sft_dataloader(), hp.sft_steps, hp.sft_lr, self.device,
                       before_step=lambda: stop_if_preempted(self.trainer, "GRPO's SFT warm-up"))
        self._warmup_done = True
        if hp.kl_coef > 0 and not self._reference:
            self._reference.append(self._initial_policy())
        self._verifier = data.reward_fn()
        if hp.sft_checkpoint and self.reward_funcs is None:
            check_sft_fits_verifier(self._sft_data_hparams, self._verifier, hp.sft_checkpoint)

    def _initial_policy(self) -> torch.nn.Module:
        """The frozen KL reference: the policy now (a run's start, after the warm-up), or the checkpoint's."""
        saved, self._saved_reference = self._saved_reference, None
        return frozen_reference(self.model, saved, self.global_step if self.trainer.ckpt_path else None)

    # ------------------------------------------------------------------------------------------ rollouts
    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, num: int, greedy: bool = False,
                 max_new_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``num`` completions per prompt at the rollout's sampling settings (or greedy) from ``rollout_engine``:
        ids [P * num, T], prompt-major, and their mask (see ``recipes.grpo.engines.sample_completions``)."""
        hp = self.hparams
        return sample_completions(self.model, module_tokenizer(self), prompt_ids, prompt_mask, num,
                                  max_new_tokens or hp.max_new_tokens, sampling_settings(hp.temperature, hp.top_p,
                                  greedy), hp.rollout_engine, hp.rollout_memory_fraction)

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

    def answer_mask(self, completion: torch.Tensor, cmask: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Tokens of the final answer: from the last ``####`` (or the last line) to the end of the completion."""
        return answer_span.answer_mask(module_tokenizer(self), completion, cmask, texts)

    # ------------------------------------------------------------------------------------------- training
    def training_step(self, batch: dict, batch_idx: int) -> None:
        """One rollout batch: sample and score completions (in eval mode), then ``mu`` passes of mini-batch updates,
        forward and backward without dropout unless ``logprob_dropout`` (``callbacks.core.modes.dropout_off``)."""
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        stats: dict[str, list[torch.Tensor]] = {}
        with nullcontext() if self.hparams.logprob_dropout else dropout_off(self.model):
            rollout = self.rollout(batch)
            forward = self.rollout_logprobs(rollout)
            self._log_rollout(rollout)
            for idx in self.mini_batches(rollout.n):
                loss = self.mini_batch_loss(rollout, idx.to(self.device), stats, forward)
                forward = None  # the first (with one update per rollout, the only) mini-batch's own forward
                optimizer.zero_grad()
                self.manual_backward(loss)
                if self.hparams.max_grad_norm is not None:
                    self.clip_gradients(optimizer, gradient_clip_val=self.hparams.max_grad_norm,
                                        gradient_clip_algorithm="norm")
                optimizer.step()
                scheduler.step()
                _add(stats, "train/loss", loss.detach())
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
        scores = score_completions(self._verifier or self.trainer.datamodule.reward_fn(), self.reward_funcs, prompts,
                                   texts, columns, hp.drop_bad_rewards)
        rewards, correct, valid = (t.to(self.device) for t in scores)
        return Rollout(prompt_ids=batch["prompt_input_ids"].repeat_interleave(g, 0),
                       prompt_mask=batch["prompt_attention_mask"].repeat_interleave(g, 0),
                       completion=completion, cmask=cmask, rewards=rewards, correct=correct, valid=valid,
                       advantages=group_advantages(rewards, g, hp.scale_rewards, valid),
                       loss_mask=cmask * valid.unsqueeze(1).long(),
                       answer_mask=self.answer_mask(completion, cmask, texts) if self._answer_mask_terms else None)

    def rollout_logprobs(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Fill ``ref_logp`` (the frozen reference) and ``old_logp`` (the rollout policy): their one owner.

        With one update per rollout the rollout policy is the current one, so ``old_logp`` is that update's own
        forward (with grad, every completion in order), returned as ``(logp, entropy)`` for :meth:`mini_batch_loss`
        to reuse: the ratio is exactly 1 and no extra forward is spent. Otherwise a no-grad pass gives it (``None``
        is returned).
        """
        if self._reference:
            rollout.ref_logp = self.batched_logprobs(self._reference[0], rollout)
        if self.updates_per_rollout > 1:
            rollout.old_logp = self.batched_logprobs(self.model, rollout)
            return None
        every = torch.arange(rollout.n, device=self.device)
        forward = self.completion_logprobs(self.model, *rollout.inputs(every), entropy=True)
        rollout.old_logp = forward[0].detach()
        return forward

    def mini_batches(self, n: int) -> Iterator[torch.Tensor]:
        """Completion indices of each optimizer step: ``mu`` shuffled passes of exactly ``num_mini_batches``."""
        hp = self.hparams
        seed = int(self.global_step) + 1_000_003 * int(self.current_epoch)
        return mini_batch_indices(n, hp.mu, hp.num_mini_batches, seed)

    def mini_batch_loss(self, rollout: Rollout, idx: torch.Tensor, stats: dict[str, list[torch.Tensor]],
                        forward: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> torch.Tensor:
        """Clipped surrogate (+ k3 KL, + registered terms) on the completions ``idx``; metrics added to ``stats``.

        ``forward``: the policy's ``(logp, entropy)`` on ``idx`` when :meth:`rollout_logprobs` already computed it.
        """
        hp = self.hparams
        if forward is None:
            forward = self.completion_logprobs(self.model, *rollout.inputs(idx), entropy=True)
        logp, entropy = forward
        old, m, advantages = rollout.old_logp[idx], rollout.loss_mask[idx], rollout.advantages[idx]
        valid = rollout.valid[idx]  # dropped completions count in no denominator
        ref = rollout.ref_logp[idx] if rollout.ref_logp is not None else None
        loss, metrics = grpo_objective(logp, old, advantages, m, valid, ref, entropy, eps_low=hp.eps_low,
                                       eps_high=hp.eps_high, kl_coef=hp.kl_coef, aggregation=hp.loss_aggregation,
                                       max_new_tokens=hp.max_new_tokens)
        for key, value in metrics.items():
            _add(stats, key, value)
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
        return loss

    def _log_rollout(self, rollout: Rollout) -> None:
        """The rollout batch's statistics (``rollout_metrics``); warns on a streak of all-zero rewards."""
        self._zero_rewards.update(bool((rollout.rewards[rollout.valid] == 0).all()))
        metrics = rollout_metrics(rollout)
        self.log_dict(metrics, prog_bar=False, batch_size=rollout.n)
        self.log("grpo/reward", metrics["grpo/reward_mean"], prog_bar=True, batch_size=rollout.n, logger=False)

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
        if self.model is None:  # configure_model left it to a GRPO checkpoint, and none was restored
            raise CheckpointError(f"sft_checkpoint {self.hparams.sft_checkpoint} does not exist (a CausalLMModule "
                                  "checkpoint), and no GRPO checkpoint was restored to build the model from")
        optimizer = self.optimizer_factory(decay_groups(self.model))
        warmup = self.hparams.warmup_steps  # then constant (min_ratio 1)
        return {"optimizer": optimizer, "lr_scheduler": warmup_cosine_scheduler(optimizer, warmup, warmup, 1.0)}


def _add(stats: dict[str, list[torch.Tensor]], key: str, value: torch.Tensor) -> None:
    stats.setdefault(key, []).append(value)

