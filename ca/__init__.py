"""devid's local certificate authority.

Keys, profiles, issuance, serial numbers, revocation and CRLs. No network I/O; the clock,
randomness and the registry (storage) are passed in by the caller.
"""
