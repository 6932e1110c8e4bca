"""Named errors of the CA. Each carries a short message fit for an operator or a device."""


class CAError(Exception):
    """Base of every error the CA raises on purpose."""


class InvalidCSR(CAError):
    """The CSR cannot be parsed, or its signature does not verify."""


class KeyPolicyViolation(CAError):
    """A public key the profile does not allow (wrong algorithm or curve)."""


class UnknownDevice(CAError):
    """No device with this serial in the registry."""


class DeviceRevoked(CAError):
    """The device (or the certificate presented) is revoked."""


class DeviceStateError(CAError):
    """The device is in a state that does not allow the operation."""


class UnknownProfile(CAError):
    """No certificate profile with this name."""


class InvalidSerial(CAError):
    """A device serial or device type with characters outside the allowed set."""


class SerialCollision(CAError):
    """A certificate serial or device serial already exists (the registry refused it)."""


class DuplicateDevice(SerialCollision):
    """A device with this serial is already registered."""


class KeyFileError(CAError):
    """A key file is missing, unreadable, insecure or does not decrypt."""


class InsecureKeyFile(KeyFileError):
    """A CA key or secret file is readable by group or others."""


class WrongPassphrase(KeyFileError):
    """The passphrase does not decrypt a CA key."""


class CAExists(CAError):
    """`init` was asked to create a CA where one already exists."""


class CANotInitialised(CAError):
    """No CA in the data directory."""


class ValidationFailed(CAError):
    """A certificate chain does not validate, or the certificate is unknown or revoked."""
