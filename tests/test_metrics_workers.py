"""`devid serve --workers 2`: every worker counts into the run's multiprocess directory
(DATA/metrics/<pid>/), and an exposition there is the sum over the workers, equal to what the
registry says happened; the directory goes when the gateway stops, and a stale one at start."""

from __future__ import annotations

import asyncio
import os
import shutil
from datetime import timedelta
from pathlib import Path

import aiocoap
from aiocoap.numbers import codes
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from devid.gateway.device.client import device_context
from devid.gateway.device.enroll import enroll
from devid.gateway.store.gauges import RegistryGauges
from devid.gateway.system import metrics

from .gateway_helpers import FW
from .serve_helpers import serve


def _values(text: str) -> dict[tuple, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _collect(path: Path) -> dict[tuple, float]:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(path))
    return _values(generate_latest(registry).decode())


async def _refused_config(bundle: Path, uri: str) -> None:
    ctx, _ = await device_context(bundle, "127.0.0.1")
    try:
        answer = await asyncio.wait_for(ctx.request(aiocoap.Message(code=codes.GET, uri=uri + "/config")).response, 15)
        assert answer.code == codes.FORBIDDEN
    finally:
        await ctx.shutdown()


def test_two_workers_metrics_add_up(world, tmp_path, monkeypatch):
    data, out = world
    stale = data.path / metrics.METRICS_DIR / "999999999"       # a run whose process is gone
    stale.mkdir(parents=True)
    (stale / "counter_1.db").write_bytes(b"")
    served = serve(data.path, tmp_path / "gateway.log", workers=2)
    try:
        run_dir = data.path / metrics.METRICS_DIR / str(served.gateway_pid())
        assert run_dir.is_dir() and not stale.exists()
        devices = [out / f"TS0000000{i}" for i in (1, 2, 3)]

        async def flows():
            for bundle in devices:                  # one session each: new ports, spread over the workers
                await enroll(bundle, served.uri, FW)
            await _refused_config(out / "TS00000004", served.uri)
        asyncio.run(flows())
        # each worker writes its own files; the sum over them is the run's total
        pids = {f.stem.rsplit("_", 1)[1] for f in run_dir.glob("*.db")}
        assert len(pids) == 2, sorted(run_dir.iterdir())
        total = _collect(run_dir)
        per_worker = []
        for pid in pids:
            alone = tmp_path / f"worker-{pid}"
            alone.mkdir()
            for f in run_dir.glob(f"*_{pid}.db"):
                shutil.copy(f, alone / f.name)
            per_worker.append(_collect(alone))
        key = ("devid_enrollment_decisions_total", (("action", "enroll"), ("result", "issued")))
        assert total[key] == 3 == sum(w.get(key, 0) for w in per_worker)
        refused = ("devid_coap_requests_total", (("code", "4.03"), ("resource", "/config")))
        assert total[refused] == 1 == sum(w.get(refused, 0) for w in per_worker)
        hs = ("devid_dtls_handshakes_total", (("result", "ok"),))
        assert total[hs] == sum(w.get(hs, 0) for w in per_worker) >= 4
        # exposition() in any process of the run (here: this one, pointed at the run's directory)
        # gives the same sums, and the registry's gauges once a collector for it is added
        monkeypatch.setenv(metrics.MULTIPROC_ENV, str(run_dir))
        gauges = RegistryGauges(data.open_registry, threshold=lambda t: timedelta(days=3650))
        metrics.add_scrape_collector(gauges)
        try:
            exposed = _values(metrics.exposition()[0].decode())
        finally:
            metrics.remove_scrape_collector(gauges)
            if not callable(gauges._registry):
                gauges._registry.close()
        assert exposed[key] == 3 and exposed[refused] == 1
        assert exposed[("devid_certificates_expiring", (("device_type", "temperature-sensor"),))] == 3
    finally:
        assert served.stop() == 0
    assert "Traceback" not in (tmp_path / "gateway.log").read_text()
    assert not (data.path / metrics.METRICS_DIR / str(served.proc.pid)).exists()
    assert os.listdir(data.path / metrics.METRICS_DIR) == []
