"""`devid serve`: the gateway process.

Builds the DTLS server Context from the data directory (gateway certificate and key, the
manufacturing and operational CAs as trust anchors), the device authenticator (path validation +
registry), the CoAP site, and runs until SIGINT or SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone

import aiocoap
import aiocoap.resource as resource
from aiocoap.numbers.contentformat import ContentFormat

from attestation.policy import Policy, load_policy
from attestation.service import AttestationService

from .attestation_store import SQLiteAttestationStore
from .configuration import ConfigTemplates
from .datadir import DataDir
from .enrollment import EnrollmentService
from .resources import add_enrollment_resources
from .dtls import contexts, engine as E
from .dtls.transport import DTLSServerInterface, server_context
from .identity import DeviceAuthenticator, PeerIdentity

log = logging.getLogger("devid.gateway")
POLICY_FILE = "attestation-policy.toml"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class WhoAmI(resource.Resource):
    """GET: the identity the gateway authenticated for this DTLS session (JSON)."""

    rt = "devid.whoami"

    async def render_get(self, request):
        claims = [c for c in request.remote.authenticated_claims if isinstance(c, PeerIdentity)]
        if not claims:
            return aiocoap.Message(code=aiocoap.UNAUTHORIZED, payload=b"no device identity")
        return aiocoap.Message(code=aiocoap.CONTENT, content_format=ContentFormat.JSON,
                               payload=json.dumps(claims[0].as_dict()).encode())


def build_site() -> resource.Site:
    site = resource.Site()
    site.add_resource([".well-known", "core"], resource.WKCResource(site.get_resources_as_linkheader))
    site.add_resource(["whoami"], WhoAmI())
    return site


def load_gateway_policy(data: DataDir) -> Policy:
    """DATA/attestation-policy.toml; without one, no device type can enroll (logged once)."""
    path = data.path / POLICY_FILE
    if not path.exists():
        log.warning(json.dumps({"event": "policy", "result": "missing", "path": str(path),
                                "effect": "no device type can enroll until a policy is written"}))
        return Policy(device_types={}, source=str(path))
    return load_policy(path)


@dataclass
class GatewayConfig:
    listen: list[tuple[str, int]] = field(default_factory=lambda: [("0.0.0.0", 5684), ("::", 5684)])
    limits: E.ServerLimits = field(default_factory=E.ServerLimits)
    ciphers: bytes = contexts.CIPHERS_CCM8_AND_GCM
    revocation_check_interval: float = 5.0
    reuse_port: bool = False


class Gateway:
    """The running gateway: one aiocoap Context over the DTLS transport."""

    def __init__(self, data: DataDir, config: GatewayConfig | None = None, clock=utcnow) -> None:
        self.data = data.require()
        self.config = config or GatewayConfig()
        self.clock = clock
        self.registry = data.open_registry()
        gw = data.issuer("gateway")
        mfg, op = data.cert("manufacturing"), data.cert("operational")
        self.ssl_context = contexts.server_context(gw.cert, [op], gw.key, trust_anchors=[mfg, op],
                                                   client_cas=[mfg, op], ciphers=self.config.ciphers)
        self.authenticator = DeviceAuthenticator(mfg, op, data.config.identity, self.registry, clock)
        self.engine = E.ServerEngine(self.ssl_context, self.authenticator, self.config.limits)
        self.policy = load_gateway_policy(data)
        store = SQLiteAttestationStore(self.registry)
        self.attestation = AttestationService(self.policy, store, store, clock=clock)
        self.configs = ConfigTemplates(data.path / "config", data.cert)
        self.configs.ensure_default()
        self.enrollment = EnrollmentService(data.authority(self.registry), self.attestation, self.policy,
                                            self.configs, clock)
        self.site = build_site()
        add_enrollment_resources(self.site, self.enrollment, data.cert("root"), op)
        self.context: aiocoap.Context | None = None
        self.interface: DTLSServerInterface | None = None

    async def start(self) -> None:
        self.context, self.interface = await server_context(self.site, self.engine, self.config.listen,
                                                            reuse_port=self.config.reuse_port)
        self.interface.start_revocation_watch(self.authenticator.revoked,
                                              self.config.revocation_check_interval)

    @property
    def addresses(self) -> list[tuple]:
        return self.interface.addresses if self.interface else []

    async def stop(self) -> None:
        if self.context is not None:
            await self.context.shutdown()
            self.context = None
        self.registry.close()


async def serve(data: DataDir, config: GatewayConfig, ready=None) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    gateway = Gateway(data, config)
    await gateway.start()
    addrs = ", ".join(f"coaps://{'[' + h + ']' if ':' in h else h}:{p}" for h, p in gateway.addresses)
    print(f"devid gateway listening on {addrs}", flush=True)
    if ready is not None:
        ready(gateway)
    await stop.wait()
    print("devid gateway: shutting down", flush=True)
    await gateway.stop()
    s = gateway.engine.stats
    print(f"devid gateway: stopped ({s.handshakes} handshakes, {s.resumed} resumed, {s.failed} refused, "
          f"{s.cookies_sent} cookies)", flush=True)
    return 0


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
    root = logging.getLogger("devid")
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("coap-server").setLevel(logging.WARNING)
    logging.getLogger("devid.coap").setLevel(logging.WARNING)
