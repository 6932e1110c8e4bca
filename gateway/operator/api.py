"""The JSON API, `/api/v1/...` (docs/operations.md#api): thin handlers over `OperatorService`.
Authentication is done before a handler runs (`listener.py`); `request["caller"]` names who."""

from __future__ import annotations

import json

from aiohttp import web

from devid.gateway.operator.auth import CALLER
from devid.gateway.operator.problems import Problem
from devid.gateway.operator.service import OperatorService
from devid.gateway.system.metrics import exposition


def _json(doc: dict, status: int = 200) -> web.Response:
    return web.Response(status=status, body=json.dumps(doc).encode(), content_type="application/json",
                        headers={"Cache-Control": "no-store"})


async def _body(request: web.Request) -> dict:
    """A write's body. Content-Type: application/json always, even with no body: a cross-site
    HTML form can only send form or text types (anything else needs a CORS preflight, which this
    listener never grants)."""
    if request.content_type != "application/json":
        raise Problem("unsupported-media-type", f"got {request.headers.get('Content-Type', 'none')!r}: "
                                                "send 'Content-Type: application/json' (also with an empty body)")
    if not request.can_read_body:
        return {}
    try:
        doc = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError):
        raise Problem("bad-request", "the body is not JSON") from None
    if not isinstance(doc, dict):
        raise Problem("bad-request", "the body must be a JSON object, e.g. {\"reason\": \"keyCompromise\"}")
    unknown = set(doc) - {"reason"}
    if unknown:
        raise Problem("bad-request", f"unknown field(s): {', '.join(sorted(unknown))}")
    return doc


def add_routes(app: web.Application, svc: OperatorService) -> None:
    q = lambda r, k: r.query.get(k)      # noqa: E731

    async def devices(r):
        page = svc.devices(state=q(r, "state"), device_type=q(r, "type"), expiring_within=q(r, "expiring_within"),
                           cursor=q(r, "cursor"), limit=q(r, "limit"))
        return _json(page.as_json("devices"))

    async def device(r):
        return _json(svc.device(r.match_info["serial"]))

    async def certificates(r):
        return _json({"device": r.match_info["serial"], "certificates": svc.certificates(r.match_info["serial"])})

    async def attestations(r):
        page = svc.attestations(r.match_info["serial"], q(r, "cursor"), q(r, "limit"))
        return _json({"device": r.match_info["serial"], **page.as_json("attestations")})

    async def log_entries(r):
        page = svc.attestations(q(r, "device") or None, q(r, "cursor"), q(r, "limit"))
        v = svc.verification()
        return _json({"verification": {k: v[k] for k in ("status", "ok", "head_seq", "entries", "checked_at")},
                      **page.as_json("entries")})

    async def verification(r):
        return _json(svc.verification())

    async def expiring(r):
        return _json(svc.expiring(q(r, "within"), q(r, "cursor"), q(r, "limit")).as_json("certificates"))

    async def overview(r):
        return _json(svc.overview())

    async def revoke_device(r):
        body = await _body(r)
        return _json(svc.revoke_device(r.match_info["serial"], body.get("reason"), r[CALLER].who, "api"))

    async def revoke_certificate(r):
        body = await _body(r)
        return _json(svc.revoke_certificate(r.match_info["serial"], body.get("reason"), r[CALLER].who, "api"))

    async def metrics(r):
        body, content_type = exposition()
        return web.Response(body=body, headers={"Content-Type": content_type})

    app.router.add_get("/api/v1/devices", devices)
    app.router.add_get("/api/v1/devices/{serial}", device)
    app.router.add_get("/api/v1/devices/{serial}/certificates", certificates)
    app.router.add_get("/api/v1/devices/{serial}/attestations", attestations)
    app.router.add_post("/api/v1/devices/{serial}/revoke", revoke_device)
    app.router.add_post("/api/v1/certificates/{serial}/revoke", revoke_certificate)
    app.router.add_get("/api/v1/certificates/expiring", expiring)
    app.router.add_get("/api/v1/attestation-log", log_entries)
    app.router.add_get("/api/v1/attestation-log/verification", verification)
    app.router.add_get("/api/v1/overview", overview)
    app.router.add_get("/metrics", metrics)
