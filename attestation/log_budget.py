"""The refused-evidence budget: how much of one device's refused evidence is logged in full.

Every evidence message is appraised and answered. Acceptable verdicts (enrollment takes them)
and verdicts that revoke the device are always appended to the log. Refused ones (not
acceptable) are appended in full up to `LogBudget.refused_per_window` per device per window;
beyond that they are only counted in the device's `RefusedTally`, and one chained summary entry
("N more refused evidence messages from this device between T1 and T2", counts by reason code)
stands for them. The summary is written before the next entry for that device (an acceptable
verdict, a revocation, or the first refused one once a new window opens) or by a rotation
(`LogStore.flush_refused`), whichever comes first.

A window opens with the first refused appraisal after the previous window closed, and lasts
`window`. So one device adds at most `refused_per_window` full entries and one summary per
window, whatever its request rate; the tally is one row per device, updated in place.

`admit` is the decision as a pure function of the tally; the store applies its answer in the
transaction that reads the tally and the head. On the accepted path with no tally (the usual
case) it returns at once and nothing but the entry is written.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import timedelta

from .log import Admission, RefusedTally, format_time
from .verifier import Appraisal


@dataclass(frozen=True)
class LogBudget:
    """Refused evidence logged in full per device and window. The defaults are far above what a
    working device sends (one evidence per enrollment, a retry a minute when refused)."""

    refused_per_window: int = 60
    window: timedelta = timedelta(hours=1)

    def __post_init__(self) -> None:
        n = self.refused_per_window
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 100_000:
            raise ValueError(f"attestation_log.refused_per_window must be an integer from 1 to 100,000 (got {n!r})")
        if not isinstance(self.window, timedelta) or not timedelta(minutes=1) <= self.window <= timedelta(days=7):
            raise ValueError(f"attestation_log.window must be 60 to 604,800 seconds (got {self.window!r})")


def is_budgeted(appraisal: Appraisal) -> bool:
    """Refused and not revoking: the kind of verdict the budget limits."""
    v = appraisal.verdict
    return not v.acceptable and not v.revoke


# the usual answer, made once: append, no summary, no tally to write (its time is never used)
_JUST_APPEND = Admission(append=True, time="")


def admit(tally: RefusedTally | None, appraisal: Appraisal, budget: LogBudget) -> Admission:
    budgeted = is_budgeted(appraisal)
    if tally is None and not budgeted:
        return _JUST_APPEND                                         # the fast path: nothing more to write
    now = format_time(appraisal.time)
    if tally is None:
        return Admission(append=True, time=now, write=True,
                         tally=RefusedTally(format_time(appraisal.time + budget.window), 1))
    pending = tally if tally.suppressed else None
    closed = now >= tally.window_end
    if not budgeted:
        if closed:                                                  # summarise what is left, forget the window
            return Admission(append=True, time=now, summarise=pending, tally=None, write=True)
        if pending is None:
            return _JUST_APPEND
        return Admission(append=True, time=now, summarise=pending, write=True,
                         tally=RefusedTally(tally.window_end, tally.logged))
    if closed:                                                      # a new window opens with this one
        return Admission(append=True, time=now, summarise=pending, write=True,
                         tally=RefusedTally(format_time(appraisal.time + budget.window), 1))
    if tally.logged < budget.refused_per_window:
        return Admission(append=True, time=now, summarise=pending, write=True,
                         tally=RefusedTally(tally.window_end, tally.logged + 1))
    # over budget: counted, not appended
    counts = dict(tally.reason_counts)
    for code in dict.fromkeys(appraisal.verdict.codes):
        counts[code] = counts.get(code, 0) + 1
    tier = appraisal.verdict.tier if appraisal.verdict.tier.rank > tally.tier.rank or not tally.suppressed \
        else tally.tier
    return Admission(append=False, time=now, write=True, tally=replace(
        tally, suppressed=tally.suppressed + 1, first=tally.first or now, last=now,
        reason_counts=tuple(sorted(counts.items())), device_type=appraisal.device.device_type,
        cert_fingerprint=appraisal.device.cert_fingerprint, tier=tier))


__all__ = ["LogBudget", "admit", "is_budgeted"]
