"""`devid serve`: run the CoAP/DTLS gateway, its limits from flags over devid.toml's [gateway].

The server, the DTLS engine and aiocoap are imported when the command runs, so the other
commands start without them."""

from __future__ import annotations

import argparse
import os
import sys

from devid.gateway.cli import output
from devid.gateway.cli.base import Deprecated, data_dir
from devid.gateway.errors import CLIError

# serve flags that set a ServerLimits field (default: devid.toml [gateway], else the field's default)
_LIMIT_FLAGS = ("max_sessions", "max_half_open", "max_half_open_per_address", "max_sessions_per_device",
                "handshake_timeout", "idle_timeout", "mtu", "ipv6_prefix_length", "max_half_open_per_ipv6_network",
                "ipv6_network_prefix_length", "handshake_burst_per_address",
                "handshake_rate_per_address")


def cmd_serve(args) -> int:
    import asyncio
    import signal
    # a SIGHUP (policy reload) sent while the gateway is still starting must not end it: ignored
    # until serve() installs the reload handler (imports and key decryption take a second or more)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from devid.gateway.dtls.engine import LimitError, ServerLimits
    from devid.gateway.coap.transport import parse_listen
    from devid.gateway.system.logs import configure_logging
    from devid.gateway.app.server import GatewayConfig, serve
    listen = []
    for item in args.listen or []:
        try:
            listen.append(parse_listen(item))
        except ValueError as exc:
            raise CLIError(f"--listen {item}: {exc}") from None
    data = data_dir(args)
    flags = {name: getattr(args, name) for name in _LIMIT_FLAGS if getattr(args, name) is not None}
    try:
        limits = ServerLimits(**{**data.config.gateway, **flags})     # flags win over devid.toml [gateway]
    except LimitError as exc:
        where = ("--" + exc.field.replace("_", "-")) if exc.field in flags else f"{data.config_path}: gateway.{exc.field}"
        print(f"devid: error: {where} must be {exc.allowed} (got {exc.value})", file=sys.stderr)
        return 2
    data.require()
    config = GatewayConfig(limits=limits)        # budgets from devid.toml
    if (args.mqtt_broker_pid is not None or args.mqtt_broker_batch is not None) and args.mqtt_broker is None:
        raise CLIError("--mqtt-broker-pid and --mqtt-broker-batch need --mqtt-broker DIR")
    if args.mqtt_broker_batch is not None:
        if not 0 <= args.mqtt_broker_batch <= 86400:
            raise CLIError(f"--mqtt-broker-batch {args.mqtt_broker_batch:g}: seconds from 0 to 86400")
        config.mqtt_broker_batch = args.mqtt_broker_batch
    if args.mqtt_broker is not None:
        from devid.gateway.app.broker_keeper import check_broker_dir
        config.mqtt_broker = check_broker_dir(args.mqtt_broker).resolve()
        spec = args.mqtt_broker_pid
        if spec is not None:
            if spec.isdigit():
                if int(spec) <= 1:
                    raise CLIError(f"--mqtt-broker-pid {spec}: not a broker's process id")
                config.mqtt_broker_pid = int(spec)
            else:
                from devid.gateway.app.broker import broker_pid
                broker_pid(spec)                # a pid file that cannot be read: one line now
                config.mqtt_broker_pid = os.path.abspath(spec)
    if args.http is not None:
        from devid.gateway.operator.listener import HttpConfig, parse_http
        try:
            host, port = parse_http(args.http)
        except ValueError as exc:
            raise CLIError(f"--http {exc}") from None
        config.http = HttpConfig(host, port, tls=args.http_tls, metrics_open=args.metrics_open)
    elif args.http_tls or args.metrics_open:
        raise CLIError("--http-tls and --metrics-open need --http [ADDR:]PORT")
    if listen:
        config.listen = listen
    workers = args.workers if args.workers is not None else (os.cpu_count() or 1)
    if workers < 1:
        raise CLIError("--workers must be at least 1")
    if args.log_file is not None:
        try:
            open(args.log_file, "a").close()        # one clear error here, not a traceback per worker
        except OSError as exc:
            raise CLIError(f"--log-file {args.log_file}: {exc.strerror}") from None
    for name in ("manufacturing", "operational"):
        if data.in_token(name):         # a wrong PIN or a missing token: one clear error before anything listens
            data.issuer(name)           # (each worker opens its own session after fork)
    if workers > 1:
        from devid.gateway.app.server import serve_workers
        data.issuer("gateway")          # a wrong passphrase is one clear error here, not N in the workers
        return serve_workers(data, config, workers, args.log_level, args.log_file)
    configure_logging(args.log_level, log_file=args.log_file)
    try:
        asyncio.run(serve(data, config))
        return 0
    except OSError as exc:
        raise CLIError(f"cannot listen: {exc.strerror or exc}") from None


