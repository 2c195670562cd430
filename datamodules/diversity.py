"""Generation diversity metrics and the Constrained Random Character (CRC) proxy task (arXiv 2602.06665).

Metrics over the ``K`` sampled completions of one prompt (callers average them over prompts):

- distinct-n (Li et al., 2016): ``|unique n-grams| / |n-grams|`` pooled over the completions.
- unique-completion rate: ``|unique completions| / K``.
- CRC validity: share of completions that are non-empty and use only the allowed characters.
- CRC entropy: Shannon entropy of the characters of the valid completions, divided by ``log |allowed|``
  (1 = every allowed character equally often, 0 = a single character).

The CRC prompts ask for a random string from an explicit character set. ``CRCValidityReward`` turns validity
into a GRPO reward (other prompts fall back to the GSM8K answer match), and ``write_crc_mix`` writes the small-scale
restoration experiment's data: the synthetic tasks plus CRC prompts, in GSM8K form (digit sets, so every answer is a
number the existing readers accept).
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

from datamodules.rewards import GSM8KReward
from datamodules.synthetic_tasks import make_problems

CRC_TEMPLATE = "Random {length} from {allowed}"
DIGIT_POOL = "123456789"


# ----------------------------------------------------------------------------------------------------- metrics
def distinct_n(completions: Sequence[Sequence[Hashable]], n: int) -> float:
    """Distinct unique n-grams over all n-grams of ``completions`` (sequences of tokens or characters); 0 if none."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    grams = [tuple(seq[i:i + n]) for seq in completions for i in range(len(seq) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def unique_rate(completions: Sequence[Hashable]) -> float:
    """Share of distinct completions: ``|set(completions)| / len(completions)``."""
    if not completions:
        raise ValueError("unique_rate needs at least one completion")
    return len(set(completions)) / len(completions)


def normalized_entropy(symbols: Sequence[Hashable], alphabet_size: int) -> float:
    """Entropy of the empirical distribution of ``symbols`` divided by ``log(alphabet_size)``; 0 when empty."""
    if alphabet_size < 2:
        raise ValueError(f"alphabet_size must be >= 2 for a normalized entropy, got {alphabet_size}")
    counts = Counter(symbols)
    total = sum(counts.values())
    if total == 0:
        return 0.0
    entropy = -sum(c / total * math.log(c / total) for c in counts.values())
    return entropy / math.log(alphabet_size)


# ------------------------------------------------------------------------------------------ the CRC proxy task
@dataclass(frozen=True)
class CRCPrompt:
    """One CRC request: a random string of ``length`` characters drawn from ``allowed``."""

    allowed: str
    length: int

    def text(self, template: str = CRC_TEMPLATE) -> str:
        return template.format(length=self.length, allowed=self.allowed, allowed_list=", ".join(self.allowed))


def crc_prompts(n: int, seed: int, pool: str = DIGIT_POOL, set_sizes: Sequence[int] = (2, 3, 4),
                length: int = 6) -> list[CRCPrompt]:
    """``n`` CRC requests with allowed sets of the given sizes sampled from ``pool`` (deterministic in ``seed``)."""
    if not pool or len(set(pool)) != len(pool) or not pool.isalnum():
        raise ValueError(f"pool must be distinct letters or digits, got {pool!r}")
    bad = [s for s in set_sizes if not 2 <= s < len(pool)]
    if bad or not set_sizes:
        raise ValueError(f"set_sizes must lie in [2, {len(pool) - 1}] for a pool of {len(pool)} characters, got "
                         f"{list(set_sizes)}")
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    rng = random.Random(seed)
    return [CRCPrompt("".join(sorted(rng.sample(pool, set_sizes[i % len(set_sizes)]))), length) for i in range(n)]


def crc_answer(completion: str) -> str:
    """The string a completion answers with: the text after the last ``####`` if there is one, stripped."""
    return completion.rsplit("####", 1)[-1].strip()


def crc_valid(completion: str, allowed: str) -> bool:
    """A non-empty answer made only of ``allowed`` characters."""
    answer = crc_answer(completion)
    return bool(answer) and set(answer) <= set(allowed)


def crc_scores(completions: Sequence[str], allowed: str) -> dict[str, float]:
    """Validity, normalized character entropy of the valid answers, and distinct shares for one prompt's samples."""
    answers = [crc_answer(c) for c in completions]
    valid = [a for a in answers if a and set(a) <= set(allowed)]
    return {
        "validity": len(valid) / len(answers),
        "entropy": normalized_entropy([ch for a in valid for ch in a], len(allowed)),
        "distinct": unique_rate(answers),
        "valid_distinct": len(set(valid)) / len(answers),
    }


