"""Pre-shared-key DTLS (RFC 4279) beside certificates, on the same Contexts.

The suite is TLS_PSK_WITH_AES_128_CCM_8 (RFC 6655; OpenSSL's name PSK-AES128-CCM8), the one RFC
7925 makes mandatory for PSK devices and the one tinydtls speaks. On a server Context that also
offers the certificate suites, the ClientHello decides: a client offering only PSK suites gets a
PSK handshake (no certificate is requested: OpenSSL sends no CertificateRequest for PSK suites),
a client offering ECDHE-ECDSA gets the certificate handshake. OpenSSL offers PSK suites only on a
Context with a PSK callback.

pyOpenSSL 26 binds no PSK call, so the callbacks go on the Context through pyOpenSSL's own cffi
bindings (`SSL_CTX_set_psk_server_callback`, `SSL_CTX_set_psk_client_callback`), as alerts.py does
for the verify callback; tests/test_psk_engine.py fails if those bindings move.

What OpenSSL does on a refusal:
- the server callback returns no key: OpenSSL ends the handshake with a fatal
  `unknown_psk_identity` alert (115). The gateway's engine does so only when it could not look
  the identity up (its registry failed): an identity it refuses gets a random key (DUMMY_PSK_LEN
  bytes) instead, so the peer cannot tell an unknown or revoked device from a wrong key
  (RFC 4279 section 2) and the handshake fails as below;
- a wrong key: both sides derive different keys, the server cannot open the client's Finished,
  and OpenSSL's DTLS drops such a record silently (RFC 6347 4.1.2.7), so the client would wait for
  its timeout. The server engine notices it (server.py: the datagram that carried the client's
  ChangeCipherSpec and Finished left the handshake incomplete) and answers with a fatal
  `decrypt_error` alert (51), what TLS sends for a Finished that does not verify (RFC 5246 7.4.9).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Protocol

from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi, lib as _lib       # private: see the module docstring

from devid.gateway.dtls.errors import RemoteProtocolError

log = logging.getLogger("devid.dtls")

PSK_CIPHER = "PSK-AES128-CCM8"
CIPHERS_PSK = b"PSK-AES128-CCM8:@SECLEVEL=0"
MAX_PSK = 64                         # bytes: more than any key devid derives (16)
DUMMY_PSK_LEN = 16                   # the random key an identity the gateway refuses gets (server.py)

class PskRefused(RemoteProtocolError):
    """A `PskAuthenticator`'s refusal of a PSK identity (its text is the reason, for the log)."""


class PskAuthenticator(Protocol):
    """What `ServerEngine(psk=...)` asks for a PSK identity."""

    def psk_for(self, identity: bytes) -> tuple[bytes, Any]:
        """(the identity's key, the peer's identity), or raise `PskRefused`; any other exception
        refuses the identity too."""


# callback(conn, identity) -> the key, or None to refuse the identity
ServerCallback = Callable[[SSL.Connection, bytes], "bytes | None"]
# callback(conn) -> (identity, key)
ClientCallback = Callable[[SSL.Connection], "tuple[bytes, bytes] | None"]


def install_psk_server(context: SSL.Context, callback: ServerCallback) -> None:
    """Let `context` serve PSK handshakes, looking keys up with `callback`. Once per Context."""
    if getattr(context, "_devid_psk", None) is not None:
        raise RuntimeError("install_psk_server: this Context has its PSK callback already")

    def server(ssl: Any, identity: Any, psk: Any, max_len: int) -> int:
        try:
            conn = SSL.Connection._reverse_mapping[ssl]
            name = _ffi.string(identity) if identity != _ffi.NULL else b""
            key = callback(conn, name)
            if not key or len(key) > min(max_len, MAX_PSK):
                return 0                 # OpenSSL: unknown_psk_identity
            _ffi.memmove(psk, key, len(key))
            return len(key)
        except BaseException:            # never let anything cross into OpenSSL
            log.exception("PSK server callback failed")
            return 0

    c_callback = _ffi.callback("unsigned int (*)(SSL *, const char *, unsigned char *, unsigned int)", server)
    context._devid_psk = (server, c_callback)        # alive as long as the Context
    _lib.SSL_CTX_set_psk_server_callback(context._context, c_callback)


def install_psk_client(context: SSL.Context, callback: ClientCallback) -> None:
    """Let `context` make PSK handshakes as a client, the identity and key from `callback`."""
    if getattr(context, "_devid_psk", None) is not None:
        raise RuntimeError("install_psk_client: this Context has its PSK callback already")

    def client(ssl: Any, hint: Any, identity: Any, max_identity: int, psk: Any, max_psk: int) -> int:
        try:
            conn = SSL.Connection._reverse_mapping[ssl]
            found = callback(conn)
            if found is None:
                return 0
            name, key = found
            if len(name) + 1 > max_identity or not key or len(key) > max_psk:
                return 0
            _ffi.memmove(identity, name + b"\x00", len(name) + 1)
            _ffi.memmove(psk, key, len(key))
            return len(key)
        except BaseException:
            log.exception("PSK client callback failed")
            return 0

    c_callback = _ffi.callback("unsigned int (*)(SSL *, const char *, char *, unsigned int, unsigned char *, "
                               "unsigned int)", client)
    context._devid_psk = (client, c_callback)
    _lib.SSL_CTX_set_psk_client_callback(context._context, c_callback)


def alert_record(description: int, record_seq: int) -> bytes:
    """A fatal alert in a plaintext epoch-0 DTLS 1.2 record: what a client still reading epoch 0
    (it has sent its Finished, not yet received ours) can read."""
    return (b"\x15\xfe\xfd\x00\x00" + record_seq.to_bytes(6, "big") + b"\x00\x02"
            + bytes([2, description]))


DECRYPT_ERROR = 51
UNKNOWN_PSK_IDENTITY = 115
