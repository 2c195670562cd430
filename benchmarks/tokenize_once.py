"""Tokenize once: the first and the second start of ``InstructionDataModule.setup()`` on the same JSONL file.

Writes ``--records`` synthetic Alpaca records (default 100,000) to a temporary JSONL file, then runs ``setup()``
in child processes sharing one fresh ``datasets`` cache: the first start reads the file into the cache and tokenizes
it (``datasets.map``), the second opens the memory-mapped result. Goal: the second start takes at most 5% of the
first, and its resident memory does not grow with the number of records (the second start is also run on a file
of a tenth of the records, and the growth of the peak resident memory over ``setup()`` is compared, as well as the
growth of the heap alone: pages of the memory-mapped cache count in the peak but the kernel can drop them).
Prints one JSON line.

    python benchmarks/tokenize_once.py [--records 100000 --num-proc 1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from peak_memory import phase_report, phase_start, run_child  # noqa: E402

GOAL_RATIO = 0.05


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=100_000, help="records in the JSONL file")
    p.add_argument("--num-proc", type=int, default=1, help="tokenizing processes (datasets.map num_proc)")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--child", default=None, help="(child) the JSONL file to set up")
    p.add_argument("--cache", default=None, help="(child) the datasets cache folder")
    return p.parse_args(argv)


def write_records(path: Path, n: int) -> None:
    from datamodules.synthetic_tasks import make_problems

    with path.open("w") as f:
        for p in make_problems(n, seed=0):
            f.write(json.dumps({"instruction": p.instruction, "input": p.input, "output": p.answer}) + "\n")


def anon_rss_mb() -> float:
    """Anonymous resident memory (heap; not pages of memory-mapped files, which the kernel can drop), in MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) / 1024


def child(args: argparse.Namespace) -> None:
    from datamodules.instruction import InstructionDataModule

    anon = anon_rss_mb()
    phase_start()
    dm = InstructionDataModule(train_file=args.child, max_length=args.max_length, num_proc=args.num_proc,
                               cache_dir=args.cache)
    dm.setup()
    first = dm.datasets["train"][0]  # a training example is read back from the mapped file
    print(phase_report(records=len(dm.datasets["train"]) + len(dm.datasets["val"]), tokens=len(first["input_ids"]),
                       anon_growth_mb=round(anon_rss_mb() - anon, 1)))


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    if args.child:
        child(args)
        return {}
    script = str(Path(__file__).resolve())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        runs = {}
        for name, n in (("full", args.records), ("tenth", max(20, args.records // 10))):
            data, cache = tmp / f"{name}.jsonl", tmp / f"cache-{name}"
            write_records(data, n)
            flags = ["--child", str(data), "--cache", str(cache), "--num-proc", str(args.num_proc),
                     "--max-length", str(args.max_length)]
            runs[name] = [run_child(script, flags) for _ in range(2)]  # first start, second start
    (first, second), (_, second_tenth) = runs["full"], runs["tenth"]
    result = {"records": first["records"], "num_proc": args.num_proc,
              "first_start_s": first["seconds"], "second_start_s": second["seconds"],
              "second_over_first": round(second["seconds"] / first["seconds"], 4), "goal": GOAL_RATIO,
              "first_peak_growth_mb": first["phase_peak_mb"], "second_peak_growth_mb": second["phase_peak_mb"],
              "second_peak_growth_mb_tenth": second_tenth["phase_peak_mb"],
              "second_heap_growth_mb": second["anon_growth_mb"],
              "second_heap_growth_mb_tenth": second_tenth["anon_growth_mb"]}
    result["met"] = result["second_over_first"] <= GOAL_RATIO
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
