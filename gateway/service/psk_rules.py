"""What the enrollment service asks of a PSK session (docs/enrollment.md#psk-devices).

A PSK is a string in flash, not a key: whoever reads it opens sessions as the device. So wherever
a certificate or a key is at stake, a PSK session must show what only the device's attestation key
(its factory key) can give:
- /sen and /sren: acceptable evidence inside the CSR, signed with the attestation key, for a
  server nonce, bound to the CSR's key by its cnf claim; never a verdict of the window (unless
  the device type's policy waives attestation: then the PSK is the only proof);
- GET /psk: only in the session whose /sen or /sren issued the certificate the operational PSK
  goes with, sealed to that certificate's key and signed by the gateway (ca/sealed.py). The PSK
  suite has no (EC)DHE: whoever holds the PSK a session was opened with, and records or relays
  that session, reads what it carries; sealed, the operational PSK opens only with the private
  key the attested CSR named. And the gateway's side of a PSK session proves only that it knows
  the PSK: signed, the answer (and through its digest the configuration of the same session)
  cannot be one a PSK holder on the path made up.

A mixin of `EnrollmentService` (enrollment.py), kept apart to keep that module readable.
"""

from __future__ import annotations

import hashlib

import cbor2
from cryptography.hazmat.primitives import serialization

from devid.attestation.evidence import cose_key_xy
from devid.ca import sealed
from devid.ca.authority import CheckedKey
from devid.ca.errors import CAError

from devid.gateway.errors import ConfigError
from devid.gateway.service.identity import SUPERSEDED_SESSION_GRACE, PeerIdentity, attestation_identity, operational_psk
from devid.gateway.service.refusals import (AttestationRefused, AttestationRequired, DeviceNotAllowed,
                                            NotAuthenticated, WrongIdentity)


class PskRules:
    def _psk_without_evidence(self, action: str, who: PeerIdentity) -> None:
        self._decision(action, who, "refused", reason="PSK session without evidence in the CSR")
        raise AttestationRequired(f"a PSK device of type {who.device_type} must put evidence signed with its "
                                  "attestation key in the CSR (attribute id-aa-attestation)")

    def _psk_appraisal(self, who: PeerIdentity, checked: CheckedKey):
        """The appraisal of the evidence in a PSK session's /sren CSR, acceptable (else refused,
        and logged); None if the CSR has none and the policy waives attestation."""
        tpolicy = self.policy.for_type(who.device_type)
        if checked.evidence is None:
            if tpolicy is not None and tpolicy.attestation == "waived":
                return None
            self._psk_without_evidence("renew", who)
        attester = attestation_identity(self.ca.store, who)
        if attester is None:
            self._decision("renew", who, "refused", reason="no current factory certificate")
            raise DeviceNotAllowed(f"device {who.serial} is not allowed")
        # tinydtls exports no session value: the nonce is a server nonce, bound to the factory
        # certificate (nonce()); the cnf claim binds the evidence to the CSR's key
        appraisal = self.attestation.appraise(checked.evidence,
                                              self._attesting(attester, None, cose_key_xy(checked.public_key)))
        if not appraisal.verdict.acceptable:
            outcome = self._judged(who, self.attestation.record(appraisal), via="csr")
            verdict = appraisal.verdict
            raise AttestationRefused(f"verdict {verdict.tier.value}: {', '.join(verdict.codes)}"
                                     + (" (the device was revoked)" if outcome.revoked else ""))
        return appraisal

    def operational_psk(self, who: PeerIdentity | None, issued_here: int | None) -> bytes:
        """GET /psk: the signed answer (COSE_Sign1, ca/sealed.py; docs/enrollment.md#the-answer)
        carrying the PSK device's operational PSK, the one that goes with the certificate
        `issued_here`: the one this very session's /sen or /sren issued (None: it issued none),
        while it is still the device's current one. The key comes sealed to that certificate's
        public key (a COSE_Encrypt), the answer signed by the gateway (`delivery`). A factory PSK alone, or an
        operational PSK of a session that renewed nothing, gets no key (authorization.RULES["psk"]
        for the device, service/psk.py for the session). Paid from the /config budget: the same
        sessions read both, once per enrollment or renewal."""
        if who is None:
            self._decision("psk", None, "refused", reason="no device identity")
            raise NotAuthenticated("a device identity is required")
        self._spend("config", who)
        # the session that renewed (its certificate now superseded) fetches the key that goes with
        # the new certificate: for as long as such a session lives (identity.session_grace)
        self._standing("psk", who, max(self.budgets.superseded_grace, SUPERSEDED_SESSION_GRACE))
        if issued_here is None:
            self._decision("psk", who, "refused", reason="no certificate issued in this session")
            raise WrongIdentity("the operational PSK is served only in the session whose /sen or /sren issued "
                                "its certificate")
        secret = self.psk_secret()
        if secret is None:          # no PSK session exists without the secret; said plainly all the same
            self._decision("psk", who, "refused", reason="no PSK secret")
            raise DeviceNotAllowed(f"device {who.serial}: the gateway has no PSK secret")
        found = operational_psk(self.ca.store, secret, who.serial)
        if found is None or found[2] != issued_here:
            self._decision("psk", who, "refused", reason="the certificate this session was issued is not current")
            raise DeviceNotAllowed(f"device {who.serial}: the certificate this session was issued is no longer "
                                   "current: renew again")
        name, key, cert_serial, cert = found
        if self.delivery is None:
            self._decision("psk", who, "refused", reason="no key to sign the answer with")
            raise DeviceNotAllowed("this gateway serves no operational PSKs (no signing key)")
        # the configuration the device was served in this session (GET /config serves the same
        # bytes): its digest in the signed answer vouches for it
        try:
            config_digest = hashlib.sha256(cbor2.dumps(self._config(who))).digest()
        except (CAError, ConfigError):      # the operator's template is at fault (logged): the key still goes
            config_digest = None            # out, and the device asks GET /config later
        cert_digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()
        payload = cbor2.dumps({"identity": name, "certificate": cert_digest,
                               "sealed_key": cbor2.loads(sealed.seal(cert.public_key(), key, self.random)),
                               "config": config_digest})
        signing_key, chain = self.delivery
        answer = sealed.sign(payload, signing_key, chain)
        # the identity and the certificate it goes with, never the key
        self._decision("psk", who, "served", psk_identity=name, certificate_serial=format(cert_serial, "x"))
        return answer

