"""RFC 9457 problem details for the operator listener: `application/problem+json`, with a `type`
URI per kind of problem (docs/operations.md#problem-types lists them), a title, the status and
a detail that helps (never a secret)."""

from __future__ import annotations

import json

from aiohttp import web

PROBLEM_JSON = "application/problem+json"
BASE = "https://devid.invalid/problems/"

TITLES = {
    "unauthorized": (401, "Authentication required"),
    "wrong-credential": (403, "This credential is not an operator's"),
    "csrf": (403, "The form's anti-forgery check failed"),
    "not-found": (404, "Not found"),
    "method-not-allowed": (405, "Method not allowed"),
    "bad-parameter": (400, "A query parameter is not valid"),
    "bad-request": (400, "The request body is not valid"),
    "unsupported-media-type": (415, "The body must be application/json"),
    "conflict": (409, "The request conflicts with the registry's state"),
    "unavailable": (503, "The registry is not available"),
    "internal": (500, "Internal error"),
}


class Problem(Exception):
    def __init__(self, kind: str, detail: str, **extra) -> None:
        super().__init__(detail)
        self.kind, self.detail, self.extra = kind, detail, extra

    @property
    def status(self) -> int:
        return TITLES[self.kind][0]

    def body(self, instance: str | None = None) -> dict:
        doc = {"type": BASE + self.kind, "title": TITLES[self.kind][1], "status": self.status, "detail": self.detail}
        if instance:
            doc["instance"] = instance
        doc.update(self.extra)
        return doc

    def response(self, instance: str | None = None, headers: dict | None = None) -> web.Response:
        h = dict(headers or {})
        if self.status == 401:
            h.setdefault("WWW-Authenticate", 'Bearer realm="devid operator"')
        return web.Response(status=self.status, body=json.dumps(self.body(instance)).encode(),
                            content_type=PROBLEM_JSON, headers=h)
