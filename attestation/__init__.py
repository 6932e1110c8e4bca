"""Device attestation: EAT evidence, nonces, policy, verifier, log. No network I/O."""
