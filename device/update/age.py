"""The age v1 file format (c2sp.org/age) on ``cryptography``: X25519 recipients, streaming, bounded memory.

The board reads age files (a release's ciphertext, its own release-key file) and the operator's tools write
them; the standard ``age``/``rage`` tools read and write the same files. Only X25519 recipients are
implemented: scrypt (passphrase) files and other recipient types are "not for us".

Decryption streams: the header is read (at most :data:`MAX_HEADER_BYTES`, :data:`MAX_STANZAS` stanzas),
one identity unwraps the file key, the header MAC is checked, then the payload is read one 64 KiB chunk
at a time, and a chunk is handed to ``on_chunk`` and written only after its tag is verified. Memory stays
O(chunk) whatever the file's size. A stream that ends without its final chunk (truncation), with data after
it, or with an empty final chunk after others is refused, and the chunk that reveals it (an authentic final
chunk followed by data, an authentic non-final chunk at the end) is not written either.

Errors: every malformed, tampered, truncated or foreign input raises :class:`~device.update.errors.DecryptError`
(``decrypt_failed``) with a message naming what is wrong, and nothing else escapes whatever the input bytes
(:class:`NoMatchingIdentity`, a subclass, says the file is well formed but for someone else). ``max_plaintext``
raises :class:`~device.update.errors.SizeError` (``size_exceeded``). I/O errors of ``src`` and ``dst`` (a full disk)
propagate as ``OSError`` for the caller to map, as do exceptions raised by ``on_chunk``/``chunk_hook``.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import logging
import os
import re
import stat
from typing import BinaryIO, Callable, Sequence, Union

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from device.update import bech32
from device.update.errors import DecryptError, SizeError

log = logging.getLogger(__name__)

VERSION_LINE = b"age-encryption.org/v1\n"
CHUNK_SIZE = 64 * 1024
TAG_SIZE = 16
ENC_CHUNK_SIZE = CHUNK_SIZE + TAG_SIZE
NONCE_SIZE = 16
FILE_KEY_SIZE = 16
#: Bounds on a header we agree to parse. A release or key file has one or two stanzas; ``age`` writes about
#: 100 bytes per X25519 recipient, so these still admit several hundred recipients while keeping the header
#: buffer the size of one chunk and the X25519 work (one exchange per stanza per identity) small.
MAX_HEADER_BYTES = 64 * 1024
MAX_STANZAS = 1000
#: An identity file holds a few keys; anything larger is not one.
MAX_IDENTITY_FILE_BYTES = 64 * 1024

RECIPIENT_HRP = "age"
IDENTITY_HRP = "AGE-SECRET-KEY-"
_X25519_LABEL = b"age-encryption.org/v1/X25519"
_ZERO_NONCE = bytes(12)
_B64_RE = re.compile(rb"[A-Za-z0-9+/]*\Z")
_COLUMNS = 64
_ARMOR_BEGIN = b"-----BEGIN AGE ENCRYPTED FILE-----"

RecipientLike = Union[str, X25519PublicKey]
IdentityLike = Union[str, X25519PrivateKey]


class NoMatchingIdentity(DecryptError):
    """A well-formed age file that none of the given identities can open (encrypted for someone else)."""


def _raw_public(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _short(text: str) -> str:
    """A key for an error message: enough to recognise it, never a whole secret."""
    return repr(text[:12] + "...") if len(text) > 12 else repr(text)


def generate_identity() -> tuple[str, str]:
    """Makes a new X25519 identity.

    Returns:
        ``(identity, recipient)``: ``AGE-SECRET-KEY-1...`` (secret, keep it on the board) and ``age1...``.
    """
    key = X25519PrivateKey.generate()
    secret = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                               serialization.NoEncryption())
    return bech32.encode(IDENTITY_HRP, secret), bech32.encode(RECIPIENT_HRP, _raw_public(key.public_key()))


def identity_file_text(identity: str, recipient: str, created: str) -> str:
    """An identity file as ``age-keygen`` writes it: ``# created``, ``# public key: age1...``, the identity."""
    return f"# created: {created}\n# public key: {recipient}\n{identity}\n"


