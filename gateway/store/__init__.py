"""Everything that is stored: the SQLite registry (`database`, `registry`, `storage`), the attestation nonce and log store,
log rotation and verification, configuration templates. The only modules that speak SQL.
"""
