"""The refusals of the enrollment service: domain errors the device is told about (a short
reason); `problems.py` maps each to a CoAP code by its `code`."""

from __future__ import annotations

from devid.gateway.errors import GatewayError


class EnrollmentError(GatewayError):
    """A refusal the device is told about (short reason); `problems.py` maps it to a CoAP code."""

    code = "refused"


class NotAuthenticated(EnrollmentError):
    code = "not-authenticated"


class WrongIdentity(EnrollmentError):
    """A factory identity where an operational one is needed, or the reverse."""

    code = "wrong-identity"


class AttestationRequired(EnrollmentError):
    code = "attestation-required"


class AttestationRefused(EnrollmentError):
    """Evidence that came inside the CSR was appraised unacceptable (the verdict is logged)."""

    code = "attestation-refused"


class ReenrollmentRefused(EnrollmentError):
    code = "reenrollment-refused"


class DeviceNotAllowed(EnrollmentError):
    """Unknown or revoked device."""

    code = "device-not-allowed"


class UnknownDeviceType(EnrollmentError):
    code = "unknown-device-type"


class CertificateRevoked(EnrollmentError):
    """The certificate of this session was revoked (its device may not be)."""

    code = "certificate-revoked"


class CertificateSuperseded(EnrollmentError):
    """A later issuance replaced the certificate of this session (and its grace, if any, is over)."""

    code = "certificate-superseded"


class TooManyRequests(EnrollmentError):
    """Over a per-device budget; `retry_after` is the seconds until a request would be accepted."""

    code = "too-many-requests"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TooManyCertificates(TooManyRequests):
    """The device received its allowance of operational certificates within the window."""

    code = "too-many-certificates"
