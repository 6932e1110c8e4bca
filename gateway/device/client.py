"""The device side of coaps:// through aiocoap: a client Context authenticating as a device
bundle and checking the gateway, the DTLS handshake as a step of its own (`connect`), and the
exchange that carries the flows' requests over the session.

Used by the enrollment script, the device simulator and the tests. (The load generator in
benchmarks/ carries the same flows over its own lean DTLS sessions.)
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import aiocoap

from devid.gateway.coap.transport import DTLSHandshakeError, client_context, handshake
from devid.gateway.device.identity import load_bundle, server_checker
from devid.gateway.device.protocol import Answer, EnrollFailed, GatewayURI, Request
from devid.gateway.dtls import contexts

__all__ = ["device_context", "open_session", "connect", "coap_exchange", "load_bundle", "server_checker",
           "session_exporter"]

LOGGER = "devid.coap-client"
# The engine's own handshake limit lies this far beyond the caller's timeout, so that the caller's
# timer always fires first: one outcome (a step that got no answer), never a race between the two.
HANDSHAKE_SLACK = 5.0

# aiocoap logs an error with a traceback when a request fails after its caller stopped waiting
# for it (e.g. a handshake that fails just after our own timeout). The caller has reported the
# failure as one line already; without a handler of our own, Python's last-resort handler would
# print that traceback on stderr under the error line. A program that configures logging still
# gets these records (they propagate as usual).
logging.getLogger(LOGGER).addHandler(logging.NullHandler())


async def device_context(directory: Path, host: str, cert_name: str = "chain.pem", key_name: str = "key.pem",
                         handshake_timeout: float = 30.0):
    """An aiocoap client Context authenticating as the device in `directory`, talking to `host`,
    and its DTLS interface. The handshake happens with the first request (or `connect`)."""
    leaf, intermediates, key, root = load_bundle(directory, cert_name, key_name)
    ssl_ctx = contexts.client_context(leaf, intermediates, key, root)
    return await client_context(ssl_ctx, server_check=server_checker(root, host),
                                handshake_timeout=handshake_timeout, loggername=LOGGER)


async def connect(iface, gateway: GatewayURI, timeout: float) -> None:
    """The DTLS handshake with `gateway` through the client interface `iface` of a device
    Context, within `timeout` seconds; the requests that follow use its session. Every failure
    is EnrollFailed at step `connect`: a name that does not resolve, nothing answering (no
    gateway at that address and port, a host that drops the datagrams), a refused handshake."""
    try:
        await asyncio.wait_for(handshake(iface, gateway.base), timeout)
    except asyncio.TimeoutError:
        raise EnrollFailed("connect", f"no answer from {gateway.host} port {gateway.port} within {timeout:g} s "
                                      "(is the gateway running, at this address and port?)") from None
    except DTLSHandshakeError as exc:
        raise EnrollFailed.handshake(str(exc)) from None
    except aiocoap.error.ResolutionError as exc:
        raise EnrollFailed("connect", str(exc.args[0]) if exc.args else f"cannot resolve {gateway.host}") from None
    except OSError as exc:          # an unreachable network, no route to the host
        raise EnrollFailed("connect", f"cannot reach {gateway.host} port {gateway.port}: "
                                      f"{exc.strerror or exc}") from None


def session_exporter(iface) -> bytes | None:
    """The exporter value of the one DTLS session of the client interface `iface` of a device
    Context (`ClientEngine.exporter`: the session nonce, docs/evidence.md#session-nonces), as
    this end computed it; None without an established session or without the extended master
    secret. The device's own value: it never asks the gateway (/whoami) for it."""
    sessions = list(iface.sessions.values())
    if len(sessions) != 1 or not sessions[0].engine.established:
        return None
    return sessions[0].engine.exporter


async def open_session(directory: Path, gateway: GatewayURI, timeout: float, cert_name: str = "chain.pem",
                       key_name: str = "key.pem"):
    """(a device Context whose DTLS session with `gateway` is established (`connect`), the
    session's exporter value or None); the caller shuts the Context down. EnrollFailed at step
    `connect` if the handshake does not complete."""
    ctx, iface = await device_context(directory, gateway.host, cert_name, key_name,
                                      handshake_timeout=timeout + HANDSHAKE_SLACK)
    try:
        await connect(iface, gateway, timeout)
    except BaseException:
        await ctx.shutdown()
        raise
    return ctx, session_exporter(iface)


def coap_exchange(ctx, base: str, timeout: float):
    """exchange(request) -> Answer over the aiocoap Context `ctx` to the gateway at `base`
    (coaps://HOST[:PORT]): each request within `timeout` seconds (a DTLS handshake included when
    the session is not established yet); transport failures become EnrollFailed (the handshake's
    at step `connect`)."""
    async def exchange(request: Request) -> Answer:
        ep = request.endpoint
        options = {k: v for k, v in (("content_format", ep.content_format), ("accept", ep.accept)) if v is not None}
        if request.etag is not None:
            options["etags"] = [request.etag]
        message = aiocoap.Message(code=ep.method, uri=f"{base}/{ep.path}", payload=request.payload, **options)
        try:
            response = await asyncio.wait_for(ctx.request(message).response, timeout)
        except asyncio.TimeoutError:
            raise EnrollFailed.no_answer(ep.step, timeout) from None
        except DTLSHandshakeError as exc:
            raise EnrollFailed.handshake(str(exc)) from None
        except aiocoap.error.ResolutionError as exc:
            raise EnrollFailed("connect", str(exc.args[0]) if exc.args else str(exc)) from None
        except OSError as exc:          # name resolution, unreachable network
            raise EnrollFailed("connect", f"cannot reach the gateway: {exc.strerror or exc}") from None
        except aiocoap.error.Error as exc:
            raise EnrollFailed(ep.step, str(exc) or exc.__class__.__name__) from None
        # held while the exchange is: aiocoap's tinydtls transport keeps its connections only
        # weakly (a WeakValueDictionary), so a session nothing refers to between two requests is
        # collected (close_notify) and the next request opens a new one: a PSK device's GET /psk
        # must come in the session that was issued the certificate (device/psk.py)
        exchange.remote = response.remote
        cf = response.opt.content_format
        return Answer(int(response.code), None if cf is None else int(cf), response.payload)
    exchange.remote = None
    return exchange
