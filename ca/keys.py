"""CA key storage: encrypted PKCS#8 on disk, refused when readable by group or others."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

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


def encrypt_key(key: ec.EllipticCurvePrivateKey, passphrase: bytes) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.BestAvailableEncryption(passphrase))


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
