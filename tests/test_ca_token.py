"""The CA's keys in a PKCS#11 token (devid init --pkcs11): made in SoftHSM2, never extractable,
every certificate and CRL signed there, the whole enrollment on top; and the errors a token
gives (wrong PIN, no module, no token, no key), each one line without the PIN."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from .conftest import make_csr, ok, one_line_error, run_devid, tool
from .external_helpers import pkilint, without_urn_false_positive
from .serve_helpers import bench_common, serve

CA_KEYS = ("root", "manufacturing", "operational")


def init_in_token(tmp_path: Path, token, *extra, name: str = "data") -> Path:
    data = tmp_path / name
    ok(run_devid("init", "--pkcs11", token.uri, "--hostname", "gw.example.net", *extra, data_dir=data, env=token.env))
    return data


def openssl(*args, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([tool("openssl"), *map(str, args)], capture_output=True, text=True, timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc


def test_init_generates_the_ca_keys_in_the_token_never_extractable(tmp_path, token):
    data = tmp_path / "data"
    proc = run_devid("init", "--pkcs11", token.uri, "--json", data_dir=data, env=token.env)
    doc = json.loads(ok(proc))
    for name in CA_KEYS:
        place = doc["keys"][name]
        assert place["store"] == "pkcs11" and f"token={token.label}" in place["uri"] and "object=devid-" + name in place["uri"]
        assert (data / "ca" / f"{name}.key.pkcs11").read_text().strip() == place["uri"]
    assert doc["keys"]["gateway"] == {"store": "file", "path": str(data / "ca" / "gateway.key.pem")}
    # no CA private key in the data directory: the only key file is the gateway's DTLS key
    assert sorted(p.name for p in data.rglob("*.key.pem")) == ["gateway.key.pem"]
    for path in data.rglob("*"):
        if path.is_file():
            assert b"PRIVATE KEY" not in path.read_bytes() or path.name == "gateway.key.pem", path
    # what the token itself says (pkcs11-tool, not devid): sensitive, never extractable, made there
    access = token.private_keys()
    assert sorted(access) == sorted(f"devid-{n}" for n in CA_KEYS)
    for label, flags in access.items():
        assert "sensitive" in flags and "never extractable" in flags and "local" in flags, (label, flags)
    root = x509.load_pem_x509_certificate((data / "ca" / "root.cert.pem").read_bytes())
    assert isinstance(root.public_key().curve, ec.SECP384R1)
    for name in ("manufacturing", "operational"):
        cert = x509.load_pem_x509_certificate((data / "ca" / f"{name}.cert.pem").read_bytes())
        assert isinstance(cert.public_key().curve, ec.SECP256R1)
        cert.verify_directly_issued_by(root)
    assert token.pin not in proc.stdout.decode() + proc.stderr.decode()
    text = ok(run_devid("init", "--pkcs11", token.uri, data_dir=tmp_path / "other", env=token.env))
    assert f"keys are in PKCS#11 token '{token.label}'" in text and token.pin not in text


def test_token_ca_issues_certificates_that_verify_and_lint(tmp_path, token):
    data = init_in_token(tmp_path, token)
    ok(run_devid("provision", "--count", 6, "--device-type", "temperature-sensor", "--out", tmp_path / "fac",
                 "--serial-prefix", "HS", "--workers", 2, data_dir=data, env=token.env))
    root, mfg, op = (tmp_path / f"{n}.pem" for n in CA_KEYS)
    for name, path in zip(CA_KEYS, (root, mfg, op)):
        path.write_bytes((data / "ca" / f"{name}.cert.pem").read_bytes())
    bundles = sorted((tmp_path / "fac").iterdir())
    assert len(bundles) == 6
    out = openssl("verify", "-CAfile", root, "-untrusted", mfg, *(b / "cert.pem" for b in bundles)).stdout
    assert out.count(": OK") == 6
    csr, _ = make_csr()
    (tmp_path / "op.csr").write_bytes(csr)
    ok(run_devid("ca", "sign-csr", "--profile", "operational", "--device", "HS00000001", "--csr", tmp_path / "op.csr",
                 "--out", tmp_path / "op-cert.pem", data_dir=data, env=token.env))
    assert ": OK" in openssl("verify", "-CAfile", root, "-untrusted", op, tmp_path / "op-cert.pem").stdout
    for path in (bundles[0] / "cert.pem", tmp_path / "op-cert.pem"):
        assert without_urn_false_positive(pkilint("cert", path)) == []
    for path in (root, mfg, op):
        assert pkilint("cert", path) == []


def test_crls_signed_by_the_token_verify_and_name_the_revoked(tmp_path, token):
    data = init_in_token(tmp_path, token)
    ok(run_devid("provision", "--count", 2, "--device-type", "temperature-sensor", "--out", tmp_path / "fac",
                 "--serial-prefix", "CR", "--workers", 1, data_dir=data, env=token.env))
    ok(run_devid("revoke", "CR00000001", "--reason", "keyCompromise", data_dir=data, env=token.env))
    ok(run_devid("crl", "--out", tmp_path / "all.pem", data_dir=data, env=token.env))
    for name in CA_KEYS:
        crl = data / "crl" / f"{name}.crl.pem"
        issuer = data / "ca" / f"{name}.cert.pem"
        assert "verify OK" in openssl("crl", "-in", crl, "-CAfile", issuer, "-noout").stderr
        assert pkilint("ARL" if name == "root" else "CRL", crl) == [], name
    chain = tmp_path / "chain.pem"
    chain.write_bytes((data / "ca" / "manufacturing.cert.pem").read_bytes())
    crls = tmp_path / "crls.pem"
    crls.write_bytes((data / "crl" / "root.crl.pem").read_bytes() + (data / "crl" / "manufacturing.crl.pem").read_bytes())
    revoked = openssl("verify", "-crl_check", "-CRLfile", crls, "-CAfile", data / "ca" / "root.cert.pem",
                      "-untrusted", chain, tmp_path / "fac" / "CR00000001" / "cert.pem", check=False)
    assert revoked.returncode != 0 and "certificate revoked" in revoked.stdout + revoked.stderr
    good = openssl("verify", "-crl_check", "-CRLfile", crls, "-CAfile", data / "ca" / "root.cert.pem",
                   "-untrusted", chain, tmp_path / "fac" / "CR00000002" / "cert.pem")
    assert ": OK" in good.stdout


def test_enrollment_with_a_token_ca_and_two_workers(tmp_path, token):
    """The whole flow on a token-backed CA: devices provisioned with it (two forked workers),
    `devid serve --workers 2` (each worker process opens its own session), `devid enroll` and
    `devid renew`."""
    data = init_in_token(tmp_path, token)
    (data / "attestation-policy.toml").write_text(bench_common.bench_policy())
    ok(run_devid("provision", "--count", 2, "--device-type", bench_common.DEVICE_TYPE, "--out", tmp_path / "fac",
                 "--serial-prefix", "EN", "--workers", 2, data_dir=data, env=token.env))
    fw = bench_common.bench_firmware()
    firmware = ["--firmware-digest", fw.digest.hex(), "--firmware-name", fw.name, "--firmware-version", fw.version]
    served = serve(data, tmp_path / "gateway.log", workers=2, env=token.env)
    try:
        for serial in ("EN00000001", "EN00000002"):
            device = tmp_path / "fac" / serial
            ok(run_devid("enroll", "--gateway", served.uri, "--device", device, *firmware))
            op = x509.load_pem_x509_certificate((device / "op-cert.pem").read_bytes())
            op.verify_directly_issued_by(x509.load_pem_x509_certificate((data / "ca" / "operational.cert.pem").read_bytes()))
        before = (tmp_path / "fac" / "EN00000001" / "op-cert.pem").read_bytes()
        ok(run_devid("renew", "--gateway", served.uri, "--device", tmp_path / "fac" / "EN00000001"))
        assert (tmp_path / "fac" / "EN00000001" / "op-cert.pem").read_bytes() != before
    finally:
        assert served.stop() == 0
    log = (tmp_path / "gateway.log").read_text()
    assert "Traceback" not in log and token.pin not in log
    assert sorted(token.private_keys()) == sorted(f"devid-{n}" for n in CA_KEYS)   # nothing else made in it


def test_the_pin_from_a_pin_source_file(tmp_path, token):
    pin_file = tmp_path / "pin"
    pin_file.write_text(token.pin + "\n")
    pin_file.chmod(0o644)
    uri = token.uri + f"&pin-source=file:{pin_file}"
    err = one_line_error(run_devid("init", "--pkcs11", uri, data_dir=tmp_path / "d1"), "group or others", str(pin_file))
    assert token.pin not in err and not (tmp_path / "d1").exists()
    pin_file.chmod(0o600)
    ok(run_devid("init", "--pkcs11", uri, data_dir=tmp_path / "d2"))
    ok(run_devid("crl", "--out", tmp_path / "crls.pem", data_dir=tmp_path / "d2"))      # no $DEVID_PKCS11_PIN needed
    # a relative pin-source is made absolute in the references: later commands run from anywhere
    e = {k: v for k, v in os.environ.items() if k not in ("DEVID_CA_PASSPHRASE", "DEVID_PKCS11_PIN")}
    e["DEVID_DATA"] = str(tmp_path / "d3")
    proc = subprocess.run([sys.executable, "-m", "devid.gateway.cli", "init", "--pkcs11", token.uri + "&pin-source=file:pin"],
                          capture_output=True, cwd=tmp_path, env=e, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"pin-source=file:{pin_file}" in (tmp_path / "d3" / "ca" / "root.key.pkcs11").read_text()
    ok(run_devid("crl", "--out", tmp_path / "crls3.pem", data_dir=tmp_path / "d3"))


def test_token_errors_are_one_line_without_the_pin(tmp_path, token, softhsm):
    wrong = {"DEVID_PKCS11_PIN": token.pin + "9"}
    cases = [
        (("init", "--pkcs11", token.uri), wrong, ("wrong PIN", f"token '{token.label}'")),
        (("init", "--pkcs11", token.uri), {"DEVID_PKCS11_PIN": ""}, ("no PIN", "DEVID_PKCS11_PIN")),
        (("init", "--pkcs11", token.uri + "&pin-value=" + token.pin), token.env, ("pin-value is refused",)),
        (("init", "--pkcs11", f"pkcs11:token={token.label}?module-path=/usr/lib/nowhere/libnone.so"), token.env,
         ("module /usr/lib/nowhere/libnone.so", "no such file")),
        (("init", "--pkcs11", "pkcs11:token=no-such-token"), token.env, ("no token 'no-such-token'",)),
        (("init", "--pkcs11", f"pkcs11:token={token.label};object=x"), token.env, ("name the token only",)),
        (("init", "--pkcs11", "pkcs11:tokn=x"), token.env, ("unknown attribute 'tokn'",)),
    ]
    for args, env, needles in cases:
        proc = run_devid(*args, data_dir=tmp_path / "never", env=env)
        err = one_line_error(proc, *needles)
        assert token.pin not in err
        assert not (tmp_path / "never").exists(), args
    assert token.private_keys() == {}                      # a refused init made nothing in the token
    data = init_in_token(tmp_path, token)
    err = one_line_error(run_devid("crl", data_dir=data, env=wrong), "wrong PIN")
    assert token.pin not in err
    served_err = run_devid("serve", "--listen", "127.0.0.1:1", "--workers", 2, data_dir=data, env=wrong)
    one_line_error(served_err, "wrong PIN")
    # a key gone from the token (deleted by pkcs11-tool): one line naming the token and the key
    ref = (data / "ca" / "manufacturing.key.pkcs11").read_text()
    key_id = ref.split(";id=")[1].split(";")[0].replace("%", "")
    proc = subprocess.run([tool("pkcs11-tool"), "--module", "/usr/lib/softhsm/libsofthsm2.so", "--token-label",
                           token.label, "--login", "--pin", token.pin, "--delete-object", "--type", "privkey",
                           "--id", key_id], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    one_line_error(run_devid("provision", "--count", 1, "--device-type", "temperature-sensor", "--out",
                             tmp_path / "fac", data_dir=data, env=token.env),
                   f"token '{token.label}' has no private key id={key_id}")
    assert not list((tmp_path / "fac").glob("SN*"))


def test_an_init_that_fails_after_making_its_keys_takes_them_out_of_the_token(tmp_path, token):
    """The registry cannot be reached (a PostgreSQL URL with nothing listening): the keys made
    in the token are destroyed, and the data directory is not left behind."""
    env = {**token.env, "DEVID_REGISTRY": "postgresql://devid@127.0.0.1:1/devid?connect_timeout=2"}
    proc = run_devid("init", "--pkcs11", token.uri, data_dir=tmp_path / "data", env=env)
    one_line_error(proc)
    assert token.private_keys() == {}
    assert not (tmp_path / "data" / "ca").exists()


def test_a_second_host_joins_with_the_ca_keys_in_the_same_token(tmp_path, token, postgres):
    """Two gateway hosts of one PostgreSQL registry share the CA keys in one token (a network HSM
    stands in for it here): the joining host copies the key references, checks that each names a
    key in the token matching its certificate, and signs with it; no key file is copied."""
    import shutil
    url = postgres.new_schema("tok")
    a = init_in_token(tmp_path, token, "--registry", url, name="a")
    ca_copy = tmp_path / "ca-copy"
    shutil.copytree(a / "ca", ca_copy)
    b = tmp_path / "b"
    doc = json.loads(ok(run_devid("init", "--join", url, "--ca-from", ca_copy, "--json", data_dir=b, env=token.env)))
    assert doc["ok"] is True
    for name in CA_KEYS:
        assert (b / "ca" / f"{name}.key.pkcs11").read_bytes() == (a / "ca" / f"{name}.key.pkcs11").read_bytes()
        assert not (b / "ca" / f"{name}.key.pem").exists()
    ok(run_devid("provision", "--count", 1, "--device-type", "temperature-sensor", "--out", tmp_path / "fac",
                 "--serial-prefix", "JB", data_dir=b, env=token.env))
    openssl("verify", "-CAfile", a / "ca" / "root.cert.pem", "-untrusted", a / "ca" / "manufacturing.cert.pem",
            tmp_path / "fac" / "JB00000001" / "cert.pem")
    # a reference to a key that is not this CA's is refused (the operational key named as the manufacturing one)
    (ca_copy / "manufacturing.key.pkcs11").write_bytes((ca_copy / "operational.key.pkcs11").read_bytes())
    one_line_error(run_devid("init", "--join", url, "--ca-from", ca_copy, data_dir=tmp_path / "c", env=token.env),
                   "does not match its certificate")
    assert not (tmp_path / "c").exists()


def test_the_next_init_destroys_the_keys_of_an_init_that_was_killed(tmp_path, token):
    """An init killed after its keys were made and named in its staging directory (left as a
    kill -9 leaves it: here, the CA directory of a finished init renamed back to a staging name,
    which is what a staging directory holds just before its rename): the next init destroys
    those keys and makes its own."""
    data = init_in_token(tmp_path, token)
    first = {p.read_text().strip() for p in (data / "ca").glob("*.key.pkcs11")}
    (data / "ca").rename(data / ".ca-init-4242-deadbeef")
    (data / "devid.toml").unlink()
    (data / "registry.sqlite3").unlink()
    ok(run_devid("init", "--pkcs11", token.uri, data_dir=data, env=token.env))
    assert not list(data.glob(".ca-init-*"))
    second = {p.read_text().strip() for p in (data / "ca").glob("*.key.pkcs11")}
    assert len(second) == 3 and not first & second
    assert sorted(token.private_keys()) == sorted(f"devid-{n}" for n in CA_KEYS)     # three, not six


def test_a_reference_cut_short_by_a_kill_means_no_key_was_made(tmp_path, token):
    """An init killed while writing a key's reference (before the token made that key) leaves
    an empty reference: the next init removes that staging directory without a warning."""
    data = tmp_path / "data"
    stale = data / ".ca-init-4242-cafecafe"
    stale.mkdir(parents=True, mode=0o700)
    ref = stale / "root.key.pkcs11"
    ref.touch(mode=0o600)
    proc = run_devid("init", "--pkcs11", token.uri, data_dir=data, env=token.env)
    ok(proc)
    assert not stale.exists() and "warning" not in proc.stderr.decode()
    assert sorted(token.private_keys()) == sorted(f"devid-{n}" for n in CA_KEYS)
