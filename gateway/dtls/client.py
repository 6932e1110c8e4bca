"""The device's DTLS role: one session with one server, on the session core (session.py).

The handshake, timers, the record layer, close_notify and the final flight's resending are the
core's; this role adds the server's identity (OpenSSL's chain check, then an optional
`server_check`), a per-connection certificate, TLS session resumption, and calls without a peer
argument (there is one). `exporter` is the session's exporter value (exporter.py), the nonce of
evidence bound to the session.
"""

from __future__ import annotations

from typing import Any, Callable

from cryptography import x509
from OpenSSL import SSL

from devid.gateway.dtls.events import Output, Peer
from devid.gateway.dtls.errors import VERIFY_ERRORS
from devid.gateway.dtls.session import CLOSED, ESTABLISHED, Engine, Session, State


class ClientEngine(Engine):
    """One DTLS client session to one server (the device side)."""

    _is_server = False

    def __init__(self, context: SSL.Context, peer: Peer, *, mtu: int = 1280,
                 handshake_timeout: float = 30.0, session: SSL.Session | None = None,
                 server_check: Callable[[x509.Certificate, list[x509.Certificate]], Any] | None = None,
                 certificate: Any = None, private_key: Any = None, takeover: bool = False,
                 psk: tuple[bytes, bytes] | None = None) -> None:
        """`certificate` and `private_key` (cryptography or pyOpenSSL objects), when given, are this
        connection's identity instead of the Context's: one Context then serves many devices whose
        certificates share the Context's extra chain certificates and trust anchors.
        `takeover`: once the handshake is complete, application records go through our record
        layer (recordlayer.py) instead of OpenSSL, as on the server (less CPU per message).
        `psk`: (identity, key) for a PSK handshake (on a `contexts.psk_client_context`)."""
        super().__init__(mtu, None)
        self._takes_over = takeover
        self.peer = peer
        self.context = context
        self.handshake_timeout = handshake_timeout
        self._server_check = server_check
        self.server_identity: Any = None
        self.psk = psk
        self._resuming = session is not None
        self._tls_session: SSL.Session | None = None
        conn = SSL.Connection(context, None)
        conn.set_connect_state()
        conn.set_ciphertext_mtu(mtu)
        if certificate is not None:
            conn.use_certificate(certificate)
            conn.use_privatekey(private_key)
        if session is not None:
            conn.set_session(session)
        self._s = Session(peer, conn, 0.0, 0.0)
        self._s.owner = self
        conn.set_app_data(self._s)
        self.sessions[peer] = self._s

    @staticmethod
    def verify_callback(conn: SSL.Connection, cert: Any, errno: int, depth: int, ok: int) -> bool:
        """Install on the client Context: OpenSSL's chain check, then the engine's server check."""
        s = conn.get_app_data()
        if not isinstance(s, Session):
            return False
        if not ok:
            s.failure = f"server certificate refused: {VERIFY_ERRORS.get(errno, f'X509 error {errno}')}"
            return False
        s.chain.append(cert.to_cryptography())
        engine = s.owner
        if depth == 0 and engine is not None and engine._server_check is not None:
            try:
                engine.server_identity = engine._server_check(s.chain[-1], list(reversed(s.chain[:-1])))
            except Exception as exc:
                s.failure = f"server certificate refused: {exc}"
                return False
        return True

    @property
    def established(self) -> bool:
        return self._s.state is ESTABLISHED

    @property
    def state(self) -> State:
        return self._s.state

    @property
    def cipher(self) -> str | None:
        return self._s.cipher

    @property
    def exporter(self) -> bytes | None:
        """The session's exporter value (exporter.py), the same the server computed: the nonce of
        evidence bound to this session. None before the handshake completes, or without the
        extended master secret."""
        return self._s.exporter

    @property
    def closed_reason(self) -> str | None:
        return self._s.closed_reason

    @property
    def session(self) -> SSL.Session | None:
        """The TLS session, for resumption by a later ClientEngine."""
        conn = self._s.conn
        return conn.get_session() if conn is not None else self._tls_session

    def start(self, now: float) -> Output:
        self._now = now
        s = self._s
        s.started = s.last_seen = now
        s.hs_deadline = now + self.handshake_timeout
        out = Output()
        self._drive(s, out)
        return out

    def receive(self, datagram: bytes, now: float) -> Output:
        self._now = now
        out = Output()
        if self._s.state is not CLOSED:
            self._receive(self._s, datagram, out)
        return out

    def send(self, data: bytes, now: float) -> Output:
        """Encrypt one application message (one record). LocalProtocolError when the session is
        not established, or for a message that would not fit the MTU (use CoAP block-wise transfer)."""
        self._now = now
        return self._send(self._s, self.peer, data)

    def close(self, now: float) -> Output:
        self._now = now
        out = Output()
        if self._s.state is not CLOSED:
            self._close(self._s, out, "closed by client")
        return out

    # -- the role's part of the session core ---------------------------------------------------

    def _authenticate(self, s: Session) -> tuple[Any, bool]:
        # resumed: OpenSSL did not verify the server's chain, it trusts the session it resumed
        # (a PSK handshake has no chain either: `session_reused` tells)
        if self.psk is not None:
            return self.server_identity, self._resuming
        return self.server_identity, bool(s.conn.get_session() and not s.chain)

    def _admitted(self, s: Session, out: Output) -> None:
        self._tls_session = s.conn.get_session()     # the OpenSSL object may go to the record layer