def add_commands(sub, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("serve", parents=[common], help="run the CoAP/DTLS gateway (coaps://, default port 5684)",
                       description="Run the gateway. Each limit flag overrides the same key of devid.toml's "
                                   "[gateway] section (docs/configuration.md).")
    s.add_argument("--listen", action="append", metavar="HOST:PORT",
                   help="address to listen on (repeatable; default: 0.0.0.0:5684 and [::]:5684)")
    s.add_argument("--max-sessions", type=int, metavar="N", help="cap on DTLS sessions (default 20000)")
    s.add_argument("--max-half-open", type=int, metavar="N", help="cap on handshakes in progress (default 1000)")
    s.add_argument("--max-half-open-per-address", type=int, metavar="N",
                   help="cap on handshakes in progress from one IP address (default 100, at most --max-half-open)")
    s.add_argument("--max-sessions-per-device", type=int, metavar="N",
                   help="cap on sessions of one device, all its certificates together; a new one closes its "
                        "oldest (default 8)")
    s.add_argument("--max-sessions-per-identity", type=int, dest="max_sessions_per_device",
                   action=Deprecated, new="--max-sessions-per-device", help=argparse.SUPPRESS)
    s.add_argument("--handshake-timeout", type=float, metavar="S", help="seconds (default 30)")
    s.add_argument("--idle-timeout", type=float, metavar="S", help="seconds (default 600)")
    s.add_argument("--mtu", type=int, help="largest datagram sent (default 1280)")
    s.add_argument("--ipv6-prefix-length", type=int, metavar="BITS",
                   help="IPv6 peers in one prefix of this length count as one address (default 64)")
    s.add_argument("--max-half-open-per-ipv6-network", type=int, metavar="N",
                   help="cap on handshakes in progress from one IPv6 network, all its /64s together (default 300)")
    s.add_argument("--ipv6-network-prefix-length", type=int, metavar="BITS",
                   help="the IPv6 network of that cap (default 48)")
    s.add_argument("--handshake-burst-per-address", type=int, metavar="N",
                   help="new handshakes one address may start at once (default 1000)")
    s.add_argument("--handshake-rate-per-address", type=float, metavar="R",
                   help="new handshakes per second one address may start after its burst (default 100)")
    s.add_argument("--workers", type=output.positive_int, metavar="N",
                   help="gateway processes sharing the port (SO_REUSEPORT) and the registry (default: one per core)")
    s.add_argument("--http", metavar="[ADDR:]PORT",
                   help="the operator HTTP listener: JSON API, web view, /metrics (off by default; loopback when "
                        "no address is given; with --workers, in worker 0; docs/operations.md)")
    s.add_argument("--http-tls", action="store_true",
                   help="serve --http over HTTPS with a certificate from devid's operational CA, and take operator "
                        "client certificates (devid operator cert)")
    s.add_argument("--metrics-open", action="store_true",
                   help="let /metrics answer without a credential (a Prometheus scraper); nothing else does")
    s.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    s.add_argument("--mqtt-broker", metavar="DIR",
                   help="keep the Mosquitto broker files `devid mqtt broker-config --out DIR` wrote current: the "
                        "CRL and the ACL written again after each revocation or enrollment (docs/mqtt.md)")
    s.add_argument("--mqtt-broker-pid", metavar="PID|FILE",
                   help="the broker to send SIGHUP after each refresh: its pid, or a pid file read each time")
    s.add_argument("--mqtt-broker-batch", type=float, metavar="S",
                   help="new enrollments reach the broker's ACL in batches, at most one reload every S seconds "
                        "(default 30; revocations do not wait)")
    s.add_argument("--log-file", metavar="PATH",
                   help="append the log lines (one JSON object each) to PATH instead of stderr")
    s.set_defaults(func=cmd_serve)
