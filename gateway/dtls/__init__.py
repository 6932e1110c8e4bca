"""DTLS 1.2 with X.509 mutual authentication for CoAP (coaps://), built on pyOpenSSL.

`engine` is sans-I/O (datagrams in; datagrams, plaintext and events out; deadlines as values),
`transport` puts it on an asyncio UDP socket and under aiocoap.
"""
