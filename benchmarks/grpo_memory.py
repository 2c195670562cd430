"""Peak host memory of GRPO's log-prob passes plus one update: chunked head (ours) vs full-vocabulary logits.

A Qwen2-shaped model with the Qwen2.5 vocabulary (151,936) and a small hidden size, 64 completions x 256 tokens
(after a 32-token prompt), on the CPU. The measured phase is one rollout batch's work after generation: the
old-policy and reference log-prob passes (no grad) and one update (log-probs with grad, entropy statistic, clipped
surrogate + k3 KL, backward), through ``GRPOModule.rollout_logprobs`` and ``mini_batch_loss``. Ours: the module's
default ``logprob_chunk_size``, all completions in one pass and one update. The baseline: ``logprob_chunk_size=None``
(``policy_logits`` -> ``token_logprobs`` / ``token_entropy`` on full [n, T, V] fp32 logits) in passes of
``--baseline-batch`` completions (gradients accumulated), so that it fits this machine; one pass over all
completions, as the module did before, would hold ``completions / baseline-batch`` times more. Each variant runs in
its own child process (peak = ``ru_maxrss``), alternating; their log-probs, loss and gradients are compared.
Prints one JSON line.

    python benchmarks/grpo_memory.py [--completions 64 --tokens 256 --vocab 151936 --repeats 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from peak_memory import phase_report, phase_start, run_child  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from recipes.grpo import GRPOModule  # noqa: E402
from recipes.grpo.rollout import Rollout  # noqa: E402

KL_COEF = 0.04


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--completions", type=int, default=64)
    p.add_argument("--tokens", type=int, default=256, help="completion tokens")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--baseline-batch", type=int, default=8, help="completions per pass of the unchunked baseline")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--child", choices=["chunked", "full"], default=None)
    p.add_argument("--save", default=None, help="(child) where to save log-probs, loss and gradients")
    return p.parse_args(argv)


def inputs(args) -> tuple[torch.nn.Module, torch.nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("qwen2", vocab_size=args.vocab, hidden_size=args.hidden,
                               intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                               num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                               max_position_embeddings=args.prompt + args.tokens)
    model = AutoModelForCausalLM.from_config(cfg)
    reference = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():  # a reference that differs from the policy, so the KL is not zero
        for p in reference.parameters():
            p.add_(0.01 * torch.randn_like(p))
    n, t = args.completions, args.tokens
    lengths = torch.randint(t // 4, t + 1, (n,))
    batch = {"prompt_ids": torch.randint(0, args.vocab, (n, args.prompt)),
             "prompt_mask": torch.ones(n, args.prompt, dtype=torch.long),
             "completion": torch.randint(0, args.vocab, (n, t)),
             "cmask": (torch.arange(t) < lengths[:, None]).long(),
             "advantages": torch.randn(n)}
    batch["prompt_mask"][: n // 2, : args.prompt // 4] = 0  # some left padding
    return model, reference, batch


def child(args) -> None:
    model, reference, b = inputs(args)
    chunked = args.child == "chunked"
    # mu=2 so that the old-policy pass runs; ours: the default chunk size, all completions in one pass and one update
    module = GRPOModule(model_config={"model_type": "qwen2"}, kl_coef=KL_COEF, mu=2, max_new_tokens=args.tokens,
                        **({} if chunked else {"logprob_chunk_size": None, "logprob_batch_size": args.baseline_batch}))
    module.model = model
    module._reference.append(reference)
    n = args.completions
    valid = torch.ones(n, dtype=torch.bool)
    rollout = Rollout(prompt_ids=b["prompt_ids"], prompt_mask=b["prompt_mask"], completion=b["completion"],
                      cmask=b["cmask"], rewards=torch.zeros(n), correct=valid, valid=valid,
                      advantages=b["advantages"], loss_mask=b["cmask"])
    stats: dict[str, list[torch.Tensor]] = {}
    phase_start()
    module.rollout_logprobs(rollout)
    size = n if chunked else args.baseline_batch
    loss = 0.0
    for start in range(0, n, size):  # the baseline accumulates gradients over passes (sequence_mean splits exactly)
        idx = torch.arange(start, min(start + size, n))
        part = module.mini_batch_loss(rollout, idx, stats) * (len(idx) / n)
        part.backward()
        loss = loss + part.detach()
    report = phase_report(variant=args.child)
    entropy = float(sum(e * (size / n) for e in stats["grpo/entropy"]))
    logp = torch.cat([module.completion_logprobs(model, *rollout.inputs(slice(i, i + 8)))[0].detach()
                      for i in range(0, n, 8)])  # after the phase: the current policy's log-probs, for comparison
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    torch.save({"old": rollout.old_logp, "ref": rollout.ref_logp, "logp": logp, "loss": torch.as_tensor(loss),
                "entropy": entropy, "grads": grads}, args.save)
    print(report)


def max_diff(a: dict, b: dict) -> dict[str, float]:
    grads = max(float((a["grads"][k] - b["grads"][k]).abs().max()) for k in a["grads"])
    assert a["grads"].keys() == b["grads"].keys()
    return {"old_logp": float((a["old"] - b["old"]).abs().max()), "ref_logp": float((a["ref"] - b["ref"]).abs().max()),
            "logp": float((a["logp"] - b["logp"]).abs().max()), "loss": float((a["loss"] - b["loss"]).abs()),
            "grad": grads, "entropy_rel": abs(a["entropy"] - b["entropy"]) / max(abs(b["entropy"]), 1e-12)}


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    if args.child:
        child(args)
        return {}
    shape = ["--completions", str(args.completions), "--tokens", str(args.tokens), "--prompt", str(args.prompt),
             "--vocab", str(args.vocab), "--hidden", str(args.hidden), "--layers", str(args.layers),
             "--baseline-batch", str(args.baseline_batch)]
    runs: dict[str, list[dict]] = {"chunked": [], "full": []}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for variant in (("chunked", "full") if rep % 2 == 0 else ("full", "chunked")):
                runs[variant].append(run_child(__file__, [*shape, "--child", variant,
                                                          "--save", f"{tmp}/{variant}.pt"]))
        diffs = max_diff(torch.load(f"{tmp}/chunked.pt"), torch.load(f"{tmp}/full.pt"))
    ours = max(r["phase_peak_mb"] for r in runs["chunked"])
    base = min(r["phase_peak_mb"] for r in runs["full"])
    line = {"benchmark": "grpo_memory", "completions": args.completions, "tokens": args.tokens,
            "vocab": args.vocab, "hidden": args.hidden,
            "chunk_size": GRPOModule(model_config={"model_type": "qwen2"}).hparams.logprob_chunk_size,
            "baseline_completions_per_pass": args.baseline_batch,
            "ours_phase_peak_mb": ours, "baseline_phase_peak_mb": base, "ratio": round(ours / base, 3),
            "ours_seconds": min(r["seconds"] for r in runs["chunked"]),
            "baseline_seconds": min(r["seconds"] for r in runs["full"]),
            "full_logits_fp32_gb_all_completions": round(args.completions * args.tokens * args.vocab * 4 / 1e9, 2),
            "max_abs_diff": {k: float(f"{v:.3g}") for k, v in diffs.items()},
            "equal_1e-5": all(v <= 1e-5 for k, v in diffs.items() if k != "entropy_rel"),
            "runs": runs, "device": "cpu", "torch": torch.__version__}
    print(json.dumps(line))
    return line


if __name__ == "__main__":
    main()
