"""DTLS 1.2 with X.509 mutual authentication, built on pyOpenSSL; no aiocoap and no sockets here.

Sans-I/O: datagrams in; datagrams, plaintext and events out; deadlines as values. `engine` is the
public API in one import. Behind it: `session` (the session core both roles share: states,
handshake, records, timers, closing), `server` (the gateway's role: cookies, caps, half-open
bookkeeping), `client` (the device's role), `events`, `errors` (`LocalProtocolError`,
`RemoteProtocolError`), `limits`, `cookies`, `records`, `recordlayer` (AEAD records after the
handshake), `exporter` (the session's RFC 5705 exporter value: the session-bound attestation
nonce) and `contexts` (the pyOpenSSL Contexts). `devid.gateway.coap.transport` puts the
engine on asyncio UDP sockets and under aiocoap.
"""
