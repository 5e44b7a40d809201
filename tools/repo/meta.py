"""The TUF metadata of the operator's update repository: layout, staging, signing, publishing, key rotation.

A repository directory holds what boards fetch and what only the operator may read::

    DIR/metadata/   published TUF metadata: N.root.json (every version), root.json (the newest),
                    N.targets.json, N.snapshot.json (consistent snapshots) and timestamp.json
    DIR/targets/    published target files, named <sha256>.<name> as consistent snapshots require
    DIR/grants/     published per-board release-key files (outside the TUF metadata, see repo_release)
    DIR/staged/     signed metadata not yet published (add-model, rotate), made live by publish
    DIR/keys/       never published: offline/ (root, targets), online/ (snapshot, timestamp), releases/

Every change is staged first and goes live with ``publish``, which writes the new files in the order a
refreshing board reads them backwards (targets, root, snapshot, then timestamp.json last, the commit point), so
a board that refreshes during a publish sees the old repository or the new one. Each file is written
atomically (temp file, fsync, ``os.replace``, directory fsync).

The board trusts nothing it did not verify through the root chain, so this module never needs to be trusted by
a board; what it must get right is what it signs, and that it never signs with a key the operator did not make.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re

from device.statefile import write_atomic
from device.update.errors import RepositoryError
from tools.repo import keys as repo_keys

ROLES = ("root", "targets", "snapshot", "timestamp")
OFFLINE_ROLES = ("root", "targets")
ONLINE_ROLES = ("snapshot", "timestamp")
# Days until each role expires unless told otherwise. The timestamp bounds how long a stale view can be replayed
# to an online board (a freeze); the others only need re-signing that often (offline keys: rarely).
DEFAULT_DAYS = {"root": 365.0, "targets": 180.0, "snapshot": 30.0, "timestamp": 7.0}
MAX_KEYS = 16
_ROOT_FILE = re.compile(r"([1-9][0-9]{0,9})\.root\.json\Z")

OFFLINE_NOTE = """\
THESE ARE OFFLINE KEYS. MOVE THEM OFF THIS MACHINE.

The root and targets keys in this directory decide which models every board will install. Whoever holds a
threshold of them can push any model to the whole fleet, and rotate you out. Keep them on an encrypted stick
or an air-gapped machine (one holder per key when a role has several), and pass --keys DIR to the commands
that need them (add-model, rotate, publish --resign). Never copy this directory to a server.

