"""How the issuance benchmark measures: one timed call, sides interleaved in rounds whose order
alternates, and medians of the per-round paired ratios."""

from __future__ import annotations

import gc
import statistics
import time
from typing import Callable

from issuance_base import log


def timed(fn: Callable[[], object]) -> float:
    gc.collect()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleave(rounds: int, sides: dict[str, Callable[[int], float]], *, slices: int = 1,
               budget: float | None = None, min_rounds: int = 1) -> list[dict[str, float]]:
    """Per round, run every side `slices` times, in short blocks whose order alternates (ABC CBA ...),
    and return each round's seconds per side, summed over its slices. Fine slicing keeps both sides
    of a pair within a fraction of a second of each other, so drift on the machine hits both.

    With a budget (seconds), stop after the round that exhausts it, but not before `min_rounds`.
    Side functions are called with the global slice index (round * slices + slice).
    """
    names = list(sides)
    out = []
    started = time.perf_counter()
    for r in range(rounds):
        totals = dict.fromkeys(names, 0.0)
        for k in range(r * slices, (r + 1) * slices):
            for name in (names if k % 2 == 0 else names[::-1]):
                totals[name] += sides[name](k)
        out.append(totals)
        elapsed = time.perf_counter() - started
        if budget is not None and len(out) >= min_rounds and r + 1 < rounds and \
                elapsed / len(out) * (len(out) + 1) > budget:
            log(f"stopping after {len(out)} of {rounds} rounds: {elapsed:.0f} s spent, budget {budget:g} s")
            break
    return out


def summarise(per_round: list[dict[str, float]], work: int, devid: str = "devid") -> dict:
    """Median rates of each side, and the median of the paired per-round ratios."""
    devid_rates = [work / r[devid] for r in per_round]
    base_rates = [work / r["baseline"] for r in per_round]
    ratios = [r["baseline"] / r[devid] for r in per_round]          # devid rate / baseline rate
    overheads = [r[devid] / r["baseline"] - 1 for r in per_round]   # devid time / baseline time - 1
    return {
        "devid_per_s": statistics.median(devid_rates),
        "baseline_per_s": statistics.median(base_rates),
        "ratio": statistics.median(ratios),
        "overhead": statistics.median(overheads),
        "overhead_min": min(overheads),
        "overhead_max": max(overheads),
        "work_per_round": work,
        "rounds": [{"devid_s": r[devid], "baseline_s": r["baseline"]} for r in per_round],
    }
