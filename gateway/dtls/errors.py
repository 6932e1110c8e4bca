"""The DTLS engine's errors, in the manner of h11, and readable reasons for OpenSSL's.

- `LocalProtocolError`: the caller used the API wrongly (`send` to a peer without an established
  session, on either side; a message larger than one record). Raised to the caller; the
  engine's state is unchanged.
- `RemoteProtocolError`: the peer broke the protocol or was refused (a failed handshake step, a
  refused certificate, a fatal alert, a DTLS error in its records). It never leaves the engine,
  whose calls never raise for anything a peer sends (one peer cannot break the others): the
  session core turns it into a `HandshakeFailed` (during the handshake) or a `SessionClosed`
  (after it) in one place, with its text as the event's reason.
"""

from __future__ import annotations

from devid.gateway.errors import GatewayError


class DTLSError(GatewayError):
    """Base of the DTLS engine's errors."""


class LocalProtocolError(DTLSError):
    """The caller used the engine wrongly; the engine's state is unchanged."""


class RemoteProtocolError(DTLSError):
    """The peer broke the protocol or was refused; its handshake or session ends. Never raised to
    the caller: it becomes a `HandshakeFailed` or `SessionClosed` event with this text as reason."""


# X509_V_ERR_* codes worth a readable name in logs
VERIFY_ERRORS = {
    2: "unable to get issuer certificate", 7: "certificate signature failure", 9: "certificate not yet valid",
    10: "certificate has expired", 18: "self-signed certificate", 19: "self-signed certificate in chain",
    20: "unable to get local issuer certificate", 21: "unable to verify the first certificate",
    22: "certificate chain too long", 24: "invalid CA certificate", 25: "path length constraint exceeded",
    26: "unsupported certificate purpose", 28: "certificate rejected",
}


def ssl_reason(exc: Exception) -> str:
    """The text of a pyOpenSSL error: its OpenSSL reasons, joined."""
    args = getattr(exc, "args", ())
    if args and isinstance(args[0], list) and args[0]:
        return "; ".join(str(e[-1]) for e in args[0] if e)
    return str(exc) or exc.__class__.__name__
