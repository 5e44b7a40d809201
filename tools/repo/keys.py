"""Key files of the operator's update repository (``fieldnode repo``): TUF signing keys and release identities.

A TUF signing key is an Ed25519 private key in a PKCS#8 PEM file (what securesystemslib's ``CryptoSigner``
writes and reads), mode 0600, in a directory of mode 0700. Its name, ``<role>-<keyid prefix>.pem``, is only for
people: which role a key serves is decided by the root metadata, and a key is matched to its role by its key id
(computed from the public key), so renaming or moving a file never changes what it can sign.

A key replaced by ``fieldnode repo rotate`` is moved to ``retired/`` beside it, not deleted: it still signs the
transition (the new root, and for the publish that makes it live the snapshot and timestamp, for a board whose
refresh is under way during that publish: it walked the roots just before, and checks the new timestamp against
the old root). Delete ``retired/`` once the fleet has moved on.

No key is ever created implicitly or shipped with the project: every key comes from ``generate_signer``.
"""

from __future__ import annotations

import os
import stat

from device.statefile import fsync_dir, write_new
from device.update.errors import RepositoryError

RETIRED = "retired"


def generate_signer(directory: str, role: str):
    """Makes a new Ed25519 signing key for ``role`` and writes it to ``directory`` (0600, never overwriting).

    Args:
        directory: Where the key file goes; created 0700 when missing.
        role: The role name, used in the file name only.

    Returns:
        The ``CryptoSigner`` (its ``public_key`` goes into the root metadata).

    Raises:
        RepositoryError: The directory or the file cannot be written.
    """
    from securesystemslib.signer import CryptoSigner

    signer = CryptoSigner.generate_ed25519()
    path = os.path.join(directory, f"{role}-{signer.public_key.keyid[:12]}.pem")
    write_secret(path, signer.private_bytes)
    return signer


def write_secret(path: str, data: bytes) -> None:
    """Writes a new secret file (mode 0600) durably, in a 0700 directory, and never replaces an existing one.

    Temp file in the same directory, fsync, then a hard link to the final name (which fails when the name
    exists; on filesystems without hard links a check, then a rename), then the directory fsynced.

    Raises:
        RepositoryError: The file exists already, or cannot be written.
    """
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
        write_new(path, data, 0o600)
    except FileExistsError as exc:
        raise RepositoryError(f"{path}: exists already; refusing to overwrite a key file") from exc
    except OSError as exc:
        raise RepositoryError(f"{path}: cannot write the key file ({exc.strerror or exc})") from exc


def read_secret(path: str, what: str) -> bytes:
    """Reads a secret file, refusing one that others can read (a key that may already have leaked).

    Args:
        path: The file.
        what: What it is, for the message (``"signing key"``, ``"release identity"``).

    Raises:
        RepositoryError: Missing, unreadable, or readable by group or others.
    """
    try:
        with open(path, "rb") as fh:
            mode = os.fstat(fh.fileno()).st_mode
            data = fh.read(1 << 20)
    except FileNotFoundError as exc:
        raise RepositoryError(f"{what} {path}: no such file") from exc
    except OSError as exc:
        raise RepositoryError(f"{what} {path}: cannot read it ({exc.strerror or exc})") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise RepositoryError(f"{what} {path}: mode {stat.S_IMODE(mode):04o} lets others read it; a secret file "
                              f"must be 0600 (chmod 600 it if it never left your control, else rotate the key)")
    return data


def load_signers(*directories: str, problems: list | None = None) -> dict:
    """Loads every ``*.pem`` signing key in ``directories`` and their ``retired/`` subdirectories.

    Args:
        directories: Key directories; a missing one is skipped (the caller reports which keys it lacked).
        problems: When given, a bad key file is skipped and its error message appended here instead of raised
            (for ``status``, which reports rather than refuses).

    Returns:
        ``{keyid: CryptoSigner}``.

    Raises:
        RepositoryError: A ``.pem`` file that is not an Ed25519 private key, or is readable by others.
    """
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from securesystemslib.signer import CryptoSigner, SSlibKey

    signers = {}
    for top in directories:
        for directory in (top, os.path.join(top, RETIRED)):
            for path in _pem_files(directory):
                try:
                    pem = read_secret(path, "signing key")
                    try:
                        private = load_pem_private_key(pem, None)
                    except (ValueError, TypeError) as exc:
                        raise RepositoryError(f"signing key {path}: not an unencrypted PEM private key "
                                              f"({exc})") from exc
                    if not isinstance(private, ed25519.Ed25519PrivateKey):
                        raise RepositoryError(f"signing key {path}: not an Ed25519 key")
                except RepositoryError as exc:
                    if problems is None:
                        raise
                    problems.append(str(exc))
                    continue
                public = SSlibKey.from_crypto(private.public_key(), scheme="ed25519")
                signers.setdefault(public.keyid, CryptoSigner(private, public))
    return signers


def _pem_files(directory: str) -> list[str]:
    """The ``.pem`` files of a key directory, by name; none when it does not exist.

    Raises:
        RepositoryError: The directory cannot be listed.
    """
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise RepositoryError(f"key directory {directory}: cannot list it ({exc.strerror or exc})") from exc
    return [os.path.join(directory, n) for n in names if n.endswith(".pem") and os.path.isfile(os.path.join(directory, n))]


def retire(directory: str, keyids) -> list:
    """Moves the key files of ``keyids`` found in ``directory`` to ``directory/retired/``.

    Returns:
        The new paths.

    Raises:
        RepositoryError: A file cannot be moved.
    """
    moved = []
    wanted = set(keyids)
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from securesystemslib.signer import SSlibKey

    for path in _pem_files(directory):
        name = os.path.basename(path)
        private = load_pem_private_key(read_secret(path, "signing key"), None)
        if SSlibKey.from_crypto(private.public_key(), scheme="ed25519").keyid not in wanted:
            continue
        target = os.path.join(directory, RETIRED, name)
        try:
            os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
            os.replace(path, target)
        except OSError as exc:
            raise RepositoryError(f"signing key {path}: cannot move it to {RETIRED}/ ({exc.strerror or exc})") from exc
        moved.append(target)
    if moved:
        fsync_dir(directory)
        fsync_dir(os.path.join(directory, RETIRED))
    return moved
