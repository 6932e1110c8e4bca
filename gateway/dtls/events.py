"""What the DTLS engines hand back from every call: an `Output` of datagrams to send and events
for the application. Events are frozen values, compared by value (tests do: `ApplicationData(peer,
b"ping") in out.events`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable

Peer = Hashable          # e.g. ("127.0.0.1", 40000) for UDP


@dataclass(frozen=True)
class HandshakeComplete:
    peer: Peer
    identity: Any            # server: what the Authenticator returned; client: what its server check returned
    resumed: bool
    cipher: str | None
    # the session's exporter value (exporter.py: RFC 5705, 32 bytes), the session-bound attestation
    # nonce; None when the session has no extended master secret
    exporter: bytes | None = None


@dataclass(frozen=True)
class HandshakeFailed:
    peer: Peer
    reason: str


@dataclass(frozen=True)
class ApplicationData:
    peer: Peer
    data: bytes


@dataclass(frozen=True)
class SessionClosed:
    peer: Peer
    reason: str


Event = HandshakeComplete | HandshakeFailed | ApplicationData | SessionClosed


@dataclass
class Output:
    datagrams: list[tuple[Peer, bytes]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    def extend(self, other: "Output") -> "Output":
        self.datagrams.extend(other.datagrams)
        self.events.extend(other.events)
        return self
