"""`devid serve`: the gateway process.

Builds the DTLS server Context from the data directory (gateway certificate and key, the
manufacturing and operational CAs as trust anchors), the device authenticator (path validation +
registry), the CoAP site, and runs until SIGINT or SIGTERM. SIGHUP, or a change of the policy
file, reloads the attestation policy (`policy_reload.py`); with `--workers`, the parent passes
SIGHUP on to every worker, and every worker watches the file itself.
"""

from __future__ import annotations

import asyncio
import faulthandler
import os
import logging
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import aiocoap.resource as resource

from devid.attestation.policy import Policy
from devid.attestation.service import AttestationService
from devid.ca.errors import CAError
from devid.ca.psk import SECRET_CHECK_KEY, SECRET_FILE

from devid.gateway.store.attestation_store import AttestationStore
from devid.attestation.log_budget import LogBudget

from devid.gateway.service.anomalies import AnomalySettings, AnomalyTracker, RefusalWitness
from devid.gateway.service.budgets import Budgets
from devid.gateway.store.configuration import ConfigTemplates
from devid.gateway.app.broker_keeper import BrokerKeeper, check_broker_dir
from devid.gateway.app.datadir import DataDir
from devid.gateway.app.policy_reload import CHECK_INTERVAL, POLICY_FILE, PolicyFile
from devid.gateway.service.enrollment import EnrollmentService
from devid.gateway.service.resources import WhoAmI, add_enrollment_resources
from devid.gateway.dtls import contexts, engine as E
from devid.gateway.coap.server import CoapServer
from devid.gateway.coap.transport import DTLSServerInterface
from devid.gateway.service.identity import FACTORY, OPERATIONAL, DeviceAuthenticator, PskDeviceAuthenticator
from devid.gateway.service.psk import OperationalPsk
from devid.gateway.system.lifeline import die_with_parent
from devid.gateway.system.logs import configure_logging
from devid.gateway.store.gauges import RegistryGauges
from devid.gateway.store.storage import StorageHealth
from devid.gateway.system import metrics

if TYPE_CHECKING:   # the operator room is imported only when --http asks for it
    from devid.gateway.operator.listener import HttpConfig

log = logging.getLogger("devid.gateway")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def build_site() -> resource.Site:
    """The resources, in an aiocoap Site: `CoapServer` routes on its exact paths, and
    `.well-known/core` lists them."""
    site = resource.Site()
    site.add_resource([".well-known", "core"], resource.WKCResource(site.get_resources_as_linkheader))
    site.add_resource(["whoami"], WhoAmI())
    return site


@dataclass
class GatewayConfig:
    listen: list[tuple[str, int]] = field(default_factory=lambda: [("0.0.0.0", 5684), ("::", 5684)])
    # None: from devid.toml ([gateway], [budgets], [attestation_log]; docs/configuration.md), else the defaults
    limits: E.ServerLimits | None = None
    ciphers: bytes = contexts.CIPHERS_CCM8_AND_GCM
    revocation_check_interval: float = 5.0
    policy_check_interval: float | None = CHECK_INTERVAL    # s between looks at the policy file; None: SIGHUP only
    reuse_port: bool = False
    budgets: Budgets | None = None              # per-device limits (docs/enrollment.md#budgets)
    log_budget: LogBudget | None = None         # refused evidence logged per device (docs/attestation.md)
    mqtt_broker: Path | None = None             # a broker directory whose CRL and ACL serve keeps current
    mqtt_broker_pid: int | str | None = None    # the broker to SIGHUP after each refresh: pid or pid file
    mqtt_broker_check_interval: float = 5.0     # s between looks at the registry for the broker
    mqtt_broker_batch: float = 30.0             # s at least between broker reloads for new enrollments alone
    anomalies: AnomalySettings | None = None    # anomaly thresholds (docs/operations.md#anomaly-signals)
    # the operator HTTP listener (`--http`, docs/operations.md): None = off; with --workers, worker 0 only
    http: HttpConfig | None = None