retired/ holds keys replaced by `fieldnode repo rotate`; delete it once boards run the new root.
"""


def utcnow() -> datetime.datetime:
    """The current UTC time to the second (TUF expiry dates carry no fractions)."""
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)


def expiry(now: datetime.datetime, days: float) -> datetime.datetime:
    """``now`` plus ``days``, to the second."""
    return (now + datetime.timedelta(days=days)).replace(microsecond=0)


def write_md(path: str, md) -> str:
    """Writes metadata ``md`` to ``path`` atomically, mode 0644 (metadata is public); returns ``path``."""
    try:
        write_atomic(path, md.to_bytes(), mode=0o644)
    except OSError as exc:
        raise RepositoryError(f"{path}: cannot write it ({exc.strerror or exc})") from exc
    return path


def _tuf_error_types() -> tuple:
    from tuf.api import exceptions
    from tuf.api.serialization import DeserializationError

    return (exceptions.RepositoryError, DeserializationError, ValueError, KeyError, TypeError)


class Repository:
    """One repository directory: reads its published and staged metadata and writes new files atomically.

    Args:
        path: The repository directory (made by :func:`init`).
        keys: The offline key directory (default ``DIR/keys/offline``).
        online_keys: The online key directory (default ``DIR/keys/online``).

    Raises:
        RepositoryError: ``path`` is not a repository.
    """

    def __init__(self, path: str, *, keys: str | None = None, online_keys: str | None = None):
        self.path = path
        self.metadata_dir = os.path.join(path, "metadata")
        self.targets_dir = os.path.join(path, "targets")
        self.grants_dir = os.path.join(path, "grants")
        self.staged_dir = os.path.join(path, "staged")
        self.releases_dir = os.path.join(path, "keys", "releases")
        self.offline_keys = keys or os.path.join(path, "keys", "offline")
        self.online_keys = online_keys or os.path.join(path, "keys", "online")
        if not os.path.isdir(path):
            raise RepositoryError(f"{path}: no such repository directory (make one with fieldnode repo init {path})")
        if not os.path.isfile(os.path.join(self.metadata_dir, "1.root.json")):
            raise RepositoryError(f"{path}: not a fieldnode repository (no metadata/1.root.json; make one with "
                                  f"fieldnode repo init DIR)")
        self._cache: dict = {}

    # -- reading --------------------------------------------------------------------------------------------
    def read(self, path: str, role: str):
        """Loads one metadata file of ``role``; a file that cannot be parsed is a RepositoryError naming it."""
        from tuf.api.metadata import Metadata

        try:
            with open(path, "rb") as fh:
                md = Metadata.from_bytes(fh.read())
        except FileNotFoundError as exc:
            raise RepositoryError(f"{path}: missing (the repository is incomplete)") from exc
        except OSError as exc:
            raise RepositoryError(f"{path}: cannot read it ({exc.strerror or exc})") from exc
        except _tuf_error_types() as exc:
            raise RepositoryError(f"{path}: not valid TUF metadata ({exc})") from exc
        if md.signed.type != role:
            raise RepositoryError(f"{path}: holds {md.signed.type} metadata, expected {role}")
        return md

    def root_versions(self) -> list:
        """The published root versions, ascending."""
        return sorted(int(m.group(1)) for m in map(_ROOT_FILE.match, os.listdir(self.metadata_dir)) if m)

    def published(self, role: str):
        """The published metadata of ``role`` (the newest root; the rest through timestamp → snapshot)."""
        if role not in self._cache:
            if role == "root":
                path = os.path.join(self.metadata_dir, f"{self.root_versions()[-1]}.root.json")
            elif role == "timestamp":
                path = os.path.join(self.metadata_dir, "timestamp.json")
            elif role == "snapshot":
                path = os.path.join(self.metadata_dir, f"{self.published('timestamp').signed.snapshot_meta.version}"
                                                       f".snapshot.json")
            else:
                meta = self.published("snapshot").signed.meta.get("targets.json")
                if meta is None:
                    raise RepositoryError(f"{self.metadata_dir}: the snapshot lists no targets.json")
                path = os.path.join(self.metadata_dir, f"{meta.version}.targets.json")
            self._cache[role] = self.read(path, role)
        return self._cache[role]

    def staged(self, role: str):
        """The staged (signed, unpublished) metadata of ``role``, or None."""
        path = os.path.join(self.staged_dir, f"{role}.json")
        return self.read(path, role) if os.path.isfile(path) else None

    def current(self, role: str):
        """What ``role`` will be after the next publish: the staged copy, else the published one."""
        return self.staged(role) or self.published(role)

    def staged_roles(self) -> list:
        """Roles with staged changes, in publish order."""
        return [r for r in ROLES if os.path.isfile(os.path.join(self.staged_dir, f"{r}.json"))]

    # -- writing --------------------------------------------------------------------------------------------
    def write_metadata(self, name: str, md, directory: str | None = None) -> str:
        """Writes ``md`` as ``directory/name`` atomically (0644: metadata is public)."""
        path = write_md(os.path.join(directory or self.metadata_dir, name), md)
        self._cache.clear()
        return path

    def stage(self, md) -> str:
        """Writes ``md`` as the staged copy of its role."""
        return self.write_metadata(f"{md.signed.type}.json", md, self.staged_dir)

    def unstage(self, role: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.staged_dir, f"{role}.json"))

    @contextlib.contextmanager
    def lock(self):
        """Holds ``DIR/.lock`` so two commands never change the repository at once."""
        import fcntl

        fd = os.open(os.path.join(self.path, ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                raise RepositoryError(f"{self.path}: another fieldnode repo command is changing this repository "
                                      f"(it holds .lock); try again when it has finished") from exc
            self._cache.clear()
            yield self
        finally:
            os.close(fd)

    # -- signing --------------------------------------------------------------------------------------------
    def sign(self, md, role: str, signers: dict, required: list, also: list = (), where: str = "") -> None:
        """Replaces ``md``'s signatures with those of every available key that a root in ``required`` or
        ``also`` trusts for ``role``, then checks each root in ``required`` would accept it.

        Args:
            md: The metadata to sign.
            role: The role whose keys sign it.
            signers: ``{keyid: signer}`` available.
            required: Root payloads (``Root``) whose threshold must be met.
            also: Roots whose keys sign too when present (the previous root during a rotation).
            where: Where the keys were looked for, for the message.

        Raises:
            RepositoryError: A required threshold is not met; names the role, the count and the missing keys.
        """
        md.signatures.clear()
        for root in list(required) + list(also):
            for keyid in root.roles[role].keyids:
                if keyid in signers and keyid not in md.signatures:
                    md.sign(signers[keyid], append=True)
        for root in required:
            result = root.get_verification_result(role, md.signed_bytes, md.signatures)
            if not result:
                missing = ", ".join(k[:12] for k in root.roles[role].keyids if k not in md.signatures)
                raise RepositoryError(
                    f"{role}: signed by {len(result.signed)} of the {result.threshold} keys root version "
                    f"{root.version} requires; missing key ids {missing} (looked in {where or 'no directory'})")


def check_count(role: str, n: int, k: int) -> None:
    if not 1 <= n <= MAX_KEYS:
        raise RepositoryError(f"{role}: {n} keys; expected 1 to {MAX_KEYS}")
    if not 1 <= k <= n:
        raise RepositoryError(f"{role}: threshold {k} with {n} keys; expected 1 to {n}")


def init(path: str, *, counts: dict | None = None, days: dict | None = None, keys: str | None = None,
         online_keys: str | None = None, now: datetime.datetime | None = None) -> dict:
    """Makes a new repository: fresh keys for the four roles and version 1 of their metadata, published.

    Args:
        path: A directory that does not exist or is empty.
        counts: ``{role: (keys, threshold)}``; every role defaults to one key, threshold 1.
        days: ``{role: days}`` until expiry, over :data:`DEFAULT_DAYS`.
        keys: Where the offline keys go (default ``DIR/keys/offline``).
        online_keys: Where the online keys go (default ``DIR/keys/online``).
        now: The signing time (a clock seam for tests).

    Returns:
        A summary: ``{"path", "roles": {role: {"keyids", "threshold", "expires"}}, "offline_keys", "online_keys"}``.

    Raises:
        RepositoryError: ``path`` is not empty, a count is out of range, a file cannot be written.
    """
    from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, Targets, Timestamp

    counts = {r: (1, 1) for r in ROLES} | dict(counts or {})
    days = DEFAULT_DAYS | dict(days or {})
    now = now or utcnow()
    for role, (n, k) in counts.items():
        check_count(role, n, k)
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise RepositoryError(f"{path}: exists and is not an empty directory; init makes a new repository")
    try:
        os.makedirs(path, exist_ok=True)
        for sub in ("metadata", "targets", "grants"):
            os.makedirs(os.path.join(path, sub), exist_ok=True)
        os.makedirs(os.path.join(path, "keys"), mode=0o700, exist_ok=True)
    except OSError as exc:
        raise RepositoryError(f"{path}: cannot create the repository ({exc.strerror or exc})") from exc
    offline = keys or os.path.join(path, "keys", "offline")
    online = online_keys or os.path.join(path, "keys", "online")
    repo_keys.write_secret(os.path.join(offline, "README-OFFLINE-KEYS.txt"), OFFLINE_NOTE.encode())
    root = Root(expires=expiry(now, days["root"]), consistent_snapshot=True)
    signers: dict = {}
    for role in ROLES:
        n, k = counts[role]
        for _ in range(n):
            signer = repo_keys.generate_signer(offline if role in OFFLINE_ROLES else online, role)
            root.add_key(signer.public_key, role)
            signers[signer.public_key.keyid] = signer
        root.roles[role].threshold = k
    mds = {"root": Metadata(root),
           "targets": Metadata(Targets(expires=expiry(now, days["targets"]))),
           "snapshot": Metadata(Snapshot(expires=expiry(now, days["snapshot"]), meta={"targets.json": MetaFile(1)})),
           "timestamp": Metadata(Timestamp(expires=expiry(now, days["timestamp"]), snapshot_meta=MetaFile(1)))}
    for role, md in mds.items():
        for keyid in root.roles[role].keyids:
            md.sign(signers[keyid], append=True)
    # 1.root.json last: it is what makes the directory a repository (Repository refuses one without it).
    for name, md in (("1.targets.json", mds["targets"]), ("1.snapshot.json", mds["snapshot"]),
                     ("timestamp.json", mds["timestamp"]), ("root.json", mds["root"]), ("1.root.json", mds["root"])):
        write_md(os.path.join(path, "metadata", name), md)
    return {"path": path, "offline_keys": offline, "online_keys": online,
            "roles": {r: {"keyids": list(root.roles[r].keyids), "threshold": root.roles[r].threshold,
                          "expires": mds[r].signed.expires.isoformat()} for r in ROLES}}
