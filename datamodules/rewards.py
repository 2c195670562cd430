"""Verifiable rewards: GSM8K numeric match, normalized QA exact match, and the guard that calls any reward function.

A reward function is a plain callable ``fn(prompts, completions, **columns) -> list[float]``: ``columns`` are the
data module's per-prompt reference columns (``answer`` for GSM8K form, ``answers`` for QA form), repeated for every
completion.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

RewardFn = Callable[..., list[float]]
# A number as a completion writes it: optional sign and currency sign, digits with optional thousands commas and
# decimals, optionally a fraction ``a/b``.
_NUM = r"[-+]?\$?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:/\d+)?"
_STRICT = re.compile(r"####\s*(" + _NUM + ")")
_NUMBER = re.compile(_NUM)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)
# A reference answer: one number (thousands commas only in groups of three), optionally with a currency sign before
# it and a percent sign or unit words after it ("18 dollars", "$1,200", "1/2", "45%").
_REFERENCE = re.compile(
    r"(?P<sign>[-+]?)\s*[$\u20ac\u00a3\u00a5]?\s*(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+"
    r"|\d+/\d+)\s*(?P<unit>%|[^\W\d_][^\d]*)?")


def parse_number(text: str) -> float | None:
    """``"1,234"`` -> 1234.0, ``"-5."`` -> -5.0, ``"$3"`` -> 3.0, ``"1/2"`` -> 0.5; ``None`` when not a number."""
    text = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        if "/" in text:
            numerator, denominator = text.split("/")
            value = float(numerator) / float(denominator)
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        return None
    return value if math.isfinite(value) else None


def extract_gsm8k_answer(text: str, mode: str = "strict") -> float | None:
    """The number a completion answers with.

    ``strict``: the number after the last ``#### `` marker (the GSM8K convention); no marker -> ``None``.
    ``flexible``: the last number anywhere in the text (lm-evaluation-harness's flexible extract).
    Numbers may carry thousands commas, a ``$`` and be a fraction ``a/b``.
    """
    if mode == "strict":
        found = _STRICT.findall(text)
    elif mode == "flexible":
        found = _NUMBER.findall(text)
    else:
        raise ValueError(f"mode must be 'strict' or 'flexible', got {mode!r}")
    return parse_number(found[-1]) if found else None


def normalize_reference(text: str) -> str:
    """The reference answer of a GSM8K-form record (the text after ``####``) as the plain number the reward
    compares with: thousands commas, a currency sign, a percent sign and trailing unit words are dropped
    (``"$1,200"`` -> ``"1200"``, ``"18 dollars"`` -> ``"18"``, ``"1/2"`` stays a fraction worth 0.5).

    Raises ``ValueError`` saying why when the text is not exactly one such number (``"3 or 4"``, ``"2:30"``,
    ``"3,5"``), because no completion could ever match it; the result is checked with the reward's own parser.
    """
    match = _REFERENCE.fullmatch(text.strip().rstrip(".").strip())
    if match is None:
        raise ValueError(f"the reference {text.strip()!r} is not one number (optionally with thousands commas, a "
                         "currency sign, a fraction a/b, a percent sign or unit words after it)")
    number = match.group("sign") + match.group("num").replace(",", "")
    if "/" in number and parse_number(number) is None:
        raise ValueError(f"the reference {text.strip()!r} divides by zero")
    if extract_gsm8k_answer(f"#### {number}", "strict") != parse_number(number):
        raise ValueError(f"the reference {text.strip()!r} cannot be matched by the reward's number parser")
    return number


def reference_value(reference: str) -> float:
    """The number a reference stands for (see :func:`normalize_reference`); ``ValueError`` when it has none."""
    value = parse_number(normalize_reference(str(reference)))
    if value is None:
        raise ValueError(f"the reference {reference!r} is not a number")
    return value


def normalize_answer(text: str) -> str:
    """SQuAD-style normalization: lower case, no punctuation, no articles (a, an, the), single spaces.

    The normalization never empties a non-blank text: when dropping articles would leave nothing (a
    multiple-choice answer ``A``, a title ``The The``), articles are kept; when dropping punctuation would leave
    nothing (``?``), punctuation is kept too. A blank text normalizes to ``""``, which matches nothing.
    """
    lowered = text.lower()
    no_punct = " ".join("".join(ch for ch in lowered if ch not in _PUNCTUATION).split())
    squad = " ".join(_ARTICLES.sub(" ", no_punct).split())
    return squad or no_punct or " ".join(lowered.split())


@dataclass
class GSM8KReward:
    """1.0 when the completion's number equals the reference ``answer`` column, else 0.0.

    A reference that is not one number (see :func:`normalize_reference`) raises ``ValueError`` instead of
    scoring every completion 0; ``VerifiableQADataModule`` checks every reference when it loads the file.
    """

    mode: str = "strict"

    def __post_init__(self) -> None:
        if self.mode not in ("strict", "flexible"):
            raise ValueError(f"GSM8KReward mode must be 'strict' or 'flexible', got {self.mode!r}")
        self.__name__ = f"gsm8k_{self.mode}"

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], answer: Sequence[str],
                 **columns) -> list[float]:
        out = []
        for completion, reference in zip(completions, answer, strict=True):
            got = extract_gsm8k_answer(completion, self.mode)
            out.append(float(got is not None and got == reference_value(reference)))
        return out


@dataclass
class QAExactMatch:
    """1.0 when the normalized completion equals any normalized accepted answer (``answers`` column), else 0.0.

    A blank completion never matches, and blank accepted answers are ignored (see :func:`normalize_answer`).
    """

    def __post_init__(self) -> None:
        self.__name__ = "qa_exact_match"

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], answers: Sequence[Sequence[str]],
                 **columns) -> list[float]:
        out = []
        for completion, accepted in zip(completions, answers, strict=True):
            key = normalize_answer(completion)
            out.append(float(bool(key) and key in {normalize_answer(str(a)) for a in accepted}))
        return out


BUILTIN_REWARDS: dict[str, Callable[[], RewardFn]] = {
    "gsm8k_strict": lambda: GSM8KReward("strict"),
    "gsm8k_flexible": lambda: GSM8KReward("flexible"),
    "qa_exact_match": QAExactMatch,
}


class RewardError(RuntimeError):
    """A reward function failed; the message names it and says what went wrong."""


def reward_name(fn: RewardFn) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


def _check(fn: RewardFn, values, n: int) -> str | None:
    """Why ``values`` is not a valid reward list of length ``n`` (``None`` when it is)."""
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError) as err:
        return f"returned something that is not a list of numbers ({err})"
    if len(values) != n:
        return f"returned {len(values)} rewards for {n} completions"
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        return f"returned non-finite rewards at positions {bad[:5]} (values {[values[i] for i in bad[:5]]})"
    return None


def compute_rewards(fn: RewardFn, prompts: list[str], completions: list[str], columns: dict[str, list],
                    drop_bad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Call ``fn`` on the whole batch and return ``(rewards, valid)`` float and bool tensors.

    If the call raises, returns the wrong number of values or a non-finite value, this raises ``RewardError``
    naming the function, unless ``drop_bad``: then ``fn`` is called again on each completion alone, and the
    completions on which it still fails are marked invalid (reward 0, ``valid`` False) for the caller to drop.
    """
    n = len(completions)
    name = reward_name(fn)
    try:
        values = fn(prompts, completions, **columns)
        problem = _check(fn, values, n)
    except Exception as err:  # noqa: BLE001 - any failure of user code is reported with its name
        if not drop_bad:
            raise RewardError(f"Reward function {name!r} raised {type(err).__name__}: {err}. Fix it, or set "
                              "drop_bad_rewards=True to drop the samples it fails on") from err
        problem = f"raised {type(err).__name__}: {err}"
    if problem is None:
        return torch.tensor([float(v) for v in values]), torch.ones(n, dtype=torch.bool)
    if not drop_bad:
        raise RewardError(f"Reward function {name!r} {problem}. Fix it, or set drop_bad_rewards=True to drop "
                          "the samples it fails on")
    rewards, valid = torch.zeros(n), torch.zeros(n, dtype=torch.bool)
    for i in range(n):
        try:
            one = fn(prompts[i:i + 1], completions[i:i + 1], **{k: v[i:i + 1] for k, v in columns.items()})
            if _check(fn, one, 1) is None:
                rewards[i], valid[i] = float(one[0]), True
        except Exception:  # noqa: BLE001, S112 - a failing sample is dropped, counted and logged by the caller
            continue
    return rewards, valid
