"""Independent checkers of issued certificates and CRLs: pkilint (test_external.py, test_ca_token.py)."""

from __future__ import annotations

import json
import re
import subprocess

from .conftest import tool

# RFC 8141 URN syntax, narrowed to RFC 9039's "os" subtype: urn:dev:os:<PEN>-<serial>
URN_DEV_OS = re.compile(r"^urn:dev:os:[1-9][0-9]*-[A-Za-z0-9][A-Za-z0-9._-]*$")


def pkilint(kind: str, path) -> list[dict]:
    """Run a pkilint linter; return its ERROR and FATAL findings (JSON report)."""
    if kind == "cert":
        cmd = [tool("lint_pkix_cert"), "lint", "-s", "ERROR", "-f", "JSON", str(path)]
    else:
        cmd = [tool("lint_crl"), "lint", "-t", kind, "-p", "PKIX", "-s", "ERROR", "-f", "JSON", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip(), f"pkilint printed nothing: {proc.stderr}"
    report = json.loads(proc.stdout)
    findings = []
    for result in report["results"]:
        for finding in result["finding_descriptions"]:
            findings.append({"validator": result["validator"], "node": result["node_path"], **finding})
    return findings


def without_urn_false_positive(findings: list[dict]) -> list[dict]:
    """pkilint checks SubjectAltName URIs with `validators.url`, which only accepts
    scheme://host URLs, so every URN (RFC 8141) is reported as pkix.invalid_uri_syntax although
    RFC 5280 4.2.1.6 allows any RFC 3986 URI. We drop exactly that finding, for exactly a URI that
    passes the stricter RFC 9039 urn:dev:os grammar; any other finding stays."""
    kept = []
    for f in findings:
        m = re.search(r'Invalid URI syntax: "([^"]*)"', f.get("message") or "")
        if f["code"] == "pkix.invalid_uri_syntax" and m and URN_DEV_OS.match(m.group(1)):
            continue
        kept.append(f)
    return kept
