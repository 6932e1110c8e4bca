"""The policy file: what it means, and a clear message naming the place for each mistake."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import pytest

from devid.attestation.errors import PolicyError
from devid.attestation.policy import Tier, load_policy, parse_policy, parse_version

from .attest_util import DIGEST_CURRENT, POLICY_TEXT

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "attestation-policy.example.toml"
D = f"sha-256:{DIGEST_CURRENT.hex()}"


def test_example_policy_parses_with_the_documented_meaning():
    p = load_policy(EXAMPLE)
    assert p.nonce_lifetime == timedelta(seconds=60) and p.verdict_window == timedelta(seconds=300)
    assert p.oemid is None          # commented out in the example: devices of any PEN
    ts = p.for_type("temperature-sensor")
    assert (ts.attestation, ts.accept, ts.revoke_on_contraindicated, ts.minimum_firmware_version) == \
        ("required", Tier.AFFIRMING, False, "2.1.0")
    assert [f.version for f in ts.firmware] == ["2.3.1", "2.2.0", "2.0.4"] and ts.firmware[1].deprecated
    assert p.for_type("meter").accept is Tier.WARNING and p.for_type("meter").firmware[0].alg == "sha-384"
    assert p.for_type("gateway-node").attestation == "waived" and p.for_type("nope") is None
    assert ts.accepts(Tier.AFFIRMING) and not ts.accepts(Tier.WARNING)
    assert p.for_type("meter").accepts(Tier.WARNING) and not p.for_type("meter").accepts(Tier.CONTRAINDICATED)


def test_the_example_policys_oemid_is_the_pen_devices_are_issued_with_and_the_docs_agree(ca):
    """Issue 12 item 8: the oemid commented out in the example policy is devid's default
    organization.pen, the PEN `devid enroll` puts in evidence (from the certificate's URN); the
    docs name the same number, and the demo's policy leaves oemid unset like the example."""
    from devid.ca.identity import IdentitySettings
    from devid.gateway.cli.demo import DEMO_POLICY
    from devid.gateway.device.enroll import pen_of

    from .conftest import register_device

    text = EXAMPLE.read_text()
    [commented] = re.findall(r"^# oemid = (\d+)", text, re.M)
    pen = int(commented)
    assert pen == IdentitySettings().pen
    assert parse_policy(text.replace("# oemid =", "oemid =", 1)).oemid == pen     # uncommented, it parses
    _, issued = register_device(ca, "PEN1")
    assert pen_of(issued.cert) == pen
    docs = (EXAMPLE.parent / "enrollment.md").read_text()
    assert f"default PEN\n{pen}" in docs or f"default PEN {pen}" in docs
    assert not re.search(r"example policy has \d+", docs)
    demo = parse_policy(DEMO_POLICY.format(device_type="t", name="f", version="1", digest="00" * 32))
    assert demo.oemid is None


def test_defaults():
    p = parse_policy(f'version = 1\n[device_types.t]\n[[device_types.t.firmware]]\nname = "f"\nversion = "1"\n'
                     f'digest = "{D}"\n')
    t = p.for_type("t")
    assert (t.attestation, t.accept, t.revoke_on_contraindicated, t.secure_boot_required,
            t.debug_disabled_required, t.minimum_firmware_version) == ("required", Tier.AFFIRMING, False, True,
                                                                        True, None)
    assert p.max_clock_skew == timedelta(seconds=300) and p.oemid is None


FW = f'[[device_types.t.firmware]]\nname = "f"\nversion = "1.0"\ndigest = "{D}"\n'


@pytest.mark.parametrize("text,needle", [
    ("version = 1\n[device_types.t\n", "not valid TOML"),
    ("[device_types.t]\n", "missing required key 'version'"),
    ("version = 2\n[device_types.t]\n", "version: this devid reads policy version 1, not 2"),
    ("version = 1\n", "missing required key 'device_types'"),
    ("version = 1\n[device_types]\n", "device_types: no device type"),
    ("version = 1\nextra = 1\n[device_types.t]\n" + FW, "extra: unknown key"),
    ("version = 1\n[settings]\nnonce_lifetime = 60\n[device_types.t]\n" + FW,
     "settings.nonce_lifetime: unknown key (did you mean 'nonce_lifetime_seconds'?)"),
    ("version = 1\n[settings]\nnonce_lifetime_seconds = 3600\n[device_types.t]\n" + FW,
     "settings.nonce_lifetime_seconds: must be between 5 and 600 seconds, got 3600"),
    ("version = 1\n[settings]\nnonce_lifetime_seconds = \"60\"\n[device_types.t]\n" + FW,
     "settings.nonce_lifetime_seconds: expected an integer, got a string"),
    ("version = 1\n[settings]\noemid = -3\n[device_types.t]\n" + FW, "settings.oemid: must be an IANA"),
    ("version = 1\n[device_types.T]\n" + FW.replace(".t.", ".T."), "device_types.T: device type must be"),
    ("version = 1\n[device_types.t]\nsecure_boot = true\n" + FW,
     "device_types.t.secure_boot: unknown key (did you mean 'secure_boot_required'?)"),
    ("version = 1\n[device_types.t]\nattestation = \"optional\"\n" + FW,
     "device_types.t.attestation: expected one of 'required', 'waived', got 'optional'"),
    ("version = 1\n[device_types.t]\naccept = \"contraindicated\"\n" + FW,
     "device_types.t.accept: expected one of 'affirming', 'warning'"),
    ("version = 1\n[device_types.t]\nsecure_boot_required = \"yes\"\n" + FW,
     "device_types.t.secure_boot_required: expected true or false, got a string"),
    ("version = 1\n[device_types.t]\nminimum_firmware_version = \"2.x\"\n" + FW,
     "device_types.t.minimum_firmware_version: version '2.x' is not dotted numbers"),
    ("version = 1\n[device_types.t]\n", "device_types.t.firmware: attestation is required but no firmware"),
    ("version = 1\n[device_types.t]\n" + FW.replace('name = "f"\n', ""),
     "device_types.t.firmware[1]: missing required key 'name'"),
    ("version = 1\n[device_types.t]\n" + FW.replace(D, D[:-1]),
     "device_types.t.firmware[1].digest: expected 64 hex digits for sha-256, got 63 characters"),
    ("version = 1\n[device_types.t]\n" + FW.replace(D, D[:-1] + "g"),
     "device_types.t.firmware[1].digest: expected 64 hex digits for sha-256, got 64 characters with non-hex ones"),
    ("version = 1\n[device_types.t]\n" + FW.replace("sha-256:", "md5:"),
     "device_types.t.firmware[1].digest: expected '<alg>:<hex>'"),
    ("version = 1\n[device_types.t]\n" + FW + FW.replace('"1.0"', '"1.1"'),
     "device_types.t.firmware[2].digest: same digest as firmware[1]"),
    ("version = 1\n[device_types.t]\n" + FW.replace('"1.0"', '"v1"'), "device_types.t.firmware[1].version"),
    ("version = 1\n[device_types.t]\n" + FW.replace('"f"', '""'), "device_types.t.firmware[1].name: must not be empty"),
    ("version = 1\n[device_types.t]\n" + FW + "colour = 1\n", "device_types.t.firmware[1].colour: unknown key"),
    ("version = 1\ndevice_types = 3\n", "device_types: expected a table, got an integer"),
    ("version = 1\n[device_types]\nt = 3\n", "device_types.t: expected a table, got an integer"),
])
def test_mistakes_have_clear_messages(text, needle):
    with pytest.raises(PolicyError) as exc:
        parse_policy(text, "p.toml")
    assert str(exc.value).startswith("p.toml: ") and needle in str(exc.value), str(exc.value)
    assert "\n" not in str(exc.value)


def test_waived_type_needs_no_firmware_and_files_errors(tmp_path):
    assert parse_policy("version = 1\n[device_types.t]\nattestation = \"waived\"\n").for_type("t").firmware == ()
    with pytest.raises(PolicyError, match="policy file not found"):
        load_policy(tmp_path / "none.toml")
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe")
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "bin.toml")


def test_versions_compare_numerically():
    assert parse_version("2.10.0") > parse_version("2.9.9") and parse_version("3") > parse_version("2.99")
    assert parse_policy(POLICY_TEXT).for_type("lenient-sensor").accept is Tier.WARNING
