"""The web view: server-rendered pages (jinja2, autoescaped), no script, no build step, nothing
from the internet; the one stylesheet is inlined and allowed by its hash in the page's
Content-Security-Policy. Pages: the overview (/), the fleet (/devices), a device
(/devices/{serial}, with its revoke confirmation), the attestation log (/log), and the login
form (/login), the only page that answers without a credential."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import jinja2
from aiohttp import web

from devid.ca.revocation import REASONS
from devid.ca.store import DeviceState
from devid.gateway.operator.auth import CALLER, COOKIE, FORM, SESSION_LIFETIME, Authenticator, Caller
from devid.gateway.operator.problems import Problem
from devid.gateway.operator.service import OperatorService

HERE = Path(__file__).resolve().parent
STYLE = (HERE / "static" / "style.css").read_text()
_STYLE_HASH = base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()
HEADERS = {
    "Content-Security-Policy": f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; img-src 'self'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin", "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
}
ENV = jinja2.Environment(loader=jinja2.FileSystemLoader(str(HERE / "templates")),
                         autoescape=jinja2.select_autoescape(["html"]), undefined=jinja2.StrictUndefined)


def render(name: str, status: int = 200, caller: Caller | None = None, auth: Authenticator | None = None,
           **context) -> web.Response:
    csrf = auth.csrf(caller) if caller is not None and auth is not None else ""
    text = ENV.get_template(name).render(style=STYLE, caller=caller, csrf=csrf, **context)
    return web.Response(status=status, text=text, content_type="text/html", headers=HEADERS)


def login_page(status: int, message: str = "", next_path: str = "/") -> web.Response:
    return render("login.html", status=status, message=message, next_path=_local(next_path))


def error_page(problem: Problem, caller: Caller | None) -> web.Response:
    return render("error.html", status=problem.status, problem=problem.body(), caller=caller)


def _local(path: str | None) -> str:
    """Only a path on this listener (never '//host', a scheme, or anything a browser would read
    as one, e.g. '/', a tab, '/evil.example': browsers drop tabs and newlines from a URL): where to go
    after the login."""
    if not path or any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7f for c in path) or "\\" in path:
        return "/"
    parts = urlsplit(path)
    if parts.scheme or parts.netloc or not parts.path.startswith("/") or parts.path.startswith("//"):
        return "/"
    return path


def _redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={**HEADERS, "Location": location})


def _query(**kw) -> str:
    return urlencode({k: v for k, v in kw.items() if v})


def add_routes(app: web.Application, svc: OperatorService, auth: Authenticator, secure: bool) -> None:
    def page(name, r, **context):
        return render(name, caller=r[CALLER], auth=auth, **context)

    async def overview(r):
        return page("overview.html", r, overview=svc.overview(), due=svc.expiring(None, limit="20").items)

    async def fleet(r):
        f = {k: r.query.get(k, "") for k in ("state", "type", "expiring_within")}
        result = svc.devices(state=f["state"] or None, device_type=f["type"] or None,
                             expiring_within=f["expiring_within"] or None, cursor=r.query.get("cursor"),
                             limit=r.query.get("limit"))
        next_link = "/devices?" + _query(**f, cursor=result.next_cursor) if result.next_cursor else None
        return page("fleet.html", r, devices=result.items, filters=f, states=[s.value for s in DeviceState],
                    types=svc.fleet.device_types(), next_link=next_link,
                    first_link="/devices?" + _query(**f) if r.query.get("cursor") else None)

    async def device(r):
        serial = r.match_info["serial"]
        history = svc.attestations(serial, r.query.get("cursor"), r.query.get("limit"))
        return page("device.html", r, device=svc.device(serial), certificates=svc.certificates(serial),
                    history=history.items, next_link=(f"/devices/{serial}?" + _query(cursor=history.next_cursor))
                    if history.next_cursor else None)

    async def confirm(r):
        serial = r.match_info["serial"]
        return page("revoke.html", r, device=svc.device(serial), reasons=list(REASONS))

    async def revoke(r):
        serial = r.match_info["serial"]
        form = r[FORM]
        if form.get("confirm") != "yes":
            raise Problem("bad-request", "the revocation was not confirmed")
        result = svc.revoke_device(serial, form.get("reason") or None, r[CALLER].who, "web")
        return page("revoked.html", r, result=result, device=result["device"])

    async def log_page(r):
        entries = svc.attestations(r.query.get("device") or None, r.query.get("cursor"), r.query.get("limit"))
        next_link = "/log?" + _query(device=r.query.get("device"), cursor=entries.next_cursor) \
            if entries.next_cursor else None
        return page("log.html", r, verification=svc.verification(), entries=entries.items, next_link=next_link)

    async def login_form(r):
        return login_page(200, next_path=r.query.get("next", "/"))

    async def login(r):
        form = r[FORM]
        cookie = auth.login(str(form.get("token", "")))
        if cookie is None:
            return login_page(401, "That is not the operator token.", str(form.get("next", "/")))
        resp = _redirect(_local(str(form.get("next", "/"))))
        resp.set_cookie(COOKIE, cookie, max_age=SESSION_LIFETIME, path="/", httponly=True, samesite="Strict",
                        secure=secure)
        return resp

    async def logout(r):
        resp = _redirect("/login")
        resp.del_cookie(COOKIE, path="/")
        return resp

    app.router.add_get("/", overview)
    app.router.add_get("/devices", fleet)
    app.router.add_get("/devices/{serial}", device)
    app.router.add_get("/devices/{serial}/revoke", confirm)
    app.router.add_post("/devices/{serial}/revoke", revoke)
    app.router.add_get("/log", log_page)
    app.router.add_get("/login", login_form)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
