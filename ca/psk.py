"""Pre-shared keys for devices whose DTLS stack has no certificates (tinydtls; docs/enrollment.md#psk-devices).

Identities (ASCII, sent in clear in the ClientKeyExchange):
    factory      the device serial, e.g. ``SN00000001``
    operational  ``op:`` + the device serial, e.g. ``op:SN00000001``
A serial is made of ``A-Z a-z 0-9 . -``, so the ``:`` tells the two kinds apart. Both fit tinydtls's
32-byte identity limit (``DTLS_PSK_MAX_CLIENT_IDENTITY_LEN``) when the serial is at most 29 characters.

Keys: 16 characters of the base64url alphabet (``A-Z a-z 0-9 - _``, 64 symbols), used verbatim as
the 16 key bytes: 16 x 6 = 96 bits of entropy. Two limits decide the format: tinydtls as bundled in
DTLSSocket 0.2.3 takes keys of at most 16 bytes (``DTLS_PSK_MAX_KEY_LEN``), and libcoap's
``coap-client -k`` takes printable text only. 16 random bytes (128 bits) would suit only peers that
take binary keys; 96 bits is far beyond online guessing (every guess is a full handshake with the
gateway) and, with HKDF-SHA256 behind it, offline attack on one key tells nothing about another.

Nothing stores a key: each is derived, with HKDF-SHA256 (RFC 5869), from a per-CA PSK secret (32
random bytes) and the identity; an operational key also from the serial number of the device's
current operational certificate, so each renewal (a new certificate) rotates it and the old one
stops working. The secret is kept in ``DATA/ca/psk.secret`` (mode 0600), sealed with AES-256-GCM
under a key scrypt derives from the CA passphrase (N=2^14, r=8, p=5, as a person's passphrase
protects the CA keys: ca/keys.py).
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from .errors import KeyFileError, WrongPassphrase
from .keys import SCRYPT_N, SCRYPT_P, SCRYPT_R, check_private_file, write_private_file

KEY_CHARS = 16                  # tinydtls: DTLS_PSK_MAX_KEY_LEN = 16 bytes
KEY_BITS = KEY_CHARS * 6        # base64url: 6 bits per character
MAX_IDENTITY = 32               # tinydtls: DTLS_PSK_MAX_CLIENT_IDENTITY_LEN
OPERATIONAL_PREFIX = "op:"
FACTORY_PSK = "factory-psk"
OPERATIONAL_PSK = "operational-psk"
SECRET_FILE = "psk.secret"

# the registry's deployment row naming the secret every host must share (secret_check)
SECRET_CHECK_KEY = "psk_secret_check"

_MAGIC = b"devid-psk-secret-v1\n"
_AAD = b"devid psk secret v1"


def factory_identity(serial: str) -> str:
    return serial


def operational_identity(serial: str) -> str:
    return OPERATIONAL_PREFIX + serial


def parse_identity(identity: bytes) -> tuple[str, str] | None:
    """(kind, device serial) of a PSK identity as received, or None for one devid never issues."""
    try:
        text = identity.decode("ascii")
    except UnicodeDecodeError:
        return None
    if not text or len(text) > MAX_IDENTITY:        # devid issues none longer (provision --psk)
        return None
    if text.startswith(OPERATIONAL_PREFIX):
        kind, serial = OPERATIONAL_PSK, text[len(OPERATIONAL_PREFIX):]
    else:
        kind, serial = FACTORY_PSK, text
    if not serial or any(not (c.isascii() and (c.isalnum() or c in ".-")) for c in serial):
        return None
    return kind, serial


def derive_key(secret: bytes, identity: str, certificate_serial: int | None = None) -> bytes:
    """The 16-character key of `identity` (its bytes are the PSK); an operational identity's key
    depends on its certificate's serial number too."""
    info = b"devid psk v1\x00" + identity.encode("ascii")
    if certificate_serial is not None:
        info += b"\x00" + format(certificate_serial, "x").encode()
    raw = HKDF(hashes.SHA256(), KEY_BITS // 8, salt=None, info=info).derive(secret)
    return base64.urlsafe_b64encode(raw)          # 12 bytes -> exactly 16 characters, no padding


def secret_check(secret: bytes) -> str:
    """What the registry keeps to tell one PSK secret from another (hosts of one registry must
    share one: ca/psk.secret is copied by `devid init --join`): HMAC-SHA256 keyed with the secret
    over a fixed text, 128 bits in hex. It tells nothing about the secret or any key."""
    mac = hmac.HMAC(secret, hashes.SHA256())
    mac.update(b"devid psk secret check v1")
    return mac.finalize()[:16].hex()


def _seal_key(passphrase: bytes, salt: bytes) -> bytes:
    return Scrypt(salt=salt, length=32, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P).derive(passphrase)


def seal_secret(secret: bytes, passphrase: bytes, random: Callable[[int], bytes] = os.urandom) -> bytes:
    salt, nonce = random(16), random(12)
    sealed = AESGCM(_seal_key(passphrase, salt)).encrypt(nonce, secret, _AAD)
    return _MAGIC + base64.b64encode(salt + nonce + sealed) + b"\n"


def open_secret(data: bytes, passphrase: bytes, where: str = "PSK secret") -> bytes:
    if not data.startswith(_MAGIC):
        raise KeyFileError(f"{where}: not a devid PSK secret file")
    try:
        raw = base64.b64decode(data[len(_MAGIC):].strip(), validate=True)
    except ValueError:
        raise KeyFileError(f"{where}: damaged (not base64)") from None
    if len(raw) != 16 + 12 + 32 + 16:
        raise KeyFileError(f"{where}: damaged (wrong length)")
    salt, nonce, sealed = raw[:16], raw[16:28], raw[28:]
    try:
        return AESGCM(_seal_key(passphrase, salt)).decrypt(nonce, sealed, _AAD)
    except InvalidTag:
        raise WrongPassphrase(f"{where}: cannot decrypt it (wrong passphrase?)") from None


def load_secret(path: Path, passphrase: bytes) -> bytes | None:
    """The PSK secret kept in `path`, or None if there is none yet."""
    if not path.exists():
        return None
    check_private_file(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: {exc.strerror}") from None
    return open_secret(data, passphrase, str(path))


def ensure_secret(path: Path, passphrase: bytes, random: Callable[[int], bytes] = os.urandom) -> bytes:
    """The PSK secret in `path`, made (32 random bytes, sealed) if there is none. Two runs making it
    at once agree: the file is written aside, then linked into place only if no other run's is."""
    found = load_secret(path, passphrase)
    if found is not None:
        return found
    secret = random(32)
    aside = path.with_name(f".{path.name}.{os.getpid()}")
    aside.unlink(missing_ok=True)
    write_private_file(aside, seal_secret(secret, passphrase, random))
    try:
        os.link(aside, path)            # fails if another run put its secret there first
    except FileExistsError:
        pass
    finally:
        aside.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    loaded = load_secret(path, passphrase)
    assert loaded is not None
    return loaded
