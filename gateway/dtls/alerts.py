"""The alert a refused peer certificate earns, so the device's own log says why (RFC 5246 7.2.2).

    certificate_revoked   the certificate or its device is revoked
    certificate_expired   the certificate's validity has ended
    unknown_ca            no chain to a trust anchor of the gateway
    bad_certificate       anything else the gateway refuses (unknown to the registry, superseded,
                          not yet valid, a path that does not validate)
    internal_error        the gateway could not decide (its registry failed)

Refusals by OpenSSL itself, before the callback decides, keep OpenSSL's alert (KEEP): unknown_ca
for another CA, bad_certificate for a certificate not yet valid, unsupported_certificate for one
without the clientAuth purpose, certificate_expired for an expired one.

OpenSSL picks the alert from the X509 error of the store context when verification fails.
pyOpenSSL's verify callback returns a bool and cannot set that error, so a refusal by the
callback left OpenSSL 3 with X509_V_ERR_UNSPECIFIED and the device saw `internal_error` for a
revoked certificate. `install_verify` therefore puts the engine's callback on the Context through
pyOpenSSL's own cffi bindings, making the same calls pyOpenSSL's `_VerifyHelper` makes plus
`X509_STORE_CTX_set_error`. Those bindings are pyOpenSSL internals: the range of pyOpenSSL in
pyproject.toml is the one this was checked against, and tests/test_dtls_alerts.py fails if they
move.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi, lib as _lib       # private: see the module docstring
from OpenSSL.crypto import X509

from devid.gateway.dtls.errors import RemoteProtocolError

log = logging.getLogger("devid.dtls")

# alert -> an X509 error that OpenSSL (ssl_x509err2alert) turns into exactly that alert
_X509_ERROR = {
    "certificate_revoked": _lib.X509_V_ERR_CERT_REVOKED,
    "certificate_expired": _lib.X509_V_ERR_CERT_HAS_EXPIRED,
    "unknown_ca": _lib.X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT,
    "bad_certificate": _lib.X509_V_ERR_CERT_REJECTED,
    "internal_error": 1,            # X509_V_ERR_UNSPECIFIED (not among the bindings' names)
}
ALERTS = tuple(_X509_ERROR)
KEEP = "keep"           # a refusal that keeps the error OpenSSL found itself (its own alert)


class CertificateRefused(RemoteProtocolError):
    """An authenticator's refusal of a peer certificate, with the alert the peer is sent."""

    def __init__(self, reason: str, alert: str = "bad_certificate") -> None:
        if alert not in _X509_ERROR:
            raise ValueError(f"unknown alert {alert!r} (known: {', '.join(ALERTS)})")
        super().__init__(reason)
        self.alert = alert


# callback(conn, cert, errno, depth, ok) -> None to accept, or the alert to refuse with (or KEEP)
VerifyCallback = Callable[[SSL.Connection, X509, int, int, int], "str | None"]


def install_verify(context: SSL.Context, mode: int, callback: VerifyCallback) -> None:
    """`context.set_verify(mode, ...)` with a callback that chooses the refusal's alert. Once per
    Context: SSL objects copy the C callback's address when they are made, so replacing it would
    leave them calling freed memory."""
    if getattr(context, "_devid_verify", None) is not None:
        raise RuntimeError("install_verify: this Context has its verify callback already")

    def verify(ok: int, store_ctx: Any) -> int:
        try:
            raw = _lib.X509_STORE_CTX_get_current_cert(store_ctx)
            if raw == _ffi.NULL:
                return 0 if not ok else 1          # nothing to look at (not reached with our flags)
            _lib.X509_up_ref(raw)
            cert = X509._from_raw_x509_ptr(raw)
            errno = _lib.X509_STORE_CTX_get_error(store_ctx)
            depth = _lib.X509_STORE_CTX_get_error_depth(store_ctx)
            ssl = _lib.X509_STORE_CTX_get_ex_data(store_ctx, _lib.SSL_get_ex_data_X509_STORE_CTX_idx())
            conn = SSL.Connection._reverse_mapping[ssl]
            try:
                refusal = callback(conn, cert, errno, depth, ok)
            except Exception as exc:        # a bug of the callback: refused, and said why
                session = conn.get_app_data()
                if hasattr(session, "failure"):
                    session.failure = f"certificate check failed: {exc.__class__.__name__}: {exc}"
                log.exception("certificate verify callback failed")
                refusal = "internal_error"
            if refusal is None:
                _lib.X509_STORE_CTX_set_error(store_ctx, _lib.X509_V_OK)
                return 1
            if refusal != KEEP or errno == _lib.X509_V_OK:
                _lib.X509_STORE_CTX_set_error(store_ctx, _X509_ERROR.get(refusal, 1))
            return 0
        except BaseException:               # never let anything cross into OpenSSL
            log.exception("certificate verify callback failed")
            return 0

    c_callback = _ffi.callback("int (*)(int, X509_STORE_CTX *)", verify)
    context._devid_verify = (verify, c_callback)        # alive as long as the Context
    _lib.SSL_CTX_set_verify(context._context, mode, c_callback)
