"""PKCS#11 URIs (RFC 7512): which module, which token, which object, and where the PIN is.

    pkcs11:token=devid-ca?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/devid/pin

Path attributes (`;`-separated) select the token and the object: token, serial, manufacturer,
model, slot-id, object, id, type. Query attributes (`&`-separated) say how: module-path (the
PKCS#11 library to load), module-name, pin-source (a file holding the PIN). `pin-value` is
refused: a PIN in a URI ends up in shell history, `ps` and configuration files; give it in a
file (`pin-source`) or in $DEVID_PKCS11_PIN. Values are percent-decoded; an attribute devid
does not know is refused rather than ignored, so a typo never selects a different token.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass, replace
from urllib.parse import quote, unquote_to_bytes

from devid.gateway.errors import TokenError

PATH_ATTRS = ("token", "serial", "manufacturer", "model", "slot-id", "object", "id", "type")
QUERY_ATTRS = ("module-path", "module-name", "pin-source")
OBJECT_TYPES = ("private", "public", "cert", "secret-key", "data")
DEFAULT_MODULE = "/usr/lib/softhsm/libsofthsm2.so"


@dataclass(frozen=True)
class TokenURI:
    token: str | None = None
    serial: str | None = None
    manufacturer: str | None = None
    model: str | None = None
    slot_id: int | None = None
    object: str | None = None          # CKA_LABEL
    id: bytes | None = None            # CKA_ID
    type: str | None = None
    module_path: str | None = None
    module_name: str | None = None
    pin_source: str | None = None

    @property
    def module(self) -> str:
        """The PKCS#11 library to load: module-path, else module-name in the system's module
        directory, else SoftHSM2's."""
        if self.module_path:
            return self.module_path
        if self.module_name:
            arch = sysconfig.get_config_var("MULTIARCH") or ""
            return f"/usr/lib/{arch + '/' if arch else ''}pkcs11/{self.module_name}.so"
        return DEFAULT_MODULE

    @property
    def token_label(self) -> str:
        """How messages name the token."""
        if self.token:
            return f"token '{self.token}'"
        if self.serial:
            return f"token with serial {self.serial}"
        if self.slot_id is not None:
            return f"token in slot {self.slot_id}"
        return "the first token"

    def with_object(self, *, label: str | None = None, id: bytes | None = None, type: str | None = None) -> "TokenURI":
        return replace(self, object=label, id=id, type=type)

    def token_only(self) -> "TokenURI":
        """The same token and module, no object."""
        return replace(self, object=None, id=None, type=None)

    def __str__(self) -> str:
        path = []
        for name in PATH_ATTRS:
            value = getattr(self, name.replace("-", "_"))
            if value is None:
                continue
            if name == "id":
                text = "".join(f"%{b:02x}" for b in value)
            else:
                text = quote(str(value), safe="")
            path.append(f"{name}={text}")
        query = [f"{name}={quote(getattr(self, name.replace('-', '_')), safe='/:')}"
                 for name in QUERY_ATTRS if getattr(self, name.replace("-", "_")) is not None]
        return "pkcs11:" + ";".join(path) + ("?" + "&".join(query) if query else "")


def _pairs(text: str, sep: str, what: str):
    seen = set()
    for part in text.split(sep):
        if not part:
            continue
        name, eq, value = part.partition("=")
        if not eq:
            raise TokenError(f"PKCS#11 URI: {what} attribute '{name}' has no value (name=value)")
        if name.lower() in seen:
            raise TokenError(f"PKCS#11 URI: attribute '{name.lower()}' given twice")
        seen.add(name.lower())
        yield name.lower(), value


def parse(text: str) -> TokenURI:
    """The TokenURI of `text`; TokenError for anything that is not a PKCS#11 URI devid can use.
    The messages never repeat a value after 'pin-'."""
    if not isinstance(text, str) or not text.lower().startswith("pkcs11:"):
        raise TokenError("not a PKCS#11 URI: it starts with 'pkcs11:' (RFC 7512), e.g. "
                         f"pkcs11:token=devid-ca?module-path={DEFAULT_MODULE}")
    body = text[len("pkcs11:"):]
    path, _, query = body.partition("?")
    fields: dict = {}
    for name, value in _pairs(path, ";", "path"):
        if name not in PATH_ATTRS:
            raise TokenError(f"PKCS#11 URI: unknown attribute '{name}' (devid knows {', '.join(PATH_ATTRS)})")
        raw = unquote_to_bytes(value)
        if name == "id":
            fields["id"] = raw
            continue
        try:
            decoded = raw.decode()
        except UnicodeDecodeError:
            raise TokenError(f"PKCS#11 URI: {name} is not UTF-8") from None
        if name == "slot-id":
            if not decoded.isdigit():
                raise TokenError("PKCS#11 URI: slot-id is a decimal number")
            fields["slot_id"] = int(decoded)
        elif name == "type" and decoded not in OBJECT_TYPES:
            raise TokenError(f"PKCS#11 URI: type must be one of {', '.join(OBJECT_TYPES)}")
        else:
            fields[name] = decoded
    for name, value in _pairs(query, "&", "query"):
        if name == "pin-value":
            raise TokenError("PKCS#11 URI: pin-value is refused (a PIN in a URI ends up in shell history and "
                             "process lists); give pin-source=file:PATH (a 0600 file) or set $DEVID_PKCS11_PIN")
        if name not in QUERY_ATTRS:
            raise TokenError(f"PKCS#11 URI: unknown query attribute '{name}' (devid knows {', '.join(QUERY_ATTRS)})")
        try:
            fields[name.replace("-", "_")] = unquote_to_bytes(value).decode()
        except UnicodeDecodeError:
            raise TokenError(f"PKCS#11 URI: {name} is not UTF-8") from None
    if fields.get("module_name") and "/" in fields["module_name"]:
        raise TokenError("PKCS#11 URI: module-name is a name, not a path: give module-path for a path")
    return TokenURI(**fields)
