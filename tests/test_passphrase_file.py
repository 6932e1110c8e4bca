"""`devid init --passphrase-file`: the CA passphrase kept outside the data directory."""

from __future__ import annotations

import os
import subprocess

from devid.gateway.app.datadir import DataDir

from .conftest import ok, one_line_error, run_devid


def _key_kdf(data_path, name="operational") -> str:
    pem = (data_path / "ca" / f"{name}.key.pem").read_bytes()
    return subprocess.run(["openssl", "asn1parse"], input=pem, capture_output=True, check=True).stdout.decode()


def test_a_generated_passphrase_goes_to_the_named_file(tmp_path):
    data, secret = tmp_path / "data", tmp_path / "secrets" / "ca-pass"
    secret.parent.mkdir(mode=0o700)
    out = ok(run_devid("init", "--passphrase-file", secret, data_dir=data))
    assert str(secret) in out and "generated" in out
    assert not (data / "ca" / "passphrase").exists()
    assert oct(secret.stat().st_mode & 0o777) == "0o600" and len(secret.read_bytes().strip()) >= 40
    assert f'passphrase_file = "{secret}"' in (data / "devid.toml").read_text()
    assert ":scrypt" not in _key_kdf(data)                # full entropy: not stretched
    # every later command finds the passphrase through devid.toml
    ok(run_devid("provision", "--count", "1", "--device-type", "t", "--out", tmp_path / "f", data_dir=data))
    assert (tmp_path / "f").is_dir()


def test_a_persons_passphrase_file_is_read_and_stretched(tmp_path, monkeypatch):
    data, secret = tmp_path / "data", tmp_path / "ca-pass"
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"correct horse battery staple\n")
    os.close(fd)
    out = ok(run_devid("init", "--passphrase-file", secret, data_dir=data))
    assert "scrypt" in out and "generated" not in out
    assert secret.read_bytes() == b"correct horse battery staple\n"       # untouched
    assert ":scrypt" in _key_kdf(data)
    assert DataDir(data).issuer("operational").key is not None      # through [ca] passphrase_file
    monkeypatch.setenv("DEVID_CA_PASSPHRASE", "wrong")
    one_line_error(run_devid("crl", data_dir=data, env={"DEVID_CA_PASSPHRASE": "wrong"}), "wrong passphrase")


def test_a_passphrase_file_readable_by_others_is_refused(tmp_path):
    data, secret = tmp_path / "data", tmp_path / "ca-pass"
    secret.write_bytes(b"pw\n")
    secret.chmod(0o644)
    one_line_error(run_devid("init", "--passphrase-file", secret, data_dir=data), "chmod 600")
    assert not (data / "ca").exists()


def test_the_passphrase_file_must_be_outside_the_data_directory(tmp_path):
    data = tmp_path / "data"
    one_line_error(run_devid("init", "--passphrase-file", data / "pass", data_dir=data), "outside the data directory")
    assert not (data / "ca").exists()


def test_a_passphrase_file_and_the_environment_passphrase_together_are_refused(tmp_path):
    """Two passphrases: the file would be recorded in devid.toml while the keys used the other."""
    data, secret = tmp_path / "data", tmp_path / "ca-pass"
    secret.write_bytes(b"from the file\n")
    secret.chmod(0o600)
    one_line_error(run_devid("init", "--passphrase-file", secret, data_dir=data,
                             env={"DEVID_CA_PASSPHRASE": "from the environment"}), "give one")
    assert not (data / "ca").exists() and not (data / "devid.toml").exists()
