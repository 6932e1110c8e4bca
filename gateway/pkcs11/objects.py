"""Objects of a token by CKA_ID: find, remove and relabel the key pair and certificate that share
an id (the PKCS#11 convention pairs a private key, its public key and its certificate by CKA_ID,
and tools such as p11-kit find them by CKA_LABEL). Used by secure-element provisioning and by
the device-side `devid se` commands; every call goes through the Token's session and lock.
"""

from __future__ import annotations

from devid.gateway.errors import TokenError
from devid.gateway.pkcs11.token import Token, _pkcs11

KEY_CLASSES = ("PUBLIC_KEY", "PRIVATE_KEY")
# the private key last: it is what the others are found by (`ids_labelled`), so a destroy or a
# relabel interrupted half-way leaves the id findable, and the next call finishes it
ALL_CLASSES = ("CERTIFICATE", "PUBLIC_KEY", "PRIVATE_KEY")


def _classes(names):
    O = _pkcs11().ObjectClass
    return [getattr(O, n) for n in names]


def ids_labelled(token: Token, label: str, cls: str = "PRIVATE_KEY") -> list[bytes]:
    """The CKA_IDs of the objects of class `cls` labelled `label`."""
    pkcs11 = _pkcs11()
    A = pkcs11.Attribute
    with token.lock:
        try:
            found = list(token.session().get_objects({A.CLASS: getattr(pkcs11.ObjectClass, cls), A.LABEL: label}))
            return [bytes(obj[A.ID]) for obj in found]
        except pkcs11.PKCS11Error as exc:
            raise TokenError(f"PKCS#11 {token.uri.token_label}: cannot list its objects ({type(exc).__name__})") from None


def labels(token: Token, cls: str = "PRIVATE_KEY") -> set[str]:
    """The labels of every object of class `cls` (one pass over the token)."""
    pkcs11 = _pkcs11()
    A = pkcs11.Attribute
    with token.lock:
        try:
            return {str(obj[A.LABEL]) for obj in token.session().get_objects({A.CLASS: getattr(pkcs11.ObjectClass, cls)})}
        except pkcs11.PKCS11Error as exc:
            raise TokenError(f"PKCS#11 {token.uri.token_label}: cannot list its objects ({type(exc).__name__})") from None


def _each(token: Token, classes, query: dict, act, what: str) -> int:
    """`act(obj)` on every object of `classes` matching `query` (a write: the token's writing
    lock); how many it acted on. `act` returns False to pass an object by."""
    pkcs11 = _pkcs11()
    n = 0
    with token.writing():
        session = token.session()
        try:
            for cls in _classes(classes):
                for obj in list(session.get_objects({pkcs11.Attribute.CLASS: cls, **query})):
                    if act(obj) is not False:
                        n += 1
        except pkcs11.PKCS11Error as exc:
            raise TokenError(f"PKCS#11 {token.uri.token_label}: cannot {what} ({type(exc).__name__})") from None
    return n


def destroy(token: Token, id: bytes, classes=ALL_CLASSES) -> int:
    """Remove every object of `classes` with CKA_ID `id`; how many there were (none is fine)."""
    token._keys.pop(id, None)
    return _each(token, classes, {_pkcs11().Attribute.ID: id}, lambda obj: obj.destroy(),
                 f"remove object id={id.hex()}")


def destroy_unnamed(token: Token) -> int:
    """Destroy every key object (public or private) whose label and id are both empty or missing."""
    pkcs11 = _pkcs11()
    A = pkcs11.Attribute

    def empty(obj, attr) -> bool:
        try:
            return not obj[attr]
        except pkcs11.PKCS11Error:
            return True

    def unnamed(obj):
        if not (empty(obj, A.LABEL) and empty(obj, A.ID)):
            return False
        obj.destroy()
    return _each(token, KEY_CLASSES, {}, unnamed, "remove unnamed key objects")


def relabel(token: Token, id: bytes, label: str, classes=ALL_CLASSES) -> None:
    """Give the objects of `classes` with CKA_ID `id` the label `label`."""
    A = _pkcs11().Attribute

    def set_label(obj):
        obj[A.LABEL] = label
    _each(token, classes, {A.ID: id}, set_label, f"relabel object id={id.hex()}")
    token._keys.pop(id, None)


def is_trusted(token: Token, id: bytes, label: str | None = None) -> bool:
    """Whether certificate object `id` is marked trusted (CKA_TRUSTED)."""
    pkcs11 = _pkcs11()
    A = pkcs11.Attribute
    query = {A.CLASS: pkcs11.ObjectClass.CERTIFICATE, A.ID: id, **({A.LABEL: label} if label else {})}
    with token.lock:
        try:
            for obj in token.session().get_objects(query):
                try:
                    return bool(obj[A.TRUSTED])
                except pkcs11.PKCS11Error:
                    return False
        except pkcs11.PKCS11Error as exc:
            raise TokenError(f"PKCS#11 {token.uri.token_label}: cannot list its objects ({type(exc).__name__})") from None
    return False
