"""The session's exporter value (RFC 5705): 32 bytes both ends of a DTLS 1.2 session compute from
its master secret and its two randoms, and nobody else can. devid uses it as the session-bound
attestation nonce (docs/evidence.md#session-nonces): evidence that carries it was made for this
session, so it needs no round trip to fetch a nonce and no row to remember one.

    label    "EXPERIMENTAL-devid-attestation-nonce" (ASCII, no terminating NUL)
    length   32 bytes
    context  none (RFC 5705 distinguishes no context from an empty one: none is used)

Label: RFC 5705 section 4 reserves labels beginning with "EXPERIMENTAL" for private use without
registration; every other label must be registered with IANA (TLS Exporter Labels). devid's
label is not registered, so it begins with "EXPERIMENTAL". It is devid's own, not RFC 9266's
"EXPORTER-Channel-Binding": a value exported for one purpose is never the value of another.

Extended master secret (RFC 7627): without it, a TLS 1.2 master secret is not bound to the
handshake that made it, and a machine in the middle can give two sessions (device to it, it to
the gateway) the same master secret and randoms, hence the same exporter value (the triple
handshake attack). A session without the extended master secret therefore has no exporter value
here (None): its device uses a server nonce (GET /attest/nonce). OpenSSL, GnuTLS and libcoap's
builds negotiate it by default.

`SSL_get_extms_support` is not among pyOpenSSL's methods; it is called through pyOpenSSL's own
cffi bindings (as alerts.py does). Should they lose it, sessions have no exporter value (devices
fall back to server nonces) rather than failing their handshakes, and
tests/test_session_nonce.py fails.
"""

from __future__ import annotations

from OpenSSL import SSL
from OpenSSL._util import lib as _lib       # private: see the module docstring

LABEL = b"EXPERIMENTAL-devid-attestation-nonce"
LENGTH = 32

_get_extms_support = getattr(_lib, "SSL_get_extms_support", None)


def extended_master_secret(conn: SSL.Connection) -> bool:
    """Whether the completed handshake of `conn` negotiated the extended master secret (False
    when the bindings cannot say)."""
    return _get_extms_support is not None and _get_extms_support(conn._ssl) == 1


def exporter_value(conn: SSL.Connection) -> bytes | None:
    """The session's exporter value (LABEL, LENGTH, no context) once its handshake is complete,
    or None when the session has no extended master secret."""
    if not extended_master_secret(conn):
        return None
    return conn.export_keying_material(LABEL, LENGTH)
