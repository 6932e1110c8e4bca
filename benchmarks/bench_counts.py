"""What an enrollment costs on the wire, as the load generator's sessions see it: datagrams each
way, the DTLS handshake's apart from the rest, and CoAP exchanges.

Counted in the client process by the DTLS engine of each session (`install` gives loadgen_dtls a
counting subclass of its `ClientEngine`): every datagram a session receives goes through the
engine's `receive`, every datagram it sends comes out of an engine call (`start`, `receive`,
`send`, `handle_timeouts`, `close`). A datagram belongs to the handshake when the engine's
session was not yet established at that call; everything after (CoAP messages, the client's
close_notify) is the session's part. Retransmissions count: they are datagrams too (the run's
`client_retransmissions` says how many there were). A CoAP exchange is one confirmable request
with a new Message ID (a Block2 continuation is one more exchange; a retransmission is not).
What the sessions do not see is not counted: a datagram the kernel dropped before a session read
it, the gateway's answer to a close_notify after the socket closed.

Process-wide tallies in COUNTS (one client process runs many sessions); `snapshot` and `delta`
take the timed part of a run. Imports nothing of devid: the engine class comes from the module
that `install` is given.
"""

from __future__ import annotations

KEYS = ("handshake_sent", "handshake_received", "sent", "received", "exchanges")
COUNTS = dict.fromkeys(KEYS, 0)


class Counting:
    """The counting layer, mixed in before a ClientEngine (the engine's API is unchanged)."""

    _last_mid = -1

    def _tally(self, out, handshake: bool) -> None:
        COUNTS["handshake_sent" if handshake else "sent"] += len(out.datagrams)

    def start(self, now):
        out = super().start(now)
        COUNTS["handshake_sent"] += len(out.datagrams)
        return out

    def receive(self, datagram, now):
        handshake = not self.established
        COUNTS["handshake_received" if handshake else "received"] += 1
        out = super().receive(datagram, now)
        self._tally(out, handshake)
        return out

    def send(self, data, now):
        # a CoAP request: type CON (0), a request code (0.01-0.31), a Message ID not sent before
        if len(data) >= 4 and data[0] >> 4 & 3 == 0 and 1 <= data[1] < 32:
            mid = data[2] << 8 | data[3]
            if mid != self._last_mid:
                self._last_mid = mid
                COUNTS["exchanges"] += 1
        out = super().send(data, now)
        COUNTS["sent"] += len(out.datagrams)
        return out

    def handle_timeouts(self, now):
        handshake = not self.established
        out = super().handle_timeouts(now)
        self._tally(out, handshake)
        return out

    def close(self, now):
        handshake = not self.established
        out = super().close(now)
        self._tally(out, handshake)
        return out


def counting(engine_class: type) -> type:
    """`engine_class` with the counting layer (itself if it has it already)."""
    if issubclass(engine_class, Counting):
        return engine_class
    return type(f"Counting{engine_class.__name__}", (Counting, engine_class), {})


def install(module) -> None:
    """Make the sessions of `module` (loadgen_dtls) count: its `ClientEngine` becomes the counting
    subclass. In the client processes of `devid bench` only."""
    module.ClientEngine = counting(module.ClientEngine)


def snapshot() -> dict:
    return dict(COUNTS)


def delta(before: dict) -> dict:
    return {k: COUNTS[k] - before[k] for k in KEYS}


def per_op(totals: list[dict], done: int) -> dict | None:
    """The summary's figures per enrollment (or renewal) from the client processes' deltas; None
    when nothing was counted (no lean client, or sessions that did not go through the engine)."""
    if not totals or not done:
        return None
    t = {k: sum(c.get(k, 0) for c in totals) for k in KEYS}
    if not t["handshake_sent"] and not t["sent"]:
        return None

    def r(x: int) -> float:
        return round(x / done, 2)
    return {"datagrams_per_op": {"total": r(t["handshake_sent"] + t["handshake_received"] + t["sent"] + t["received"]),
                                 "handshake": {"sent": r(t["handshake_sent"]), "received": r(t["handshake_received"])},
                                 "after_handshake": {"sent": r(t["sent"]), "received": r(t["received"])}},
            "coap_exchanges_per_op": r(t["exchanges"])}
