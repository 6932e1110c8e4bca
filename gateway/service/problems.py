"""Domain errors to CoAP responses, in one place (RFC 9290 concise problem details, ct 257).

Devices get a code and a short reason; the details stay in the gateway's log. Anything not
listed here is unexpected: aiocoap answers 5.00 with an empty body and logs the traceback.
"""

from __future__ import annotations

import sqlite3

import aiocoap
from aiocoap import error
from aiocoap.numbers import codes

from devid.attestation.errors import AttestationError
from devid.ca.errors import (CAError, DeviceRevoked, InvalidCSR, InvalidSerial, KeyPolicyViolation, SerialCollision,
                       UnknownDevice)

from devid.gateway.service import enrollment as E
from devid.gateway.coap.problems import problem_message
from devid.gateway.errors import ConfigError
from devid.gateway.store.storage import BUSY, FAILED, FULL, READ_ONLY, storage_kind

# (error class, CoAP code, title); the first matching class wins, so specific before general
TABLE: list[tuple[type[BaseException], codes.Code, str]] = [
    (E.TooManyCertificates, codes.TOO_MANY_REQUESTS, "too many certificates"),
    (E.TooManyRequests, codes.TOO_MANY_REQUESTS, "too many requests"),
    (E.NotAuthenticated, codes.UNAUTHORIZED, "device certificate required"),
    (E.WrongIdentity, codes.FORBIDDEN, "wrong identity for this resource"),
    (E.DeviceNotAllowed, codes.FORBIDDEN, "device not allowed"),
    (E.CertificateRevoked, codes.FORBIDDEN, "certificate revoked"),
    (E.CertificateSuperseded, codes.FORBIDDEN, "certificate superseded"),
    (E.AttestationRequired, codes.FORBIDDEN, "attestation required"),
    (E.AttestationRefused, codes.FORBIDDEN, "attestation refused"),
    (E.ReenrollmentRefused, codes.FORBIDDEN, "re-enrollment not allowed"),
    (E.UnknownDeviceType, codes.FORBIDDEN, "device type not enrolled by this gateway"),
    (DeviceRevoked, codes.FORBIDDEN, "device revoked"),
    (UnknownDevice, codes.FORBIDDEN, "unknown device"),
    (InvalidCSR, codes.BAD_REQUEST, "invalid CSR"),
    (KeyPolicyViolation, codes.BAD_REQUEST, "key not allowed"),
    (InvalidSerial, codes.BAD_REQUEST, "invalid identifier"),
    (SerialCollision, codes.SERVICE_UNAVAILABLE, "try again"),
    (ConfigError, codes.SERVICE_UNAVAILABLE, "configuration unavailable"),
    (AttestationError, codes.BAD_REQUEST, "attestation error"),
    (sqlite3.OperationalError, codes.SERVICE_UNAVAILABLE, "registry unavailable, try again"),
    (E.EnrollmentError, codes.FORBIDDEN, "refused"),
    (CAError, codes.BAD_REQUEST, "refused"),
]

# what the device is told for errors whose text may name internals
_GENERIC_DETAIL = (sqlite3.OperationalError, ConfigError, SerialCollision)


# storage errors (gateway/store/storage.py), told apart by their SQLite result code or errno rather than
# their class: a busy database is worth a retry in a second; a full disk, a read-only database or
# an I/O error needs the operator, so devices are told to wait longer
STORAGE: dict[str, tuple[str, int]] = {
    BUSY: ("registry busy, try again", 1),
    FULL: ("storage full, try again later", 60),
    READ_ONLY: ("storage read-only, try again later", 60),
    FAILED: ("storage unavailable, try again later", 60),
}


def to_response(exc: BaseException) -> aiocoap.Message | None:
    kind = storage_kind(exc)
    if kind is not None:
        title, max_age = STORAGE[kind]
        return problem_message(codes.SERVICE_UNAVAILABLE, title, None, max_age=max_age)
    for cls, code, title in TABLE:
        if isinstance(exc, cls):
            detail = None if isinstance(exc, _GENERIC_DETAIL) else (str(exc) or None)
            options = {}
            if code == codes.SERVICE_UNAVAILABLE:
                options["max_age"] = 1
            elif isinstance(exc, E.TooManyRequests):
                options["max_age"] = exc.retry_after     # RFC 8516: seconds until a request may succeed
            return problem_message(code, title, detail, **options)
    return None


class Problem(error.ConstructionRenderableError):
    """A refusal decided in the resource layer (content formats, sizes), rendered as problem details."""

    def __init__(self, code: codes.Code, title: str, detail: str | None = None, **options) -> None:
        super().__init__(detail or title)
        self.code = code
        self._title = title
        self._detail = detail
        self._options = options

    def to_message(self) -> aiocoap.Message:
        return problem_message(self.code, self._title, self._detail, **self._options)
