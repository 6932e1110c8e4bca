"""Helpers shared by the tests that run the real gateway: the test firmware and policy, a
gateway on loopback, CoAP requests, problem details, signed evidence. (The `world` fixture that
provisions devices for them is in conftest.py.)"""

from __future__ import annotations

import asyncio
import hashlib
import time
from contextlib import asynccontextmanager
from pathlib import Path

import aiocoap
import cbor2
from aiocoap.numbers import codes
from cryptography import x509

from devid.attestation.evidence import Evidence, sign_evidence
from devid.ca import keys
from devid.gateway.device.client import device_context
from devid.gateway.device.enroll import Firmware
from devid.gateway.app.server import Gateway, GatewayConfig

from .conftest import free_port

IMAGE = b"sensor firmware 3.1.0"
FW = Firmware("sha-256", hashlib.sha256(IMAGE).digest(), "sensor-fw", "3.1.0")
POLICY = f"""
version = 1
[device_types.temperature-sensor]
[[device_types.temperature-sensor.firmware]]
name = "sensor-fw"
version = "3.1.0"
digest = "sha-256:{FW.digest.hex()}"

[device_types.meter]
revoke_on_contraindicated = true
[[device_types.meter.firmware]]
name = "sensor-fw"
version = "3.1.0"
digest = "sha-256:{FW.digest.hex()}"

[device_types.strict-sensor]
reenroll = false
[[device_types.strict-sensor.firmware]]
name = "sensor-fw"
version = "3.1.0"
digest = "sha-256:{FW.digest.hex()}"

[device_types.legacy-sensor]
attestation = "waived"
"""


def run_with_gateway(data, body, clock=None, **config):
    """Start the real gateway on loopback (GatewayConfig fields in `config`, the gateway's clock
    if given), run `body(uri, gateway)`, stop the gateway."""
    async def main():
        port = free_port()
        kw = {"clock": clock} if clock is not None else {}
        gw = Gateway(data, GatewayConfig(listen=[("127.0.0.1", port)], revocation_check_interval=0.2, **config), **kw)
        await gw.start()
        try:
            return await body(f"coaps://127.0.0.1:{port}", gw)
        finally:
            await gw.stop()
    return asyncio.run(main())


@asynccontextmanager
async def device_session(bundle: Path, **names):
    """An aiocoap client Context as the device of `bundle` (its factory identity, or the
    `cert_name`/`key_name` given), to a gateway on 127.0.0.1; shut down at the end."""
    ctx, _ = await device_context(bundle, "127.0.0.1", **names)
    try:
        yield ctx
    finally:
        await ctx.shutdown()


async def request(ctx, uri, code=codes.GET, **kw):
    return await asyncio.wait_for(ctx.request(aiocoap.Message(code=code, uri=uri, **kw)).response, 15)


def problem(response) -> dict:
    assert response.opt.content_format == 257, response
    return cbor2.loads(response.payload)


def token_for(bundle: Path, nonce: bytes, **changes) -> bytes:
    key = keys.load_plain_key(bundle / "key.pem")
    cert = x509.load_pem_x509_certificate((bundle / "cert.pem").read_bytes())
    dtype = [e.value.value[2:] for e in cert.extensions if isinstance(e.value, x509.UnrecognizedExtension)][0]
    fields = dict(nonce=nonce, ueid=b"\x01" + bytes(16), oemid=12345, hwmodel=dtype, swname=FW.name,
                  swversion=FW.version, fw_alg=FW.alg, fw_digest=FW.digest, secure_boot=True, dbgstat=2,
                  bootcount=1, iat=int(time.time()))
    # iat: now, as the device would say; the gateway's clock is real time, and conftest.NOW (the
    # start of the run) can be more than max_clock_skew (300 s) behind it late in a long run
    signer = changes.pop("signer", key)
    fields.update(changes)
    return sign_evidence(Evidence(**fields), signer)
