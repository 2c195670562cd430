"""Built-in synthetic tasks with checkable answers: multi-digit addition, digit reversal, digit sorting.

Every answer is a number, so the same problems can be written as Alpaca or chat instruction data and in
GSM8K form (``answer`` ending ``#### <number>``). The default recipes write these files and then read them
back through the same loaders as user data.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

TASKS = ("addition", "reversal", "sorting")
Format = Literal["alpaca", "chat", "gsm8k"]
_INSTRUCTIONS = {
    "addition": "Add",
    "reversal": "Reverse",
    "sorting": "Sort",
}


@dataclass(frozen=True)
class Problem:
    task: str
    input: str
    answer: str

    @property
    def instruction(self) -> str:
        return _INSTRUCTIONS[self.task]

    @property
    def question(self) -> str:
        return f"{self.instruction}: {self.input}"

    def record(self, fmt: Format) -> dict:
        """The problem as one JSONL record of the given format."""
        if fmt == "alpaca":
            return {"instruction": self.instruction, "input": self.input, "output": self.answer}
        if fmt == "chat":
            return {"messages": [{"role": "user", "content": self.question},
                                 {"role": "assistant", "content": self.answer}]}
        if fmt == "gsm8k":
            return {"question": self.question, "answer": f"#### {self.answer}"}  # the form GRPO's verifier reads
        raise ValueError(f"Unknown format {fmt!r}; expected one of alpaca, chat, gsm8k")


def make_problem(task: str, rng: random.Random, max_digits: int = 2, min_len: int = 3, max_len: int = 5) -> Problem:
    """Draw one problem. Digits 1-9 only for reversal/sorting, so answers never start with 0."""
    if task == "addition":
        a, b = (rng.randint(0, 10**max_digits - 1) for _ in range(2))
        return Problem(task, f"{a}+{b}", str(a + b))
    digits = [str(rng.randint(1, 9)) for _ in range(rng.randint(min_len, max_len))]
    if task == "reversal":
        return Problem(task, "".join(digits), "".join(reversed(digits)))
    if task == "sorting":
        return Problem(task, "".join(digits), "".join(sorted(digits)))
    raise ValueError(f"Unknown synthetic task {task!r}; expected one of {TASKS}")


def make_problems(n: int, seed: int, tasks: tuple[str, ...] = TASKS, **kwargs) -> list[Problem]:
    """``n`` problems cycling through ``tasks``, deterministic in ``seed``."""
    rng = random.Random(seed)
    return [make_problem(tasks[i % len(tasks)], rng, **kwargs) for i in range(n)]


def write_jsonl(path: str | Path, problems: list[Problem], fmt: Format) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for p in problems:
            f.write(json.dumps(p.record(fmt)) + "\n")
    return path


def write_synthetic_splits(
    directory: str | Path, fmt: Format = "chat", n_train: int = 4000, n_val: int = 200, n_test: int = 200,
    seed: int = 0, tasks: tuple[str, ...] = TASKS, **kwargs,
) -> dict[str, Path]:
    """Write ``train/val/test.jsonl`` with disjoint problems (held-out problems never appear in train)."""
    problems = make_problems(4 * (n_train + n_val + n_test), seed, tasks, **kwargs)
    seen: set[tuple[str, str]] = set()
    unique = [p for p in problems if (p.task, p.input) not in seen and not seen.add((p.task, p.input))]
    if len(unique) < n_train + n_val + n_test:
        raise ValueError(f"Only {len(unique)} distinct synthetic problems for {n_train + n_val + n_test} requested; "
                         "raise max_digits / max_len or ask for fewer")
    test, val, train = unique[:n_test], unique[n_test:n_test + n_val], unique[n_test + n_val:n_test + n_val + n_train]
    directory = Path(directory)
    return {name: write_jsonl(directory / f"{name}.jsonl", split, fmt)
            for name, split in (("train", train), ("val", val), ("test", test))}