def recipient_of(identity: str) -> str:
    """The ``age1...`` recipient of an ``AGE-SECRET-KEY-1...`` identity.

    Raises:
        DecryptError: the identity is malformed.
    """
    return bech32.encode(RECIPIENT_HRP, _raw_public(parse_identity(identity).public_key()))


def _decode_key(text: str, what: str, hrp: str, example: str) -> bytes:
    if not isinstance(text, str):
        raise DecryptError(f"{what}: expected an {example!r} string, got {type(text).__name__}")
    text = text.strip()
    try:
        got, data = bech32.decode(text)
    except ValueError as exc:
        raise DecryptError(f"{what} {_short(text)}: not a valid age {what} ({exc})") from exc
    if got != hrp:
        raise DecryptError(f"{what} {_short(text)}: type {got!r} is not supported, expected an X25519 {what} "
                           f"{example!r}")
    if len(data) != 32:
        raise DecryptError(f"{what} {_short(text)}: {len(data)} bytes of key, expected 32")
    return data


def parse_recipient(text: str) -> X25519PublicKey:
    """Parses an ``age1...`` X25519 recipient.

    Raises:
        DecryptError: not a string, not Bech32, another type (such as ``age1pq1...``), a wrong length.
    """
    return X25519PublicKey.from_public_bytes(_decode_key(text, "recipient", RECIPIENT_HRP, "age1..."))


def parse_identity(text: str) -> X25519PrivateKey:
    """Parses an ``AGE-SECRET-KEY-1...`` X25519 identity (uppercase, as ``age-keygen`` writes it).

    Raises:
        DecryptError: not Bech32, lowercase or another type (such as ``AGE-SECRET-KEY-PQ-1...``), a wrong
            length. The message never repeats the secret beyond its prefix.
    """
    return X25519PrivateKey.from_private_bytes(_decode_key(text, "identity", IDENTITY_HRP, "AGE-SECRET-KEY-1..."))


