"""The gateway's metrics in the Prometheus text format (prometheus-client); docs/operations.md#metrics.

`exposition()` is what the operator listener's `/metrics` answers with.

Every metric is named `devid_*`, with its unit in the name, and has labels from small fixed sets
(a result, a resource path the gateway serves, a refusal class, a verdict tier or reason code, a
device type from the policy): never a serial, an address or an identity.

The metrics are counted where the gateway already has a seam: the DTLS events in
`coap/dtls_server.py` (the sans-I/O engine in `dtls/` knows nothing of this module), the CoAP
server core (`coap/server.py`), the enrollment service's decisions (`service/enrollment.py`) and
the registry's transaction wrapper (`store/database.py`, `store/postgres.py`). Gauges whose truth
is the registry (outstanding nonces, certificates due for renewal) are computed when scraped, by
collectors added with `add_scrape_collector` (`store/gauges.py`).

With `devid serve --workers N`, prometheus-client's multiprocess mode: `multiprocess_dir` makes a
fresh directory per run (removed at start and stop) and sets PROMETHEUS_MULTIPROC_DIR before the
workers start, each worker's values go to its own files there, and `exposition()` in any process
of the run sums them. A worker that exits is marked dead (`worker_exited`), which drops its
live gauges (open sessions) and keeps its counters.

`DEVID_METRICS=off` in the environment turns counting off (every metric is then a no-op object):
for the benchmark's baseline only (benchmarks/bench_metrics.py); the metrics are on otherwise.
"""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from prometheus_client import (CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)

ENV = "DEVID_METRICS"                       # "off": every metric a no-op (the benchmark's baseline)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
ENABLED = os.environ.get(ENV, "").strip().lower() != "off"


class _Off:
    """A metric that counts nothing (DEVID_METRICS=off)."""

    def labels(self, *args, **kwargs) -> "_Off":
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    dec = set = observe = inc


def _metric(cls, *args, **kwargs):
    return cls(*args, **kwargs) if ENABLED else _Off()


# latency buckets: a CoAP request or an issuance takes milliseconds; a registry commit tens of
# microseconds to a few milliseconds (an fsync), seconds when the registry is locked or slow
_REQUEST_BUCKETS = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)
_TX_BUCKETS = (.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 5, 30)

HANDSHAKES = _metric(Counter, "devid_dtls_handshakes_total", "DTLS handshakes by result (ok, refused)",
                     ["result"])
HANDSHAKE_REFUSALS = _metric(Counter, "devid_dtls_handshake_refusals_total",
                             "Refused DTLS handshakes by reason class", ["reason"])
SESSIONS = _metric(Gauge, "devid_dtls_sessions", "Open DTLS sessions", multiprocess_mode="livesum")
REQUESTS = _metric(Counter, "devid_coap_requests_total", "CoAP requests answered, by resource and response code",
                   ["resource", "code"])
REQUEST_SECONDS = _metric(Histogram, "devid_coap_request_duration_seconds",
                          "Time from a request's arrival to its answer, by resource", ["resource"],
                          buckets=_REQUEST_BUCKETS)
DECISIONS = _metric(Counter, "devid_enrollment_decisions_total",
                    "Enrollment service decisions by action (nonce, evidence, enroll, renew, config) and result",
                    ["action", "result"])
VERDICTS = _metric(Counter, "devid_attestation_verdicts_total", "Attestation verdicts by tier",
                   ["tier"])
VERDICT_REASONS = _metric(Counter, "devid_attestation_verdict_reasons_total",
                          "Reasons in attestation verdicts, by reason code and its tier", ["reason", "tier"])
ISSUANCE_SECONDS = _metric(Histogram, "devid_issuance_duration_seconds",
                           "Time of an enrollment or renewal that issued a certificate (checks, attestation, "
                           "signature, registry commit)", ["action"], buckets=_REQUEST_BUCKETS)
TRANSACTION_SECONDS = _metric(Histogram, "devid_registry_transaction_duration_seconds",
                              "Registry write transactions, BEGIN to COMMIT or ROLLBACK", ["engine", "durable"],
                              buckets=_TX_BUCKETS)
ANOMALIES = _metric(Counter, "devid_anomalies_total", "Anomaly signals raised, by kind (docs/operations.md)",
                    ["kind"])
ANOMALY_TRACKED = _metric(Gauge, "devid_anomaly_tracked_identities",
                          "Identities the anomaly tracker holds state for (bounded)", multiprocess_mode="livesum")
ANOMALY_EVICTIONS = _metric(Counter, "devid_anomaly_evictions_total",
                            "Identities the anomaly tracker dropped to stay within its cap")

