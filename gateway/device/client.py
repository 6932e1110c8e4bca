"""The device side of coaps://: credentials from a factory bundle, and a checked gateway identity.

Used by the enrollment script, the device simulator and the tests.
"""

from __future__ import annotations

import ipaddress
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store

from devid.ca import keys
from devid.gateway.errors import BundleError

from devid.gateway.dtls import contexts
from devid.gateway.coap.transport import client_context


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BundleError(f"{path}: {exc.strerror}") from None


def load_bundle(directory: Path, cert_name: str = "chain.pem", key_name: str = "key.pem"):
    """(leaf, intermediates, key, root) from a device directory made by `devid provision`."""
    directory = Path(directory)
    try:
        chain = x509.load_pem_x509_certificates(_read(directory / cert_name))
        root = x509.load_pem_x509_certificate(_read(directory / "ca.pem"))
    except ValueError as exc:
        raise BundleError(f"{directory}: unreadable certificate ({exc})") from None
    key = keys.load_plain_key(directory / key_name)
    if key.public_key() != chain[0].public_key():
        raise BundleError(f"{directory}: {key_name} does not match {cert_name}")
    return chain[0], chain[1:], key, root


def server_checker(root: x509.Certificate, host: str,
                   clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc)):
    """Check the gateway's certificate: chain to our root, serverAuth, and a SAN matching `host`."""
    store = Store([root])
    try:
        subject: x509.verification.Subject = x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        subject = x509.DNSName(host)

    def check(leaf: x509.Certificate, intermediates: list[x509.Certificate]):
        verifier = PolicyBuilder().store(store).time(clock()).build_server_verifier(subject)
        verifier.verify(leaf, intermediates)
        return leaf.subject.rfc4514_string()
    return check


async def device_context(directory: Path, host: str, cert_name: str = "chain.pem", key_name: str = "key.pem",
                         handshake_timeout: float = 30.0):
    """An aiocoap client Context authenticating as the device in `directory`, talking to `host`."""
    leaf, intermediates, key, root = load_bundle(directory, cert_name, key_name)
    ssl_ctx = contexts.client_context(leaf, intermediates, key, root)
    return await client_context(ssl_ctx, server_check=server_checker(root, host),
                                handshake_timeout=handshake_timeout)
