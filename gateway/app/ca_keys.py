"""CA keys in a PKCS#11 token (`devid init --pkcs11 URI`): made there, used there, named here.

For each CA (root, manufacturing, operational) the data directory holds, instead of an
encrypted key file, `DATA/ca/<name>.key.pkcs11`: one line, the RFC 7512 URI of its private key
in the token (token, CKA_ID, label, module-path, pin-source; never a PIN). The keys are
generated inside the token, sensitive and never extractable; every certificate and CRL
signature is the token's (`devid.gateway.pkcs11.token.TokenKey`). The gateway's own DTLS key
stays an encrypted key file: pyOpenSSL, the gateway's DTLS stack, signs its handshakes in
process and has no way to use a key that stays in a token.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from devid.ca import keys
from devid.gateway.errors import TokenError
from devid.gateway.pkcs11.token import Token, TokenKey, read_pin
from devid.gateway.pkcs11.uri import TokenURI, parse

REF_SUFFIX = ".key.pkcs11"
LABEL_PREFIX = "devid-"


def token_for_init(text: str) -> TokenURI:
    """The token `devid init --pkcs11 URI` names, checked: a token, not an object, and a PIN to
    log in with (the token itself is opened when the first key is made)."""
    uri = parse(text)
    if uri.object is not None or uri.id is not None or uri.type is not None:
        raise TokenError("--pkcs11: name the token only (token=..., serial=..., slot-id=...); devid makes and "
                         "names the CA keys in it")
    if uri.token is None and uri.serial is None and uri.slot_id is None:
        raise TokenError("--pkcs11: name the token (token=LABEL, serial=... or slot-id=...), e.g. "
                         "pkcs11:token=devid-ca?module-path=/usr/lib/softhsm/libsofthsm2.so")
    read_pin(uri)
    return uri


class TokenKeyMaker:
    """`make_ca_key` for `devid.ca.hierarchy.create_hierarchy`: each CA key generated in the
    token, with a random CKA_ID and the label devid-<name>; `undo()` destroys what it made."""

    def __init__(self, uri: TokenURI, rand_bytes: Callable[[int], bytes] = os.urandom) -> None:
        self.uri = uri
        self.token = Token.of(uri)
        self.rand_bytes = rand_bytes
        self.made: dict[str, TokenKey] = {}

    def __call__(self, name: str, curve: ec.EllipticCurve) -> TokenKey:
        id = self.rand_bytes(16)
        label = LABEL_PREFIX + name
        public = self.token.generate_ec_key(curve, label, id)
        key = TokenKey(self.token, id, label, public)
        self.made[name] = key
        return key

    def references(self) -> dict[str, bytes]:
        """File name -> content of each key's reference file."""
        return {name + REF_SUFFIX: (str(key.uri) + "\n").encode() for name, key in self.made.items()}

    def undo(self) -> None:
        """After a failed init: the keys it made leave the token (best effort)."""
        for key in self.made.values():
            try:
                self.token.destroy_key(key.id)
            except Exception:
                pass
        self.made.clear()


def ref_uri(path: Path) -> TokenURI:
    keys.check_private_file(path)
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise keys.KeyFileError(f"{path}: cannot read it ({exc.__class__.__name__})") from None
    try:
        uri = parse(text)
    except TokenError as exc:
        raise TokenError(f"{path}: {exc}") from None
    if uri.id is None and uri.object is None:
        raise TokenError(f"{path}: the URI names no key (id= or object=)")
    return uri


def load_token_key(path: Path, cert: x509.Certificate) -> TokenKey:
    """The CA key `path` refers to, checked against its certificate."""
    key = TokenKey.open(ref_uri(path))
    if key.public_key() != cert.public_key():
        raise TokenError(f"the key {path} names in {key.token.uri.token_label} does not match its certificate")
    return key


def destroy_staged(staging: Path) -> None:
    """The keys an interrupted init made, named by the references in its staging directory
    (never renamed into place, so no CA uses them): out of the token, best effort (no PIN or no
    token here: they stay, and sign nothing)."""
    for ref in staging.glob(f"*{REF_SUFFIX}"):
        try:
            uri = ref_uri(ref)
            if uri.id is not None and (uri.object or "").startswith(LABEL_PREFIX):
                Token.of(uri).destroy_key(uri.id)
        except Exception:
            continue
