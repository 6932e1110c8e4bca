"""Strict CBOR decoding for untrusted input (threat 12).

cbor2 is a fine general decoder but it is lenient where evidence must not be: it keeps the last
of two equal map keys, ignores bytes after the first item, and accepts indefinite lengths and
any tag. This module decodes one item itself, in one pass, with these rules:

- the input is refused before decoding if it is longer than `max_size` bytes;
- arrays, maps and tags may nest at most `max_depth` deep;
- map keys must be integers or text strings, each at most once per map;
- exactly one item: trailing bytes are an error;
- no indefinite lengths (no "indefinite-length bombs"), no reserved additional information;
- only the tags listed in `tags` (none by default), decoded as `cbor2.CBORTag`;
- simple values: false, true, null only; floats (half, single, double) are decoded;
- text strings must be valid UTF-8.

Each violation is a named error from `attestation.errors`. The decoder is written for small
documents (a few hundred bytes); it never allocates more than the input size for strings, since
every length is checked against the bytes actually present before slicing.
"""

from __future__ import annotations

import struct
from typing import Any

from cbor2 import CBORTag

from .errors import (DuplicateMapKey, EvidenceTooLarge, IndefiniteLength, MalformedCBOR, NestingTooDeep,
                     TrailingBytes, UnsupportedCBOR)

DEFAULT_MAX_SIZE = 4096
DEFAULT_MAX_DEPTH = 16

_SIMPLE = {20: False, 21: True, 22: None}
_NO_TAGS: frozenset[int] = frozenset()


def loads(data: bytes, *, max_size: int = DEFAULT_MAX_SIZE, max_depth: int = DEFAULT_MAX_DEPTH,
          tags: frozenset[int] = _NO_TAGS) -> Any:
    """Decode exactly one CBOR item from `data` under the rules above."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MalformedCBOR(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    n = len(data)
    if n > max_size:
        raise EvidenceTooLarge(f"{n} bytes exceeds the limit of {max_size}")
    if n == 0:
        raise MalformedCBOR("empty input")
    unpack_from = struct.unpack_from

    def head(i: int) -> tuple[int, int, int, int]:
        """(major type, additional info, argument, next offset) of the head at i."""
        if i >= n:
            raise MalformedCBOR(f"truncated at byte {i}")
        ib = data[i]
        major, ai = ib >> 5, ib & 0x1F
        i += 1
        if ai < 24:
            return major, ai, ai, i
        if ai == 24:
            if i + 1 > n:
                raise MalformedCBOR(f"truncated at byte {i}")
            return major, ai, data[i], i + 1
        if ai == 25:
            if i + 2 > n:
                raise MalformedCBOR(f"truncated at byte {i}")
            return major, ai, unpack_from(">H", data, i)[0], i + 2
        if ai == 26:
            if i + 4 > n:
                raise MalformedCBOR(f"truncated at byte {i}")
            return major, ai, unpack_from(">I", data, i)[0], i + 4
        if ai == 27:
            if i + 8 > n:
                raise MalformedCBOR(f"truncated at byte {i}")
            return major, ai, unpack_from(">Q", data, i)[0], i + 8
        if ai == 31:
            if major in (2, 3, 4, 5):
                raise IndefiniteLength(f"indefinite-length item at byte {i - 1}")
            if major == 7:
                raise MalformedCBOR(f"unexpected break at byte {i - 1}")
        raise MalformedCBOR(f"reserved additional information {ai} at byte {i - 1}")

    def item(i: int, depth: int) -> tuple[Any, int]:
        if i < n and data[i] & 0x1F < 24:      # fast path: argument in the initial byte
            ib = data[i]
            major, ai, arg, i = ib >> 5, ib & 0x1F, ib & 0x1F, i + 1
        else:
            major, ai, arg, i = head(i)
        if major == 0:
            return arg, i
        if major == 1:
            return -1 - arg, i
        if major == 2 or major == 3:
            end = i + arg
            if end > n:
                raise MalformedCBOR(f"truncated string at byte {i}: {arg} bytes announced, {n - i} present")
            if major == 2:
                return data[i:end], end
            try:
                return data[i:end].decode("utf-8"), end
            except UnicodeDecodeError:
                raise MalformedCBOR(f"invalid UTF-8 in text string at byte {i}") from None
        if major == 7:
            if ai == 24 and arg < 32:
                # RFC 8949 3.3: a two-byte simple value below 32 is not well-formed
                raise MalformedCBOR(f"two-byte simple value {arg} at byte {i - 2}")
            if ai < 24 or ai == 24:
                if arg in _SIMPLE:
                    return _SIMPLE[arg], i
                raise UnsupportedCBOR(f"simple value {arg} at byte {i - 1}")
            if ai == 25:
                return struct.unpack(">e", data[i - 2:i])[0], i
            if ai == 26:
                return struct.unpack(">f", data[i - 4:i])[0], i
            return struct.unpack(">d", data[i - 8:i])[0], i
        if depth >= max_depth:
            raise NestingTooDeep(f"nesting deeper than {max_depth} at byte {i}")
        if major == 4:
            if arg > n - i:      # every element takes at least one byte
                raise MalformedCBOR(f"truncated array at byte {i}: {arg} items announced")
            out = []
            append = out.append
            for _ in range(arg):
                v, i = item(i, depth + 1)
                append(v)
            return out, i
        if major == 5:
            if 2 * arg > n - i:
                raise MalformedCBOR(f"truncated map at byte {i}: {arg} pairs announced")
            m: dict = {}
            for _ in range(arg):
                at = i
                kb = data[i] if i < n else -1
                # inline fast path for the usual keys (CBOR ints -24..23 and 256..65535): one
                # function call less per map entry, ~4 % of an evidence verification
                if 0 <= kb < 0x18:
                    k, i = kb, i + 1
                elif 0x20 <= kb < 0x38:
                    k, i = 0x1F - kb, i + 1
                elif kb == 0x19 and i + 3 <= n:
                    k, i = (data[i + 1] << 8) | data[i + 2], i + 3
                else:
                    kmajor = kb >> 5 if kb >= 0 else -1
                    if kmajor not in (0, 1, 3):
                        if kmajor == -1:
                            raise MalformedCBOR(f"truncated at byte {i}")
                        raise UnsupportedCBOR(f"map key at byte {at} is not an integer or text string")
                    k, i = item(i, depth + 1)
                if k in m:
                    raise DuplicateMapKey(f"duplicate map key {k!r} at byte {at}")
                m[k], i = item(i, depth + 1)
            return m, i
        # major 6: tag
        if arg not in tags:
            raise UnsupportedCBOR(f"tag {arg} at byte {i - 1} is not allowed here")
        v, i = item(i, depth + 1)
        return CBORTag(arg, v), i

    try:
        value, end = item(0, 0)
    except RecursionError:      # max_depth above the interpreter's limit
        raise NestingTooDeep("nesting too deep") from None
    if end != n:
        raise TrailingBytes(f"{n - end} byte(s) after the end of the item at byte {end}")
    return value
