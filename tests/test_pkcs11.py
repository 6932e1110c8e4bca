"""gateway/pkcs11: RFC 7512 URIs as devid reads them, and TokenKey's signatures (SoftHSM2)."""

from __future__ import annotations

import os
import select

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils

from devid.gateway.errors import TokenError
from devid.gateway.pkcs11.token import Token, TokenKey
from devid.gateway.pkcs11.uri import DEFAULT_MODULE, parse


def sign_in_child(key: TokenKey, data: bytes) -> bytes:
    """The signature a forked child makes with `key`: it must exit 0 within 60 s (a child that
    hangs, on a lock it inherited held or a module mid-call, fails the test, never blocks it)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(write, key.sign(data, ec.ECDSA(hashes.SHA256())))
        finally:
            os._exit(0)
    os.close(write)
    ready, _, _ = select.select([read], [], [], 60)
    if not ready:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        os.close(read)
        pytest.fail("the forked child did not sign within 60 s")
    sig = os.read(read, 200)
    os.close(read)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and len(sig) >= 64, sig
    return sig


def test_uri_attributes_percent_decoding_and_round_trip():
    u = parse("pkcs11:token=My%20CA;id=%01%ff;object=devid-root;type=private"
              "?module-path=/opt/hsm/lib%2Dp11.so&pin-source=file:/etc/devid/pin")
    assert (u.token, u.id, u.object, u.type) == ("My CA", b"\x01\xff", "devid-root", "private")
    assert (u.module, u.pin_source) == ("/opt/hsm/lib-p11.so", "file:/etc/devid/pin")
    assert parse(str(u)) == u
    assert parse("pkcs11:slot-id=3").slot_id == 3 and parse("pkcs11:token=x").module == DEFAULT_MODULE
    assert str(u.token_only()) == "pkcs11:token=My%20CA?module-path=/opt/hsm/lib-p11.so&pin-source=file:/etc/devid/pin"


@pytest.mark.parametrize("text, needle", [
    ("token=x", "starts with 'pkcs11:'"),
    ("pkcs11:token=x?pin-value=1234", "pin-value is refused"),
    ("pkcs11:token=x?PIN-VALUE=1234", "pin-value is refused"),
    ("pkcs11:tokn=x", "unknown attribute 'tokn'"),
    ("pkcs11:token=x?module=y", "unknown query attribute 'module'"),
    ("pkcs11:token", "has no value"),
    ("pkcs11:slot-id=one", "slot-id is a decimal number"),
    ("pkcs11:type=secret", "type must be one of"),
    ("pkcs11:token=a;token=b", "given twice"),
    ("pkcs11:token=x?module-name=../../tmp/evil", "module-name is a name"),
])
def test_uri_refusals_name_the_problem_never_the_pin(text, needle):
    with pytest.raises(TokenError) as info:
        parse(text)
    assert needle in str(info.value) and "1234" not in str(info.value)


def test_token_key_signatures_verify_and_the_key_cannot_be_read(token, monkeypatch):
    monkeypatch.setenv("DEVID_PKCS11_PIN", token.pin)
    uri = parse(token.uri)
    t = Token.of(uri)
    public = t.generate_ec_key(ec.SECP256R1(), "unit", b"\x07")
    key = TokenKey.open(uri.with_object(id=b"\x07"))
    assert key.public_key() == public and key.key_size == 256
    for algorithm in (hashes.SHA256(), hashes.SHA384()):
        sig = key.sign(b"message", ec.ECDSA(algorithm))
        public.verify(sig, b"message", ec.ECDSA(algorithm))
        with pytest.raises(InvalidSignature):
            public.verify(sig, b"other", ec.ECDSA(algorithm))
    digest = hashes.Hash(hashes.SHA256())
    digest.update(b"message")
    prehashed = key.sign(digest.finalize(), ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    public.verify(prehashed, b"message", ec.ECDSA(hashes.SHA256()))
    assert t.key_attributes(b"\x07") == {"sensitive": True, "extractable": False, "always_sensitive": True,
                                         "never_extractable": True, "local": True}
    for read in (key.private_numbers, lambda: key.private_bytes(None, None, None),
                 lambda: key.exchange(ec.ECDH(), public)):
        with pytest.raises(TokenError):
            read()
    assert token.pin not in repr(key) + repr(t)


def test_a_forked_child_opens_its_own_session(token, monkeypatch):
    monkeypatch.setenv("DEVID_PKCS11_PIN", token.pin)
    uri = parse(token.uri)
    public = Token.of(uri).generate_ec_key(ec.SECP256R1(), "fork", b"\x08")
    key = TokenKey.open(uri.with_object(id=b"\x08"))
    key.sign(b"parent", ec.ECDSA(hashes.SHA256()))          # the parent's session is open
    public.verify(sign_in_child(key, b"child"), b"child", ec.ECDSA(hashes.SHA256()))
    public.verify(key.sign(b"parent again", ec.ECDSA(hashes.SHA256())), b"parent again", ec.ECDSA(hashes.SHA256()))


def test_a_fork_waits_for_a_signature_under_way_in_another_thread(token, monkeypatch):
    """Another thread signs in a loop while the main thread forks: the fork takes the token's
    lock first, so the module is never finalised under a signature, the parent's signatures all
    succeed, and the child signs with its own session."""
    import threading
    monkeypatch.setenv("DEVID_PKCS11_PIN", token.pin)
    uri = parse(token.uri)
    public = Token.of(uri).generate_ec_key(ec.SECP256R1(), "threads", b"\x09")
    key = TokenKey.open(uri.with_object(id=b"\x09"))
    stop, failures, signed = threading.Event(), [], []

    def sign_loop():
        while not stop.is_set():
            try:
                public.verify(key.sign(b"loop", ec.ECDSA(hashes.SHA256())), b"loop", ec.ECDSA(hashes.SHA256()))
                signed.append(1)
            except Exception as exc:       # any failure is the finding
                failures.append(repr(exc))
    worker = threading.Thread(target=sign_loop)
    worker.start()
    try:
        for _ in range(5):
            public.verify(sign_in_child(key, b"child"), b"child", ec.ECDSA(hashes.SHA256()))
    finally:
        stop.set()
        worker.join(30)
    assert failures == [] and len(signed) > 0


def test_a_child_forked_while_another_thread_holds_the_token_still_signs(token, monkeypatch):
    """The fork gives up waiting for a token lock another thread holds (FORK_WAIT made short):
    the child makes its locks anew, since nobody holds them there, and signs with its own
    session; the parent's thread goes on with its lock."""
    import threading
    from devid.gateway.pkcs11 import token as token_module
    monkeypatch.setenv("DEVID_PKCS11_PIN", token.pin)
    monkeypatch.setattr(token_module, "FORK_WAIT", 0.2)
    uri = parse(token.uri)
    t = Token.of(uri)
    public = t.generate_ec_key(ec.SECP256R1(), "held", b"\x0a")
    key = TokenKey.open(uri.with_object(id=b"\x0a"))
    holding, release = threading.Event(), threading.Event()

    def hold():
        with t.lock:
            holding.set()
            release.wait(60)
    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert holding.wait(30)
        public.verify(sign_in_child(key, b"child"), b"child", ec.ECDSA(hashes.SHA256()))
    finally:
        release.set()
        holder.join(30)
    public.verify(key.sign(b"parent", ec.ECDSA(hashes.SHA256())), b"parent", ec.ECDSA(hashes.SHA256()))