# A handshake refusal's reason (free text from OpenSSL, the authenticator, the engine) -> its
# class: the first pattern found in the text wins; anything else is "other". Bounded by design.
REFUSAL_CLASSES = (
    ("handshake timeout", "timeout"),
    ("revoked", "revoked"),
    ("expired", "expired"),
    ("superseded by a newer handshake", "replaced"),
    ("superseded", "superseded"),
    ("unknown to the registry", "unknown-certificate"),
    ("not issued by the manufacturing", "unknown-ca"),
    ("unable to get local issuer", "unknown-ca"),
    ("self-signed", "unknown-ca"),
    ("did not return a certificate", "no-certificate"),
    ("not a factory device certificate", "wrong-certificate"),
    ("certificate refused by OpenSSL", "certificate-invalid"),
    ("certificate path does not validate", "certificate-invalid"),
    ("resumed session refused", "resumption-refused"),
    ("alert from peer", "peer-alert"),
)


# the results each enrollment decision can have (service/enrollment.py): every pair is created at
# import, as are the handshake results, refusal classes, verdict tiers (below), so each series
# exists at 0 from the first scrape and increase()/rate() see the first event
_GUARDS = ("refused", "rate-limited")
DECISION_RESULTS = {
    "nonce": ("issued", *_GUARDS),
    "evidence": ("affirming", "warning", "contraindicated", *_GUARDS),
    "enroll": ("issued", *_GUARDS),
    "renew": ("issued", *_GUARDS),
    "config": ("served", "failed", *_GUARDS),
}


def _create_series() -> None:
    from devid.attestation.policy import Tier
    for result in ("ok", "refused"):
        HANDSHAKES.labels(result)
    for label in sorted({label for _, label in REFUSAL_CLASSES} | {"other"}):
        HANDSHAKE_REFUSALS.labels(label)
    for action, results in DECISION_RESULTS.items():
        for result in results:
            DECISIONS.labels(action, result)
    for tier in Tier:
        VERDICTS.labels(tier.value)


def refusal_class(reason: str) -> str:
    for pattern, label in REFUSAL_CLASSES:
        if pattern in reason:
            return label
    return "other"


_create_series()


def resource_label(path: tuple[str, ...], known: bool) -> str:
    """The `resource` label of a request: its path if the gateway serves it, else "unknown"
    (a peer choosing paths must not choose label values)."""
    return "/" + "/".join(path) if known else "unknown"


# -- collectors evaluated at scrape time -----------------------------------------------------

_scrape_collectors: list = []


def add_scrape_collector(collector) -> None:
    """A collector (prometheus-client's `collect()` protocol) asked at every exposition, in the
    process that answers it: for values read from the registry, which every worker shares (summing
    them over workers would count them N times)."""
    if collector not in _scrape_collectors:
        _scrape_collectors.append(collector)


def remove_scrape_collector(collector) -> None:
    if collector in _scrape_collectors:
        _scrape_collectors.remove(collector)


class _Extras:
    def collect(self):
        for collector in list(_scrape_collectors):
            yield from collector.collect()


def exposition() -> tuple[bytes, str]:
    """The current metrics as (body, content type): this process's, or with `--workers` the sum
    over every worker of the run (multiprocess mode), then the scrape-time gauges."""
    path = os.environ.get(MULTIPROC_ENV)
    if path and Path(path).is_dir():
        from prometheus_client import multiprocess
        registry = CollectorRegistry(auto_describe=False)
        multiprocess.MultiProcessCollector(registry, path=path)
        body = generate_latest(registry)
    else:
        body = generate_latest(REGISTRY)
    extras = CollectorRegistry(auto_describe=False)
    extras.register(_Extras())
    return body + generate_latest(extras), CONTENT_TYPE_LATEST


# -- multiprocess mode (devid serve --workers N) ----------------------------------------------

METRICS_DIR = "metrics"     # DATA/metrics/<pid of devid serve>/: one directory per run


@contextmanager
def multiprocess_dir(data_path: Path) -> Iterator[Path | None]:
    """The run's multiprocess directory, DATA/metrics/<this pid>/, fresh and in the environment
    (PROMETHEUS_MULTIPROC_DIR, inherited by the workers) until the run ends; directories of runs
    whose process is gone are removed first, this run's at the end. None when metrics are off."""
    if not ENABLED:
        yield None
        return
    base = Path(data_path) / METRICS_DIR
    base.mkdir(mode=0o700, exist_ok=True)
    for old in base.iterdir():
        if old.name.isdigit() and not _alive(int(old.name)):
            shutil.rmtree(old, ignore_errors=True)
    path = base / str(os.getpid())
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(mode=0o700)
    saved = os.environ.get(MULTIPROC_ENV)
    os.environ[MULTIPROC_ENV] = str(path)
    try:
        yield path
    finally:
        if saved is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = saved
        shutil.rmtree(path, ignore_errors=True)


def worker_exited(pid: int) -> None:
    """prometheus-client's `mark_process_dead` for a worker of this run: its live gauges go."""
    path = os.environ.get(MULTIPROC_ENV)
    if ENABLED and path and Path(path).is_dir():
        from prometheus_client import multiprocess
        multiprocess.mark_process_dead(pid, path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
