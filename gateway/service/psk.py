"""GET /psk: a PSK device's operational pre-shared key (docs/enrollment.md#psk-devices).

    /psk    GET    COSE_Sign1 (Content-Format 18) of CBOR {"identity", "certificate", "sealed_key",
                   "config"}, Max-Age 0
                   (factory-psk or operational-psk, only in the session whose /sen or /sren issued
                   the device's current operational certificate)

The key is the one that goes with that certificate (ca/psk.py): a factory PSK alone, or a session
that issued nothing, gets none (a PSK is a string in flash, not a key: the certificate the session
was issued needed evidence signed by the attestation key, EnrollmentService.enroll/renew). Each
enrollment and renewal issues a new certificate, so the key rotates with it, and the old key stops
working at once (the gateway then accepts only the new one in new handshakes; sessions of the
old one end with the certificate's grace period, like a superseded certificate's). It travels only
inside the device's authenticated DTLS session, sealed to the key of that certificate and signed
by the gateway (service/psk_rules.py says why); the gateway logs the identity, never the key.
"""

from __future__ import annotations

import aiocoap
from aiocoap.numbers import codes

from devid.gateway.service.resources import _Resource, identity_of


CT_COSE_SIGN1 = 18        # application/cose; cose-type="cose-sign1" (RFC 9052)


class OperationalPsk(_Resource):
    rt = "devid.psk"
    ct = str(CT_COSE_SIGN1)

    async def render_get(self, request):
        self.accepted(request, CT_COSE_SIGN1)
        # the certificate this session's /sen or /sren issued (resources.SimpleEnroll), if any
        body = self.service.operational_psk(identity_of(request), getattr(request.remote, "psk_issued", None))
        return aiocoap.Message(code=codes.CONTENT, payload=body, content_format=CT_COSE_SIGN1, max_age=0)
