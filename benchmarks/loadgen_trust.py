"""What the load generator loads before a run: the devices (bundles, keys converted for pyOpenSSL)
and the trust of one client process (the root of the bundles, then the CA certificates from EST
/crts, validated once, so that the P-384 root signature is not checked again per device)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store
from OpenSSL import SSL, crypto

from devid.gateway.device.identity import DeviceIdentity, load_bundle, server_subject
from devid.gateway.device.protocol import EnrollFailed
from loadgen_dtls import client_ssl_context


@dataclass
class Device:
    """A device bundle, loaded: what one session needs, converted before the run."""

    directory: Path
    identity: DeviceIdentity         # from the factory certificate and key: serial, type, claims
    key: ec.EllipticCurvePrivateKey  # the identity the session authenticates with
    intermediates: tuple[bytes, ...] # DER, sent after the leaf (the Context's extra chain certs)
    root: x509.Certificate
    x509: crypto.X509
    pkey: crypto.PKey

    @property
    def serial(self) -> str:
        return self.identity.serial

    @property
    def device_type(self) -> str:
        return self.identity.device_type

    @property
    def factory_key(self) -> ec.EllipticCurvePrivateKey:
        return self.identity.factory_key


def load_device(directory: Path, operational: bool = False) -> Device:
    """Raises devid.gateway.errors.BundleError or devid.ca.keys.KeyFileError."""
    factory, f_inter, f_key, root = load_bundle(directory)
    if operational:
        leaf, inter, key, root = load_bundle(directory, "op-chain.pem", "op-key.pem")
    else:
        leaf, inter, key = factory, f_inter, f_key
    return Device(Path(directory), DeviceIdentity.of(factory, f_key), key,
                  tuple(c.public_bytes(serialization.Encoding.DER) for c in inter), root,
                  crypto.X509.from_cryptography(leaf), crypto.PKey.from_cryptography_key(key))


def load_devices(bundles: Iterable[Path], operational: bool = False) -> tuple[list[Device], dict[str, str]]:
    devices, failures = [], {}
    for b in bundles:
        try:
            devices.append(load_device(Path(b), operational))
        except Exception as exc:
            failures[Path(b).name] = f"bundle: {exc}"
    return devices, failures


class Trust:
    """What one client process trusts: the root of the bundles, and after `pin`, the CA
    certificates it got from the gateway's EST /crts (each checked to be issued by the root)."""

    def __init__(self, root: x509.Certificate, host: str, full_chain: bool = False) -> None:
        self.root = root
        self.host = host
        self.full_chain = full_chain
        self.cas: list[x509.Certificate] = []          # validated issuing CAs (from /crts)
        self._contexts: dict[tuple, SSL.Context] = {}
        self._server_ok: dict[tuple, tuple[float, str]] = {}
        self._verifier = None
        self._verifier_at = 0.0
        self._issuers: dict[bytes, list[x509.Certificate]] = {}
        self._subject = server_subject(host)

    @property
    def anchors(self) -> list[x509.Certificate]:
        return [self.root] if self.full_chain or not self.cas else self.cas

    def pin(self, certs: list[x509.Certificate], now: datetime) -> None:
        cas = []
        for c in certs:
            if c == self.root:
                continue
            try:
                c.verify_directly_issued_by(self.root)
                ca = c.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
            except Exception as exc:
                raise EnrollFailed("trust", f"CA certificate {c.subject.rfc4514_string()} from /crts is not "
                                            f"issued by the root: {exc}") from None
            if not ca or not c.not_valid_before_utc <= now <= c.not_valid_after_utc:
                raise EnrollFailed("trust", f"{c.subject.rfc4514_string()} from /crts is not a valid CA certificate")
            cas.append(c)
        if not cas:
            raise EnrollFailed("trust", "the gateway's /crts holds no CA certificate besides the root")
        self.cas = cas
        self._issuers.clear()
        self._contexts.clear()
        self._server_ok.clear()
        self._verifier = None

    def context(self, device: Device) -> SSL.Context:
        """One Context per set of intermediates (in practice: one per process)."""
        ctx = self._contexts.get(device.intermediates)
        if ctx is None:
            chain = [x509.load_der_x509_certificate(d) for d in device.intermediates]
            ctx = self._contexts[device.intermediates] = client_ssl_context(chain, self.anchors)
        return ctx

    def check_server(self, leaf: x509.Certificate, intermediates: list[x509.Certificate]) -> str:
        """The DTLS engine's server check, after OpenSSL's own chain check of this handshake: path
        validation with serverAuth and the host name. A chain that passed it in the last minute
        is not validated again (an identical certificate chain, compared byte for byte)."""
        key = (leaf.public_bytes(serialization.Encoding.DER),
               *(c.public_bytes(serialization.Encoding.DER) for c in intermediates))
        now = time.monotonic()
        hit = self._server_ok.get(key)
        if hit is not None and now - hit[0] < 60:
            return hit[1]
        verifier = (PolicyBuilder().store(Store(self.anchors)).time(datetime.now(timezone.utc))
                    .build_server_verifier(self._subject))
        verifier.verify(leaf, intermediates)
        name = leaf.subject.rfc4514_string()
        self._server_ok[key] = (now, name)
        return name

    def issuers_of(self, cert: x509.Certificate) -> list[x509.Certificate]:
        """The pinned CA certificates named as `cert`'s issuer (for op-chain.pem)."""
        issuer = cert.issuer.public_bytes()
        found = self._issuers.get(issuer)
        if found is None:
            found = self._issuers[issuer] = [c for c in self.cas if c.subject.public_bytes() == issuer]
        return found

    def verify_issued(self, cert: x509.Certificate, chain: list[x509.Certificate]) -> None:
        """The flows' check of an issued certificate: a client certificate valid to the anchors
        (the verifier is rebuilt once a minute, for its time). Raises on failure."""
        now = time.monotonic()
        if self._verifier is None or now - self._verifier_at > 60:
            self._verifier = (PolicyBuilder().store(Store(self.anchors)).time(datetime.now(timezone.utc))
                              .build_client_verifier())
            self._verifier_at = now
        self._verifier.verify(cert, chain or (self.cas if self.full_chain else []))
