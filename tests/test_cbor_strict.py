"""The strict CBOR decoder: named vectors for each refusal, and properties against cbor2."""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devid.attestation import cbor_strict
from devid.attestation.errors import (DuplicateMapKey, EvidenceTooLarge, IndefiniteLength, MalformedCBOR, NestingTooDeep,
                                TrailingBytes, UnsupportedCBOR)

VECTORS = {
    # name: (hex, error)
    "empty": ("", MalformedCBOR),
    "truncated-uint16": ("19 01", MalformedCBOR),
    "truncated-bstr": ("45 0102", MalformedCBOR),
    "truncated-array": ("83 01 02", MalformedCBOR),
    "truncated-map-value": ("a2 01 02 03", MalformedCBOR),
    "huge-announced-array": ("9b 7fffffffffffffff", MalformedCBOR),
    "huge-announced-bstr": ("5b 7fffffffffffffff 00", MalformedCBOR),
    "trailing-byte": ("01 00", TrailingBytes),
    "two-items": ("a0 a0", TrailingBytes),
    "duplicate-int-key": ("a2 01 01 01 02", DuplicateMapKey),
    "duplicate-text-key": ("a2 61 61 01 61 61 02", DuplicateMapKey),
    "duplicate-key-overlong": ("a2 01 01 18 01 02", DuplicateMapKey),      # 1 and 1 in a longer head
    "duplicate-negative-key": ("a2 20 00 38 00 01", DuplicateMapKey),      # -1 twice
    "duplicate-nested": ("a1 01 a2 02 00 02 01", DuplicateMapKey),
    "indefinite-array": ("9f 01 ff", IndefiniteLength),
    "indefinite-map": ("bf 01 02 ff", IndefiniteLength),
    "indefinite-bstr": ("5f 41 00 ff", IndefiniteLength),
    "indefinite-text": ("7f 61 61 ff", IndefiniteLength),
    "lone-break": ("ff", MalformedCBOR),
    "reserved-ai-28": ("1c", MalformedCBOR),
    "reserved-ai-30-in-array": ("81 5e", MalformedCBOR),
    "invalid-utf8": ("62 c328", MalformedCBOR),
    "bstr-map-key": ("a1 41 00 01", UnsupportedCBOR),
    "array-map-key": ("a1 80 01", UnsupportedCBOR),
    "bool-map-key": ("a1 f5 01", UnsupportedCBOR),
    "tag-not-allowed": ("c1 1a 5f5e1000", UnsupportedCBOR),
    "undefined": ("f7", UnsupportedCBOR),
    "simple-16": ("f0", UnsupportedCBOR),
    "simple-255": ("f8 ff", UnsupportedCBOR),
}


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_named_malformed_vectors(name):
    hexdata, error = VECTORS[name]
    with pytest.raises(error):
        cbor_strict.loads(bytes.fromhex(hexdata.replace(" ", "")))


def test_cbor2_accepts_what_we_refuse():
    """The reason this module exists: cbor2 silently takes duplicates and ignores trailing bytes."""
    assert cbor2.loads(bytes.fromhex("a2010101 02".replace(" ", ""))) == {1: 2}
    assert cbor2.loads(bytes.fromhex("0100")) == 1


def test_size_cap_is_checked_before_decoding():
    big = cbor2.dumps(b"x" * 5000)
    with pytest.raises(EvidenceTooLarge):
        cbor_strict.loads(big, max_size=4096)
    assert cbor_strict.loads(big, max_size=len(big)) == b"x" * 5000
    # even garbage is refused for its size alone, not for being garbage
    with pytest.raises(EvidenceTooLarge):
        cbor_strict.loads(b"\xff" * 4097)


