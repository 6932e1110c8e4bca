"""`devid mqtt`: service access over MQTT (docs/mqtt.md). `broker-config` writes a Mosquitto
broker's files from the data directory; `publish` and `subscribe` are the device side, with its
operational identity."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from devid.gateway.cli import output
from devid.gateway.cli.base import data_dir, utcnow
from devid.gateway.cli.ca import hostname


def cmd_broker_config(args) -> int:
    from devid.gateway.app.broker import broker_config
    data = data_dir(args).require()
    summary = broker_config(data, Path(args.out), hostnames=args.hostname or ["localhost"], port=args.port,
                            listen=args.listen, owner=args.owner, reload_pid=args.reload_pid, now=utcnow())
    if args.json:
        output.emit({"ok": True, **summary})
        return 0
    print(f"wrote {summary['config']} (listener {summary['listen']}:{summary['port']}; broker certificate for "
          f"{', '.join(summary['hostnames'])}{', reissued' if summary['broker_certificate_reissued'] else ''}; "
          f"CRL number {summary['crl_number']} with {summary['crl_entries']} revoked; ACL for "
          f"{summary['acl_devices']} enrolled device(s))")
    if summary["acl_devices"] == 0:
        print("note: no enrolled device's configuration template has an [mqtt] table: the ACL admits no device "
              "(docs/mqtt.md)", file=sys.stderr)
    if summary["reloaded"]:
        print(f"sent SIGHUP to {args.reload_pid}: the broker reloads the CRL and the ACL")
    return 0


def _connection(args):
    """The device's service and a connection to it (one session per device: the broker names the
    session after the certificate)."""
    from devid.gateway.device.mqtt import Connection, service
    svc = service(Path(args.device), args.broker)
    return svc, Connection(svc, timeout=args.timeout)


def _topic(svc, suffix: str) -> str:
    from devid.gateway.device.mqtt import topic_under
    return topic_under(svc.topic_prefix, suffix)


def cmd_publish(args) -> int:
    svc, conn = _connection(args)
    topic = _topic(svc, args.topic)
    with conn:
        conn.publish(topic, args.message.encode(), retain=args.retain)
    if args.json:
        output.emit({"ok": True, "broker": svc.url, "client_id": svc.client_id, "topic": topic,
                     "bytes": len(args.message.encode())})
    else:
        print(f"published {len(args.message.encode())} bytes to {topic} at {svc.url} (PUBACK: success)")
    return 0


def cmd_subscribe(args) -> int:
    from devid.gateway.device.mqtt import MQTTFailed
    svc, conn = _connection(args)
    topic = _topic(svc, args.topic)
    with conn:
        conn.subscribe(topic)
        if args.ready:
            print(f"subscribed to {topic}", file=sys.stderr, flush=True)
        messages = conn.wait_messages(args.count, args.wait)
    if len(messages) < args.count:
        raise MQTTFailed(f"{len(messages)} of {args.count} message(s) on {topic} within {args.wait:g} s")
    if args.json:
        output.emit({"ok": True, "broker": svc.url, "topic": topic,
                     "messages": [{"topic": t, "message": p.decode(errors="replace")} for t, p in messages]})
    else:
        for t, payload in messages:
            print(f"{t} {payload.decode(errors='replace')}")
    return 0


def _device_flags(s) -> None:
    s.add_argument("--device", required=True, metavar="DIR", help="the device's bundle, enrolled (op-chain.pem, "
                                                                  "op-key.pem, config.cbor)")
    s.add_argument("--broker", metavar="mqtts://HOST[:PORT]", help="instead of the broker its configuration names")
    s.add_argument("--topic", required=True, metavar="SUFFIX", help="under the device's topic prefix "
                                                                   "(devices/SERIAL by default)")
    s.add_argument("--timeout", type=float, default=10.0, metavar="S", help="for the connection and each answer "
                                                                           "(default 10)")
    s.add_argument("--json", action="store_true", help="one JSON document instead of the summary")


def add_commands(sub, common: argparse.ArgumentParser) -> None:
    g = sub.add_parser("mqtt", parents=[common], help="service access over MQTT: a Mosquitto broker's configuration, and a device "
                                    "publishing or subscribing with its operational identity",
                       description="Service access over MQTT with TLS client certificates (docs/mqtt.md).")
    gs = g.add_subparsers(dest="mqtt_command", metavar="COMMAND", required=True)

    s = gs.add_parser("broker-config", parents=[common],
                      help="write a Mosquitto broker's configuration, certificate, key, trust anchor, CRL and "
                           "ACL (run again to renew the CRL and ACL)")
    s.add_argument("--out", required=True, metavar="DIR", help="the broker's directory (made mode 0750)")
    s.add_argument("--hostname", action="append", metavar="NAME", type=hostname,
                   help="a name (or address) devices connect to; repeat for more (default: localhost)")
    s.add_argument("--port", type=int, default=8883, help="the TLS listener's port (default 8883)")
    s.add_argument("--listen", default="0.0.0.0", metavar="ADDR", help="the address it listens on (default 0.0.0.0)")
    s.add_argument("--owner", metavar="USER", help="the broker's account (e.g. mosquitto): its group may read the "
                                                   "files (the key 0640); the files stay yours")
    s.add_argument("--reload-pid", type=int, metavar="PID", help="send the broker SIGHUP afterwards (reloads the "
                                                                 "CRL and the ACL)")
    s.add_argument("--json", action="store_true", help="one JSON document instead of the summary")
    s.set_defaults(func=cmd_broker_config)

    s = gs.add_parser("publish", help="publish one message as the device (MQTT 5, QoS 1, PUBACK checked)")
    _device_flags(s)
    s.add_argument("--message", required=True, metavar="TEXT")
    s.add_argument("--retain", action="store_true", help="the broker keeps it for the next subscriber of the topic")
    s.set_defaults(func=cmd_publish)

    s = gs.add_parser("subscribe", help="receive messages as the device")
    _device_flags(s)
    s.add_argument("--count", type=output.positive_int, default=1, metavar="N", help="messages to wait for "
                                                                                    "(default 1)")
    s.add_argument("--wait", type=float, default=30.0, metavar="S", help="how long to wait for them (default 30)")
    s.add_argument("--ready", action="store_true", help="print 'subscribed to TOPIC' on stderr once subscribed")
    s.set_defaults(func=cmd_subscribe)
