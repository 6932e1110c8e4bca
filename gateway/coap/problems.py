"""RFC 9290 concise problem details (Content-Format 257): the one builder of a problem response.

The CoAP server core uses it for transport-level refusals (a bad Block option, a body too large);
`devid.gateway.service.problems` maps the enrollment service's errors onto it.
"""

from __future__ import annotations

import aiocoap
import cbor2
from aiocoap.numbers import codes

CT_PROBLEM = 257


def problem_message(code: codes.Code, title: str, detail: str | None = None, **options) -> aiocoap.Message:
    body = {-1: title}
    if detail:
        body[-2] = detail
    msg = aiocoap.Message(code=code, payload=cbor2.dumps(body), content_format=CT_PROBLEM)
    for name, value in options.items():
        setattr(msg.opt, name, value)
    return msg
