"""The gateway package's errors: one hierarchy, apart from the CA's (`devid.ca.errors`) and the
attestation's (`devid.attestation.errors`).

The command line prints any of them as one line (`devid: error: ...`); the CoAP layer maps the
ones a request can meet to codes in one place (`problems.py`).
"""

from __future__ import annotations


class GatewayError(Exception):
    """Something the gateway's own code refuses or cannot do, with a message for a person."""


class ConfigError(GatewayError):
    """devid.toml or a configuration template is missing, malformed or has a bad value."""


class RegistryError(GatewayError):
    """The registry cannot be opened: missing, empty, of a newer schema, unreadable."""


class DirectoryBusy(GatewayError):
    """Another process holds the lock on this directory (or lock file)."""

    def __init__(self, path, pid: int | None) -> None:
        super().__init__(f"{path} is locked by {'process ' + str(pid) if pid else 'another process'}")
        self.path = path
        self.pid = pid


class ProvisioningError(GatewayError):
    """Factory provisioning refused its input or could not finish."""


class BundleError(GatewayError):
    """A device bundle (factory or operational files) is missing or unreadable."""


class CLIError(GatewayError):
    """Bad input detected by the command line itself."""


class TokenError(GatewayError):
    """A PKCS#11 token cannot be used: its module does not load, the token or the key is missing,
    the PIN is wrong or missing. The message names the token, never the PIN."""
