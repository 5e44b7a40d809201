"""``fieldnode keys``: the operator's Ed25519 keys for signed commands (docs/signing.md), boards' age keys.

- ``generate NAME [--out DIR]`` writes ``NAME.key`` (PKCS8 PEM, mode 0600) and ``NAME.pub``
  (SubjectPublicKeyInfo PEM). It never overwrites a file, and prints the key id and how to install the
  public key on boards (``/etc/fieldnode/trust/``).
- ``generate NAME --kind recipient [--out DIR]`` makes a board's age X25519 identity: ``NAME.age`` (mode
  0600, ``age-keygen``'s identity file format, with a ``# public key: age1...`` line) that stays on the
  board, and prints its recipient (``age1...``), which the operator grants releases to (docs/updates.md).
- ``id FILE`` prints the key id of a public or private key file.
- ``sign --key KEY --device ID --cmd CMD [--args JSON] [--ttl S]`` prints a signed envelope as one JSON line,
  ready to publish to the board's command topic.

Exit codes: 0 ok, 2 usage or bad input (the message on stderr names the problem), 1 a file could not be
written.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import sys

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from device.link import envelope
from device.link.errors import EnvelopeError
from device.cliargs import positive_seconds, print_error
from device.errors import Exit, SystemCallFailed, UsageError
from device.update import age
from device.statefile import write_new

TRUST_DIR = envelope.DEFAULT_TRUST_DIR
DEFAULT_MAX_TTL_S = 600  # the boards' default limit (Verifier.max_ttl_s)
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")


class _BadInput(Exception):
    """Bad input from the operator: exit code 2."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds the ``generate``, ``id`` and ``sign`` actions to the ``keys`` parser.

    Args:
        p: The parser of the ``keys`` subcommand.
    """
    sub = p.add_subparsers(dest="keys_action", metavar="ACTION", required=True)
    g = sub.add_parser("generate", help="make a key pair: NAME.key (private) and NAME.pub (for the boards)",
                       description="Make an Ed25519 signing key pair (NAME.key, NAME.pub) or, with --kind "
                                   "recipient, a board's age identity (NAME.age) and print its recipient; "
                                   "never overwrites existing files.")
    g.add_argument("name", help="key name: 1-64 characters from A-Z, a-z, 0-9, '.', '_', '-'")
    g.add_argument("--kind", choices=("signing", "recipient"), default="signing",
                   help="signing: an Ed25519 pair for signed commands (default); recipient: a board's age "
                        "identity for encrypted updates")
    g.add_argument("--out", metavar="DIR", default=".", help="directory for the files (default: here)")
    i = sub.add_parser("id", help="print the key id of a .pub or .key file",
                       description="Print the key id (first 16 hex digits of SHA-256 of the raw public key).")
    i.add_argument("file", help="a PEM Ed25519 public or private key")
    s = sub.add_parser("sign", help="print a signed command envelope (JSON) for one board",
                       description="Print a signed command envelope as one JSON line.")
    s.add_argument("--key", required=True, metavar="KEY", help="the private key file (NAME.key)")
    s.add_argument("--device", required=True, metavar="ID", help="the target device id")
    s.add_argument("--cmd", required=True, metavar="CMD", help="the command name, e.g. variant")
    s.add_argument("--args", default="{}", metavar="JSON", help="the command's arguments, a JSON object "
                                                                "(default: {})")
    s.add_argument("--ttl", type=positive_seconds, default=60.0, metavar="S", help="seconds until it expires (default 60)")


def run(args: argparse.Namespace) -> int:
    """Runs one ``keys`` action; errors go to stderr as one line naming the file, argument or field.

    Args:
        args: The parsed arguments (``keys_action`` and the action's options).

    Returns:
        0 on success, 2 for bad input (name, file, JSON, key), 1 when a key file could not be written.
    """
    action = args.keys_action
    try:
        if action == "generate":
            if getattr(args, "kind", "signing") == "recipient":
                return _generate_recipient(args.name, args.out)
            return _generate(args.name, args.out)
        if action == "id":
            print(envelope.key_id(_load_any_key(args.file)))
            return Exit.OK
        return _sign(args)
    except _BadInput as exc:
        return print_error(f"keys {action}", UsageError(str(exc)))
    except EnvelopeError as exc:
        return print_error(f"keys {action}", exc, exit_code=Exit.USAGE)
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        return print_error(f"keys {action}", SystemCallFailed(f"cannot write{where}: {exc.strerror or exc}"))


def _check_name_and_dir(name: str, out: str, suffixes: tuple[str, ...]) -> None:
    if not _NAME_RE.match(name) or name.endswith(suffixes):
        raise _BadInput(f"key name {name!r}: expected 1-64 characters from A-Z, a-z, 0-9, '.', '_', '-' "
                        f"(not starting with '.' or '-', without {'/'.join(suffixes)})")
    if not os.path.isdir(out):
        try:
            os.makedirs(out, mode=0o700)
        except OSError as exc:
            raise _BadInput(f"output directory {out}: cannot create it ({exc.strerror or exc})") from exc


def _generate(name: str, out: str) -> int:
    _check_name_and_dir(name, out, (".key", ".pub"))
    key_path, pub_path = os.path.join(out, f"{name}.key"), os.path.join(out, f"{name}.pub")
    existing = [p for p in (key_path, pub_path) if os.path.lexists(p)]
    if existing:
        raise _BadInput(f"refusing to overwrite {' and '.join(existing)}; choose another name or --out")
    private = ed25519.Ed25519PrivateKey.generate()
    key_pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    pub_pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        write_new(key_path, key_pem, 0o600)
        try:
            write_new(pub_path, pub_pem, 0o644)
        except BaseException:
            # Leave nothing half-made: a .key without its .pub would block the next attempt for no reason.
            with contextlib.suppress(OSError):
                os.unlink(key_path)
            raise
    except FileExistsError as exc:  # created by someone else since the check above
        raise _BadInput(f"refusing to overwrite {exc.filename}; choose another name or --out") from exc
    print(f"key id: {envelope.key_id(private)}")
    print(f"private key: {key_path} (mode 0600; keep it off the boards)")
    print(f"public key: {pub_path}")
    print(f"install on each board: sudo install -m 0644 {pub_path} {TRUST_DIR}/")
    return Exit.OK


def _generate_recipient(name: str, out: str) -> int:
    """A board's age identity in ``NAME.age`` (0600, as ``age-keygen`` writes it); prints the recipient."""
    _check_name_and_dir(name, out, (".key", ".pub", ".age"))
    path = os.path.join(out, f"{name}.age")
    if os.path.lexists(path):
        raise _BadInput(f"refusing to overwrite {path}; choose another name or --out")
    identity, recipient = age.generate_identity()
    created = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    text = age.identity_file_text(identity, recipient, created)
    try:
        write_new(path, text.encode("ascii"), 0o600)
    except FileExistsError as exc:  # created by someone else since the check above
        raise _BadInput(f"refusing to overwrite {exc.filename}; choose another name or --out") from exc
    print(f"recipient: {recipient}")
    print(f"identity: {path} (mode 0600; install it on the board only, keep no other copy)")
    print(f"grant a release to it: fieldnode repo grant REPO --device ID --recipient {recipient}")
    return Exit.OK


def _sign(args: argparse.Namespace) -> int:
    private = envelope.load_private_key(args.key)
    try:
        cmd_args = json.loads(args.args)
    except ValueError as exc:
        raise _BadInput(f"--args: not valid JSON ({exc})") from exc
    if not isinstance(cmd_args, dict):
        raise _BadInput(f"--args: expected a JSON object like '{{\"variant\": \"lite\"}}', got "
                        f"{type(cmd_args).__name__}")
    if args.ttl > DEFAULT_MAX_TTL_S:
        print(f"fieldnode keys sign: warning: --ttl {args.ttl:g} is above the boards' default limit of "
              f"{DEFAULT_MAX_TTL_S} s; boards with that limit refuse it (expiry_too_far)", file=sys.stderr)
    env = envelope.sign_envelope(private, device=args.device, cmd=args.cmd, args=cmd_args, ttl_s=args.ttl)
    print(json.dumps(env, sort_keys=True, separators=(",", ":")))
    return Exit.OK


def _load_any_key(path: str):
    """The key in ``path``: a private key when the PEM says so, else a public key."""
    try:
        with open(path, "rb") as fh:
            is_private = b"PRIVATE KEY-----" in fh.read(64 * 1024)
    except OSError:
        is_private = False  # let the loader report the read error with its usual wording
    return envelope.load_private_key(path) if is_private else envelope.load_public_key(path)