def test_nesting_limit():
    ok = b"\x81" * 7 + b"\x00"
    assert cbor_strict.loads(ok, max_depth=7) == [[[[[[[0]]]]]]]
    with pytest.raises(NestingTooDeep):
        cbor_strict.loads(b"\x81" * 8 + b"\x00", max_depth=7)
    with pytest.raises(NestingTooDeep):
        cbor_strict.loads(b"\xa1\x01" * 20 + b"\x00", max_depth=16)
    with pytest.raises(NestingTooDeep):          # tags count as nesting too
        cbor_strict.loads(b"\xd2" * 20 + b"\x00", tags=frozenset({18}))
    # far above Python's recursion limit: still the named error, no RecursionError
    with pytest.raises(NestingTooDeep):
        cbor_strict.loads(b"\x81" * 4000 + b"\x00", max_depth=100000, max_size=10000)


def test_allowed_tag_and_simple_values():
    v = cbor_strict.loads(bytes.fromhex("d2 83 f4 f5 f6".replace(" ", "")), tags=frozenset({18}))
    assert v == cbor2.CBORTag(18, [False, True, None])
    assert cbor_strict.loads(bytes.fromhex("f93c00")) == 1.0
    assert cbor_strict.loads(bytes.fromhex("fa3fc00000")) == 1.5
    assert cbor_strict.loads(bytes.fromhex("1bffffffffffffffff")) == 2**64 - 1
    assert cbor_strict.loads(bytes.fromhex("3bffffffffffffffff")) == -2**64


def test_input_must_be_bytes():
    with pytest.raises(MalformedCBOR):
        cbor_strict.loads("a0")   # type: ignore[arg-type]


# -- properties -----------------------------------------------------------------------------------

keys = st.one_of(st.integers(min_value=-2**64, max_value=2**64 - 1), st.text(max_size=8))
scalars = st.one_of(st.integers(min_value=-2**64, max_value=2**64 - 1), st.binary(max_size=40), st.text(max_size=20),
                    st.booleans(), st.none(), st.floats(allow_nan=False))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                       st.dictionaries(keys, inner, max_size=5)), max_leaves=25)


@settings(max_examples=400, deadline=None)
@given(values)
def test_agrees_with_cbor2_on_well_formed_input(value):
    data = cbor2.dumps(value)
    assert cbor_strict.loads(data, max_size=1 << 20, max_depth=64) == value


@settings(max_examples=300, deadline=None)
@given(values, st.binary(min_size=1, max_size=4))
def test_trailing_bytes_are_always_refused(value, extra):
    with pytest.raises(TrailingBytes):
        cbor_strict.loads(cbor2.dumps(value) + extra, max_size=1 << 20, max_depth=64)


@settings(max_examples=300, deadline=None)
@given(values, st.data())
def test_every_truncation_is_refused(value, data):
    encoded = cbor2.dumps(value)
    cut = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1))
    with pytest.raises(MalformedCBOR):
        cbor_strict.loads(encoded[:cut], max_size=1 << 20, max_depth=64)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.integers(min_value=-1000, max_value=1000), scalars, min_size=1, max_size=6), st.data())
def test_a_repeated_key_is_always_refused(m, data):
    key = data.draw(st.sampled_from(sorted(m)))
    # a map with one more pair than it has distinct keys: the chosen key again, at the end
    body = b"".join(cbor2.dumps(k) + cbor2.dumps(v) for k, v in m.items()) + cbor2.dumps(key) + cbor2.dumps(0)
    n = len(m) + 1
    head = bytes([0xA0 | n]) if n < 24 else bytes([0xB8, n])
    with pytest.raises(DuplicateMapKey):
        cbor_strict.loads(head + body)


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=64))
def test_arbitrary_bytes_decode_or_raise_a_named_error(data):
    try:
        value = cbor_strict.loads(data)
    except MalformedCBOR:
        return
    # whatever we accept, cbor2 decodes to the same value
    assert cbor2.loads(data) == value or value != value


def test_two_byte_simple_values_below_32_are_not_well_formed():
    """RFC 8949 3.3: 0xf8 followed by a byte < 0x20 is not well-formed (found by hypothesis:
    f8 14 was decoded as false)."""
    for raw in (b"\xf8\x14", b"\xf8\x15", b"\xf8\x16", b"\xf8\x00"):
        with pytest.raises(MalformedCBOR):
            cbor_strict.loads(raw)
