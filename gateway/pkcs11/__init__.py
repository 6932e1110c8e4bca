"""Keys in PKCS#11 tokens: an HSM for the CA, a secure element for a device (RFC 7512 URIs,
per-process sessions, a `cryptography` private key whose signatures the token makes)."""
