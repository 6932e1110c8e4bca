"""CoAP over DTLS: the server core (`server`), the aiocoap message transport (`transport`, built
from `dtls_interface`, `dtls_server` and `dtls_client`) and RFC 9290 problem details (`problems`).

The only modules that touch aiocoap internals: an aiocoap upgrade has this one place to look.
"""
