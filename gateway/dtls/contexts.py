"""pyOpenSSL Contexts for the gateway (server) and for devices (client).

DTLS 1.2 only. Cipher suites: TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8 (RFC 7925's mandatory suite,
which OpenSSL 3+ only offers at security level 0) and ECDHE-ECDSA-AES128-GCM-SHA256. Level 0
also relaxes OpenSSL's key-size and signature-algorithm checks; that is acceptable on the server
because every device certificate it accepts is then matched byte for byte against one devid's CA
issued under its own profile (P-256, ECDSA with SHA-256; service/identity.py), and on the client
because the gateway's certificate is validated by `cryptography.x509.verification`.
A Context freezes once a Connection is made from it: to rotate certificates, build a new one.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL, crypto

from devid.gateway.dtls.client import ClientEngine
from devid.gateway.dtls.psk import CIPHERS_PSK, PSK_CIPHER, install_psk_client

DTLS1_2_VERSION = 0xFEFD
CIPHERS_CCM8_AND_GCM = b"ECDHE-ECDSA-AES128-CCM8:ECDHE-ECDSA-AES128-GCM-SHA256:@SECLEVEL=0"
CIPHERS_GCM_ONLY = b"ECDHE-ECDSA-AES128-GCM-SHA256"
SESSION_ID_CONTEXT = b"devid-gateway"
MAX_CLIENT_CHAIN_DEPTH = 2


def with_psk(ciphers: bytes) -> bytes:
    """`ciphers` and TLS_PSK_WITH_AES_128_CCM_8 after them (at security level 0, as CCM_8 needs)."""
    return ciphers.replace(b":@SECLEVEL=0", b"") + b":" + PSK_CIPHER.encode() + b":@SECLEVEL=0"


def psk_client_context(ciphers: bytes = CIPHERS_PSK) -> SSL.Context:
    """A PSK device's Context (tests, benchmarks: the engine's own client). Each connection's
    identity and key come from its `ClientEngine(psk=(identity, key))`."""
    ctx = _base(SSL.DTLS_CLIENT_METHOD, ciphers)
    install_psk_client(ctx, lambda conn: getattr(getattr(conn.get_app_data(), "owner", None), "psk", None))
    return ctx


def _base(method: int, ciphers: bytes) -> SSL.Context:
    ctx = SSL.Context(method)
    ctx.set_min_proto_version(DTLS1_2_VERSION)
    ctx.set_max_proto_version(DTLS1_2_VERSION)
    ctx.set_options(SSL.OP_NO_QUERY_MTU | SSL.OP_NO_RENEGOTIATION | SSL.OP_NO_COMPRESSION)
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    ctx.set_cipher_list(ciphers)
    ctx.set_tmp_ecdh(ec.SECP256R1())
    return ctx


def server_context(cert: x509.Certificate, chain: Sequence[x509.Certificate], key: ec.EllipticCurvePrivateKey,
                   trust_anchors: Iterable[x509.Certificate], client_cas: Iterable[x509.Certificate],
                   ciphers: bytes = CIPHERS_CCM8_AND_GCM, cookie_exchange: bool = True,
                   psk: bool = False) -> SSL.Context:
    """`trust_anchors`: the CAs client chains must lead to (the manufacturing CA for factory
    identities, the operational CA for operational ones); `client_cas`: the CA names advertised
    to clients. `psk`: TLS_PSK_WITH_AES_128_CCM_8 too (psk.py; the engine installs the callback
    that offers it)."""
    if psk:
        ciphers = with_psk(ciphers)
    ctx = _base(SSL.DTLS_SERVER_METHOD, ciphers)
    if cookie_exchange:
        ctx.set_options(SSL.OP_COOKIE_EXCHANGE)
    ctx.use_certificate(cert)
    for extra in chain:
        ctx.add_extra_chain_cert(extra)
    ctx.use_privatekey(key)
    ctx.check_privatekey()
    store = ctx.get_cert_store()
    # the issuing CAs themselves are the anchors: chains stop there (no P-384 root signature
    # to check on every handshake), as RFC 5280 allows for any trusted CA
    store.set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)
    for anchor in trust_anchors:
        store.add_cert(crypto.X509.from_cryptography(anchor))
    # a short chain only: OpenSSL's verify depth bounds the intermediate CA certificates between a
    # device certificate and its anchor (devid's chains have none: the issuing CAs are the
    # anchors, and a recorded certificate is signed by its anchor directly; the registry match
    # accepts nothing else)
    ctx.set_verify_depth(MAX_CLIENT_CHAIN_DEPTH)
    for ca in client_cas:
        ctx.add_client_ca(ca)
    ctx.set_session_id(SESSION_ID_CONTEXT)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
    return ctx


def client_context(cert: x509.Certificate | None, chain: Sequence[x509.Certificate],
                   key: ec.EllipticCurvePrivateKey | None, root: x509.Certificate | Sequence[x509.Certificate],
                   ciphers: bytes = CIPHERS_CCM8_AND_GCM) -> SSL.Context:
    """A device's Context. Without `cert` and `key`, a template for many devices: each connection
    sets its own (`ClientEngine(certificate=, private_key=)`). `root` may be several anchors; an
    anchor that is not self-signed ends the chain there (partial chain, as on the server)."""
    ctx = _base(SSL.DTLS_CLIENT_METHOD, ciphers)
    if cert is not None:
        ctx.use_certificate(cert)
    for extra in chain:
        ctx.add_extra_chain_cert(extra)
    if key is not None:
        ctx.use_privatekey(key)
        ctx.check_privatekey()
    store = ctx.get_cert_store()
    anchors = [root] if isinstance(root, x509.Certificate) else list(root)
    if any(a.issuer != a.subject for a in anchors):
        store.set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)
    for anchor in anchors:
        store.add_cert(crypto.X509.from_cryptography(anchor))
    ctx.set_verify(SSL.VERIFY_PEER, ClientEngine.verify_callback)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_CLIENT)
    return ctx