class Gateway:
    """The running gateway: the CoAP server core (`coap.py`) over the DTLS transport."""

    def __init__(self, data: DataDir, config: GatewayConfig | None = None, clock=utcnow) -> None:
        self.data = data.require()
        self.config = config or GatewayConfig()
        if self.config.mqtt_broker is not None:
            check_broker_dir(self.config.mqtt_broker)
        self.clock = clock
        self.registry = data.open_registry()
        self.registry.health = StorageHealth(log, str(self.registry.path))
        gw = data.issuer("gateway")
        mfg, op = data.cert("manufacturing"), data.cert("operational")
        self.ssl_context = contexts.server_context(gw.cert, [op], gw.key, trust_anchors=[mfg, op],
                                                   client_cas=[mfg, op], ciphers=self.config.ciphers, psk=True)
        settings = data.config
        budgets = self.config.budgets or settings.budgets
        self.authenticator = DeviceAuthenticator(mfg, op, data.config.identity, self.registry, clock,
                                                 superseded_grace=budgets.superseded_grace)
        # PSK devices (tinydtls) on the same port: the ClientHello's suites decide (dtls/psk.py)
        self.psk = PskDeviceAuthenticator(self.registry, PskSecretLoader(data), clock=clock,
                                          issuers={FACTORY: [mfg, data.cert("root")], OPERATIONAL: [op, data.cert("root")]})
        self.psk.load_now()         # read now if there is one (scrypt: ~0.5 s), not in a handshake
        # the engine's authenticator, wrapped to name the device of a refused certificate
        self.witness = RefusalWitness(self.authenticator)
        self.engine = E.ServerEngine(self.ssl_context, self.witness,
                                     self.config.limits or settings.server_limits, psk=self.psk)
        self.anomalies = AnomalyTracker(self.config.anomalies, self.registry)
        # certificates expiring within their type's renewal threshold (the policy's, docs/attestation.md)
        self.gauges = RegistryGauges(self.registry, clock, threshold=lambda t: self.policy.renewal_threshold(t))
        self.policy_file = PolicyFile(data.path / POLICY_FILE, self.use_policy)
        self.policy = self.policy_file.load_at_start()
        store = AttestationStore(self.registry)
        self.attestation = AttestationService(self.policy, store, store, clock=clock,
                                              max_outstanding_nonces=budgets.outstanding_nonces,
                                              log_budget=self.config.log_budget or settings.log_budget)
        self.configs = ConfigTemplates(data.path / "config", data.cert)
        self.configs.ensure_default()
        # the verdict's use and the issuance in one durable transaction that holds the device
        # (store/registry.py device_transaction): the certificate is on disk before the answer
        # carrying it is sent, and racing requests for one device see each other's writes
        self.enrollment = EnrollmentService(data.authority(self.registry), self.attestation, self.policy,
                                            self.configs, clock, budgets=budgets,
                                            atomic=self.registry.device_transaction, anomalies=self.anomalies,
                                            psk_secret=self.psk.secret, delivery=(gw.key, [gw.cert, op]))
        self.site = build_site()
        add_enrollment_resources(self.site, self.enrollment, data.cert("root"), op)
        self.site.add_resource(["psk"], OperationalPsk(self.enrollment))
        self.coap: CoapServer | None = None
        self.interface: DTLSServerInterface | None = None
        self._policy_watch: asyncio.Task | None = None
        self.broker_keeper: BrokerKeeper | None = None
        if self.config.mqtt_broker is not None:         # docs/mqtt.md#keeping-the-broker-current
            self.broker_keeper = BrokerKeeper(data, self.config.mqtt_broker, self.config.mqtt_broker_pid, clock,
                                              check_interval=self.config.mqtt_broker_check_interval,
                                              debounce=self.config.mqtt_broker_batch)
        self.operator = None                    # the operator listener (`--http`), once started

    def use_policy(self, policy: Policy) -> None:
        """Put a validated policy in force for every later request (nothing is awaited here, so
        a request in the event loop sees the old policy or the new one, never a mix)."""
        self.policy = policy
        self.attestation.use_policy(policy)
        self.enrollment.policy = policy

    def reload_policy(self, trigger: str = "signal") -> bool:
        """Read the policy file again now (SIGHUP); True if a new policy is in force."""
        return self.policy_file.reload(trigger)

    async def start(self) -> None:
        self.coap = CoapServer(self.site)
        self.coap.on_refused = lambda serial: self.anomalies.refused(serial, "request")
        self.interface = await DTLSServerInterface.create(self.coap, self.engine, self.config.listen,
                                                          asyncio.get_running_loop(),
                                                          reuse_port=self.config.reuse_port)
        self.coap.interface = self.interface
        self.interface.anomalies, self.interface.witness = self.anomalies, self.witness
        metrics.add_scrape_collector(self.gauges)
        self.interface.start_revocation_watch(self.authenticator.ended,
                                              self.config.revocation_check_interval)
        if self.config.policy_check_interval:
            self._policy_watch = asyncio.get_running_loop().create_task(
                self.policy_file.watch(self.config.policy_check_interval))
        if self.broker_keeper is not None:
            self.broker_keeper.start()
        if self.config.http is not None:
            # on this loop, with this registry (gateway/operator/listener.py says why)
            from devid.gateway.operator.listener import build_listener
            self.operator = build_listener(
                self.config.http, self.data.path, self.registry, self.clock, gateway_cert=self.data.cert("gateway"),
                operational_cert=self.data.cert("operational"), root_cert=self.data.cert("root"),
                issuer=lambda: self.data.issuer("operational"), organization=self.data.config.identity.organization,
                threshold=lambda t: self.policy.renewal_threshold(t))
            await self.operator.start()

    @property
    def addresses(self) -> list[tuple]:
        return self.interface.addresses if self.interface else []

    async def stop(self) -> None:
        metrics.remove_scrape_collector(self.gauges)
        if self.operator is not None:
            await self.operator.stop()
            self.operator = None
        if self._policy_watch is not None:
            self._policy_watch.cancel()
            self._policy_watch = None
        if self.broker_keeper is not None:
            await self.broker_keeper.stop()
        if self.coap is not None:
            await self.coap.shutdown()
            self.coap = None
        self.registry.close()


