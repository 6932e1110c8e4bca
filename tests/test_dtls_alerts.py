"""The alert a refused certificate earns (gateway/dtls/alerts.py), on the engine itself: each
refusal of the authenticator reaches the client as the alert it names, an authenticator that
fails is internal_error, and OpenSSL's own refusals keep their alert."""

from __future__ import annotations

import pytest

from devid.gateway.dtls import engine as E
from devid.gateway.dtls.alerts import ALERTS, CertificateRefused

from .conftest import register_device
from .dtls_helpers import client_for, server_engine, shuttle, start_pending


def test_a_refusal_names_a_known_alert():
    assert set(ALERTS) == {"certificate_revoked", "certificate_expired", "unknown_ca", "bad_certificate",
                           "internal_error"}
    with pytest.raises(ValueError):
        CertificateRefused("x", "access_denied_please")


class Refusing:
    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def authenticate(self, leaf, intermediates):
        raise self.exc


@pytest.fixture
def device(ca):
    key, issued = register_device(ca, "SN1", "temperature-sensor")
    return key, issued.cert


@pytest.mark.parametrize("exc,alert", [
    (CertificateRefused("revoked", "certificate_revoked"), "certificate revoked"),
    (CertificateRefused("expired", "certificate_expired"), "certificate expired"),
    (CertificateRefused("who?", "unknown_ca"), "unknown ca"),
    (CertificateRefused("unknown to the registry"), "bad certificate"),
    (RuntimeError("database is locked"), "internal error"),
])
def test_the_client_reads_the_alert_the_authenticator_chose(data, registry, device, exc, alert):
    srv = server_engine(data, registry)
    srv.authenticator = Refusing(exc)
    client = client_for(data, device)
    events = shuttle(srv, client, start_pending(srv, client))
    (failed,) = [e for e in events if isinstance(e, E.HandshakeFailed)]
    assert str(exc) in failed.reason
    assert not client.established and alert in (client.closed_reason or "").lower(), client.closed_reason


def test_openssl_keeps_its_own_alert_for_a_chain_it_refuses(data, registry, tmp_path):
    """A device of another manufacturer: OpenSSL refuses the chain itself (unknown_ca), and the
    authenticator is never asked."""
    from devid.gateway.app.datadir import DataDir
    from .conftest import NOW
    other = DataDir(tmp_path / "other")
    other.init(NOW)
    oreg = other.open_registry()
    try:
        key, issued = register_device(other.authority(oreg), "SN1")
    finally:
        oreg.close()
    srv = server_engine(data, registry)
    srv.authenticator = Refusing(AssertionError("not asked"))
    client = client_for(data, (key, issued.cert), chain=[other.cert("manufacturing")])
    events = shuttle(srv, client, start_pending(srv, client))
    (failed,) = [e for e in events if isinstance(e, E.HandshakeFailed)]
    assert "not asked" not in failed.reason
    assert "unknown ca" in (client.closed_reason or "").lower(), client.closed_reason


def test_a_context_takes_one_verify_callback(data, registry):
    """SSL objects copy the C callback's address: replacing it would leave them calling freed memory."""
    from OpenSSL import SSL
    from devid.gateway.dtls.alerts import install_verify
    srv = server_engine(data, registry)
    with pytest.raises(RuntimeError, match="already"):
        install_verify(srv.ctx, SSL.VERIFY_PEER, lambda *a: None)
