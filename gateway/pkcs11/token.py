"""PKCS#11 tokens through python-pkcs11: one session per process, opened after fork, and
`TokenKey`, a `cryptography` EC private key whose signatures the token makes.

`TokenKey` is the custom-signer pattern pyca/cryptography recommends: the certificate, CRL and
CSR builders call its `sign()`, which hashes in Python and asks the token for a raw `CKM_ECDSA`
signature of the digest (SoftHSM2 offers no hash-and-sign EC mechanism), then DER-encodes r||s.
Nothing here can read the private value: the keys are generated sensitive and never extractable.

Processes: a PKCS#11 module initialised before a fork is not usable in the child (PKCS#11
v2.40 §6.6.1). The module is loaded, and each token's session opened, on first use in each
process; before any fork the process finalises its modules (`_before_fork`), and the child and
the parent each initialise them again, and open their own sessions, on their next use. A session
is used by one thread at a time (a lock per token).
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from devid.gateway.errors import TokenError
from devid.gateway.pkcs11.uri import TokenURI

ENV_PIN = "DEVID_PKCS11_PIN"
ENV_SO_PIN = "DEVID_PKCS11_SO_PIN"
FORK_WAIT = 10.0       # s the forking thread waits for a token in use by another thread
RESCANS = 1            # how often a module that lists no token, or fails to, is initialised and asked again
CURVE_OIDS = {"secp256r1": ec.SECP256R1, "secp384r1": ec.SECP384R1}

_libs: dict[str, object] = {}                  # module path -> pkcs11.lib (loaded once per process image)
_ready: dict[str, int] = {}                     # module path -> the pid in which it is initialised now
_tokens: dict[tuple, "Token"] = {}
_guard = threading.Lock()


def _pkcs11():
    import pkcs11       # imported on first use: commands without a token never load it
    return pkcs11


_fork_lock = threading.Lock()       # one fork at a time through these handlers (3.11 runs them before its own lock)
_held_for_fork: list = []           # the locks _before_fork took, released after the fork in both processes
_took_all = False                   # whether it took them all (else the child makes its locks anew)


def _before_fork() -> None:
    """Finalise every module before this process forks (os.register_at_fork): a child must
    not use its parent's sessions and must call C_Initialize itself (PKCS#11 v2.40 §6.6.1); with
    the module finalised first, it starts from one that holds no state of the parent's. The
    parent initialises it again, and opens its sessions again, on its next use.

    The forking thread first takes every lock another thread could hold across the fork, in the
    order the rest of this module takes them (each token's lock, the module lock, the guard):
    no signature, login or write is under way while the module is finalised. Both processes
    release them after the fork (`_after_fork_in_parent`, `_after_fork_in_child`). A lock not
    had within FORK_WAIT seconds: the module is left as it is, and the child makes every lock
    anew (a lock another thread held is not held by anyone in the child)."""
    global _took_all
    _fork_lock.acquire()
    _took_all = False
    for _ in range(3):                  # again if a token was made while the locks were taken
        tokens = list(_tokens.values())
        if _take([token.lock for token in tokens] + [_module_lock._lock, _guard]):
            if len(_tokens) == len(tokens):
                _took_all = True
                break
            _release_taken()
        else:
            return
    if not _took_all:
        return
    for module, lib in _libs.items():
        if _ready.get(module) == os.getpid():
            try:
                lib.finalize()
            except Exception:
                pass
    _ready.clear()
    for token in _tokens.values():
        token._session = None


def _take(locks) -> bool:
    for lock in locks:
        if not lock.acquire(timeout=FORK_WAIT):
            _release_taken()
            return False
        _held_for_fork.append(lock)
    return True


def _release_taken() -> None:
    while _held_for_fork:
        _held_for_fork.pop().release()


def _after_fork_in_parent() -> None:
    _release_taken()
    _fork_lock.release()


def _after_fork_in_child() -> None:
    if _took_all:
        _release_taken()
    else:                               # locks other threads held: nobody holds them here
        _held_for_fork.clear()
        for token in _tokens.values():
            token.lock._at_fork_reinit()
        _module_lock._lock._at_fork_reinit()
        _guard._at_fork_reinit()
        if _module_lock._fd is not None:     # the flock stays the parent's: drop this copy of its descriptor
            try:
                os.close(_module_lock._fd)
            except OSError:
                pass
        _module_lock._fd, _module_lock._depth = None, 0
    _fork_lock._at_fork_reinit()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)


class _ModuleLock:
    """Across processes, one at a time: initialising the module, finding the token, logging in,
    and writing objects (keys, certificates). An exclusive flock on the module's file (every
    process that uses the module can open it; nothing to create or clean up); re-entrant within
    a process. Measured with SoftHSM2 2.6.1 (file object store): two processes initialising it and
    logging in at the same moment failed in 15-20 % of 40 rounds (CKR_GENERAL_ERROR, or the
    token not listed); with this lock, 0 of 80. Signing needs no lock and takes none."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._depth = 0
        self._fd: int | None = None

    def __call__(self, module: str):
        return _Held(self, module)


