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
import sys
from dataclasses import replace
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from devid.ca import keys
from devid.gateway.errors import TokenError
from devid.gateway.system.fs import fsync_path
from devid.gateway.pkcs11.token import Token, TokenKey, read_pin
from devid.gateway.pkcs11.uri import TokenURI, parse

REF_SUFFIX = ".key.pkcs11"
LABEL_PREFIX = "devid-"


def token_for_init(text: str) -> TokenURI:
    """The token `devid init --pkcs11 URI` names, checked: a token, not an object, and a PIN to
    log in with (the token itself is opened when the first key is made)."""
    uri = parse(text)
    # the references outlive this working directory: relative paths made absolute now
    absolute = {}
    if uri.module_path and not os.path.isabs(uri.module_path):
        absolute["module_path"] = os.path.abspath(uri.module_path)
    if uri.pin_source:
        bare = uri.pin_source[len("file:"):] if uri.pin_source.startswith("file:") else uri.pin_source
        if not os.path.isabs(bare):
            absolute["pin_source"] = "file:" + os.path.abspath(bare)
    uri = replace(uri, **absolute)
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
    token, with a random CKA_ID (os.urandom: never a test's deterministic randomness) and the
    label devid-<name>. Its reference, `<name>.key.pkcs11`, is written and fsynced into
    `staging` before the key is made, so a kill at any point leaves every key it made named
    there (`destroy_staged`). `undo()` destroys what it made."""

    def __init__(self, uri: TokenURI, staging: Path) -> None:
        self.uri = uri
        self.token = Token.of(uri)
        self.staging = staging
        self.made: dict[str, TokenKey] = {}
        self.ids: dict[str, bytes] = {}

    def __call__(self, name: str, curve: ec.EllipticCurve) -> TokenKey:
        self.token.session()        # a wrong PIN, no token: refused before anything is named or made
        id = os.urandom(16)
        label = LABEL_PREFIX + name
        ref = self.staging / f"{name}{REF_SUFFIX}"
        keys.write_private_file(ref, (str(self.token.uri.with_object(label=label, id=id, type="private")) + "\n").encode())
        fsync_path(self.staging)
        self.ids[name] = id
        public = self.token.generate_ec_key(curve, label, id)
        key = TokenKey(self.token, id, label, public)
        self.made[name] = key
        return key

    def undo(self) -> bool:
        """After a failed init: the keys it made (or may have made) leave the token. False if
        one could not be destroyed: its reference then stays for the next init."""
        ok = True
        for name, id in list(self.ids.items()):
            try:
                self.token.destroy_key(id, LABEL_PREFIX + name)
                del self.ids[name]
            except Exception:
                ok = False
        self.made.clear()
        return ok


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
    challenge = os.urandom(32)
    try:                                    # the private key itself, not only the public object beside it
        if key.public_key() != cert.public_key():
            raise InvalidSignature
        cert.public_key().verify(key.sign(challenge, ec.ECDSA(hashes.SHA256())), challenge, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise TokenError(f"the key {path} names in {key.token.uri.token_label} does not match its certificate") from None
    return key


def destroy_staged(staging: Path) -> bool:
    """The keys an interrupted init made, named by the references in its staging directory
    (never renamed into place, so no CA uses them): out of the token. False if one could not be
    destroyed (no PIN, the token not reachable): the staging directory then stays, with one
    warning line on stderr, and the next init tries again."""
    done = True
    for ref in staging.glob(f"*{REF_SUFFIX}"):
        try:
            uri = ref_uri(ref)
        except TokenError:
            continue                    # empty or cut short: killed while writing it, before its key was made
        except Exception as exc:
            done = False
            print(f"devid: warning: {ref}: {exc}; {staging} is kept", file=sys.stderr)
            continue
        try:
            if uri.id is not None and (uri.object or "").startswith(LABEL_PREFIX):
                Token.of(uri).destroy_key(uri.id, uri.object)
        except Exception as exc:
            done = False
            print(f"devid: warning: {ref}: the key of an interrupted init stays in its token ({exc}); "
                  f"{staging} is kept until it can be destroyed", file=sys.stderr)
    return done
