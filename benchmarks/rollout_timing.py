"""Seconds of one GRPO rollout step split into generation, log-prob passes (old policy + reference) and update, at a
random-init Qwen2 shape in bf16; ``gpu_check.py``'s ``grpo`` and ``grpo_engines`` checks measure with it.

``engine`` is passed to ``GRPOModule(rollout_engine=...)``.
Two rollout steps run, the first a warm-up; the figures are the second's.
"""

from __future__ import annotations

import gc
import time

import torch


def rollout_times(shape: dict, prompts: int, g: int, new_tokens: int, cuda: bool, engine: str = "generate") -> dict:
    """Generation / log-prob passes / update seconds, completion tokens and peak memory of one rollout step."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from datamodules.tokenizer import build_char_tokenizer
    from recipes.grpo import GRPOModule
    from recipes.grpo.rollout import Rollout

    device = torch.device("cuda" if cuda else "cpu")
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("qwen2", **shape, tie_word_embeddings=True, max_position_embeddings=4096)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    module = GRPOModule(model_config={"model_type": "qwen2"}, num_generations=g, max_new_tokens=new_tokens, mu=2,
                        kl_coef=0.04, rollout_engine=engine)
    module.tokenizer = build_char_tokenizer()
    module.model = model.train()
    module._reference.append(AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).to(device).eval()
                             .requires_grad_(False))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    prompt_ids = torch.randint(10, len(module.tokenizer), (prompts, 64), device=device)
    prompt_mask = torch.ones_like(prompt_ids)

    def sync() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    rows = []
    for _ in range(2):  # the first is a warm-up
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = sync()
        completion, cmask = module.generate(prompt_ids, prompt_mask, g)
        t1 = sync()
        n = completion.shape[0]
        valid = torch.ones(n, dtype=torch.bool, device=device)
        rollout = Rollout(prompt_ids=prompt_ids.repeat_interleave(g, 0),
                          prompt_mask=prompt_mask.repeat_interleave(g, 0), completion=completion, cmask=cmask,
                          rewards=torch.zeros(n, device=device), correct=valid, valid=valid,
                          advantages=torch.randn(n, device=device), loss_mask=cmask)
        module.rollout_logprobs(rollout)
        t2 = sync()
        stats: dict = {}
        for idx in module.mini_batches(n):
            optimizer.zero_grad(set_to_none=True)
            module.mini_batch_loss(rollout, idx.to(device), stats).backward()
            optimizer.step()
        t3 = sync()
        rows.append({"generation_s": t1 - t0, "logprob_passes_s": t2 - t1, "update_s": t3 - t2,
                     "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None})
    last = {k: (round(v, 3) if v is not None else None) for k, v in rows[-1].items()}
    rollout_s = round(last["generation_s"] + last["logprob_passes_s"] + last["update_s"], 3)
    tokens = int(cmask.sum())
    return {"completion_tokens": tokens, "logprob_chunk_size": module.hparams.logprob_chunk_size,
            "mini_batches": module.updates_per_rollout, **last, "rollout_s": rollout_s,
            "completion_tokens_per_s": round(tokens / rows[-1]["generation_s"], 1),
            "generation_share": round(rows[-1]["generation_s"] / rollout_s, 3)}