class _Held:
    def __init__(self, owner: _ModuleLock, module: str) -> None:
        self.owner, self.module = owner, module

    def __enter__(self):
        owner = self.owner
        owner._lock.acquire()
        try:
            if owner._depth == 0:
                try:
                    owner._fd = os.open(self.module, os.O_RDONLY | os.O_CLOEXEC)
                    fcntl.flock(owner._fd, fcntl.LOCK_EX)
                except OSError:
                    if owner._fd is not None:
                        os.close(owner._fd)
                    owner._fd = None        # no such module: loading it gives the error
            owner._depth += 1
        except BaseException:               # (interrupted while waiting for the flock)
            if owner._depth == 0 and owner._fd is not None:
                os.close(owner._fd)
                owner._fd = None
            owner._lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        owner = self.owner
        owner._depth -= 1
        if owner._depth == 0 and owner._fd is not None:
            os.close(owner._fd)             # releases the flock
            owner._fd = None
        owner._lock.release()


_module_lock = _ModuleLock()


class _Both:
    def __init__(self, first, second) -> None:
        self.first, self.second = first, second

    def __enter__(self):
        self.first.__enter__()
        try:
            self.second.__enter__()
        except BaseException:
            self.first.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.second.__exit__(*exc)
        finally:
            self.first.__exit__(*exc)


def _library(module: str):
    """The module `module`, initialised in this process."""
    pkcs11 = _pkcs11()
    with _guard:
        pid = os.getpid()
        lib = _libs.get(module)
        if lib is not None:
            if _ready.get(module) != pid:       # finalised before a fork, or inherited: initialise it here
                try:
                    lib.reinitialize()          # (finalize is a no-op when it is not initialised)
                except pkcs11.PKCS11Error as exc:
                    raise TokenError(f"PKCS#11 module {module}: cannot initialise it ({type(exc).__name__})") from None
                _ready[module] = pid
            return lib
        if not Path(module).exists():
            raise TokenError(f"PKCS#11 module {module}: no such file (install it, e.g. Debian's softhsm2, "
                             "or give module-path=PATH in the URI)")
        try:
            lib = pkcs11.lib(module)
        except pkcs11.PKCS11Error as exc:
            raise TokenError(f"PKCS#11 module {module} cannot be loaded: {exc}") from None
        _libs[module] = lib
        _ready[module] = pid
        return lib


