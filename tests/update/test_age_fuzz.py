"""Property-based fuzzing of the age reader: arbitrary bytes, mutated valid files and generated headers (with a
correct MAC, to reach past it) never raise anything outside the update error family, and whatever is written
is a prefix of the authentic plaintext made of whole chunks. Bounded: a few hundred examples, no deadline."""

from __future__ import annotations

import io
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device.update import age, bech32
from device.update.errors import DecryptError, SizeError, UpdateError
from tests.update.test_age import IDENTITY, RECIPIENT, b64, build, stanza_text, x25519_stanza

CHUNK = age.CHUNK_SIZE
PLAIN = random.Random(3).randbytes(CHUNK + 40)
SEALED = age.encrypt_bytes(PLAIN, [RECIPIENT])
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def attempt(data: bytes, **kw) -> bytes:
    """Decrypts; returns what was written. Only the update family may be raised."""
    out = io.BytesIO()
    try:
        age.decrypt(io.BytesIO(data), out, [IDENTITY], **kw)
    except UpdateError as exc:
        assert type(exc) in (DecryptError, SizeError, age.NoMatchingIdentity), repr(exc)
        assert str(exc)  # a message naming the problem
    return out.getvalue()


def authentic_prefix(written: bytes) -> bool:
    """Whole authentic chunks of PLAIN, or all of it."""
    return PLAIN.startswith(written) and (len(written) % CHUNK == 0 or written == PLAIN)


@FUZZ
@given(st.binary(max_size=3000))
def test_arbitrary_bytes(data):
    assert attempt(data) == b""


@FUZZ
@given(st.binary(max_size=3000))
def test_arbitrary_bytes_after_the_version_line(data):
    assert attempt(b"age-encryption.org/v1\n" + data) == b""


_MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, len(SEALED) - 1), st.integers(1, 255)),
    st.tuples(st.just("insert"), st.integers(0, len(SEALED)), st.binary(min_size=1, max_size=20)),
    st.tuples(st.just("delete"), st.integers(0, len(SEALED) - 1), st.integers(1, 100)),
    st.tuples(st.just("truncate"), st.integers(0, len(SEALED) - 1), st.just(0)),
)


def mutate(data: bytes, ops) -> bytes:
    out = bytearray(data)
    for kind, at, arg in ops:
        at = min(at, len(out))
        if kind == "flip" and at < len(out):
            out[at] ^= arg
        elif kind == "insert":
            out[at:at] = arg
        elif kind == "delete":
            del out[at:at + arg]
        elif kind == "truncate":
            del out[at:]
    return bytes(out)


@FUZZ
@given(st.lists(_MUTATION, min_size=1, max_size=4))
def test_mutated_valid_files(ops):
    data = mutate(SEALED, ops)
    written = attempt(data)
    assert authentic_prefix(written)
    # Any change to an age file is detected: it never opens to the full plaintext.
    assert (written == PLAIN) == (data == SEALED)


@FUZZ
@given(st.lists(_MUTATION, min_size=1, max_size=3), st.integers(0, len(PLAIN) + 10))
def test_mutated_valid_files_with_a_size_cap(ops, cap):
    written = attempt(mutate(SEALED, ops), max_plaintext=cap)
    assert authentic_prefix(written) and len(written) <= cap


_ARG = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=12)
_LINE = st.one_of(
    st.builds(lambda args: "-> " + " ".join(args), st.lists(_ARG, min_size=1, max_size=4)),
    st.builds(lambda b: b64(b), st.binary(max_size=60)),
    st.sampled_from(["", "->", "-> ", "---", "A" * 64, "AA==", "\r", "-> X25519", "-> scrypt AAAA 10"]),
    st.text(max_size=80).filter(lambda t: "\n" not in t),
)


@FUZZ
@given(st.lists(_LINE, max_size=8), st.booleans(), st.booleans())
def test_generated_headers_with_a_valid_mac(lines, ours_first, ours_at_all):
    # Free-form lines around (or without) a real X25519 stanza, sealed with a correct MAC, so the parser
    # and the unwrap logic are exercised, not only the MAC check.
    ours = stanza_text(*x25519_stanza()) if ours_at_all else ""
    text = "\n".join(lines) + ("\n" if lines else "")
    data = build(text=(ours + text) if ours_first else (text + ours))
    written = attempt(data)
    assert written in (b"", b"age")


@FUZZ
@given(st.lists(st.tuples(st.lists(_ARG, min_size=1, max_size=3), st.binary(max_size=120)), max_size=5))
def test_well_formed_foreign_stanzas_are_skipped(stanzas):
    # Any stanza of another type, well formed, is "not for us"; our X25519 stanza among them still opens.
    stanzas = [(args, body) for args, body in stanzas if args[0] not in ("X25519", "scrypt")]
    assert attempt(build(stanzas + [x25519_stanza()] + stanzas)) == b"age"


@FUZZ
@given(st.text(max_size=120))
def test_key_parsers_raise_only_decrypt_error(text):
    for parse in (age.parse_recipient, age.parse_identity):
        try:
            parse(text)
        except DecryptError as exc:
            assert str(exc)
    try:
        bech32.decode(text)
    except ValueError:
        pass


@FUZZ
@given(st.binary(max_size=400))
def test_identity_file_parser_raises_only_decrypt_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("id") / "board.age"
    path.write_bytes(data)
    path.chmod(0o600)
    try:
        assert age.read_identity_file(str(path))
    except DecryptError as exc:
        assert str(path) in str(exc)
