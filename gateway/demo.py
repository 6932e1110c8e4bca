"""`devid demo`: the main job on the embedded default, end to end on one machine.

Until the CoAP/DTLS gateway lands, the demo runs the offline half of the life cycle: create the
CA on first use, provision a handful of factory identities, issue each an operational identity
from a CSR made with a fresh device key (what enrollment will do over the network), validate
both identities, revoke one device, publish CRLs, and show the registry.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ca.hierarchy import CA_NAMES
from ca.keys import plain_key, write_private_file
from ca.revocation import build_crl, revoke_device
from ca.validation import DeviceVerifier

from . import output
from .datadir import DataDir
from .provisioning import provision


def _now() -> datetime:
    return datetime.now(timezone.utc)


def run_demo(data: DataDir, count: int = 5) -> int:
    if not data.exists():
        print(f"== no CA in {data.path}: creating one")
        data.init(_now())
    data.require()
    registry = data.open_registry()
    ca = data.authority(registry)
    out = data.path / "devices"
    print(f"== provisioning {count} factory identities into {out}")
    result = provision(ca, count=count, device_type="temperature-sensor", out=out,
                       manufacturing_pem=data.cert_pem("manufacturing"), root_pem=data.cert_pem("root"),
                       serial_prefix="DEMO", now=_now)
    print(f"   {len(result.serials)} identities in {result.seconds * 1000:.0f} ms")
    factory = DeviceVerifier(data.cert("manufacturing"), "factory", ca.settings, registry)
    operational = DeviceVerifier(data.cert("operational"), "operational", ca.settings, registry)
    print("== each device: validate its factory identity, then get an operational one from a CSR")
    for serial in result.serials:
        bundle = out / serial
        idevid = x509.load_pem_x509_certificate((bundle / "cert.pem").read_bytes())
        factory.verify(idevid, now=_now())
        op_key = ec.generate_private_key(ec.SECP256R1())
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "ignored by the CA")]))
               .sign(op_key, hashes.SHA256()))
        issued = ca.issue_operational(csr.public_bytes(serialization.Encoding.DER), serial, _now())
        write_private_file(bundle / "op-key.pem", plain_key(op_key), exclusive=False)
        (bundle / "op-cert.pem").write_bytes(issued.pem)
        ident = operational.verify(issued.cert, now=_now())
        print(f"   {serial}: IDevID ok -> LDevID {issued.cert.serial_number:x} "
              f"(until {output.ts(issued.cert.not_valid_after_utc)}), identity {ident.device_type}")
    victim = result.serials[-1]
    revoked = revoke_device(registry, victim, "keyCompromise", _now())
    print(f"== revoked {victim}: {len(revoked)} certificate(s)")
    data.crl_dir.mkdir(exist_ok=True)
    for name in CA_NAMES:
        info = build_crl(data.issuer(name), registry, _now())
        (data.crl_dir / f"{name}.crl.pem").write_bytes(info.crl.public_bytes(serialization.Encoding.PEM))
        print(f"   CRL {name}: number {info.number}, {info.entries} revoked")
    print("== registry")
    devices = [registry.get_device(s) for s in result.serials]
    output.table(["serial", "type", "state", "enrolled", "revoked"],
                 [(d.serial, d.device_type, d.state.value, output.ts(d.enrolled_at), output.ts(d.revoked_at))
                  for d in devices])
    counts = registry.count_devices()
    print("registry totals: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    print(f"data directory: {data.path} (bundles in {out})")
    return 0
