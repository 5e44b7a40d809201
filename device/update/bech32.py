"""Bech32 (BIP 173) as the age format uses it: no length limit, one case per string, checksum over lowercase.

age encodes X25519 recipients as ``age1...`` (lowercase) and identities as ``AGE-SECRET-KEY-1...``
(uppercase). Errors are :class:`ValueError` with a message naming the problem; :mod:`device.update.age`
turns them into ``DecryptError`` for its callers.
"""

from __future__ import annotations

CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_VALUES = {c: i for i, c in enumerate(CHARSET)}
_GENERATORS = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)
_CHECKSUM_LEN = 6


def _polymod(values: list[int]) -> int:
    chk = 1
    for v in values:
        top = chk >> 25
        chk = (chk & 0x1FFFFFF) << 5 ^ v
        for i, g in enumerate(_GENERATORS):
            if (top >> i) & 1:
                chk ^= g
    return chk


def _hrp_expand(hrp: str) -> list[int]:
    return [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]


def _convert_bits(data: list[int] | bytes, from_bits: int, to_bits: int, pad: bool) -> list[int]:
    acc = bits = 0
    out = []
    maxv = (1 << to_bits) - 1
    for value in data:
        acc = (acc << from_bits) | value
        bits += from_bits
        while bits >= to_bits:
            bits -= to_bits
            out.append((acc >> bits) & maxv)
    if pad:
        if bits:
            out.append((acc << (to_bits - bits)) & maxv)
    elif bits >= from_bits or (acc << (to_bits - bits)) & maxv:
        # Leftover bits must be fewer than one input group and all zero: anything else is a second
        # spelling of the same bytes.
        raise ValueError("non-zero or excess padding bits in the data part")
    return out


def encode(hrp: str, data: bytes) -> str:
    """Encodes ``data`` under the human-readable part ``hrp``, in the case ``hrp`` is written in.

    Args:
        hrp: the human-readable part, all lowercase or all uppercase (``age``, ``AGE-SECRET-KEY-``).
        data: the payload bytes.

    Returns:
        The Bech32 string, uppercase when ``hrp`` is uppercase.
    """
    lower = hrp.lower()
    values = _convert_bits(data, 8, 5, True)
    polymod = _polymod(_hrp_expand(lower) + values + [0] * _CHECKSUM_LEN) ^ 1
    checksum = [(polymod >> 5 * (5 - i)) & 31 for i in range(_CHECKSUM_LEN)]
    text = lower + "1" + "".join(CHARSET[v] for v in values + checksum)
    return text.upper() if hrp.isupper() else text


def decode(text: str) -> tuple[str, bytes]:
    """Decodes a Bech32 string.

    Args:
        text: the string; it must be all lowercase or all uppercase.

    Returns:
        ``(hrp, data)``, the human-readable part as written (its case kept) and the payload bytes.

    Raises:
        ValueError: mixed case, no separator, a character outside the alphabet, a bad checksum, bad padding.
    """
    if text.lower() != text and text.upper() != text:
        raise ValueError("mixed upper and lower case")
    pos = text.rfind("1")
    if pos < 1 or pos + 1 + _CHECKSUM_LEN > len(text):
        raise ValueError("no '1' separator before a 6-character checksum")
    hrp = text[:pos]
    if any(not 33 <= ord(c) <= 126 for c in hrp):
        raise ValueError("a character outside printable ASCII before the '1' separator")
    values = []
    for c in text[pos + 1:].lower():
        if c not in _VALUES:
            raise ValueError(f"character {c!r} is not in the Bech32 alphabet")
        values.append(_VALUES[c])
    if _polymod(_hrp_expand(hrp.lower()) + values) != 1:
        raise ValueError("bad checksum (a typo or a truncated key)")
    return hrp, bytes(_convert_bits(values[:-_CHECKSUM_LEN], 5, 8, False))
