"""The operator HTTP listener of `devid serve --http [ADDR:]PORT`: aiohttp on the gateway's own
asyncio loop.

Why on the same loop, not a thread or a process: a handler is a few registry reads (or one
revocation) between the gateway's datagrams, on the same registry object, so the registry's
connection rules hold unchanged (SQLite: one connection per process, used from one thread;
PostgreSQL: the process's pool), nothing needs a lock, and the listener stops with the gateway.
With `--workers N` only worker 0 runs it (docs/operations.md): the API's answers come from the
registry that every worker shares, and /metrics answers with `exposition()`, the aggregate of
all workers; N listeners would need SO_REUSEPORT on TCP for no gain.

Every request is authenticated here before its handler runs (`auth.py`), except the login form
and, with `--metrics-open`, /metrics. Errors are RFC 9457 problem details on the API and
/metrics, HTML pages on the web view (a 401 there is the login form)."""

from __future__ import annotations

import logging
import ssl
import time
from collections import OrderedDict
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web

from devid.gateway.errors import RegistryError
from devid.gateway.operator import api, web as pages
from devid.gateway.operator.auth import CALLER, COOKIE, FORM, Authenticator, Caller
from devid.gateway.operator.params import BadParameter
from devid.gateway.operator.problems import Problem
from devid.gateway.operator.service import OperatorService

log = logging.getLogger("devid.operator")
MAX_BODY = 64 * 1024
AUTH_LOG_EVERY = 60.0       # seconds: at most one `auth` line per source address in this time
AUTH_LOG_PEERS = 1024       # addresses remembered for that


@dataclass
class HttpConfig:
    host: str = "127.0.0.1"
    port: int = 8443
    tls: bool = False               # HTTPS with the listener's certificate; operator client certificates
    metrics_open: bool = False      # /metrics without a credential (a Prometheus scraper)


