"""The sans-I/O DTLS engine's public API in one import: the server and client roles, what their
calls return, their states and errors, and the server's limits.

    from devid.gateway.dtls import engine as E
    srv = E.ServerEngine(context, authenticator, E.ServerLimits())
    out = srv.receive(peer, datagram, now)      # -> E.Output: datagrams to send, events

Where each part lives: `session.py` the session core both roles share (states, errors, the
handshake, records, timers, closing), `server.py` the gateway's role (cookies, caps, half-open
bookkeeping), `client.py` the device's role, `events.py` the events and `Output`, `limits.py`
the server's limits, `exporter.py` the session's exporter value (`HandshakeComplete.exporter`,
`ClientEngine.exporter`).
"""

from devid.gateway.dtls.client import ClientEngine
from devid.gateway.dtls.events import (ApplicationData, Event, HandshakeComplete, HandshakeFailed, Output, Peer,
                                       SessionClosed)
from devid.gateway.dtls.exporter import LABEL as EXPORTER_LABEL, LENGTH as EXPORTER_LENGTH
from devid.gateway.dtls.limits import LimitError, ServerLimits
from devid.gateway.dtls.psk import PskAuthenticator, PskRefused
from devid.gateway.dtls.server import Authenticator, EngineStats, ServerEngine
from devid.gateway.dtls.errors import DTLSError, LocalProtocolError, RemoteProtocolError
from devid.gateway.dtls.session import State

__all__ = ["ApplicationData", "Authenticator", "ClientEngine", "DTLSError", "EngineStats", "Event",
           "EXPORTER_LABEL", "EXPORTER_LENGTH",
           "HandshakeComplete", "HandshakeFailed", "LimitError", "LocalProtocolError", "Output", "Peer",
           "PskAuthenticator", "PskRefused",
           "RemoteProtocolError", "ServerEngine", "ServerLimits", "SessionClosed", "State"]
