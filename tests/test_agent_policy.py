"""The per-type lifecycle keys of the attestation policy (issue 17 item 5): the operational
certificate's validity and the renewal threshold, their defaults, and one clear error line for a
bad value, from `devid attest policy check` as from the parser."""

from __future__ import annotations

from datetime import timedelta

import pytest

from devid.attestation.errors import PolicyError
from devid.attestation.policy import parse_policy

from .conftest import ok, one_line_error, run_devid

BASE = """version = 1
[device_types.meter]
attestation = "waived"
{extra}
[device_types.sensor]
attestation = "waived"
"""


def test_validity_and_threshold_per_type_with_defaults():
    policy = parse_policy(BASE.format(extra="certificate_validity_days = 45\nrenewal_threshold_days = 7"))
    assert policy.certificate_validity("meter") == timedelta(days=45)
    assert policy.renewal_threshold("meter") == timedelta(days=7)
    assert policy.certificate_validity("sensor") is None              # devid.toml's operational validity
    assert policy.renewal_threshold("sensor") == timedelta(days=30)   # the seed's 30 days
    assert policy.renewal_threshold("not-in-the-policy") == timedelta(days=30)


@pytest.mark.parametrize("extra, message", [
    ("renewal_threshold_days = 0", "device_types.meter.renewal_threshold_days: must be between 1 and 3650 days, got 0"),
    ("certificate_validity_days = 4000", "device_types.meter.certificate_validity_days: must be between 1 and 3650"),
    ("certificate_validity_days = 20\nrenewal_threshold_days = 20",
     "device_types.meter.renewal_threshold_days: 20 days is not less than certificate_validity_days (20)"),
    ("renewal_threshold_days = \"30d\"", "device_types.meter.renewal_threshold_days: expected an integer, got a string"),
    ("renewal_treshold_days = 30", "did you mean 'renewal_threshold_days'?"),
])
def test_a_bad_lifecycle_value_is_one_clear_line(extra, message, tmp_path):
    with pytest.raises(PolicyError, match="^p.toml: ") as exc:
        parse_policy(BASE.format(extra=extra), "p.toml")
    assert message in str(exc.value)
    path = tmp_path / "policy.toml"
    path.write_text(BASE.format(extra=extra))
    one_line_error(run_devid("attest", "policy", "check", path), message)
    path.write_text(BASE.format(extra="renewal_threshold_days = 14"))
    ok(run_devid("attest", "policy", "check", path))