class PskSecretLoader:
    """The PSK secret, checked against the registry's (a host with another secret, or with none
    when the registry's devices use one, would refuse every PSK device the others accept). Called
    at start and then, while there is none, in a thread of its own (identity.py), so with a
    registry connection of its own. Says why a secret is missing or unusable at ERROR, once per
    reason (identity.py backs off from a secret that keeps failing)."""

    ASK_EVERY = 60.0    # s: how often a host without a secret asks the registry whether others use one

    def __init__(self, data: DataDir, monotonic=time.monotonic) -> None:
        self.data = data
        self.said: str | None = None
        self.monotonic = monotonic
        self.asked: float | None = None

    def __call__(self) -> bytes | None:
        path = self.data.ca_dir / SECRET_FILE
        now = self.monotonic()
        if not path.exists() and self.asked is not None and now - self.asked < self.ASK_EVERY:
            return None                 # the usual state of a host without PSK devices: a stat, no query
        if not path.exists():
            self.asked = now
        try:
            registry = self.data.open_registry()
            try:
                if not path.exists():
                    if SECRET_CHECK_KEY in registry.deployment():
                        raise CAError(f"{path}: missing, but this registry's PSK devices use a PSK secret: copy "
                                      "the first host's here")
                    return None
                return self.data.psk_secret(registry=registry)
            finally:
                registry.close()
        except Exception as exc:        # unusable: PSK devices are refused, and said why
            if str(exc) != self.said:
                self.said = str(exc)
                log.error("PSK secret not usable: %s", exc)
            raise


def _addresses(addrs) -> str:
    return ", ".join(f"coaps://{'[' + h + ']' if ':' in h else h}:{p}" for h, p in addrs)


def _stats_line(stats: dict) -> str:
    return (f"{stats['handshakes']} handshakes, {stats['resumed']} resumed, {stats['failed']} refused, "
            f"{stats['cookies_sent']} cookies")


