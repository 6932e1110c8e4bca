"""The DTLS engine on asyncio UDP sockets, as an aiocoap message transport (coaps://): what the
rest of the gateway imports.

- `dtls_server.py`: the gateway side. `DTLSServerInterface` hands decoded messages to the CoAP
  server core (`server.CoapServer`), which answers them (it offers the two calls of aiocoap's
  message manager the interface makes: `dispatch_message`, `dispatch_error`).
- `dtls_client.py`: the device side. `client_context` is an aiocoap Context whose coaps://
  requests run over `DTLSClientInterface`; `DTLSHandshakeError` is how a refused handshake ends
  a request.
- `dtls_interface.py`: what both share: `DTLSRemote`, one per DTLS session (its
  `authenticated_claims` carry the peer identity the engine's authenticator returned), and the
  engine-to-aiocoap event handling and timer.

aiocoap has no plug-in registry for transports: a Context gets this one the way it gets its
built-in ones (`Context._append_tokenmanaged_messagemanaged_transport`), which is why aiocoap is
pinned to the version this was built against (0.4.17).
"""

from __future__ import annotations

import ipaddress

from aiocoap.numbers import COAPS_PORT
from aiocoap.util import hostportsplit

from devid.gateway.coap.dtls_client import DTLSClientInterface, DTLSHandshakeError, client_context, handshake
from devid.gateway.coap.dtls_interface import DTLSRemote
from devid.gateway.coap.dtls_server import DTLSServerInterface

__all__ = ["DTLSClientInterface", "DTLSHandshakeError", "DTLSRemote", "DTLSServerInterface", "client_context", "handshake",
           "parse_listen"]


def parse_listen(text: str) -> tuple[str, int]:
    """'HOST:PORT', '[V6]:PORT', ':PORT', 'HOST' or a bare IPv6 address -> (host, port); port 0
    picks a free port. Raises ValueError."""
    try:
        ipaddress.ip_address(text)
        return text, COAPS_PORT                       # a bare address, IPv6 included
    except ValueError:
        pass
    if text.startswith(":"):
        host, port = "", text[1:]
    else:
        host, port = hostportsplit(text)
    port = COAPS_PORT if port in (None, "") else int(port)
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range: {port}")
    host = host or "0.0.0.0"
    ipaddress.ip_address(host)
    return host, port
