"""The real gateway on loopback: real sockets, real DTLS, aiocoap on both sides."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import aiocoap
import pytest

from devid.ca.revocation import revoke_device
from devid.gateway.device.client import device_context
from devid.gateway.dtls import engine as E
from devid.gateway.dtls import records
from devid.gateway.coap.transport import DTLSHandshakeError
from devid.gateway.app.server import Gateway, GatewayConfig

from .conftest import NOW, free_port
from .dtls_helpers import client_context_from_bundle

pytestmark = pytest.mark.engines


async def start_gateway(data, **config):
    port = free_port()
    gw = Gateway(data, GatewayConfig(listen=[("127.0.0.1", port), ("::1", port)], **config))
    await gw.start()
    return gw, port


async def get(ctx, uri):
    return await asyncio.wait_for(ctx.request(aiocoap.Message(code=aiocoap.GET, uri=uri)).response, 15)


def test_get_over_ipv4_and_ipv6_with_claims(data, bundles):
    async def main():
        gw, port = await start_gateway(data)
        try:
            for host in ("127.0.0.1", "[::1]"):
                ctx, _ = await device_context(bundles / "SN00000001", host.strip("[]"))
                try:
                    wkc = await get(ctx, f"coaps://{host}:{port}/.well-known/core")
                    assert wkc.code == aiocoap.CONTENT and b"</whoami>" in wkc.payload
                    who = json.loads((await get(ctx, f"coaps://{host}:{port}/whoami")).payload)
                    assert who["serial"] == "SN00000001" and who["kind"] == "factory"
                    assert who["device_type"] == "temperature-sensor"
                finally:
                    await ctx.shutdown()
        finally:
            await gw.stop()
    asyncio.run(main())


def test_client_refuses_a_gateway_with_the_wrong_name(data, bundles):
    async def main():
        gw, port = await start_gateway(data)
        try:
            ctx, _ = await device_context(bundles / "SN00000001", "gw.wrong.example")
            try:
                with pytest.raises(DTLSHandshakeError, match="server certificate refused"):
                    await get(ctx, f"coaps://127.0.0.1:{port}/whoami")
            finally:
                await ctx.shutdown()
        finally:
            await gw.stop()
    asyncio.run(main())


def test_device_revoked_while_connected_loses_its_session(data, bundles):
    async def main():
        gw, port = await start_gateway(data, revocation_check_interval=0.2)
        ctx, iface = await device_context(bundles / "SN00000002", "127.0.0.1")
        try:
            assert (await get(ctx, f"coaps://127.0.0.1:{port}/whoami")).code == aiocoap.CONTENT
            assert len(gw.engine.sessions) == 1
            reg = data.open_registry()
            revoke_device(reg, "SN00000002", "keyCompromise", NOW)
            reg.close()
            deadline = time.monotonic() + 5
            while gw.engine.sessions and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert gw.engine.sessions == {}, "session of a revoked device still open"
            deadline = time.monotonic() + 5
            while iface.sessions and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert iface.sessions == {}        # the device got close_notify
            # coming back fails: a fresh handshake is refused in the handshake; a resumed one (the
            # client offers its ticket) completes on the client's side and is closed at once
            with pytest.raises(aiocoap.error.NetworkError):
                await get(ctx, f"coaps://127.0.0.1:{port}/whoami")
            assert gw.engine.sessions == {}
            assert gw.engine.stats.failed == 1
        finally:
            await ctx.shutdown()
            await gw.stop()
    asyncio.run(main())


def test_clienthello_flood_from_many_addresses_creates_no_state(data, bundles):
    """500 ClientHellos from 250 loopback addresses (127.0.x.y): only cookie replies, no state,
    while an established device keeps being served."""
    hello = E.ClientEngine(client_context_from_bundle(bundles / "SN00000003"), "x").start(0.0).datagrams[0][1]

    async def main():
        gw, port = await start_gateway(data)
        ctx, _ = await device_context(bundles / "SN00000001", "127.0.0.1")
        try:
            assert (await get(ctx, f"coaps://127.0.0.1:{port}/whoami")).code == aiocoap.CONTENT
            socks = []
            for i in range(250):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.setblocking(False)
                s.bind((f"127.0.{1 + i // 200}.{1 + i % 200}", 0))
                socks.append(s)
            served = 0
            for round_ in range(2):
                for s in socks:
                    s.sendto(hello, ("127.0.0.1", port))
                resp = await get(ctx, f"coaps://127.0.0.1:{port}/whoami")
                served += resp.code == aiocoap.CONTENT
            replies = []
            deadline = time.monotonic() + 5      # until every hello is answered (or loopback dropped some)
            while len(replies) < 500 and time.monotonic() < deadline:
                for s in socks:
                    while True:
                        try:
                            replies.append(s.recv(2048))
                        except BlockingIOError:
                            break
                await asyncio.sleep(0.02)
            for s in socks:
                s.close()
            assert served == 2
            assert len(replies) >= 450           # loopback may drop a few under load
            assert all(len(r) <= len(hello) and records.split_records(r)[0][13] == 3 for r in replies)
            assert set(gw.engine.sessions) == {p for p in gw.engine.sessions if p[0] == "127.0.0.1"}
            assert len(gw.engine.sessions) == 1 and gw.engine.half_open == 0
            assert gw.engine.stats.cookies_sent >= 450
        finally:
            await ctx.shutdown()
            await gw.stop()
    asyncio.run(main())
