#!/usr/bin/env python3
"""Server CPU per DTLS handshake, in memory (no sockets): devid's engine against bare pyOpenSSL.

    .venv/bin/python benchmarks/bench_dtls_engine.py [--handshakes 300] [--rounds 5] [--json]

Both sides do the same mutual-auth DTLS 1.2 handshake (ECDHE-ECDSA, P-256, client certificate
from the manufacturing CA) between a server and a client object that pass datagrams in memory.
Only the server's work is timed (process CPU time around each server call).

  bare     pyOpenSSL Connection with memory BIOs: no cookie exchange, OpenSSL's own chain check,
           nothing else. The floor the library sets.
  devid    devid.gateway.dtls.server.ServerEngine: stateless cookie exchange, OpenSSL's chain check,
           then the registry match (the certificate byte for byte a recorded one, still good; one
           query), the session's exporter value, and the hand-over to devid's record layer.
  resumed  devid with session-ticket resumption (the registry check still runs).

And three parts of devid's engine alone, in the same rounds:
  HelloVerifyRequest  a first ClientHello from a stranger, answered statelessly (us each)
  first flight        a ClientHello with a valid cookie: the handshake's state, ECDHE and signature,
                      the server's first flight, then the handshake dropped (what an address can
                      make the gateway spend before any credential; ms each)
  established record  one application record received on an established session (us each)

Rounds alternate bare and devid; medians are reported with the ratio devid/bare.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cryptography import x509  # noqa: E402
from OpenSSL import SSL  # noqa: E402

from devid.ca import keys  # noqa: E402
from devid.gateway.app.datadir import DataDir  # noqa: E402
from devid.gateway.dtls import contexts, engine as E  # noqa: E402
from devid.gateway.dtls.session import Session  # noqa: E402
from devid.gateway.service.identity import DeviceAuthenticator  # noqa: E402
from devid.gateway.factory.provisioning import provision  # noqa: E402


def setup(work: Path):
    data = DataDir(work / "data")
    now = lambda: datetime.now(timezone.utc)  # noqa: E731
    data.init(now())
    reg = data.open_registry()
    provision(data.authority(reg), count=8, device_type="bench", out=work / "f",
              manufacturing_pem=data.cert_pem("manufacturing"), root_pem=data.cert_pem("root"), now=now)
    gw = data.issuer("gateway")
    mfg, op = data.cert("manufacturing"), data.cert("operational")
    bundle = sorted((work / "f").iterdir())[0]
    chain = x509.load_pem_x509_certificates((bundle / "chain.pem").read_bytes())
    client_ctx = contexts.client_context(chain[0], chain[1:], keys.load_plain_key(bundle / "key.pem"),
                                         data.cert("root"))

    def devid_engine():
        ctx = contexts.server_context(gw.cert, [op], gw.key, [mfg, op], [mfg, op])
        return E.ServerEngine(ctx, DeviceAuthenticator(mfg, op, data.config.identity, reg, now))

    def bare_context():
        ctx = contexts.server_context(gw.cert, [op], gw.key, [mfg, op], [mfg, op], cookie_exchange=False)
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, lambda *a: a[-1])
        return ctx
    return devid_engine, bare_context, client_ctx


def run_devid(engine, client_ctx, n, resume):
    cpu = 0.0
    session = None
    if resume:
        session = _devid_one(engine, client_ctx, None, -1)[1]
    for i in range(n):
        spent, new = _devid_one(engine, client_ctx, session, i)
        cpu += spent
        if resume:
            session = new or session
    return cpu / n


def _devid_one(engine, client_ctx, session, i):
    client = E.ClientEngine(client_ctx, "gw", session=session)
    peer = (f"10.0.{(i >> 8) & 255}.{i & 255}", 10000 + i)   # a fleet: one address per device
    pending = [dg for _, dg in client.start(0.0).datagrams]
    spent = 0.0
    while pending:
        dg = pending.pop(0)
        t = time.process_time()
        out = engine.receive(peer, dg, 0.0)
        spent += time.process_time() - t
        for _, reply in out.datagrams:
            pending.extend(d for _, d in client.receive(reply, 0.0).datagrams)
    assert client.established, client.closed_reason
    t = time.process_time()
    engine.close(peer, 0.0)
    spent += time.process_time() - t
    return spent, client.session


def _stranger(i):
    return (f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}", 20000)


def run_hvr(engine, client_ctx, n):
    hello = E.ClientEngine(client_ctx, "gw").start(0.0).datagrams[0][1]
    t = time.process_time()
    for i in range(n):
        engine.receive(_stranger(i), hello, 0.0)
    return (time.process_time() - t) / n


def run_first_flight(engine, client_ctx, n, round_):
    cpu = 0.0
    for i in range(n):
        peer = _stranger((round_ << 12) + i)
        client = E.ClientEngine(client_ctx, "gw")
        hvr = engine.receive(peer, client.start(0.0).datagrams[0][1], 0.0).datagrams[0][1]
        second = client.receive(hvr, 0.0).datagrams[0][1]
        t = time.process_time()
        out = engine.receive(peer, second, 0.0)
        engine.close(peer, 0.0)
        cpu += time.process_time() - t
        assert out.datagrams
    return cpu / n


def run_established(engine, client_ctx, n):
    peer = ("10.255.0.1", 30000)
    client = E.ClientEngine(client_ctx, "gw", takeover=True)
    pending = [dg for _, dg in client.start(0.0).datagrams]
    while pending:
        for _, reply in engine.receive(peer, pending.pop(0), 0.0).datagrams:
            pending.extend(d for _, d in client.receive(reply, 0.0).datagrams)
    assert client.established
    data = [client.send(b"x" * 60, 0.0).datagrams[0][1] for _ in range(n)]
    t = time.process_time()
    for dg in data:
        engine.receive(peer, dg, 0.0)
    cpu = (time.process_time() - t) / n
    engine.close(peer, 0.0)
    return cpu


def run_bare(ctx, client_ctx, n):
    cpu = 0.0
    for _ in range(n):
        server = SSL.Connection(ctx, None)
        server.set_accept_state()
        server.set_ciphertext_mtu(1280)
        client = SSL.Connection(client_ctx, None)
        client.set_connect_state()
        client.set_ciphertext_mtu(1280)
        client.set_app_data(Session("gw", client, 0.0, 0.0))   # what the client verify callback expects
        done = False
        while not done:
            try:
                client.do_handshake()
            except SSL.WantReadError:
                pass
            data = _drain(client)
            if data:
                t = time.process_time()
                server.bio_write(data)
                try:
                    server.do_handshake()
                    done = True
                except SSL.WantReadError:
                    pass
                reply = _drain(server)
                cpu += time.process_time() - t
                if reply:
                    client.bio_write(reply)
            if done:
                break
        t = time.process_time()
        server.shutdown()
        cpu += time.process_time() - t
    return cpu / n


def _drain(conn):
    out = b""
    while True:
        try:
            out += conn.bio_read(65536)
        except SSL.WantReadError:
            return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--handshakes", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="devid-bench-engine-"))
    try:
        devid_engine, bare_context, client_ctx = setup(work)
        engine = devid_engine()
        bare = bare_context()
        run_devid(engine, client_ctx, 20, False)     # warm-up
        run_bare(bare, client_ctx, 20)
        res: dict[str, list[float]] = {"bare": [], "devid": [], "resumed": []}
        parts: dict[str, list[float]] = {"hello_verify_request_us": [], "first_flight_ms": [],
                                         "established_record_us": []}
        for r in range(args.rounds):
            order = ["bare", "devid", "resumed"] if r % 2 == 0 else ["resumed", "devid", "bare"]
            for name in order:
                if name == "bare":
                    res[name].append(run_bare(bare, client_ctx, args.handshakes))
                else:
                    res[name].append(run_devid(engine, client_ctx, args.handshakes, name == "resumed"))
            parts["hello_verify_request_us"].append(run_hvr(engine, client_ctx, args.handshakes * 20) * 1e6)
            parts["first_flight_ms"].append(run_first_flight(engine, client_ctx, args.handshakes, r) * 1e3)
            parts["established_record_us"].append(run_established(engine, client_ctx, args.handshakes * 20) * 1e6)
        med = {k: statistics.median(v) * 1000 for k, v in res.items()}
        part = {k: round(statistics.median(v), 3) for k, v in parts.items()}
        summary = {
            "machine": {"python": platform.python_version(), "nproc": os.cpu_count(),
                        "openssl": SSL.OpenSSL_version(0).decode()},
            "server_cpu_ms_per_handshake": {k: round(v, 3) for k, v in med.items()},
            "ratio_devid_to_bare": round(med["devid"] / med["bare"], 3),
            "ratio_resumed_to_bare": round(med["resumed"] / med["bare"], 3),
            "target_ms": 0.8,
            "engine_parts": part,
        }
        if args.json:
            print(json.dumps(summary, indent=2))
        else:
            print(f"server CPU per DTLS 1.2 mutual-auth handshake, in memory; medians of {args.rounds} rounds "
                  f"of {args.handshakes}")
            print(f"  bare pyOpenSSL      {med['bare']:.3f} ms")
            print(f"  devid full          {med['devid']:.3f} ms   ratio {summary['ratio_devid_to_bare']:.2f}  "
                  f"(target <= 0.8 ms)")
            print(f"  devid resumed       {med['resumed']:.3f} ms   ratio {summary['ratio_resumed_to_bare']:.2f}")
            print(f"  HelloVerifyRequest  {part['hello_verify_request_us']:.2f} us per first ClientHello")
            print(f"  first flight        {part['first_flight_ms']:.3f} ms per cookie-validated ClientHello "
                  f"(then dropped)")
            print(f"  established record  {part['established_record_us']:.2f} us per application record received")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
