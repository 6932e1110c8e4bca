"""DTLS 1.2 AEAD record protection for established sessions, outside OpenSSL.

Why this exists: an established pyOpenSSL DTLS connection holds about 100 KiB of OpenSSL memory
(measured with mallinfo2 over 500 server sessions, OpenSSL 4.0.3 with MODE_RELEASE_BUFFERS; a
bare SSL_new alone is 32 KiB), and pyOpenSSL binds no call to shrink its buffers. A gateway
holding 10,000 idle device sessions would spend ~1 GiB on them. OpenSSL does the handshake;
once it is complete, the session's keys are derived from the master secret (RFC 5246 6.3) and
the OpenSSL object is freed. This layer then protects application records with
`cryptography`'s AES-GCM (RFC 5288) or AES-CCM-8 (RFC 6655, RFC 7251; with PSK too), and keeps the RFC 6347
4.1.2.6 replay window: 3.8 KiB per session with its Python objects (measured the same way),
8 KiB of RSS per idle session in the whole gateway process (benchmarks/bench_dtls.py).

Only the AEAD suites devid negotiates are supported (two with certificates, one with PSK); anything else keeps OpenSSL.
"""

from __future__ import annotations

import hmac

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESCCM, AESGCM

from devid.gateway.dtls import records

DTLS12 = b"\xfe\xfd"
EXPLICIT_NONCE = 8
WINDOW = 64

SUITES = {
    # OpenSSL cipher name: (key length, fixed IV length, tag length, AEAD factory)
    "ECDHE-ECDSA-AES128-GCM-SHA256": (16, 4, 16, AESGCM),
    "ECDHE-ECDSA-AES128-CCM8": (16, 4, 8, lambda key: AESCCM(key, tag_length=8)),
    # TLS_PSK_WITH_AES_128_CCM_8 (RFC 6655, RFC 7925's PSK suite): the same record protection
    # (a 4-byte implicit and an 8-byte explicit nonce, an 8-byte tag), the same SHA-256 PRF
    "PSK-AES128-CCM8": (16, 4, 8, lambda key: AESCCM(key, tag_length=8)),
}


def tls12_prf_sha256(secret: bytes, label: bytes, seed: bytes, length: int) -> bytes:
    """P_SHA256 (RFC 5246 section 5)."""
    seed = label + seed
    out = b""
    a = seed
    while len(out) < length:
        a = hmac.digest(secret, a, "sha256")
        out += hmac.digest(secret, a + seed, "sha256")
    return out[:length]


class RecordLayer:
    """Seal and open epoch-`epoch` records of one DTLS 1.2 session."""

    __slots__ = ("_seal", "_open", "_write_iv", "_read_iv", "_tag", "epoch", "write_seq", "_top", "_bits")

    def __init__(self, cipher: str, master_secret: bytes, client_random: bytes, server_random: bytes,
                 server: bool, *, epoch: int = 1, write_seq: int = 0) -> None:
        key_len, iv_len, tag_len, factory = SUITES[cipher]
        block = tls12_prf_sha256(master_secret, b"key expansion", server_random + client_random,
                                 2 * key_len + 2 * iv_len)
        client_key, server_key = block[:key_len], block[key_len:2 * key_len]
        client_iv, server_iv = block[2 * key_len:2 * key_len + iv_len], block[2 * key_len + iv_len:]
        write_key, read_key = (server_key, client_key) if server else (client_key, server_key)
        self._write_iv, self._read_iv = (server_iv, client_iv) if server else (client_iv, server_iv)
        self._seal = factory(write_key)
        self._open = factory(read_key)
        self._tag = tag_len
        self.epoch = epoch
        self.write_seq = write_seq
        self._top = -1          # highest sequence number accepted
        self._bits = 0          # bit i set: top - i was accepted

    @classmethod
    def supports(cls, cipher: str | None) -> bool:
        return cipher in SUITES

    def overhead(self) -> int:
        return records.HEADER + EXPLICIT_NONCE + self._tag

    # -- replay window (RFC 6347 4.1.2.6) ------------------------------------------------------

    def seen(self, seq: int) -> bool:
        if seq > self._top:
            return False
        offset = self._top - seq
        return offset >= WINDOW or bool(self._bits >> offset & 1)

    def mark(self, seq: int) -> None:
        if seq > self._top:
            shift = seq - self._top
            self._bits = ((self._bits << shift) | 1) & ((1 << WINDOW) - 1) if shift < WINDOW else 1
            self._top = seq
        else:
            self._bits |= 1 << (self._top - seq)

    # -- records -------------------------------------------------------------------------------

    def seal(self, content_type: int, plaintext: bytes) -> bytes:
        seq = self.write_seq
        if seq >= 1 << 48:
            raise OverflowError("record sequence numbers exhausted")
        self.write_seq = seq + 1
        seq_num = self.epoch.to_bytes(2, "big") + seq.to_bytes(6, "big")
        aad = seq_num + bytes([content_type]) + DTLS12 + len(plaintext).to_bytes(2, "big")
        body = seq_num + self._seal.encrypt(self._write_iv + seq_num, plaintext, aad)
        return bytes([content_type]) + DTLS12 + seq_num + len(body).to_bytes(2, "big") + body

    def open(self, record: bytes) -> tuple[int, bytes] | None:
        """(content type, plaintext), or None for a record to drop silently: wrong epoch or
        version, replayed, too short, or failing authentication (RFC 6347 4.1.2.7)."""
        if len(record) < records.HEADER + EXPLICIT_NONCE + self._tag or record[1:3] != DTLS12:
            return None
        if int.from_bytes(record[3:5], "big") != self.epoch:
            return None
        seq = int.from_bytes(record[5:11], "big")
        if self.seen(seq):
            return None
        explicit = record[records.HEADER:records.HEADER + EXPLICIT_NONCE]
        ciphertext = record[records.HEADER + EXPLICIT_NONCE:]
        length = len(ciphertext) - self._tag
        aad = record[3:11] + record[0:1] + DTLS12 + length.to_bytes(2, "big")
        try:
            plaintext = self._open.decrypt(self._read_iv + explicit, ciphertext, aad)
        except InvalidTag:
            return None
        self.mark(seq)
        return record[0], plaintext
