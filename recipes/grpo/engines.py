"""Rollout engines: how GRPO samples its completions. One function, :func:`sample_completions`, and a small table.

- ``generate``: one batched ``model.generate`` over the left-padded prompts with the dynamic KV cache.
- ``generate_static``: the same call with a static (preallocated) KV cache, which lets a GPU reuse fixed shapes.
- ``paged``: transformers' continuous batching with a paged KV cache (``model.generate_batch``): prompts go in
  unpadded, finished sequences leave the batch at once and new ones take their place. It runs on the policy's own
  weights (no copy), builds its cache for the rollout and frees it after (nothing is held during the update), and
  sizes the cache to ``memory_fraction`` of the free accelerator memory (of the free RAM on a CPU).

Every engine returns the same thing: completion ids [P * num, T], prompt-major (the ``num`` samples of a prompt are
consecutive), padded after the first EOS, and their mask (1 up to and including the first EOS); greedy outputs are
equal across engines. Each runs in eval mode under ``no_grad`` and gives every module its mode (and the model its
attention implementation) back after.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase

from callbacks.core.modes import eval_mode
from recipes.grpo.loss import completion_mask

ENGINES = ("generate", "generate_static", "paged")
# what the paged engine passes to transformers (5.17 and 5.25 have all of them; the tokens of a cache block are its
# ``page_size`` since 5.17 deprecated ``block_size``)
_BATCH_ARGS = ("generation_config", "continuous_batching_config", "progress_bar")
_CB_FIELDS = ("max_memory_percent", "num_blocks")
# continuous batching logs warnings on ordinary rollouts (an attention switch, a dropped logits processor) to its own
# console handler (``ContinuousBatchingLogger``, not propagated); the modules' own loggers are kept quiet too
_CB_LOGGERS = ("ContinuousBatchingLogger", "transformers.generation.continuous_batching")


def check_engine(engine: str, memory_fraction: float = 0.5) -> None:
    """Raise on an unknown ``engine`` (naming ``rollout_engine`` and the choices), on a ``memory_fraction`` outside
    (0, 1], and when ``paged`` needs a transformers release this environment lacks (checked on the API itself)."""
    if engine not in ENGINES:
        raise ValueError(f"rollout_engine must be one of {ENGINES}, got {engine!r}")
    if not 0 < memory_fraction <= 1:
        raise ValueError(f"rollout_memory_fraction must be in (0, 1], got {memory_fraction}")
    if engine == "paged":
        missing = _paged_api_missing()
        if missing:
            import transformers

            raise RuntimeError(f"rollout_engine='paged' needs transformers' continuous batching with {missing} "
                               f"(transformers 5.17 and later have it; this is {transformers.__version__}); "
                               "use rollout_engine='generate' or upgrade transformers")


def _paged_api_missing() -> str | None:
    """What of the continuous-batching API the paged engine uses is missing here, or ``None``."""
    from transformers import GenerationMixin

    batch = getattr(GenerationMixin, "generate_batch", None)
    if batch is None:
        return "generate_batch"
    params = inspect.signature(batch).parameters
    for name in _BATCH_ARGS:
        if name not in params:
            return f"generate_batch({name}=...)"
    try:
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
    except ImportError:
        return "ContinuousBatchingConfig"
    fields = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
    for name in _CB_FIELDS:
        if name not in fields:
            return f"ContinuousBatchingConfig.{name}"
    if not fields & {"page_size", "block_size"}:
        return "ContinuousBatchingConfig.page_size"
    return None


def _block_tokens(config_class: type) -> int:
    """Tokens a KV-cache block holds by default: ``page_size`` (transformers 5.17+), else ``block_size``."""
    defaults = {f.name: f.default for f in dataclasses.fields(config_class)}
    return defaults.get("page_size", defaults.get("block_size"))


def sampling_settings(temperature: float, top_p: float, greedy: bool = False) -> dict:
    """The sampling arguments every engine gets: greedy, or sampling at ``temperature`` / ``top_p`` with no top-k
    (the log-probs of the update are taken at the same temperature)."""
    if greedy:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}


@torch.no_grad()
def sample_completions(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompt_ids: torch.Tensor,
                       prompt_mask: torch.Tensor, num: int, max_new_tokens: int, sampling: dict,
                       engine: str = "generate", memory_fraction: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """``num`` completions per (left-padded) prompt from ``engine``, in eval mode; ``sampling``: ``generate``'s
    sampling arguments (``do_sample``, ``temperature``, ``top_p``, ``top_k``), the same for every engine.

    Returns completion ids [P * num, T] (prompt-major), padded after the first EOS, and their mask (1 up to and
    including the first EOS); ``memory_fraction``: the paged engine's share of the free memory for its KV cache.
    """
    check_engine(engine, memory_fraction)
    with eval_mode(model):  # every module's own mode back after
        if engine == "paged":
            completion = _paged(model, tokenizer, prompt_ids, prompt_mask, num, max_new_tokens, sampling,
                                memory_fraction)
        else:
            ids, mask = prompt_ids.repeat_interleave(num, 0), prompt_mask.repeat_interleave(num, 0)
            cache = {"cache_implementation": "static"} if engine == "generate_static" else {}
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                 use_cache=True, **cache, **sampling)
            completion = out[:, ids.shape[1]:]
    cmask = completion_mask(completion, tokenizer.eos_token_id)
    return completion.masked_fill(cmask == 0, tokenizer.pad_token_id), cmask


def _paged(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompt_ids: torch.Tensor,
           prompt_mask: torch.Tensor, num: int, max_new_tokens: int, sampling: dict,
           memory_fraction: float) -> torch.Tensor:
    """Completion ids [P * num, T] (T: the longest completion, as ``generate`` returns) from ``generate_batch``."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    prompts = [row[m.bool()].tolist() for row, m in zip(prompt_ids, prompt_mask, strict=True) for _ in range(num)]
    config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, **sampling)
    # a cache as large as this rollout needs (every sequence at full length at once), within memory_fraction
    blocks = -(-sum(len(p) + max_new_tokens for p in prompts) // _block_tokens(ContinuousBatchingConfig)) + 1
    cb = {"max_memory_percent": memory_fraction, "num_blocks": blocks}
    if "seed" in {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}:
        cb["seed"] = int(torch.randint(2**31 - 1, ()))  # from the global generator: seeded runs repeat
    attention = model.config._attn_implementation
    try:
        with _quiet(*_CB_LOGGERS):
            try:
                results = _generate_batch(model, prompts, config, ContinuousBatchingConfig(**cb))
            except MemoryError:  # the whole rollout does not fit at once: the largest cache within memory_fraction
                del cb["num_blocks"]
                try:
                    results = _generate_batch(model, prompts, config, ContinuousBatchingConfig(**cb))
                except (MemoryError, ValueError) as err:  # no cache sector fits at all
                    raise MemoryError(f"the paged rollout engine's KV cache does not fit in rollout_memory_fraction="
                                      f"{memory_fraction} of the free memory ({err})") from err
    finally:  # the manager switches to a paged attention while it runs; training keeps the model's own
        if model.config._attn_implementation != attention:
            model.set_attn_implementation(attention)
    outputs = list(results.values())
    failed = [o for o in outputs if o.error is not None]
    if len(outputs) != len(prompts) or failed:
        errors = sorted({o.error for o in failed}) or "none"
        raise RuntimeError(f"the paged rollout engine finished {len(outputs) - len(failed)} of {len(prompts)} "
                           f"completions (errors: {errors}); rollout_engine='generate' avoids it")
    width = max(1, max(len(o.generated_tokens) for o in outputs))
    completion = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    for i, o in enumerate(outputs):
        completion[i, :len(o.generated_tokens)] = torch.tensor(o.generated_tokens, dtype=torch.long)
    return completion.to(prompt_ids.device)


def _generate_batch(model: torch.nn.Module, prompts: list[list[int]], config: GenerationConfig, cb) -> dict:
    """One ``generate_batch`` call without a progress bar, its cache freed after (no persistent manager)."""
    return model.generate_batch(prompts, generation_config=config, continuous_batching_config=cb, progress_bar=False)


@contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Only errors of the loggers ``names`` (and their children) reach the console inside; their levels back after."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
