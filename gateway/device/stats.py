"""Latency figures of a fleet run, one way for the simulator, `devid bench` and the load generator:
percentiles by nearest rank (index round(p/100 * (n-1)) of the sorted values), in milliseconds
rounded to 0.1. A statistic of nothing (no device succeeded) is None, JSON null: never NaN, which
JSON does not have."""

from __future__ import annotations

import math
import statistics
from typing import Iterable, Mapping

PERCENTILES = (50, 95, 99)


def percentile(values: Iterable[float], p: float) -> float | None:
    """The p-th percentile of `values` (None for none)."""
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def percentile_ms(values: Iterable[float], p: float, missing=None):
    """The p-th percentile of `values` (seconds) in ms, rounded to 0.1; `missing` for none."""
    value = percentile(values, p)
    return missing if value is None else round(value * 1000, 1)


def latency_ms(values: list[float], missing=None) -> dict[str, float | None]:
    """{"p50": ..., "p95": ..., "p99": ...} in ms."""
    return {f"p{p}": percentile_ms(values, p, missing) for p in PERCENTILES}


def step_latency_ms(steps: Iterable[Mapping[str, float]], names: Iterable[str]) -> dict[str, dict]:
    """Per step name, the percentiles of that step over the runs that have it (seconds in `steps`)."""
    steps = list(steps)
    return {name: latency_ms([s[name] for s in steps if name in s]) for name in names}


def finite(value: float | None, ndigits: int | None = None) -> float | None:
    """`value` (rounded to `ndigits`), or None for None, NaN and the infinities."""
    if value is None or not math.isfinite(value):
        return None
    return value if ndigits is None else round(value, ndigits)


def median(values: Iterable[float | None]) -> float | None:
    """The median of the values that are finite numbers; None for none."""
    present = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(present) if present else None
