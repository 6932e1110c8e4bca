"""The device side of coaps:// through aiocoap: a client Context authenticating as a device
bundle and checking the gateway, and the exchange that carries the flows' requests over it.

Used by the enrollment script, the device simulator and the tests. (The load generator in
benchmarks/ carries the same flows over its own lean DTLS sessions.)
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiocoap

from devid.gateway.coap.transport import DTLSHandshakeError, client_context
from devid.gateway.device.identity import load_bundle, server_checker
from devid.gateway.device.protocol import Answer, EnrollFailed, Request
from devid.gateway.dtls import contexts

__all__ = ["device_context", "coap_exchange", "load_bundle", "server_checker"]


async def device_context(directory: Path, host: str, cert_name: str = "chain.pem", key_name: str = "key.pem",
                         handshake_timeout: float = 30.0):
    """An aiocoap client Context authenticating as the device in `directory`, talking to `host`."""
    leaf, intermediates, key, root = load_bundle(directory, cert_name, key_name)
    ssl_ctx = contexts.client_context(leaf, intermediates, key, root)
    return await client_context(ssl_ctx, server_check=server_checker(root, host),
                                handshake_timeout=handshake_timeout)


def coap_exchange(ctx, base: str, timeout: float):
    """exchange(request) -> Answer over the aiocoap Context `ctx` to the gateway at `base`
    (coaps://HOST[:PORT]): each request within `timeout` seconds (the first one's DTLS handshake
    included); transport failures become EnrollFailed (the handshake's at step `connect`)."""
    async def exchange(request: Request) -> Answer:
        ep = request.endpoint
        options = {k: v for k, v in (("content_format", ep.content_format), ("accept", ep.accept)) if v is not None}
        message = aiocoap.Message(code=ep.method, uri=f"{base}/{ep.path}", payload=request.payload, **options)
        try:
            response = await asyncio.wait_for(ctx.request(message).response, timeout)
        except asyncio.TimeoutError:
            raise EnrollFailed.no_answer(ep.step, timeout) from None
        except DTLSHandshakeError as exc:
            raise EnrollFailed.handshake(str(exc)) from None
        except OSError as exc:          # name resolution, unreachable network
            raise EnrollFailed("connect", f"cannot reach the gateway: {exc.strerror or exc}") from None
        except aiocoap.error.Error as exc:
            raise EnrollFailed(ep.step, str(exc) or exc.__class__.__name__) from None
        cf = response.opt.content_format
        return Answer(int(response.code), None if cf is None else int(cf), response.payload)
    return exchange