def read_pin(uri: TokenURI, *, env: str = ENV_PIN) -> str:
    """The user PIN: the URI's pin-source file (mode 0600, like every secret file devid reads),
    else $DEVID_PKCS11_PIN. TokenError without either; the PIN is never part of a message."""
    if uri.pin_source:
        source = uri.pin_source[len("file:"):] if uri.pin_source.startswith("file:") else uri.pin_source
        path = Path(source)
        from devid.ca import keys      # the same check as for CA key files
        try:
            keys.check_private_file(path)
            pin = path.read_text().strip()
        except keys.KeyFileError as exc:
            raise TokenError(f"PKCS#11 pin-source: {exc}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenError(f"PKCS#11 pin-source {path}: cannot read it ({exc.__class__.__name__})") from None
        if not pin:
            raise TokenError(f"PKCS#11 pin-source {path} is empty")
        return pin
    pin = os.environ.get(env)
    if not pin:
        raise TokenError(f"no PIN for the PKCS#11 {uri.token_label}: set ${env} or add "
                         "pin-source=file:PATH (a 0600 file) to the URI")
    return pin


class Token:
    """One token, logged in as its user, with one read-write session per process."""

    def __init__(self, uri: TokenURI, pin: str | None = None) -> None:
        self.uri = uri.token_only()
        self._pin = pin
        self._session = None
        self._pid = None
        self.lock = threading.RLock()
        self._keys: dict[bytes, object] = {}

    def __repr__(self) -> str:                  # never the PIN
        return f"Token({self.uri})"

    @classmethod
    def of(cls, uri: TokenURI) -> "Token":
        """The process's Token for `uri`'s token (one per token and process)."""
        key = (uri.module, uri.token, uri.serial, uri.slot_id, uri.manufacturer, uri.model, uri.pin_source)
        with _guard:
            token = _tokens.get(key)
            if token is None:
                token = _tokens[key] = cls(uri)
            return token

    def _list(self, lib) -> list:
        u = self.uri
        if u.slot_id is not None:
            tokens = [s.get_token() for s in lib.get_slots(token_present=True) if s.slot_id == u.slot_id]
        else:
            tokens = list(lib.get_tokens(token_label=u.token, token_serial=u.serial.encode() if u.serial else None))
        return [t for t in tokens
                if (u.token is None or t.label == u.token)
                and (u.manufacturer is None or t.manufacturer_id == u.manufacturer)
                and (u.model is None or t.model == u.model)]

    def _find(self, lib):
        """The token the URI names. When the module lists none, or fails to list (PKCS11Error),
        it is initialised again and asked again (RESCANS times): a module lists the tokens it
        found when it was initialised (SoftHSM2 does), so a token made since (softhsm2-util, a
        card inserted) needs a new C_Initialize. Every session of this module in this process
        is then gone: each Token opens its own again."""
        pkcs11 = _pkcs11()
        u = self.uri
        failure = None
        for attempt in range(RESCANS + 1):
            if attempt:
                time.sleep(0.02 * 2 ** attempt)
                with _guard:
                    try:
                        lib.reinitialize()
                    except pkcs11.PKCS11Error:
                        pass
                    for other in _tokens.values():
                        if other.uri.module == u.module:
                            other._session = None
            try:
                tokens = self._list(lib)
            except pkcs11.PKCS11Error as exc:
                failure = exc
                continue
            if tokens:
                break
            failure = None
        if failure is not None:
            raise TokenError(f"PKCS#11 module {u.module}: cannot list its tokens ({type(failure).__name__})")
        if not tokens:
            raise TokenError(f"PKCS#11: no {u.token_label} in module {u.module} (initialise it, e.g. "
                             "'softhsm2-util --init-token --free --label NAME', or check SOFTHSM2_CONF)")
        if len(tokens) > 1:
            raise TokenError(f"PKCS#11: more than one token matches ({u.token_label}): add serial= to the URI")
        return tokens[0]

    def writing(self):
        """Hold this token for a write (objects made, changed, destroyed): its lock in this
        process, and the module's lock across processes."""
        return _Both(self.lock, _module_lock(self.uri.module))

    def session(self):
        """This process's logged-in read-write session (opened on first use, again after fork)."""
        pid = os.getpid()
        if self._session is not None and self._pid == pid:
            return self._session
        pkcs11 = _pkcs11()
        pin = self._pin if self._pin is not None else read_pin(self.uri)
        with _module_lock(self.uri.module):
            return self._open(pkcs11, pin, pid)

    def _open(self, pkcs11, pin: str, pid: int):
        lib = _library(self.uri.module)
        token = self._find(lib)
        try:
            self._session = token.open(rw=True, user_pin=pin)
        except pkcs11.exceptions.PinIncorrect:
            raise TokenError(f"PKCS#11 {self.uri.token_label}: wrong PIN") from None
        except pkcs11.exceptions.PinLocked:
            raise TokenError(f"PKCS#11 {self.uri.token_label}: the PIN is locked (too many wrong PINs)") from None
        except (pkcs11.exceptions.PinInvalid, pkcs11.exceptions.PinLenRange):
            raise TokenError(f"PKCS#11 {self.uri.token_label}: the PIN is not a valid PIN for this token") from None
        except pkcs11.exceptions.UserPinNotInitialized:
            raise TokenError(f"PKCS#11 {self.uri.token_label}: its user PIN is not initialised") from None
        except pkcs11.PKCS11Error as exc:
            raise TokenError(f"PKCS#11 {self.uri.token_label}: cannot open a session ({type(exc).__name__})") from None
        self._pid = pid
        self._keys = {}
        return self._session

    def private_key(self, id: bytes, label: str | None = None):
        """The private key object with CKA_ID `id` (cached per session)."""
        with self.lock:
            session = self.session()
            found = self._keys.get(id)
            if found is None:
                found = self._keys[id] = self.find_private(session, _name(id, label), id=id,
                                                           **({"label": label} if label else {}))
            return found

    def find_private(self, session, what: str, **query):
        """The one private key object matching `query` (id=, label=); TokenError naming `what`."""
        pkcs11 = _pkcs11()
        try:
            return session.get_key(object_class=pkcs11.ObjectClass.PRIVATE_KEY, **query)
        except pkcs11.exceptions.NoSuchKey:
            raise TokenError(f"PKCS#11 {self.uri.token_label} has no private key {what}") from None
        except pkcs11.exceptions.MultipleObjectsReturned:
            raise TokenError(f"PKCS#11 {self.uri.token_label} has more than one private key {what}"
                             + (": add id= to the URI" if "id" not in query else "")) from None
        except pkcs11.PKCS11Error as exc:
            raise TokenError(f"PKCS#11 {self.uri.token_label}: cannot find private key {what} "
                             f"({type(exc).__name__})") from None

    def public_key(self, id: bytes, label: str | None = None) -> ec.EllipticCurvePublicKey:
        """The public half of key `id`, from its public key object."""
        pkcs11 = _pkcs11()
        from pkcs11.util.ec import encode_ec_public_key
        with self.lock:
            try:
                obj = self.session().get_key(object_class=pkcs11.ObjectClass.PUBLIC_KEY, id=id,
                                             **({"label": label} if label else {}))
            except pkcs11.exceptions.NoSuchKey:
                raise TokenError(f"PKCS#11 {self.uri.token_label} has no public key {_name(id, label)}") from None
            except pkcs11.PKCS11Error as exc:
                raise TokenError(f"PKCS#11 {self.uri.token_label}: cannot read public key {_name(id, label)} "
                                 f"({type(exc).__name__})") from None
            der = self._read(lambda: encode_ec_public_key(obj), f"public key {_name(id, label)}")
        key = serialization.load_der_public_key(der)
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise TokenError(f"PKCS#11 key {_name(id, label)} is not an EC key")
        return key

    def sign_digest(self, id: bytes, label: str | None, digest: bytes) -> bytes:
        """The raw ECDSA signature r||s of `digest` by key `id`."""
        pkcs11 = _pkcs11()
        with self.lock:
            key = self.private_key(id, label)
            try:
                return key.sign(digest, mechanism=pkcs11.Mechanism.ECDSA)
            except (pkcs11.exceptions.SessionHandleInvalid, pkcs11.exceptions.SessionClosed,
                    pkcs11.exceptions.ObjectHandleInvalid, pkcs11.exceptions.KeyHandleInvalid,
                    pkcs11.exceptions.DeviceRemoved, pkcs11.exceptions.TokenNotPresent,
                    pkcs11.exceptions.UserNotLoggedIn):
                self._session = None            # the token went away or was reset: once more
                key = self.private_key(id, label)
                try:
                    return key.sign(digest, mechanism=pkcs11.Mechanism.ECDSA)
                except pkcs11.PKCS11Error as exc:
                    raise TokenError(f"PKCS#11 {self.uri.token_label}: signing failed ({type(exc).__name__})") from None
            except pkcs11.PKCS11Error as exc:
                raise TokenError(f"PKCS#11 {self.uri.token_label}: signing failed ({type(exc).__name__})") from None

    def generate_ec_key(self, curve: ec.EllipticCurve, label: str, id: bytes) -> ec.EllipticCurvePublicKey:
        """A new key pair in the token: private key sensitive, never extractable, sign-only."""
        pkcs11 = _pkcs11()
        from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters
        A = pkcs11.Attribute
        with self.writing():
            session = self.session()
            try:
                params = session.create_domain_parameters(
                    pkcs11.KeyType.EC, {A.EC_PARAMS: encode_named_curve_parameters(curve.name)}, local=True)
                public, private = params.generate_keypair(
                    store=True, label=label, id=id,
                    public_template={A.TOKEN: True, A.VERIFY: True, A.ENCRYPT: False, A.WRAP: False,
                                     A.DERIVE: False},
                    private_template={A.TOKEN: True, A.PRIVATE: True, A.SENSITIVE: True, A.EXTRACTABLE: False,
                                      A.SIGN: True, A.DECRYPT: False, A.UNWRAP: False, A.DERIVE: False})
            except pkcs11.PKCS11Error as exc:
                raise TokenError(f"PKCS#11 {self.uri.token_label}: cannot generate a {curve.name} key "
                                 f"({type(exc).__name__})") from None
            # both halves from the objects just made (a search by id would read every object:
            # SoftHSM2's searches are linear in the token's objects)
            self._keys[id] = private
            der = self._read(lambda: encode_ec_public_key(public), f"public key {_name(id, label)}")
        key = serialization.load_der_public_key(der)
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise TokenError(f"PKCS#11 key {_name(id, label)} is not an EC key")
        return key

    def destroy_key(self, id: bytes, label: str | None = None) -> None:
        """Remove both halves of key `id` (labelled `label`, if given): an init that failed
        half-way. Missing is fine."""
        pkcs11 = _pkcs11()
        A = pkcs11.Attribute
        with self.writing():
            session = self.session()
            self._keys.pop(id, None)
            try:
                for cls in (pkcs11.ObjectClass.PRIVATE_KEY, pkcs11.ObjectClass.PUBLIC_KEY):
                    query = {A.CLASS: cls, A.ID: id, **({A.LABEL: label} if label else {})}
                    for obj in list(session.get_objects(query)):
                        obj.destroy()
            except pkcs11.PKCS11Error as exc:
                raise TokenError(f"PKCS#11 {self.uri.token_label}: cannot destroy key {_name(id, label)} "
                                 f"({type(exc).__name__})") from None

    def key_attributes(self, id: bytes) -> dict[str, bool]:
        """What the token says about private key `id`: sensitive, extractable, never/always."""
        A = _pkcs11().Attribute
        with self.lock:
            key = self.private_key(id)
            names = {"sensitive": A.SENSITIVE, "extractable": A.EXTRACTABLE, "always_sensitive": A.ALWAYS_SENSITIVE,
                     "never_extractable": A.NEVER_EXTRACTABLE, "local": A.LOCAL}
            return self._read(lambda: {name: bool(key[attr]) for name, attr in names.items()},
                              f"the attributes of key {_name(id, None)}")

    def store_certificate(self, der: bytes, label: str, id: bytes, *, subject: bytes, trusted: bool = False,
                          so_pin: str | None = None, replace: bool = True) -> None:
        """Write a certificate object (replacing one with the same id and label, unless `replace`
        is false: an id just made has none). `trusted`: mark it
        a trust anchor (CKA_TRUSTED, which PKCS#11 lets only the security officer set: `so_pin`)."""
        pkcs11 = _pkcs11()
        A = pkcs11.Attribute
        template = {A.CLASS: pkcs11.ObjectClass.CERTIFICATE, A.CERTIFICATE_TYPE: pkcs11.CertificateType.X_509,
                    A.TOKEN: True, A.PRIVATE: False, A.LABEL: label, A.ID: id, A.VALUE: der, A.SUBJECT: subject}
        with self.writing():
            if trusted:
                template[A.TRUSTED] = True
                lib = _library(self.uri.module)
                token = self._find(lib)
                if self._session is not None and self._pid == os.getpid():
                    try:                    # the user's login would refuse the SO's (one login per token)
                        self._session.close()
                    except pkcs11.PKCS11Error:
                        pass
                self._session = None
                try:
                    session = token.open(rw=True, so_pin=so_pin)
                except pkcs11.exceptions.PinIncorrect:
                    raise TokenError(f"PKCS#11 {self.uri.token_label}: wrong SO PIN") from None
                except pkcs11.PKCS11Error as exc:
                    raise TokenError(f"PKCS#11 {self.uri.token_label}: cannot open an SO session "
                                     f"({type(exc).__name__})") from None
            else:
                session = self.session()
            try:
                olds = (list(session.get_objects({A.CLASS: pkcs11.ObjectClass.CERTIFICATE, A.ID: id, A.LABEL: label}))
                        if replace else [])   # (a new id has none to replace: no search through the token)
                session.create_object(template)     # the new one first: a failure leaves the old one
                for old in olds:
                    old.destroy()
            except pkcs11.PKCS11Error as exc:
                raise TokenError(f"PKCS#11 {self.uri.token_label}: cannot store certificate '{label}' "
                                 f"({type(exc).__name__})") from None
            finally:
                if trusted:
                    session.close()

    def certificate(self, id: bytes, label: str | None = None) -> bytes | None:
        """The DER of certificate object `id`, or None."""
        pkcs11 = _pkcs11()
        A = pkcs11.Attribute
        query = {A.CLASS: pkcs11.ObjectClass.CERTIFICATE, A.ID: id, **({A.LABEL: label} if label else {})}
        with self.lock:
            session = self.session()
            return self._read(lambda: next((bytes(obj[A.VALUE]) for obj in session.get_objects(query)), None),
                              f"certificate {_name(id, label)}")

    def _read(self, read, what: str):
        """`read()`, with a token's failure as one TokenError line naming `what`."""
        pkcs11 = _pkcs11()
        try:
            return read()
        except pkcs11.PKCS11Error as exc:
            raise TokenError(f"PKCS#11 {self.uri.token_label}: cannot read {what} ({type(exc).__name__})") from None


def _name(id: bytes, label: str | None) -> str:
    return f"id={id.hex()}" + (f" (label '{label}')" if label else "")


class TokenKey(ec.EllipticCurvePrivateKey):
    """An EC private key in a token: `sign()` is the token's, everything that would read the
    private value refuses. Usable wherever `cryptography` takes an EC private key for signing
    (CertificateBuilder, CertificateRevocationListBuilder, CertificateSigningRequestBuilder)."""

    def __init__(self, token: Token, id: bytes, label: str | None, public: ec.EllipticCurvePublicKey) -> None:
        self.token = token
        self.id = id
        self.label = label
        self._public = public

    @classmethod
    def open(cls, uri: TokenURI) -> "TokenKey":
        """The key the URI names (id= and/or object=), its public half read from the token."""
        if uri.id is None and uri.object is None:
            raise TokenError("PKCS#11 URI names no key: add id=... or object=LABEL")
        token = Token.of(uri)
        if uri.id is None:
            pkcs11 = _pkcs11()
            with token.lock:
                obj = token.find_private(token.session(), f"labelled '{uri.object}'", label=uri.object)
                kid = token._read(lambda: bytes(obj[pkcs11.Attribute.ID]), f"the id of the key labelled '{uri.object}'")
                uri = uri.with_object(label=uri.object, id=kid, type="private")
        token.private_key(uri.id, uri.object)       # exists, or a clear error now rather than at the first signature
        return cls(token, uri.id, uri.object, token.public_key(uri.id, uri.object))

    @property
    def uri(self) -> TokenURI:
        return self.token.uri.with_object(label=self.label, id=self.id, type="private")

    def __repr__(self) -> str:
        return f"TokenKey({self.uri})"

    # -- what cryptography calls ---------------------------------------------------------------

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    @property
    def key_size(self) -> int:
        return self._public.curve.key_size

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    def sign(self, data: bytes, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise TokenError("a token key signs ECDSA only")
        algorithm = signature_algorithm.algorithm
        if isinstance(algorithm, utils.Prehashed):
            digest = data
        else:
            h = hashes.Hash(algorithm)
            h.update(data)
            digest = h.finalize()
        raw = self.token.sign_digest(self.id, self.label, digest)
        half = len(raw) // 2
        return utils.encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))

    def exchange(self, algorithm, peer_public_key) -> bytes:
        raise TokenError("a token key in devid signs only (no key agreement)")

    def private_numbers(self):
        raise TokenError(f"the key {self.uri} is in a token and cannot be read")

    def private_bytes(self, encoding, format, encryption_algorithm) -> bytes:
        raise TokenError(f"the key {self.uri} is in a token and cannot be exported")

    def __copy__(self) -> "TokenKey":
        return self

    def __deepcopy__(self, memo) -> "TokenKey":
        return self