def read_identity_file(path: str) -> list[str]:
    """Reads an age identity file (``age-keygen``'s format): one identity per line, ``#`` comments, blanks.

    A file that group or others can read is refused, as the operator's key files are: whoever could read it can
    open every release granted to the board.

    Args:
        path: the identity file.

    Returns:
        The identities, in file order (each checked with :func:`parse_identity`).

    Raises:
        DecryptError: the file cannot be read, is over 64 KiB, is readable by group or others, is not UTF-8, has
            a malformed line (its number is named) or holds no identity.
    """
    try:
        with open(path, "rb") as fh:
            mode = os.fstat(fh.fileno()).st_mode
            raw = fh.read(MAX_IDENTITY_FILE_BYTES + 1)
    except OSError as exc:
        raise DecryptError(f"identity file {path}: cannot read it ({exc.strerror or exc})") from exc
    if len(raw) > MAX_IDENTITY_FILE_BYTES:
        raise DecryptError(f"identity file {path}: larger than {MAX_IDENTITY_FILE_BYTES} bytes, not an "
                           f"identity file")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):  # as operator keys are: a secret others can read may have leaked
        raise DecryptError(f"identity file {path}: mode {stat.S_IMODE(mode):04o} lets others read it; an identity "
                           f"file must be 0600 (chmod 600 it if it never left your control, else re-key the board: "
                           f"fieldnode keys generate --kind recipient)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecryptError(f"identity file {path}: not UTF-8 text") from exc
    identities = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            parse_identity(line)
        except DecryptError as exc:
            # Never echo the line: it may be a secret with a typo.
            raise DecryptError(f"identity file {path}, line {number}: {exc}") from None
        identities.append(line)
    if not identities:
        raise DecryptError(f"identity file {path}: no identity in it (expected a line 'AGE-SECRET-KEY-1...')")
    return identities


def _identity_keys(identities: Sequence[IdentityLike]) -> list[X25519PrivateKey]:
    if isinstance(identities, (str, bytes)):
        identities = [identities]  # one identity passed bare: never iterate its characters
    keys = [i if isinstance(i, X25519PrivateKey) else parse_identity(i) for i in identities]
    if not keys:
        raise DecryptError("no identity given to decrypt with")
    return keys


def _recipient_keys(recipients: Sequence[RecipientLike]) -> list[X25519PublicKey]:
    if isinstance(recipients, (str, bytes)):
        recipients = [recipients]
    keys = [r if isinstance(r, X25519PublicKey) else parse_recipient(r) for r in recipients]
    if not keys:
        raise DecryptError("no recipient given to encrypt to")
    return keys


def _hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(ikm)


def _b64encode(data: bytes) -> bytes:
    return base64.b64encode(data).rstrip(b"=")


def _b64decode(text: bytes, what: str) -> bytes:
    """Strict unpadded base64: the age spec requires refusing padding and non-canonical encodings."""
    if not _B64_RE.match(text) or len(text) % 4 == 1:
        raise DecryptError(f"{what}: not unpadded base64")
    try:
        data = base64.b64decode(text + b"=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DecryptError(f"{what}: not unpadded base64") from exc
    if _b64encode(data) != text:
        # Unused low bits set: a second spelling of the same bytes, which would make the header malleable.
        raise DecryptError(f"{what}: not canonical base64")
    return data


def _stream_nonce(counter: int, last: bool) -> bytes:
    return counter.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def _read_full(src: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes, fewer only at end of file (a pipe or socket may return short reads)."""
    data = src.read(n) or b""
    while 0 < len(data) < n:
        more = src.read(n - len(data))
        if not more:
            break
        data += more
    return data


def _x25519_stanza(recipient: X25519PublicKey, file_key: bytes) -> bytes:
    ephemeral = X25519PrivateKey.generate()
    share = _raw_public(ephemeral.public_key())
    try:
        shared = ephemeral.exchange(recipient)
    except ValueError as exc:  # an all-zero shared secret: the recipient is a low-order point
        raise DecryptError("recipient is a low-order point, not a usable X25519 key") from exc
    wrap_key = _hkdf(shared, share + _raw_public(recipient), _X25519_LABEL)
    body = _b64encode(ChaCha20Poly1305(wrap_key).encrypt(_ZERO_NONCE, file_key, None))
    lines = [body[i:i + _COLUMNS] for i in range(0, len(body), _COLUMNS)]
    if not lines or len(lines[-1]) == _COLUMNS:
        lines.append(b"")  # a body always ends with a line shorter than 64 columns
    return b"-> X25519 " + _b64encode(share) + b"\n" + b"".join(line + b"\n" for line in lines)


def _header(recipients: Sequence[X25519PublicKey], file_key: bytes) -> bytes:
    head = VERSION_LINE + b"".join(_x25519_stanza(r, file_key) for r in recipients) + b"---"
    mac = hmac.new(_hkdf(file_key, b"", b"header"), head, "sha256").digest()
    return head + b" " + _b64encode(mac) + b"\n"


def encrypt(src: BinaryIO, dst: BinaryIO, recipients: Sequence[RecipientLike], *,
            chunk_hook: Callable[[bytes], None] | None = None) -> int:
    """Encrypts ``src`` to ``dst`` in the age v1 format, streaming one 64 KiB chunk at a time.

    Args:
        src: the plaintext, read to its end.
        dst: where the age file is written.
        recipients: ``age1...`` strings (or X25519 public keys); each can decrypt the file.
        chunk_hook: called with each plaintext chunk before it is encrypted (to hash it on the way).

    Returns:
        The number of plaintext bytes.

    Raises:
        DecryptError: no recipient, or a malformed one (nothing is written then).
    """
    keys = _recipient_keys(recipients)
    file_key = os.urandom(FILE_KEY_SIZE)
    header = _header(keys, file_key)
    nonce = os.urandom(NONCE_SIZE)
    aead = ChaCha20Poly1305(_hkdf(file_key, nonce, b"payload"))
    dst.write(header)
    dst.write(nonce)
    total = counter = 0
    chunk = _read_full(src, CHUNK_SIZE)
    while True:
        # A full chunk is the last one only if nothing follows it; look one chunk ahead to know.
        following = _read_full(src, CHUNK_SIZE) if len(chunk) == CHUNK_SIZE else b""
        last = not following
        if chunk_hook is not None:
            chunk_hook(chunk)
        dst.write(aead.encrypt(_stream_nonce(counter, last), chunk, None))
        total += len(chunk)
        if last:
            return total
        chunk = following
        counter += 1


def encrypt_bytes(data: bytes, recipients: Sequence[RecipientLike]) -> bytes:
    """Encrypts ``data`` in memory (for small files such as a board's release-key file).

    Raises:
        DecryptError: no recipient, or a malformed one.
    """
    out = io.BytesIO()
    encrypt(io.BytesIO(data), out, recipients)
    return out.getvalue()


class _Stanza:
    __slots__ = ("args", "body", "line")

    def __init__(self, args: list[str], body: bytes, line: int):
        self.args, self.body, self.line = args, body, line


def _not_age(buf: bytes) -> DecryptError:
    if buf.startswith(_ARMOR_BEGIN):
        return DecryptError("ASCII-armored age file: not supported here, decrypt it with 'age -d' or "
                            "encrypt without '-a'")
    if buf.startswith(b"age-encryption.org/"):
        version = buf[len(b"age-encryption.org/"):].split(b"\n", 1)[0][:32]
        return DecryptError(f"unsupported age version {version.decode('ascii', 'replace')!r}, expected "
                            f"'v1' (a line 'age-encryption.org/v1')")
    return DecryptError("not an age file: it does not start with 'age-encryption.org/v1'")


def _parse_header(buf: bytes) -> tuple[list[_Stanza], int, bytes]:
    """Parses the header at the start of ``buf``.

    Returns:
        ``(stanzas, mac_offset, mac)``: the MAC covers ``buf[:mac_offset]`` (up to and including ``---``);
        the payload starts after the MAC line.
    """
    if not buf.startswith(VERSION_LINE):
        if len(buf) < len(VERSION_LINE) and VERSION_LINE.startswith(buf):
            raise DecryptError(f"truncated age header: {len(buf)} bytes")
        raise _not_age(buf)
    limit = min(len(buf), MAX_HEADER_BYTES)
    pos = len(VERSION_LINE)
    number = 1
    stanzas: list[_Stanza] = []
    current: _Stanza | None = None
    while True:
        end = buf.find(b"\n", pos, limit)
        if end < 0:
            if len(buf) > MAX_HEADER_BYTES:
                raise DecryptError(f"age header longer than {MAX_HEADER_BYTES} bytes (or not terminated)")
            raise DecryptError(f"truncated age header: it ends at line {number + 1} without its '---' MAC "
                               f"line")
        start, line, pos = pos, buf[pos:end], end + 1
        number += 1
        where = f"age header line {number}"
        if current is not None:
            # Inside a stanza body: full 64-column lines continue it, a shorter one ends it.
            if line.startswith((b"->", b"---")):
                raise DecryptError(f"{where}: stanza ended without a final line shorter than 64 columns")
            if len(line) > _COLUMNS:
                raise DecryptError(f"{where}: stanza body line longer than 64 columns")
            current.body += _b64decode(line, f"{where}: stanza body")
            if len(line) < _COLUMNS:
                stanzas.append(current)
                current = None
            continue
        if line.startswith(b"---"):
            if not stanzas:
                raise DecryptError(f"{where}: the header has no recipient stanza")
            if line[3:4] != b" " or len(line) != 4 + 43:
                raise DecryptError(f"{where}: malformed MAC line, expected '--- ' and 43 base64 characters")
            mac = _b64decode(line[4:], f"{where}: header MAC")
            return stanzas, start + 3, mac
        if not line.startswith(b"-> "):
            raise DecryptError(f"{where}: expected a recipient stanza ('-> ...') or the MAC line ('--- ...')")
        args = line[3:].split(b" ")
        if any(not a or any(c < 33 or c > 126 for c in a) for a in args):
            raise DecryptError(f"{where}: malformed stanza arguments (empty, or a character outside "
                               f"printable ASCII)")
        if len(stanzas) >= MAX_STANZAS:
            raise DecryptError(f"age header has more than {MAX_STANZAS} recipient stanzas")
        current = _Stanza([a.decode("ascii") for a in args], b"", number)


def _check_stanzas(stanzas: list[_Stanza]) -> list[tuple[bytes, bytes]]:
    """The (share, body) of each X25519 stanza, checked as the spec requires; other types are skipped."""
    if any(s.args[0] == "scrypt" for s in stanzas):
        if len(stanzas) > 1:
            raise DecryptError("age header mixes a passphrase (scrypt) stanza with other stanzas, which the "
                               "format forbids")
        raise NoMatchingIdentity("passphrase-encrypted age file (scrypt): this reader opens files encrypted "
                                 "to X25519 recipients (age1...) only")
    found = []
    for s in stanzas:
        if s.args[0] != "X25519":
            continue  # another recipient type, or a grease stanza: not for us, and the spec says ignore it
        where = f"age header line {s.line}: X25519 stanza"
        if len(s.args) != 2:
            raise DecryptError(f"{where}: {len(s.args) - 1} arguments, expected 1")
        share = _b64decode(s.args[1].encode("ascii"), f"{where}: ephemeral share")
        if len(share) != 32:
            raise DecryptError(f"{where}: ephemeral share of {len(share)} bytes, expected 32")
        # Checked before any decryption, as the spec requires, against partitioning oracles.
        if len(s.body) != FILE_KEY_SIZE + TAG_SIZE:
            raise DecryptError(f"{where}: wrapped file key of {len(s.body)} bytes, expected 32")
        found.append((share, s.body))
    return found


def _unwrap(stanzas: list[_Stanza], keys: list[X25519PrivateKey]) -> bytes:
    x25519 = _check_stanzas(stanzas)
    for key in keys:
        ours = _raw_public(key.public_key())
        for share, body in x25519:
            try:
                shared = key.exchange(X25519PublicKey.from_public_bytes(share))
            except ValueError as exc:
                raise DecryptError("age header: an X25519 stanza's ephemeral share is a low-order point "
                                   "(all-zero shared secret)") from exc
            wrap_key = _hkdf(shared, share + ours, _X25519_LABEL)
            try:
                return ChaCha20Poly1305(wrap_key).decrypt(_ZERO_NONCE, body, None)
            except InvalidTag:
                continue  # addressed to another recipient
    types = sorted({s.args[0] for s in stanzas})
    raise NoMatchingIdentity(
        f"no identity matches: the file is for {len(x25519)} X25519 recipient(s)"
        + (f" (stanza types: {', '.join(types)})" if types != ["X25519"] else "")
        + f" and none is the {len(keys)} identity(ies) given")


def decrypt(src: BinaryIO, dst: BinaryIO, identities: Sequence[IdentityLike], *,
            max_plaintext: int | None = None, on_chunk: Callable[[bytes], None] | None = None) -> int:
    """Decrypts an age v1 file from ``src`` into ``dst``, streaming, in O(64 KiB) memory.

    Each chunk is authenticated before it is passed to ``on_chunk`` and written, so ``dst`` only ever holds
    a prefix of the authentic plaintext; on an error, the caller discards it.

    Args:
        src: the age file (binary, not armored).
        dst: where the plaintext goes.
        identities: ``AGE-SECRET-KEY-1...`` strings (or X25519 private keys), tried in order.
        max_plaintext: refuse a file whose plaintext is longer (checked before each chunk is written).
        on_chunk: called with each authenticated plaintext chunk before it is written.

    Returns:
        The plaintext length.

    Raises:
        NoMatchingIdentity: a well-formed file none of ``identities`` opens (a :class:`DecryptError`).
        DecryptError: a malformed identity, a malformed, tampered, truncated or extended file.
        SizeError: the plaintext is longer than ``max_plaintext``.
    """
    keys = _identity_keys(identities)
    buf = _read_full(src, MAX_HEADER_BYTES + 1)
    if not buf:
        raise DecryptError("empty file, not an age file")
    stanzas, mac_offset, mac = _parse_header(buf)
    file_key = _unwrap(stanzas, keys)
    expected = hmac.new(_hkdf(file_key, b"", b"header"), buf[:mac_offset], "sha256").digest()
    if not hmac.compare_digest(expected, mac):
        raise DecryptError("age header MAC mismatch: the header was modified")
    rest = buf[buf.index(b"\n", mac_offset) + 1:]
    del buf
    if len(rest) < NONCE_SIZE:
        rest += _read_full(src, NONCE_SIZE - len(rest))
        if len(rest) < NONCE_SIZE:
            raise DecryptError(f"truncated age file: the payload nonce has {len(rest)} of {NONCE_SIZE} bytes")
    aead = ChaCha20Poly1305(_hkdf(file_key, rest[:NONCE_SIZE], b"payload"))
    return _decrypt_stream(aead, rest[NONCE_SIZE:], src, dst, max_plaintext, on_chunk)


def _decrypt_stream(aead: ChaCha20Poly1305, pending: bytes, src: BinaryIO, dst: BinaryIO,
                    max_plaintext: int | None, on_chunk: Callable[[bytes], None] | None) -> int:
    """The STREAM payload; ``pending`` holds bytes already read past the nonce (less than 64 KiB)."""
    total = counter = 0
    while True:
        # Read one encrypted chunk plus one byte, to know whether a full chunk is the last one.
        chunk = pending + _read_full(src, max(0, ENC_CHUNK_SIZE + 1 - len(pending)))
        chunk, pending = chunk[:ENC_CHUNK_SIZE], chunk[ENC_CHUNK_SIZE:]
        where = f"age payload chunk {counter} (plaintext offset {total})"
        if not chunk:  # only possible right after the nonce: a full chunk at the end is tried as final
            raise DecryptError("truncated age file: the payload has no chunk after its nonce")
        if len(chunk) < TAG_SIZE:
            raise DecryptError(f"{where}: {len(chunk)} bytes, shorter than a tag (truncated)")
        if max_plaintext is not None and total + len(chunk) - TAG_SIZE > max_plaintext:
            raise SizeError(f"age plaintext longer than the allowed {max_plaintext} bytes")
        last = not pending
        plain = _open_chunk(aead, counter, chunk, last)
        if plain is None:
            # Not authentic under the flag its position implies; the other flag names the attack.
            if _open_chunk(aead, counter, chunk, not last) is None:
                raise DecryptError(f"{where}: authentication failed (tampered, or cut short inside the chunk)")
            if last:
                raise DecryptError(f"truncated age file: it ends after chunk {counter} without a final chunk")
            raise DecryptError(f"{where} is the final chunk but data follows it (appended bytes)")
        if last and not plain and counter > 0:
            raise DecryptError(f"{where}: empty final chunk after others, which the format forbids")
        if on_chunk is not None:
            on_chunk(plain)
        dst.write(plain)
        total += len(plain)
        if last:
            return total
        counter += 1


def _open_chunk(aead: ChaCha20Poly1305, counter: int, chunk: bytes, last: bool) -> bytes | None:
    try:
        return aead.decrypt(_stream_nonce(counter, last), chunk, None)
    except InvalidTag:
        return None


def decrypt_bytes(data: bytes, identities: Sequence[IdentityLike], *, max_plaintext: int | None = None) -> bytes:
    """Decrypts an age file held in memory (for small files such as a board's release-key file).

    Raises:
        NoMatchingIdentity, DecryptError, SizeError: as :func:`decrypt`.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecryptError(f"age file: expected bytes, got {type(data).__name__}")
    out = io.BytesIO()
    decrypt(io.BytesIO(bytes(data)), out, identities, max_plaintext=max_plaintext)
    return out.getvalue()