async def serve(data: DataDir, config: GatewayConfig, ready=None, announce: bool = True) -> dict:
    """Run one gateway until SIGINT/SIGTERM, reloading its policy on SIGHUP; returns its DTLS
    statistics."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    gateway: Gateway | None = None
    # installed before the gateway reads its policy: a SIGHUP during start-up is not fatal (the
    # policy read at start is then the newest, or the file watch sees the change)
    loop.add_signal_handler(signal.SIGHUP, lambda: gateway.reload_policy("signal") if gateway else None)
    gateway = Gateway(data, config)
    await gateway.start()
    if announce:
        print(f"devid gateway listening on {_addresses(gateway.addresses)}", flush=True)
    if gateway.operator is not None:        # (with --workers: worker 0's line)
        print(f"devid operator listening on {gateway.operator.url}", flush=True)
    if ready is not None:
        ready(gateway)
    await stop.wait()
    if announce:
        print("devid gateway: shutting down", flush=True)
    await gateway.stop()
    stats = vars(gateway.engine.stats).copy()
    if announce:
        print(f"devid gateway: stopped ({_stats_line(stats)})", flush=True)
    return stats


WORKER_GRACE = 10.0     # s after the parent's death before a worker that has not stopped is ended


def _worker(path: str, config: GatewayConfig, log_level: str, index: int, queue, parent: int,
            log_file: str | None = None) -> None:
    """One worker process of `devid serve --workers N`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)        # the parent turns ^C into SIGTERM for us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)       # until serve() installs its clean shutdown
    signal.signal(signal.SIGHUP, signal.SIG_IGN)        # until serve() installs the policy reload
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})     # blocked by the parent across the spawn
    # if the parent dies (even by kill -9), SIGTERM: a clean shutdown that frees the port;
    # ended after WORKER_GRACE if that does not finish
    die_with_parent(parent, signal.SIGTERM, grace=WORKER_GRACE)
    faulthandler.register(signal.SIGUSR1, all_threads=True)   # the parent's "where are you stuck?"
    configure_logging(log_level, worker=index, log_file=log_file)
    if index != 0:          # the operator listener runs in worker 0 only (docs/operations.md)
        config.http = None
    code = 0
    try:
        def ready(gateway):
            queue.put(("ready", index, gateway.addresses))
        if index != 0:                  # one process keeps the broker's files (worker 0)
            config = replace(config, mqtt_broker=None, mqtt_broker_pid=None)
        stats = asyncio.run(serve(DataDir(Path(path)), config, ready=ready, announce=False))
        queue.put(("stopped", index, stats))
    except Exception as exc:       # reported by the parent as one line
        queue.put(("error", index, f"{exc.__class__.__name__}: {exc}"))
        code = 1
    finally:
        # flush our messages to the parent now, then leave without multiprocessing's exit
        # handlers (a queue finalizer once hung a worker on its way out)
        queue.close()
        queue.join_thread()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve_workers(data: DataDir, config: GatewayConfig, workers: int, log_level: str = "INFO",
                  log_file: str | None = None) -> int:
    """`devid serve --workers N`, with the run's metrics directory (system/metrics.py: every
    worker's metrics in DATA/metrics/<pid>/, summed by an exposition in any process of the run;
    worker 0 answers /metrics, with the registry's gauges from its own collector)."""
    with metrics.multiprocess_dir(data.path):
        return _serve_workers(data, config, workers, log_level, log_file)


