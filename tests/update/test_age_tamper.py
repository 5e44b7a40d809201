"""The age reader under attack, through real files: flipped bits in every part of a file, truncation at many
offsets, appended bytes, the wrong identity, a size cap. Each case raises ``DecryptError`` (or ``SizeError``)
and the destination file holds only whole authenticated chunks: exactly those before the damage."""

from __future__ import annotations

import io
import os
import random

import pyrage
import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from device.update import age
from device.update.errors import DecryptError, SizeError, UpdateError
from tests.update.test_age import FILE_KEY, IDENTITY, RECIPIENT, build, hkdf

CHUNK = age.CHUNK_SIZE
ENC = age.ENC_CHUNK_SIZE
PLAIN = random.Random(10).randbytes(2 * CHUNK + 100)  # three chunks, the last one short
SEALED = age.encrypt_bytes(PLAIN, [RECIPIENT])
HEADER_END = SEALED.index(b"\n---") + 49
PAYLOAD = HEADER_END + 16  # the first chunk, after the 16-byte nonce


def open_file(tmp_path, data: bytes, identities=(IDENTITY,), **kw):
    """Decrypts ``data`` from a real file into a real file: ``(error or None, bytes written, chunks seen)``."""
    src, dst = tmp_path / "in.age", tmp_path / "out"
    src.write_bytes(data)
    seen = []
    error = None
    with open(src, "rb") as s, open(dst, "wb") as d:
        try:
            n = age.decrypt(s, d, list(identities), on_chunk=seen.append, **kw)
            assert n == len(PLAIN)
        except UpdateError as exc:
            error = exc
    written = dst.read_bytes()
    assert written == b"".join(seen)  # every byte written went through on_chunk first
    return error, written, seen


