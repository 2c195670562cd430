"""``python -m recipes diversity``: how varied a causal LM's sampled completions are, and whether they stay valid.

Two evaluations, both from ``--samples`` (K) sampled completions per prompt, metrics averaged over prompts:

- Constrained Random Character (CRC, the proxy task of Selective Layer Restoration, arXiv 2602.06665): prompts ask
  for a random string from an allowed set. ``crc/validity`` = share of answers using only allowed characters;
  ``crc/entropy`` = entropy of the valid answers' characters / log |allowed|; ``crc/distinct`` = distinct answers / K;
  ``crc/valid_distinct`` = distinct valid answers / K.
- ``--prompts_file`` (GSM8K or QA form JSONL, optional): ``task/reward`` (mean reward of the samples),
  ``task/unique`` (distinct completions / K) and ``task/distinct_<n>`` (distinct n-grams of completion tokens / all).

    python -m recipes diversity --model restored/ --prompts_file data/restoration/val.jsonl

``--write_crc_data DIR`` writes the small-scale restoration experiment's data (synthetic tasks plus CRC prompts) and
exits. The model can be a HF folder or a ``CausalLMModule`` / ``GRPOModule`` checkpoint.
"""

from __future__ import annotations

import argparse
import json
import string
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from datamodules.chat_encoding import encode_prompt, pad
from datamodules.diversity import (
    CRC_TEMPLATE,
    DIGIT_POOL,
    CRCValidityReward,
    crc_prompts,
    crc_scores,
    distinct_n,
    unique_rate,
    write_crc_mix,
)
from datamodules.rewards import QAExactMatch
from datamodules.tokenizer import require_chat_template
from datamodules.verifiable_records import read_verifiable_file
from recipes.commands.checks import CommandError, claim_output_dir
from recipes.commands.restore import load_causal_lm

TEMPLATE_FIELDS = ("length", "allowed", "allowed_list")  # what a CRC request fills into --crc_template


@torch.no_grad()
def sample_completions(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, questions: list[str], k: int,
                       temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 16,
                       batch_size: int = 256) -> list[list[tuple[str, list[int]]]]:
    """``k`` sampled ``(text, token ids up to EOS)`` completions per question, asked as a single user turn."""
    require_chat_template(tokenizer, "of --model")
    model.eval()
    device = next(model.parameters()).device
    prompts = [encode_prompt(tokenizer, [{"role": "user", "content": q}, {"role": "assistant", "content": ""}])
               for q in questions for _ in range(k)]
    out: list[tuple[str, list[int]]] = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        ids = pad(chunk, tokenizer.pad_token_id, left=True).to(device)
        mask = pad([[1] * len(p) for p in chunk], 0, left=True).to(device)
        gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature,
                             top_p=top_p, top_k=0, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        for row in gen[:, ids.shape[1]:].tolist():
            tokens = row[:row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row
            tokens = [t for t in tokens if t != tokenizer.pad_token_id]
            out.append((tokenizer.decode(tokens, skip_special_tokens=True), tokens))
    return [out[j:j + k] for j in range(0, len(out), k)]


def evaluate_crc(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, num_prompts: int = 32, k: int = 16,
                 seed: int = 0, pool: str = DIGIT_POOL, set_sizes: tuple[int, ...] = (2, 3, 4), length: int = 6,
                 template: str = CRC_TEMPLATE, **sampling) -> dict[str, float]:
    """CRC validity and diversity, averaged over ``num_prompts`` requests (``crc/entropy`` over prompts with a
    valid answer; 0 when none has one)."""
    problem = template_problem(template)
    if problem:
        raise ValueError(f"CRC template {template!r} {problem}")
    requests = crc_prompts(num_prompts, seed, pool, set_sizes, length)
    groups = sample_completions(model, tokenizer, [r.text(template) for r in requests], k, **sampling)
    scores = [crc_scores([text for text, _ in group], r.allowed) for r, group in zip(requests, groups, strict=True)]
    with_valid = [s["entropy"] for s in scores if s["validity"] > 0]
    out = {f"crc/{key}": sum(s[key] for s in scores) / len(scores) for key in ("validity", "distinct",
                                                                             "valid_distinct")}
    out["crc/entropy"] = sum(with_valid) / len(with_valid) if with_valid else 0.0
    return out


def evaluate_prompts(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str, k: int = 8,
                     max_prompts: int | None = None, answer_mode: str = "strict", template: str = CRC_TEMPLATE,
                     ngrams: tuple[int, ...] = (1, 2), **sampling) -> dict[str, float]:
    """Mean sampled reward and per-prompt diversity of the completions to a GSM8K- or QA-form prompt file.

    GSM8K form is scored by the answer after ``####`` (``answer_mode`` strict) or the last number (flexible), CRC
    prompts in it by their validity; QA form by normalized exact match.
    """
    if max_prompts is not None and max_prompts < 1:  # [:0] would divide by zero, [:-1] drop the last prompt
        raise ValueError(f"max_prompts must be >= 1 (or None: all), got {max_prompts}")
    form, rows = read_verifiable_file(path)
    rows = [row for _, row in rows][:max_prompts]
    groups = sample_completions(model, tokenizer, [r["question"] for r in rows], k, **sampling)
    texts = [[text for text, _ in group] for group in groups]
    questions = [r["question"] for r in rows for _ in range(k)]
    flat = [t for group in texts for t in group]
    if form == "gsm8k":
        rewards = CRCValidityReward(template, answer_mode)(questions, flat, answer=[r["answer"] for r in rows
                                                                                    for _ in range(k)])
    else:
        rewards = QAExactMatch()(questions, flat, answers=[r["answers"] for r in rows for _ in range(k)])
    out = {"task/reward": sum(rewards) / len(rewards),
           "task/unique": sum(unique_rate(group) for group in texts) / len(texts)}
    for n in ngrams:
        out[f"task/distinct_{n}"] = sum(distinct_n([tokens for _, tokens in g], n) for g in groups) / len(groups)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m recipes diversity", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("--model", help="HF model folder or CausalLMModule/GRPOModule checkpoint")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder or 'char' (default: the model's)")
    parser.add_argument("--samples", type=int, default=16, help="K, completions sampled per prompt")
    parser.add_argument("--crc_prompts", type=int, default=32, help="CRC requests (0 skips the CRC evaluation)")
    parser.add_argument("--crc_pool", default=DIGIT_POOL, help="characters the allowed sets are drawn from")
    parser.add_argument("--crc_set_sizes", type=int, nargs="+", default=[2, 3, 4], help="allowed-set sizes")
    parser.add_argument("--crc_length", type=int, default=6, help="requested answer length")
    parser.add_argument("--crc_template", default=CRC_TEMPLATE,
                        help="CRC prompt with {length} and {allowed} (e.g. '137') or {allowed_list} ('1, 3, 7')")
    parser.add_argument("--prompts_file", default=None, help="GSM8K- or QA-form JSONL for task reward and diversity")
    parser.add_argument("--max_prompts", type=int, default=64, help="first N prompts of --prompts_file")
    parser.add_argument("--answer_mode", default="strict", choices=["strict", "flexible"],
                        help="GSM8K answer extraction for --prompts_file")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--max_new_tokens", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=256, help="sequences per generate call")
    parser.add_argument("--seed", type=int, default=0, help="seed of the CRC sets and of sampling")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", help="HF folders: auto (as stored), bfloat16, float32, ...")
    parser.add_argument("--output", default=None, help="append the result as one JSON line to this file")
    parser.add_argument("--write_crc_data", default=None, metavar="DIR",
                        help="write the restoration experiment's sft/train/val JSONL (seeded by --seed) and exit")
    parser.add_argument("--overwrite", action="store_true",
                        help="--write_crc_data: clear a folder that already holds files instead of refusing")
    return parser