def crc_pattern(template: str = CRC_TEMPLATE) -> re.Pattern:
    """A regex recognising prompts written with ``template`` (groups ``length``, ``allowed``/``allowed_list``)."""
    if "{allowed}" not in template and "{allowed_list}" not in template:
        raise ValueError(f"CRC template must contain {{allowed}} or {{allowed_list}}, got {template!r}")
    pattern = re.escape(template).replace(r"\{length\}", r"(?P<length>\d+)")
    pattern = pattern.replace(r"\{allowed\}", r"(?P<allowed>[0-9A-Za-z]+)")
    return re.compile(pattern.replace(r"\{allowed_list\}", r"(?P<allowed_list>[0-9A-Za-z](?:, [0-9A-Za-z])*)"))


def crc_allowed(match: re.Match) -> str:
    """The allowed characters named by a ``crc_pattern`` match."""
    groups = match.groupdict()
    return groups.get("allowed") or groups["allowed_list"].replace(", ", "")


class CRCValidityReward:
    """GRPO reward: CRC prompts score their validity (1/0); any other prompt the GSM8K answer match (``answer``).

    ``template`` must be the one the prompts were written with (``{length}`` and ``{allowed}`` placeholders).
    """

    def __init__(self, template: str = CRC_TEMPLATE, fallback_mode: str = "strict") -> None:
        self.pattern = crc_pattern(template)
        self.fallback = GSM8KReward(fallback_mode)
        self.__name__ = "crc_validity"

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], answer: Sequence[str] | None = None,
                 **columns) -> list[float]:
        out = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            found = self.pattern.search(prompt)
            if found:
                out.append(float(crc_valid(completion, crc_allowed(found))))
            elif answer is None:
                raise ValueError(f"prompt {i} is not a CRC prompt and the data has no 'answer' column to check "
                                 f"it against: {prompt[:80]!r}")
            else:
                out.extend(self.fallback([prompt], [completion], [answer[i]]))
        return out


def write_crc_mix(directory: str | Path, seed: int = 0, n_sft: int = 4000, n_train: int = 2000, n_val: int = 128,
                  crc_share: float = 0.5, off_set_share: float = 0.3, tasks: tuple[str, ...] = ("reversal", "sorting"),
                  length: int = 6, set_sizes: Sequence[int] = (2, 3, 4)) -> dict[str, Path]:
    """GSM8K-form ``sft`` / ``train`` / ``val`` files mixing the synthetic ``tasks`` with CRC prompts over digits.

    ``crc_share`` of the sft and train rows are CRC requests. In the sft split a CRC answer is uniformly random over
    the allowed set, except that ``off_set_share`` of them draw from all nine digits (a base model that follows the
    constraint only partly, so post-training has validity to gain). The val split holds only ``tasks`` problems
    (its accuracy measures the tasks); CRC validation prompts come from ``crc_prompts`` with another seed.
    """
    if not 0 <= crc_share < 1 or not 0 <= off_set_share <= 1:
        raise ValueError(f"crc_share must be in [0, 1) and off_set_share in [0, 1], got {crc_share}, {off_set_share}")
    rng = random.Random(seed)
    n_crc_sft, n_crc_train = round(crc_share * n_sft), round(crc_share * n_train)
    needed = n_sft - n_crc_sft + n_train - n_crc_train + n_val
    seen: set[tuple[str, str]] = set()
    problems = [p for p in make_problems(4 * needed, seed, tasks, max_digits=2)
                if (p.task, p.input) not in seen and not seen.add((p.task, p.input))]
    if len(problems) < needed:
        raise ValueError(f"Only {len(problems)} distinct {tasks} problems for {needed} requested; ask for fewer")
    task_rows = [{"question": p.question, "answer": f"#### {p.answer}"} for p in problems[:needed]]
    val, rest = task_rows[:n_val], task_rows[n_val:]

    def crc_rows(n: int, sub_seed: int, sft: bool) -> list[dict]:
        rows = []
        for prompt in crc_prompts(n, sub_seed, DIGIT_POOL, set_sizes, length):
            source = DIGIT_POOL if sft and rng.random() < off_set_share else prompt.allowed
            rows.append({"question": prompt.text(), "answer": "#### " + "".join(rng.choices(source, k=length))})
        return rows

    sft = rest[:n_sft - n_crc_sft] + crc_rows(n_crc_sft, seed + 1, sft=True)
    train = rest[n_sft - n_crc_sft:] + crc_rows(n_crc_train, seed + 2, sft=False)
    rng.shuffle(sft)
    rng.shuffle(train)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, rows in (("sft", sft), ("train", train), ("val", val)):
        out[name] = directory / f"{name}.jsonl"
        out[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out
