"""Peak host memory of one phase, measured in a child process (its ``ru_maxrss``), for the memory benchmarks.

A benchmark script runs itself with ``--child VARIANT``; the child prepares its inputs, calls :func:`phase_start`,
runs the measured phase, and prints :func:`phase_report`'s JSON line last. The parent alternates variants with
:func:`run_child` and compares the growth of the peak over the phase (peak minus the resident memory at its start).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

_START: dict[str, float] = {}


def rss_mb() -> float:
    """Resident memory of this process now, in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def phase_start() -> None:
    """Mark the start of the measured phase (inputs and models already built)."""
    _START.update(rss_mb=rss_mb(), peak_before_mb=peak_rss_mb(), t=time.perf_counter())


def phase_report(**extra) -> str:
    """The child's JSON line: resident memory at the start, peak, growth of the peak over the phase, seconds."""
    peak = peak_rss_mb()
    return json.dumps({"start_rss_mb": round(_START["rss_mb"], 1), "peak_rss_mb": round(peak, 1),
                       "phase_peak_mb": round(peak - _START["rss_mb"], 1),
                       "peak_before_phase_mb": round(_START["peak_before_mb"], 1),
                       "seconds": round(time.perf_counter() - _START["t"], 2), **extra})


def run_child(script: str, args: list[str], timeout: float = 1800) -> dict:
    """Run ``python script *args`` and return the JSON of its last stdout line (raises with its stderr on failure)."""
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])