def template_problem(template: str) -> str | None:
    """Why ``template`` cannot write CRC prompts (``None`` when it can): it must name the allowed characters
    (``{allowed}`` or ``{allowed_list}``; without them no answer can be valid) and no other placeholder."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:
        return f"is not a format string ({err})"
    unknown = sorted(fields - set(TEMPLATE_FIELDS))
    if unknown:
        return f"has unknown placeholders {unknown}; the known ones are {list(TEMPLATE_FIELDS)}"
    if not fields & {"allowed", "allowed_list"}:
        return "does not say which characters are allowed; it needs {allowed} or {allowed_list}"
    return None


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every argument of ``diversity``, checked in one place; a bad one exits with a message naming it."""
    if args.write_crc_data:
        return
    if not args.model:
        parser.error("--model is required (or --write_crc_data DIR)")
    for name in ("samples", "max_new_tokens", "batch_size", "max_prompts", "crc_length"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not args.temperature > 0:
        parser.error(f"--temperature must be > 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        parser.error(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.crc_prompts < 0 or (args.crc_prompts == 0 and not args.prompts_file):
        parser.error(f"--crc_prompts must be >= 1 unless --prompts_file is given, got {args.crc_prompts}")
    if args.crc_prompts:
        if not args.crc_pool or len(set(args.crc_pool)) != len(args.crc_pool):
            parser.error(f"--crc_pool must be distinct characters, got {args.crc_pool!r}")
        bad = [n for n in args.crc_set_sizes if not 1 <= n <= len(args.crc_pool)]
        if bad:
            parser.error(f"--crc_set_sizes must be between 1 and len(--crc_pool) = {len(args.crc_pool)}, got {bad}")
    problem = template_problem(args.crc_template)
    if problem and (args.crc_prompts or args.prompts_file):
        parser.error(f"--crc_template={args.crc_template!r} {problem}")
    if args.prompts_file and not Path(args.prompts_file).is_file():
        parser.error(f"--prompts_file={args.prompts_file!r} is not a file")
    if args.output and (Path(args.output).is_dir() or not Path(args.output).parent.is_dir()):
        parser.error(f"--output={args.output!r} must be a file in an existing folder (one JSON line is appended)")


def main(argv: list[str] | None = None) -> dict:
    """Evaluate ``--model`` (or write the CRC data); prints and returns the metrics."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    if args.write_crc_data:
        claim_output_dir(args.write_crc_data, "--write_crc_data", args.overwrite)
        paths = write_crc_mix(args.write_crc_data, seed=args.seed)
        print(json.dumps({name: str(p) for name, p in paths.items()}))
        return {name: str(p) for name, p in paths.items()}
    model, tokenizer = load_causal_lm(args.model, args.tokenizer, "--model", args.dtype)
    model.to(args.device)
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens,
                "batch_size": args.batch_size}
    result: dict = {"model": args.model}
    torch.manual_seed(args.seed)
    if args.crc_prompts:
        result.update(evaluate_crc(model, tokenizer, args.crc_prompts, args.samples, args.seed, args.crc_pool,
                                   tuple(args.crc_set_sizes), args.crc_length, args.crc_template, **sampling))
    if args.prompts_file:
        result.update(evaluate_prompts(model, tokenizer, args.prompts_file, args.samples, args.max_prompts,
                                       args.answer_mode, args.crc_template, **sampling))
    line = json.dumps(result)
    print(line)
    if args.output:
        try:
            with open(args.output, "a") as f:
                f.write(line + "\n")
        except OSError as err:
            raise CommandError(f"--output={args.output!r} cannot be written: {err.strerror or err}") from err
    return result
