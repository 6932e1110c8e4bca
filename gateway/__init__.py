"""devid gateway: wires the CA, the attestation verifier and the registry to CoAP over DTLS."""