def parse_http(text: str) -> tuple[str, int]:
    """'[ADDR:]PORT' (an IPv6 address in brackets); loopback when no address is given."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: expected [ADDR:]PORT with a port from 0 to 65535")
    return host, int(port)


def _kind(path: str) -> str:
    if path.startswith("/api/"):
        return "api"
    if path == "/metrics":
        return "metrics"
    if path == "/login":
        return "login"
    return "web"


class OperatorListener:
    def __init__(self, config: HttpConfig, service: OperatorService, auth: Authenticator,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.config = config
        self.service = service
        self.auth = auth
        self.ssl_context = ssl_context
        self.runner: web.AppRunner | None = None
        self._auth_seen: OrderedDict[str, list] = OrderedDict()     # peer -> [last logged, refusals since]
        self.url: str | None = None
        self.app = web.Application(middlewares=[self._guard], client_max_size=MAX_BODY)
        api.add_routes(self.app, service)
        pages.add_routes(self.app, service, auth, secure=ssl_context is not None)

    async def start(self) -> str:
        self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.config.host, self.config.port, ssl_context=self.ssl_context)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        scheme = "https" if self.ssl_context is not None else "http"
        self.url = f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}"
        return self.url

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    # -- authentication and errors, around every handler --------------------------------------

    def _identify(self, request: web.Request, kind: str) -> Caller:
        header = request.headers.get("Authorization")
        if header is not None:
            return self.auth.from_header(header)
        sslobj = request.transport.get_extra_info("ssl_object") if request.transport else None
        der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
        if der:
            return self.auth.from_certificate(der)
        cookie = request.cookies.get(COOKIE)
        if cookie and kind == "web":
            caller = self.auth.from_cookie(cookie)
            if caller is not None:
                return caller
            raise Problem("unauthorized", "the session has expired or the token was rotated: log in again")
        if cookie:
            raise Problem("unauthorized", "the web view's session cookie does not authenticate the API: "
                                          "send 'Authorization: Bearer <token>' or an operator certificate")
        raise Problem("unauthorized", "send 'Authorization: Bearer <token>' (devid operator token) or an "
                                      "operator client certificate (devid operator cert)")

    def _log_refusal(self, request: web.Request, p: Problem) -> None:
        """One INFO `auth` line per source address per AUTH_LOG_EVERY seconds (a scanner or a
        misconfigured scraper must not flood the log); the next line says how many were left out.
        At most AUTH_LOG_PEERS addresses are remembered (the oldest dropped)."""
        peer = request.remote or "-"
        now = time.monotonic()
        seen = self._auth_seen.get(peer)
        if seen is not None and now - seen[0] < AUTH_LOG_EVERY:
            seen[1] += 1
            return
        suppressed = seen[1] if seen is not None else 0
        self._auth_seen.pop(peer, None)
        self._auth_seen[peer] = [now, 0]
        while len(self._auth_seen) > AUTH_LOG_PEERS:
            self._auth_seen.popitem(last=False)
        log.info("auth", extra={"result": "refused", "problem": p.kind, "path": request.path, "peer": peer,
                                "suppressed": suppressed})

    def _same_origin(self, request: web.Request) -> bool:
        origin = request.headers.get("Origin") or request.headers.get("Referer")
        if not origin or origin == "null":
            return origin is None
        parts = urlsplit(origin)
        return parts.scheme == request.scheme and parts.netloc == request.host

    @web.middleware
    async def _guard(self, request: web.Request, handler):
        kind = _kind(request.path)
        caller: Caller | None = None
        try:
            try:
                if kind == "login" or (kind == "metrics" and self.config.metrics_open):
                    request[CALLER] = None
                else:
                    caller = self._identify(request, kind)
                    request[CALLER] = caller
                if request.method == "POST":
                    # any POST, whatever the path: a browser holding an operator certificate (or a
                    # session cookie) sends it to a cross-site form too; only a bearer token is
                    # never sent by a browser on its own
                    if (caller is None or caller.kind != "token") and not self._same_origin(request):
                        raise Problem("csrf", "the request was posted from another origin")
                if request.method == "POST" and kind in ("web", "login"):
                    request[FORM] = await request.post()
                    if caller is not None and caller.kind != "token" and \
                            not self.auth.check_csrf(caller, str(request[FORM].get("csrf", ""))):
                        raise Problem("csrf", "the form's anti-forgery value is missing or stale: reload the page")
                return await handler(request)
            except BadParameter as exc:
                raise Problem("bad-parameter", str(exc), parameter=exc.name) from None
            except web.HTTPNotFound:
                raise Problem("not-found", f"no such resource: {request.path}") from None
            except web.HTTPMethodNotAllowed as exc:
                raise Problem("method-not-allowed", f"{request.method} is not allowed here "
                                                    f"(allowed: {', '.join(sorted(exc.allowed_methods))})") from None
            except web.HTTPRequestEntityTooLarge:
                raise Problem("bad-request", f"the body is larger than {MAX_BODY} bytes") from None
            except RegistryError as exc:
                log.warning("operator-request", extra={"result": "failed", "path": request.path, "reason": str(exc)})
                raise Problem("unavailable", "the registry did not answer; try again") from None
        except Problem as p:
            if p.status in (401, 403) and p.kind != "csrf":
                self._log_refusal(request, p)
            if kind == "web" or kind == "login":
                if p.status == 401:
                    return pages.login_page(401, p.detail, request.path_qs if request.method == "GET" else "/")
                return pages.error_page(p, caller)
            return p.response(instance=request.path)
        except web.HTTPException:
            raise
        except Exception:
            log.exception("operator-request", extra={"result": "failed", "path": request.path})
            problem = Problem("internal", "the listener failed on this request; its log has the details")
            return pages.error_page(problem, caller) if kind == "web" else problem.response(request.path)


def build_listener(config: HttpConfig, data_path, registry, clock, *, gateway_cert, operational_cert, root_cert,
                   issuer, organization: str, rand_bytes=None, threshold=None) -> OperatorListener:
    """The listener for `devid serve --http`: the operator token made if there is none yet (so
    `devid operator token` prints the one in force), and with `tls` the listener's certificate
    (issued by the operational CA `issuer()` if missing or near its end) with operator client
    certificates checked to the root and the operational CA. `threshold`: a device type's
    renewal threshold (the policy's), for what is "due"; 30 days for every type if None."""
    import os
    from cryptography import x509
    from devid.gateway.operator.certs import ensure_listener_cert, server_ssl_context
    from devid.gateway.operator.tokens import TokenFile
    tokens = TokenFile(data_path)
    tokens.ensure()
    ctx = None
    if config.tls:
        try:
            names = list(gateway_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
        except x509.ExtensionNotFound:
            names = [x509.DNSName("localhost")]
        cert_path, key_path = ensure_listener_cert(data_path, issuer, registry, organization, names, clock(),
                                                   rand_bytes or os.urandom)
        ctx = server_ssl_context(cert_path, key_path, [root_cert, operational_cert])
    service = OperatorService(registry, data_path, clock, gateway_cert, operational_cert,
                              **({"threshold": threshold} if threshold is not None else {}))
    return OperatorListener(config, service, Authenticator(tokens, registry), ctx)