def chunks_before(offset: int) -> bytes:
    """The plaintext of the chunks entirely before ``offset`` of the payload."""
    return PLAIN[:max(0, (offset - PAYLOAD) // ENC) * CHUNK]


def flip(data: bytes, index: int, bit: int = 1) -> bytes:
    out = bytearray(data)
    out[index] ^= bit
    return bytes(out)


def test_the_file_under_test_is_sound(tmp_path):
    error, written, seen = open_file(tmp_path, SEALED)
    assert error is None and written == PLAIN and [len(c) for c in seen] == [CHUNK, CHUNK, 100]
    assert len(SEALED) == PAYLOAD + 2 * ENC + 116


SPOTS = {
    "version line": 3,
    "stanza type": SEALED.index(b"X25519") + 1,
    "ephemeral share": SEALED.index(b"X25519") + 10,
    "wrapped file key": SEALED.index(b"\n", SEALED.index(b"X25519")) + 5,
    "the --- mark": HEADER_END - 47,
    "MAC": HEADER_END - 10,
    "MAC line end": HEADER_END - 1,
    "nonce, first byte": HEADER_END,
    "nonce, last byte": PAYLOAD - 1,
    "chunk 0, first byte": PAYLOAD,
    "chunk 0, tag": PAYLOAD + ENC - 1,
    "chunk 1, middle": PAYLOAD + ENC + CHUNK // 2,
    "chunk 1, tag": PAYLOAD + 2 * ENC - 16,
    "chunk 2, first byte": PAYLOAD + 2 * ENC,
    "chunk 2, last byte": len(SEALED) - 1,
}


@pytest.mark.parametrize("spot", sorted(SPOTS))
@pytest.mark.parametrize("bit", [0x01, 0x80])
def test_a_flipped_bit_anywhere_is_refused(tmp_path, spot, bit):
    at = SPOTS[spot]
    error, written, _ = open_file(tmp_path, flip(SEALED, at, bit))
    assert isinstance(error, DecryptError), spot
    assert written == chunks_before(at)


def test_a_flipped_chunk_2_leaves_exactly_chunks_0_and_1(tmp_path):
    error, written, _ = open_file(tmp_path, flip(SEALED, PAYLOAD + 2 * ENC + 50))
    assert "age payload chunk 2 (plaintext offset 131072): authentication failed" in str(error)
    assert written == PLAIN[:2 * CHUNK]


def test_a_bad_mac_writes_nothing(tmp_path):
    error, written, seen = open_file(tmp_path, flip(SEALED, HEADER_END - 10))
    assert "MAC" in str(error) and written == b"" and seen == []


def _truncation_points():
    rng = random.Random(7)
    points = set(range(0, PAYLOAD + 20))  # every offset in the header, the nonce and the first chunk's start
    for k in range(3):
        for d in (-17, -16, -1, 0, 1, 16, 17):
            points.add(PAYLOAD + k * ENC + d)
    points.update(rng.randrange(PAYLOAD, len(SEALED)) for _ in range(60))
    return sorted(p for p in points if 0 <= p < len(SEALED))


def test_truncated_at_many_offsets(tmp_path):
    points = _truncation_points()
    assert len(points) > 250
    for cut in points:
        error, written, _ = open_file(tmp_path, SEALED[:cut])
        assert isinstance(error, DecryptError), cut
        # A chunk cut at its end is only known to be cut when the next chunk is missing: one chunk fewer.
        whole = (cut - PAYLOAD) // ENC if (cut - PAYLOAD) % ENC else (cut - PAYLOAD) // ENC - 1
        assert written == PLAIN[:max(0, whole) * CHUNK], cut


def test_truncated_at_a_chunk_boundary_is_named(tmp_path):
    error, written, _ = open_file(tmp_path, SEALED[:PAYLOAD + 2 * ENC])
    assert "truncated age file: it ends after chunk 1 without a final chunk" in str(error)
    assert written == PLAIN[:CHUNK]


@pytest.mark.parametrize("extra", [b"\x00", os.urandom(15), os.urandom(16), os.urandom(ENC), SEALED[-116:]])
def test_appended_bytes_are_refused(tmp_path, extra):
    error, written, _ = open_file(tmp_path, SEALED + extra)
    assert isinstance(error, DecryptError)
    assert written == PLAIN[:2 * CHUNK]  # the short last chunk no longer authenticates


def test_appended_bytes_after_a_full_final_chunk_are_named(tmp_path):
    plain = PLAIN[:2 * CHUNK]
    for extra in (b"\x00", age.encrypt_bytes(b"more", [RECIPIENT])):
        error, written, _ = open_file(tmp_path, age.encrypt_bytes(plain, [RECIPIENT]) + extra)
        assert "chunk 1 (plaintext offset 65536) is the final chunk but data follows it" in str(error)
        assert written == plain[:CHUNK]


def test_wrong_identity(tmp_path):
    error, written, _ = open_file(tmp_path, SEALED, identities=[age.generate_identity()[0]])
    assert isinstance(error, age.NoMatchingIdentity) and written == b""


def test_a_file_for_another_board(tmp_path):
    other_identity, other_recipient = age.generate_identity()
    error, written, _ = open_file(tmp_path, age.encrypt_bytes(b"release key", [other_recipient]))
    assert isinstance(error, age.NoMatchingIdentity) and error.code == "decrypt_failed" and written == b""


def test_scrypt_only_file(tmp_path):
    error, written, _ = open_file(tmp_path, pyrage.passphrase.encrypt(PLAIN[:10], "hunter2"))
    assert "passphrase-encrypted" in str(error) and written == b""


@pytest.mark.parametrize("garbage", [os.urandom(200), b"\x00" * 5000, b"age-encryption.org/v1\n" + os.urandom(3000),
                                     b"\n" * 100, "age-encryption.org/v1\n-> X25519 \u00e9\n\n--- x\n".encode()])
def test_garbage(tmp_path, garbage):
    error, written, _ = open_file(tmp_path, garbage)
    assert isinstance(error, DecryptError) and written == b""


def test_max_plaintext_stops_before_the_chunk_that_exceeds_it(tmp_path):
    error, written, _ = open_file(tmp_path, SEALED, max_plaintext=CHUNK + 5)
    assert isinstance(error, SizeError) and error.code == "size_exceeded"
    assert f"longer than the allowed {CHUNK + 5} bytes" in str(error)
    assert written == PLAIN[:CHUNK]


def test_max_plaintext_equal_to_the_size_passes(tmp_path):
    error, written, _ = open_file(tmp_path, SEALED, max_plaintext=len(PLAIN))
    assert error is None and written == PLAIN
    error, written, _ = open_file(tmp_path, SEALED, max_plaintext=len(PLAIN) - 1)
    assert isinstance(error, SizeError) and written == PLAIN[:2 * CHUNK]


class Endless(io.RawIOBase):
    """A source that never ends (a hostile server), counting what the reader takes from it."""

    def __init__(self, head: bytes, filler: bytes):
        self.head, self.filler, self.taken = head, filler, 0

    def readable(self):
        return True

    def read(self, n=-1):
        start = max(0, self.taken - len(self.head)) % len(self.filler)  # where the filler left off
        out = (self.head[self.taken:] + self.filler[start:] + self.filler * (n // len(self.filler) + 1))[:n]
        self.taken += len(out)
        return out


def test_an_endless_header_is_cut_at_the_bound():
    src = Endless(b"age-encryption.org/v1\n-> grease\n", b"A" * 64 + b"\n")
    with pytest.raises(DecryptError, match="age header longer than 65536 bytes"):
        age.decrypt(src, io.BytesIO(), [IDENTITY])
    assert src.taken == age.MAX_HEADER_BYTES + 1


def test_an_endless_copy_of_one_chunk_fails_at_the_second():
    plain = b"\x05" * CHUNK
    sealed = age.encrypt_bytes(plain * 3, [RECIPIENT])
    src = Endless(sealed[:PAYLOAD], sealed[PAYLOAD:PAYLOAD + ENC])  # valid as chunk 0 only
    out = io.BytesIO()
    with pytest.raises(DecryptError, match="chunk 1"):
        age.decrypt(src, out, [IDENTITY])
    assert out.getvalue() == plain and src.taken <= PAYLOAD + 2 * ENC + 1


class EndlessValid(io.RawIOBase):
    """An endless stream of authentic non-final chunks: what someone holding the file key could serve."""

    def __init__(self):
        nonce = b"\x09" * 16
        self.buf = build(body=b"") + nonce
        self.aead = ChaCha20Poly1305(hkdf(FILE_KEY, nonce, b"payload"))
        self.counter = self.taken = 0

    def readable(self):
        return True

    def read(self, n=-1):
        while len(self.buf) < n:
            self.buf += self.aead.encrypt(self.counter.to_bytes(11, "big") + b"\x00", b"\x06" * CHUNK, None)
            self.counter += 1
        out, self.buf = self.buf[:n], self.buf[n:]
        self.taken += len(out)
        return out


def test_an_endless_authentic_stream_is_cut_by_max_plaintext():
    src, out = EndlessValid(), io.BytesIO()
    with pytest.raises(SizeError, match="longer than the allowed"):
        age.decrypt(src, out, [IDENTITY], max_plaintext=5 * CHUNK)
    assert out.getvalue() == b"\x06" * 5 * CHUNK
    assert src.counter <= 7  # read one chunk (and a byte) past the cap, never more
