"""DTLS 1.2 with X.509 mutual authentication, built on pyOpenSSL; no aiocoap and no sockets here.

`engine` is sans-I/O (datagrams in; datagrams, plaintext and events out; deadlines as values);
`devid.gateway.coap.transport` puts it on an asyncio UDP socket and under aiocoap.
"""