def _serve_workers(data: DataDir, config: GatewayConfig, workers: int, log_level: str = "INFO",
                   log_file: str | None = None) -> int:
    """`devid serve --workers N`: N processes on the same UDP ports (SO_REUSEPORT: the kernel keeps
    each peer address, hence each DTLS session, on one worker), sharing the registry database.
    Everything all workers must see (nonces, verdicts, revocations) lives in the registry."""
    import multiprocessing
    import socket as socket_module
    # Probe each address without SO_REUSEPORT first: a port another program (or another gateway)
    # holds is an error here, not a silent share; port 0 becomes one concrete port for all workers.
    resolved = []
    for host, port in config.listen:
        family = socket_module.AF_INET6 if ":" in host else socket_module.AF_INET
        with socket_module.socket(family, socket_module.SOCK_DGRAM) as probe:
            try:
                probe.bind((host, port))
            except OSError as exc:
                print(f"devid: error: cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr)
                return 1
            resolved.append((host, probe.getsockname()[1]))
    config.listen = resolved
    config.reuse_port = True
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(data.path), config, log_level, i, queue, os.getpid(), log_file),
                         daemon=False) for i in range(workers)]
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True
        for p in procs:
            if p.is_alive():
                p.terminate()            # SIGTERM: a clean shutdown in the worker
    started: set[int] = set()       # workers that reported ready: their SIGHUP handler is in place

    def reload(*_):
        # the policy lives in the workers: each reads the file again. A worker still starting is
        # left alone (a SIGHUP before its handler would end it): it reads the file as it starts,
        # or its watch of the file sees a change made after that
        for i in sorted(started):
            if procs[i].is_alive():
                try:
                    os.kill(procs[i].pid, signal.SIGHUP)
                except ProcessLookupError:
                    pass
    old = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    old[signal.SIGHUP] = signal.signal(signal.SIGHUP, reload)
    import queue as queue_module
    totals: dict[str, int] = {}
    failed = False

    def handle(kind: str, index: int, payload) -> None:
        nonlocal failed
        if kind == "error":
            if not failed:      # one line: the other workers usually fail the same way
                print(f"devid: error: worker {index}: {payload}", file=sys.stderr, flush=True)
            failed = True
        elif kind == "stopped":
            for k, v in payload.items():
                totals[k] = totals.get(k, 0) + v

    try:
        # SIGHUP blocked while the workers are made: a blocked mask survives the spawn's exec, and a
        # hang-up sent to the whole process group in that moment would otherwise end a worker
        # before it ignores the signal (it unblocks once it does, see _worker)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            for p in procs:
                p.start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        ready = 0
        addresses = None
        # wait for every worker to report; a worker that dies without a word is a failure too
        while ready < workers and not failed:
            try:
                kind, index, payload = queue.get(timeout=0.5)
            except queue_module.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode is not None]
                if dead and not stopping:
                    # a worker that failed wrote why before it exited: read that first (under
                    # load, its message and its exit can both land just after our timeout)
                    try:
                        kind, index, payload = queue.get(timeout=2.0)
                    except queue_module.Empty:
                        print(f"devid: error: worker {dead[0]} exited during start-up", file=sys.stderr, flush=True)
                        failed = True
                        continue
                elif stopping:
                    break
                else:
                    continue
            if kind == "ready":
                ready += 1
                started.add(index)
                addresses = payload
            else:
                handle(kind, index, payload)
        if failed:
            stop()
        elif not stopping:
            print(f"devid gateway listening on {_addresses(addresses)} ({workers} workers, pids "
                  f"{', '.join(str(p.pid) for p in procs)})", flush=True)
        # keep draining the queue while the workers run and stop: a worker exits only after its
        # messages are read (multiprocessing queues flush on exit)
        grace = None
        while any(p.is_alive() for p in procs):
            try:
                handle(*queue.get(timeout=0.5))
            except queue_module.Empty:
                pass
            if stopping or failed:      # shutting down: bounded, then the stragglers are killed
                grace = grace or time.monotonic() + 15
                if time.monotonic() > grace:
                    break
        while True:
            try:
                handle(*queue.get(timeout=0.2))
            except queue_module.Empty:
                break
        for i, p in enumerate(procs):   # nothing outlives the parent
            if p.is_alive() and grace is not None and time.monotonic() > grace:
                print(f"devid: warning: worker {i} (pid {p.pid}) did not stop; its stack:", file=sys.stderr,
                      flush=True)
                os.kill(p.pid, signal.SIGUSR1)      # faulthandler in the worker prints its stack
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
            metrics.worker_exited(p.pid)      # its live gauges (open sessions) go; its counters stay
        if not failed:
            print("devid gateway: shutting down", flush=True)
            stats = {k: totals.get(k, 0) for k in ('handshakes', 'resumed', 'failed', 'cookies_sent')}
            print(f"devid gateway: stopped ({_stats_line(stats)})", flush=True)
        return 1 if failed else 0
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
