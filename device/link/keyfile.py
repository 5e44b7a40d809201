"""Operator key files: load PEM Ed25519 keys with errors that say what a wrong file is, and key ids.

Split from :mod:`device.link.envelope` (which re-exports these names): reading a key file is about files
and formats; the envelope module is about what is signed and verified.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from device.link.errors import KeyFileError

_PEM_LABEL_RE = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")
_MAX_KEY_FILE = 64 * 1024  # a PEM Ed25519 key is ~120 bytes; this only stops reading a huge wrong file


def key_id(public_key: ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey) -> str:
    """The key id: the first 16 hex digits of SHA-256 over the raw 32-byte public key.

    Args:
        public_key: An Ed25519 public key (a private key stands for its public half).

    Returns:
        16 lowercase hex digits.
    """
    if isinstance(public_key, ed25519.Ed25519PrivateKey):
        public_key = public_key.public_key()
    return hashlib.sha256(public_key.public_bytes(serialization.Encoding.Raw,
                                                  serialization.PublicFormat.Raw)).hexdigest()[:16]


def load_private_key(path: str) -> ed25519.Ed25519PrivateKey:
    """Loads an unencrypted PEM (PKCS8) Ed25519 private key.

    Args:
        path: The key file (``NAME.key`` from ``fieldnode keys generate``).

    Returns:
        The private key.

    Raises:
        KeyFileError: Unreadable, not PEM, encrypted or another kind of key; names the file and what was found.
    """
    return parse_key(read_key_file(path), path, private=True)


def load_public_key(path: str) -> ed25519.Ed25519PublicKey:
    """Loads a PEM (SubjectPublicKeyInfo) Ed25519 public key.

    Args:
        path: The key file (``NAME.pub``).

    Returns:
        The public key.

    Raises:
        KeyFileError: Unreadable, not PEM, a private key or another kind of key; names the file and what was found.
    """
    return parse_key(read_key_file(path), path, private=False)


def read_key_file(path: str, *, trusted: bool = False) -> bytes:
    # O_NONBLOCK: a FIFO named like a key must not hang the agent; it fails the regular-file check instead.
    try:
        with open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NONBLOCK)) as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise KeyFileError(f"key file {path}: not a regular file")
            if trusted and st.st_mode & stat.S_IWOTH:
                raise KeyFileError(f"key file {path}: writable by every user (mode {stat.S_IMODE(st.st_mode):04o}),"
                                   f" so anyone on the board could replace it (chmod o-w)")
            data = fh.read(_MAX_KEY_FILE + 1)
    except OSError as exc:
        raise KeyFileError(f"key file {path}: cannot read it ({_short(exc)})") from exc
    if len(data) > _MAX_KEY_FILE:
        raise KeyFileError(f"key file {path}: larger than {_MAX_KEY_FILE} bytes, not a PEM key")
    return data


def parse_key(data: bytes, path: str, *, private: bool):
    want = "PRIVATE KEY" if private else "PUBLIC KEY"
    m = _PEM_LABEL_RE.search(data)
    if m is None:
        hint = "; OpenSSH key lines are not accepted" if data.lstrip().startswith(b"ssh-") else ""
        raise KeyFileError(f"key file {path}: not a PEM key (no '-----BEGIN' line){hint}")
    label = m.group(1).decode("ascii")
    if label != want:
        if private and label == "ENCRYPTED PRIVATE KEY":
            raise KeyFileError(f"key file {path}: an encrypted private key; an unencrypted PKCS8 key is needed")
        if not private and "PRIVATE KEY" in label:
            raise KeyFileError(f"key file {path}: a private key ({label}), expected an Ed25519 public key; "
                               f"never install private keys on boards")
        raise KeyFileError(f"key file {path}: a PEM '{label}' block, expected an Ed25519 key in a '{want}' block")
    try:
        key = serialization.load_pem_private_key(data, None) if private else serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:  # TypeError: it wants a password
        raise KeyFileError(f"key file {path}: malformed '{label}' PEM data ({_short(exc)})") from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey if private else ed25519.Ed25519PublicKey):
        # "an RSA key", "an EC (secp256r1) key", "an Ed448 key"... from the class name.
        kind = re.sub(r"(Public|Private)Key$", "", type(key).__name__).replace("EllipticCurve", "EC")
        if isinstance(key, (ec.EllipticCurvePublicKey, ec.EllipticCurvePrivateKey)):
            kind += f" ({key.curve.name})"
        article = "an" if kind[:1] in tuple("AEFHILMNORSX") else "a"
        raise KeyFileError(f"key file {path}: {article} {kind} key, expected Ed25519")
    return key


def _short(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).split(". See https://", 1)[0]  # cryptography appends an FAQ link
    return text if len(text) <= 120 else text[:117] + "..."
