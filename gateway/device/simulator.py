"""A device simulator: many devices running the zero-touch flow concurrently against a gateway.

Each simulated device is a factory bundle made by `devid provision` and runs exactly what the
field engineer's script runs (`device.enroll`, by default the one-request flow; `flow` selects),
over real DTLS; or renews them (`device.renew`). Used by tests, the demo and the
performance benchmark (`devid bench --client script`).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from devid.gateway.device.enroll import DEFAULT_FLOW, DEFAULT_RENEW_FLOW, EnrollResult, enroll, renew
from devid.gateway.device.identity import Firmware
from devid.gateway.device.protocol import EnrollFailed
from devid.gateway.device.stats import latency_ms, percentile


@dataclass
class SimulationReport:
    devices: int
    enrolled: int
    flow: str = DEFAULT_FLOW
    failures: dict[str, str] = field(default_factory=dict)       # serial -> "step: reason"
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0
    results: list[EnrollResult] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.enrolled / self.seconds if self.seconds else 0.0

    def percentile(self, p: float) -> float | None:
        """The p-th percentile of the successful runs' seconds; None when none succeeded."""
        return percentile(self.latencies, p)

    def summary(self) -> dict:
        """The run in numbers; statistics of no successful run are None (JSON null), never NaN."""
        return {"flow": self.flow, "devices": self.devices, "enrolled": self.enrolled, "errors": len(self.failures),
                "seconds": round(self.seconds, 3), "enrollments_per_s": round(self.rate, 1),
                "latency_ms": latency_ms(self.latencies),
                "mean_ms": round(statistics.fmean(self.latencies) * 1000, 1) if self.latencies else None}


async def simulate(gateway: str, bundles: list[Path], firmware: Callable[[Path], Firmware | None], *,
                   concurrency: int = 16, timeout: float = 30.0, renew_only: bool = False, flow: str | None = None,
                   progress: Callable[[int, int], None] | None = None, psk: bool = False) -> SimulationReport:
    """Enroll (or, `renew_only`, renew) every bundle, `concurrency` at a time, by `flow` (None:
    the default of `enroll`, one-request, or of `renew`, classic). `psk`: as PSK devices on
    tinydtls instead (device/psk.py: evidence in the CSR of /sen or /sren, then GET /psk)."""
    flow = "psk" if psk else flow or (DEFAULT_RENEW_FLOW if renew_only else DEFAULT_FLOW)
    report = SimulationReport(devices=len(bundles), enrolled=0, flow=flow)
    sem = asyncio.Semaphore(concurrency)
    done = 0

    async def one(bundle: Path) -> None:
        nonlocal done
        async with sem:
            t0 = time.perf_counter()
            try:
                if psk:
                    from devid.gateway.device.psk import enroll_psk, renew_psk
                    if renew_only:
                        await renew_psk(bundle, gateway, firmware(bundle), timeout=timeout)
                    else:
                        report.results.append(await enroll_psk(bundle, gateway, firmware(bundle), timeout=timeout))
                elif renew_only:
                    await renew(bundle, gateway, flow=flow, timeout=timeout)
                else:
                    report.results.append(await enroll(bundle, gateway, firmware(bundle), flow=flow, timeout=timeout))
                report.latencies.append(time.perf_counter() - t0)
                report.enrolled += 1
            except EnrollFailed as exc:
                report.failures[bundle.name] = str(exc)
            except Exception as exc:          # a simulator reports, it does not crash
                report.failures[bundle.name] = f"unexpected: {exc!r}"
            done += 1
            if progress:
                progress(done, len(bundles))

    started = time.perf_counter()
    await asyncio.gather(*(one(b) for b in bundles))
    report.seconds = time.perf_counter() - started
    return report
