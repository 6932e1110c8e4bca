"""CA key storage: encrypted PKCS#8 on disk, refused when readable by group or others.

A passphrase a person chose (``DEVID_CA_PASSPHRASE``, ``--passphrase-file``) protects its keys
through scrypt, a memory-hard KDF (RFC 7914), in standard PBES2 PKCS#8 (RFC 8018) that OpenSSL
reads (``openssl pkcs8 -in KEY``). The parameters, N=2^14, r=8, p=5 (16 MiB, about half a second
per key), are one of OWASP's equivalents of N=2^17, r=8, p=1 that stay inside OpenSSL's default
32 MiB scrypt memory limit, so the key files remain readable by ``openssl``. A passphrase devid
generated (32 random bytes, ``devid init`` without one) needs no stretching and keeps
`cryptography`'s default PBKDF2 encryption, so starting a gateway stays fast.

Why the PKCS#8 envelope is built here: `cryptography` decrypts scrypt PKCS#8 but can only write
PKCS#8 with its own fixed PBKDF2 settings (its encryption builder serves PKCS#12 and OpenSSH only).
"""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives import padding, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from . import der
from .errors import InsecureKeyFile, KeyFileError, WrongPassphrase

CURVES = {"P-256": ec.SECP256R1, "P-384": ec.SECP384R1}


def generate_key(curve: str = "P-256") -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(CURVES[curve]())


def check_private_file(path: Path) -> None:
    """Refuse a secret file that group or others can read (or write)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise KeyFileError(f"{path}: missing") from None
    except OSError as exc:
        raise KeyFileError(f"{path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InsecureKeyFile(
            f"{path} is accessible by group or others (mode {stat.S_IMODE(mode):04o}); "
            f"refusing to use it: run 'chmod 600 {path}'")


def write_private_file(path: Path, data: bytes, *, exclusive: bool = True) -> None:
    """Write a file created with mode 0600 from the start (never briefly world-readable)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 14, 8, 5
_PBES2 = x509.ObjectIdentifier("1.2.840.113549.1.5.13")
_SCRYPT = x509.ObjectIdentifier("1.3.6.1.4.1.11591.4.11")
_AES256_CBC = x509.ObjectIdentifier("2.16.840.1.101.3.4.1.42")


def encrypt_key(key: ec.EllipticCurvePrivateKey, passphrase: bytes, *, stretch: bool = True,
                random: Callable[[int], bytes] = os.urandom) -> bytes:
    """PEM PKCS#8, encrypted: scrypt + AES-256-CBC for a person's passphrase (`stretch`), or
    `cryptography`'s default for a generated one (full-entropy: stretching adds nothing)."""
    if not stretch:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.BestAvailableEncryption(passphrase))
    salt, iv = random(16), random(16)
    secret = Scrypt(salt=salt, length=32, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P).derive(passphrase)
    padder = padding.PKCS7(128).padder()
    plain = padder.update(key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption())) + padder.finalize()
    encryptor = Cipher(algorithms.AES(secret), modes.CBC(iv)).encryptor()
    sealed = encryptor.update(plain) + encryptor.finalize()
    scrypt_params = der.sequence(der.tlv(der.TAG_OCTET_STRING, salt), der.encode_integer(SCRYPT_N),
                                 der.encode_integer(SCRYPT_R), der.encode_integer(SCRYPT_P),
                                 der.encode_integer(32))
    pbes2_params = der.sequence(der.sequence(der.encode_oid(_SCRYPT), scrypt_params),
                                der.sequence(der.encode_oid(_AES256_CBC), der.tlv(der.TAG_OCTET_STRING, iv)))
    info = der.sequence(der.sequence(der.encode_oid(_PBES2), pbes2_params), der.tlv(der.TAG_OCTET_STRING, sealed))
    body = base64.encodebytes(info).decode().replace("\n", "")
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return ("-----BEGIN ENCRYPTED PRIVATE KEY-----\n" + "\n".join(lines)
            + "\n-----END ENCRYPTED PRIVATE KEY-----\n").encode()


def plain_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_encrypted_key(path: Path, passphrase: bytes) -> ec.EllipticCurvePrivateKey:
    check_private_file(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, passphrase)
    except (ValueError, TypeError):
        raise WrongPassphrase(f"{path}: cannot decrypt the key (wrong passphrase?)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyFileError(f"{path}: not an EC key")
    return key


def load_plain_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not a readable unencrypted private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyFileError(f"{path}: not an EC key")
    return key
