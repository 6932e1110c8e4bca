"""CA key files: a person's passphrase is stretched with scrypt in standard PKCS#8 that OpenSSL reads."""

from __future__ import annotations

import subprocess

import pytest
from cryptography.hazmat.primitives import serialization

from devid.ca import keys
from devid.ca.errors import WrongPassphrase


@pytest.fixture(scope="module")
def key():
    return keys.generate_key()


def _asn1(pem: bytes) -> str:
    return subprocess.run(["openssl", "asn1parse"], input=pem, capture_output=True, check=True).stdout.decode()


def test_a_persons_passphrase_goes_through_scrypt(key, tmp_path):
    pem = keys.encrypt_key(key, b"correct horse")
    parsed = _asn1(pem)
    assert ":PBES2" in parsed and ":scrypt" in parsed and ":aes-256-cbc" in parsed
    n, r, p = keys.SCRYPT_N, keys.SCRYPT_R, keys.SCRYPT_P
    integers = [line.split(":")[-1] for line in parsed.splitlines() if "INTEGER" in line]
    assert integers[:4] == [f"{n:02X}", f"{r:02X}", f"{p:02X}", "20"]
    path = tmp_path / "k.pem"
    keys.write_private_file(path, pem)
    loaded = keys.load_encrypted_key(path, b"correct horse")
    assert loaded.private_numbers() == key.private_numbers()
    with pytest.raises(WrongPassphrase):
        keys.load_encrypted_key(path, b"wrong horse")


def test_openssl_reads_the_key_file(key, tmp_path):
    path = tmp_path / "k.pem"
    path.write_bytes(keys.encrypt_key(key, b"s3cret pass"))
    out = subprocess.run(["openssl", "pkcs8", "-in", str(path), "-passin", "pass:s3cret pass"],
                         capture_output=True, check=True).stdout
    plain = serialization.load_pem_private_key(out, None)
    assert plain.private_numbers() == key.private_numbers()
    refused = subprocess.run(["openssl", "pkcs8", "-in", str(path), "-passin", "pass:nope"], capture_output=True)
    assert refused.returncode != 0


def test_each_encryption_has_its_own_salt_and_iv(key):
    assert keys.encrypt_key(key, b"pw") != keys.encrypt_key(key, b"pw")


def test_a_generated_passphrase_is_not_stretched(key):
    parsed = _asn1(keys.encrypt_key(key, b"x" * 43, stretch=False))
    assert ":PBES2" in parsed and ":scrypt" not in parsed
