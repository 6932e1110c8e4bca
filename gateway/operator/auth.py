"""Who is calling the operator listener.

Three credentials, each where it belongs:
- `Authorization: Bearer <token>` (DATA/operator.token): the API, the pages, /metrics;
- an operator client certificate over HTTPS (mTLS, `devid operator cert`): everything; the
  registry must hold it as a current `operator` certificate (a device's certificate, valid to
  the same CA, is the wrong kind of credential: 403);
- the web view's session cookie (after the login form took the token): the pages only; a cookie
  on /api/v1 counts for nothing (the API never relies on what a browser sends by itself).

The session cookie is `<issued unix time>.<HMAC-SHA256(token, "session" and that time)>`: it needs
no server-side state (any worker can check it), expires after SESSION_LIFETIME, and every cookie
dies when the token is rotated. Forms carry a CSRF value, HMAC(token, "csrf" and the session),
checked on every POST, beside the cookie's SameSite=Strict; every POST without the bearer token,
the API's too, must come from the listener's own origin (listener.py), and the API's writes must
be application/json (api.py).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from dataclasses import dataclass

from aiohttp import web
from cryptography import x509
from cryptography.x509.oid import NameOID

from devid.ca.identity import format_serial
from devid.ca.store import CertStatus
from devid.gateway.operator.certs import OPERATOR_PROFILE
from devid.gateway.operator.problems import Problem
from devid.gateway.operator.tokens import TokenFile, token_id

COOKIE = "devid_session"
# what the listener's guard found, for the handlers (typed keys where aiohttp has them, 3.12 and later)
CALLER = web.RequestKey("caller", object) if hasattr(web, "RequestKey") else "caller"
FORM = web.RequestKey("form", object) if hasattr(web, "RequestKey") else "form"
SESSION_LIFETIME = 12 * 3600
_HEX = re.compile(r"[0-9a-f]{64}")      # a MAC as `_mac` writes it: anything else is refused unread
_DIGITS = re.compile(r"[0-9]{1,12}")


@dataclass(frozen=True)
class Caller:
    who: str            # "token:<12 hex of its SHA-256>" or "cert:<CN>/<serial, hex>" (two certificates
                        # may share a CN; the serial says which one, as `devid operator cert --json` shows it)
    kind: str           # "token", "cert", "session"
    session: str = ""   # the cookie value (kind "session") or the certificate's fingerprint (kind "cert")


def _mac(token: str, *parts: str) -> str:
    return hmac.new(token.encode(), "|".join(parts).encode(), hashlib.sha256).hexdigest()


class Authenticator:
    def __init__(self, tokens: TokenFile, registry) -> None:
        self.tokens = tokens
        self.registry = registry

    # -- the three credentials ---------------------------------------------------------------

    def from_header(self, header: str) -> Caller:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise Problem("unauthorized", "the Authorization header must be 'Bearer <token>'")
        who = self.tokens.check(value.strip())
        if who is None:
            raise Problem("unauthorized", "the bearer token is not the operator token (rotated?)")
        return Caller(who, "token")

    def from_certificate(self, der: bytes) -> Caller:
        """The TLS layer has checked the chain to devid's CA; the registry says what it is."""
        cert = x509.load_der_x509_certificate(der)
        found = self.registry.lookup_certificate(cert.serial_number)
        fp = hashlib.sha256(der).hexdigest()
        if found is None or found.fingerprint != fp or found.profile != OPERATOR_PROFILE:
            kind = found.profile if found is not None and found.fingerprint == fp else "unknown"
            raise Problem("wrong-credential", f"the client certificate is not an operator certificate "
                                              f"(it is a {kind} certificate)")
        if found.status is not CertStatus.CURRENT:
            raise Problem("wrong-credential", f"the operator certificate is {found.status.value}")
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        name = cn[0].value if cn else cert.subject.rfc4514_string()
        return Caller(f"cert:{name}/{format_serial(cert.serial_number)}", "cert", fp)

    def from_cookie(self, value: str) -> Caller | None:
        token = self.tokens.current()
        issued, _, mac = value.partition(".")
        if token is None or not _DIGITS.fullmatch(issued) or not _HEX.fullmatch(mac):
            return None         # (str.isdigit() takes other scripts' digits; compare_digest no non-ASCII str)
        if not hmac.compare_digest(mac.encode(), _mac(token, "session", issued).encode()):
            return None
        if not 0 <= time.time() - int(issued) < SESSION_LIFETIME:
            return None
        return Caller(token_id(token), "session", value)

    # -- the web view's session and forms ----------------------------------------------------

    def login(self, presented: str) -> str | None:
        """A session cookie value for the right token, else None."""
        token = self.tokens.current()
        if token is None or self.tokens.check(presented) is None:
            return None
        issued = str(int(time.time()))
        return f"{issued}.{_mac(token, 'session', issued)}"

    def csrf(self, caller: Caller) -> str:
        token = self.tokens.current() or ""
        return _mac(token, "csrf", caller.kind, caller.session or caller.who)

    def check_csrf(self, caller: Caller, presented: str) -> bool:
        return bool(_HEX.fullmatch(presented)) and hmac.compare_digest(presented.encode(), self.csrf(caller).encode())
